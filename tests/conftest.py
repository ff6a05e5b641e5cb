"""Tiny random-weight models of every supported family, built from configs: fast, no download."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Batch-1 decoding of tiny models gains nothing from threads, and a second thread spinning on a busy
# machine slows every small op by orders of magnitude.
torch.set_num_threads(1)

VOCAB = 97


def _llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=None,
               eos_token_id=None, tie_word_embeddings=False)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg))


def _smollm():  # SmolLM: Llama architecture, tied embeddings, GQA
    return _llama(tie_word_embeddings=True, num_key_value_heads=1)


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                        intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=128,
                                        bos_token_id=None, eos_token_id=None, tie_word_embeddings=True))


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM
    return MistralForCausalLM(MistralConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=96, vocab_size=VOCAB,
                                            max_position_embeddings=128, sliding_window=8, bos_token_id=None,
                                            eos_token_id=None))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=4, n_head=4, vocab_size=VOCAB, n_positions=128,
                                      bos_token_id=None, eos_token_id=None))


FAMILIES = {"llama": _llama, "smollm": _smollm, "qwen2": _qwen2, "mistral": _mistral, "gpt2": _gpt2}


def make_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = FAMILIES[family]().eval()
    # Random init gives near-uniform logits; sharpen the head so greedy choices are not decided by noise.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def llama():
    return make_model("llama")


def random_prompt(length: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (length,), generator=g).tolist()


def prefilled_speculative_decoder(rt, prompt: list[int], max_new_tokens: int = 40, **knobs):
    """A greedy speculative decoder with ``prompt`` prefilled, as Runtime.stream makes one, and its first t0."""
    from adaptive.config import SamplingConfig
    from adaptive.sampling import Sampler

    dec, _ = rt._speculative_decoder(knobs, len(prompt) + max_new_tokens, Sampler(SamplingConfig()), set(), prompt)
    outcome = dec.prefill(torch.tensor([prompt]))
    return dec, int(outcome.logits.argmax())


def build_tiny_checkpoint(directory, family: str = "llama"):
    """A saved tiny model plus a real byte-level BPE tokenizer (trained here on a few lines)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def main():\n    return 0\n", "import os\nprint('hello world')\n"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    model = (_llama(vocab_size=len(fast), eos_token_id=0) if family == "llama" else _gpt2()).eval()
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


CODE_TEXT = "def main():\n    return 0\n\nimport os\nprint('hello world')\n" * 60


def run_command_on_copy(tmp_path, checkpoint, command: str, *args: str):
    """``python -m adaptive COMMAND --model COPY --text FILE ARGS`` on a copy of ``checkpoint`` with a small
    text file: (the copy's directory, the finished process)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    model_dir = tmp_path / "model"
    shutil.copytree(checkpoint, model_dir)
    text = tmp_path / "text.txt"
    text.write_text(CODE_TEXT)
    proc = subprocess.run([sys.executable, "-m", "adaptive", command, "--model", str(model_dir), "--text", str(text), *args],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=300)
    return model_dir, proc

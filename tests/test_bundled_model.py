"""The bundled default model: loads offline, and speculative greedy equals full on it for every drafter."""

import pytest

from adaptive import Runtime
from adaptive.runtime import DEFAULT_MODEL_DIR

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").is_file(),
                                reason="the bundled model is not in assets/ yet")

PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n\ndef main():\n",
           "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
           "    for i in range(len(items)):\n"]


@pytest.fixture(scope="module")
def rt():
    return Runtime.from_pretrained()


def test_loads_offline_with_tokenizer_and_sidecars(rt):
    assert rt.spec.architecture == "LlamaForCausalLM" and rt.spec.num_layers == 8
    assert rt.tokenizer is not None
    assert rt.decode(rt.encode("def f(x):\n    return x\n")) == "def f(x):\n    return x\n"


def test_each_traced_token_carries_its_own_text(rt):
    """A token's text comes from the runtime's per-id memo (token_text): the tokenizer's text for that id
    alone, in every mode's traces."""
    for mode in ("full", "speculative"):
        res = rt.generate("def f(x):\n", max_new_tokens=12, mode=mode)
        assert [t.text for t in res.traces] == [rt.decode([t.token_id]) for t in res.traces]
    token = res.traces[0].token_id
    assert rt._token_texts[token] == rt.decode([token]) and rt.token_text(token) is rt.token_text(token)


@pytest.mark.parametrize("settings", [dict(), dict(drafter="lookup"), dict(draft_depth=4, draft_length=3),
                                      dict(draft_depth=2, draft_vocab_size=0)],
                         ids=["self-adaptive", "lookup", "depth4-len3", "depth2-fullhead"])
def test_speculative_greedy_equals_full(rt, settings):
    for prompt in PROMPTS:
        full = rt.generate(prompt, max_new_tokens=48, stop_at_eos=False)
        spec = rt.generate(prompt, max_new_tokens=48, stop_at_eos=False, mode="speculative", **settings)
        assert spec.token_ids == full.token_ids


def test_early_exit_default_setting_runs(rt):
    res = rt.generate(PROMPTS[0], max_new_tokens=32, mode="early_exit", stop_at_eos=False)
    assert 1 <= res.stats["layers_run_mean"] <= 8 and res.stats["compute_fraction"] > 0


def test_plain_loading_path_equals_the_transformers_path():
    """The bundled model loads without importing transformers (seconds saved); pin it to AutoConfig +
    AutoTokenizer: the same spec, the same weights, the same token ids and text."""
    import sysconfig
    from pathlib import Path

    from transformers import AutoConfig, AutoTokenizer

    from adaptive.loading import PlainTokenizer, load_checkpoint, spec_from_config
    from adaptive.runtime import DEFAULT_MODEL_DIR

    plain = load_checkpoint(str(DEFAULT_MODEL_DIR))
    assert isinstance(plain.tokenizer, PlainTokenizer)
    assert plain.spec == spec_from_config(AutoConfig.from_pretrained(str(DEFAULT_MODEL_DIR)), DEFAULT_MODEL_DIR)
    hf_tok = AutoTokenizer.from_pretrained(str(DEFAULT_MODEL_DIR))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace")[:4000] for p in sorted(stdlib.glob("*.py"))[:40]]
    texts += ["", "  \n\t", "héllo wörld ✓ <|endoftext|> x"]
    for text in texts:
        ids = plain.tokenizer.encode(text, add_special_tokens=False)
        assert ids == hf_tok.encode(text, add_special_tokens=False)
        assert plain.tokenizer.decode(ids) == hf_tok.decode(ids)
    assert plain.tokenizer.get_vocab() == hf_tok.get_vocab()
    from adaptive.training.evaluate import token_byte_lengths  # bits/byte reads the backend's vocabulary

    V = plain.spec.vocab_size
    assert (token_byte_lengths(plain.tokenizer, V) == token_byte_lengths(hf_tok, V)).all()

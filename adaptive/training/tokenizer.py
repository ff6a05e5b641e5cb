"""Byte-level BPE tokenizer (vocab 8192) for the default model, trained on the corpus train split.

Byte-level so that every Python source file round-trips exactly: no unknown tokens, no added prefix
space (``add_prefix_space=False``), no whitespace clean-up on decode. Files are joined by the special
token ``<|endoftext|>``, which is also the model's bos/eos token.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from . import corpus

EOT = "<|endoftext|>"
VOCAB_SIZE = 8192
DEFAULT_DIR = Path("data/tokenizer")


def _build_and_train(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is unknown
        show_progress=True,
    )
    texts = (d.text for d in corpus.iter_documents("train"))
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_hf(tok: Tokenizer, out_dir: Path, context_length: int) -> None:
    """Write tokenizer.json + tokenizer_config.json so AutoTokenizer.from_pretrained(out_dir) works."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": None,
        "pad_token": None,
        "model_max_length": context_length,
        "add_prefix_space": False,
        # Source code must round-trip: the default clean-up would eat spaces before punctuation.
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": EOT, "eos_token": EOT}, indent=2) + "\n")


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def get_tokenizer(out_dir: Path = DEFAULT_DIR, context_length: int = 512,
                  vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Load the cached tokenizer, or train it when the train split changed (keyed by its fingerprint)."""
    out_dir = Path(out_dir)
    meta_path = out_dir / "train_meta.json"
    fingerprint = corpus.corpus_fingerprint("train")
    if meta_path.exists() and (out_dir / "tokenizer.json").exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("corpus_train") == fingerprint and meta.get("vocab_size") == vocab_size:
            return Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    tok = _build_and_train(vocab_size)
    save_hf(tok, out_dir, context_length)
    meta_path.write_text(json.dumps({"corpus_train": fingerprint, "vocab_size": vocab_size}) + "\n")
    return tok

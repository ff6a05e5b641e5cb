"""Tokenize each corpus split once into ``data/tokens/<split>.npy`` (uint16) with a JSON manifest.

A split's stream is its documents in corpus order, each followed by ``<|endoftext|>``. The manifest
keys the cache by the corpus fingerprint and the tokenizer file hash, so a rerun with the same
interpreter and tokenizer reuses the arrays and any change rebuilds them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from . import corpus
from .tokenizer import EOT

DEFAULT_DIR = Path("data/tokens")


@dataclass
class TokenSplit:
    split: str
    tokens: np.ndarray  # uint16 [num_tokens]
    num_bytes: int      # UTF-8 bytes of the split's text (for bits/byte)
    num_docs: int

    @property
    def tokens_per_byte(self) -> float:
        return len(self.tokens) / max(1, self.num_bytes)


def _tokenize_split(tok: Tokenizer, split: str) -> TokenSplit:
    eot = tok.token_to_id(EOT)
    docs = list(corpus.iter_documents(split))
    parts, nbytes = [], 0
    batch = 64  # encode_batch is parallel in Rust; batches keep memory bounded
    for i in range(0, len(docs), batch):
        chunk = docs[i:i + batch]
        for d, enc in zip(chunk, tok.encode_batch([d.text for d in chunk], add_special_tokens=False)):
            parts.append(np.asarray(enc.ids + [eot], dtype=np.uint16))
            nbytes += len(d.text.encode("utf-8"))
    arr = np.concatenate(parts) if parts else np.zeros(0, np.uint16)
    return TokenSplit(split, arr, nbytes, len(docs))


def load_splits(tok: Tokenizer, tokenizer_json: Path, cache_dir: Path = DEFAULT_DIR,
                splits=corpus.SPLITS) -> dict[str, TokenSplit]:
    assert tok.get_vocab_size() <= 65536, "uint16 cache needs vocab <= 65536"
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    from .tokenizer import file_hash
    tok_hash = file_hash(tokenizer_json)
    manifest_path = cache_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    out = {}
    for split in splits:
        fp = corpus.corpus_fingerprint(split)
        entry = manifest.get(split)
        npy = cache_dir / f"{split}.npy"
        if (entry and entry["corpus"] == fp and entry["tokenizer"] == tok_hash and npy.exists()):
            out[split] = TokenSplit(split, np.load(npy), entry["num_bytes"], entry["num_docs"])
            continue
        ts = _tokenize_split(tok, split)
        np.save(npy, ts.tokens)
        manifest[split] = {"corpus": fp, "tokenizer": tok_hash, "num_tokens": int(len(ts.tokens)),
                           "num_bytes": ts.num_bytes, "num_docs": ts.num_docs}
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        out[split] = ts
    return out

"""An n-gram datastore for free drafts when the prompt itself has no match (REST-style retrieval).

Prompt lookup proposes what followed an earlier occurrence of the last tokens *in this context*; on a
fresh line of code there often is none, and the round falls back to a model drafter or a plain step.
The datastore holds, for every 3-gram seen at least ``min_count`` times in a corpus (the train split
for the bundled model), its most frequent next token and how often that token followed (its share).
Drafting chains lookups — the last three tokens give the next, which joins the key for the one after
— while the share stays at or above ``min_share``. Drafting costs a binary search per token and no
model call; verification is the same lossless full-depth pass as every other drafter.

File ``ngram_datastore.safetensors`` next to the checkpoint: ``keys`` int64 (N,) sorted, each
(t1 * V + t2) * V + t3; ``next`` int32 (N,); ``share`` float32 (N,); metadata
``format="adaptive-ngram-datastore"``, ``version="1"``, ``vocab_size``, ``n="3"``, ``source``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError

DATASTORE_FILE = "ngram_datastore.safetensors"
DATASTORE_FORMAT = "adaptive-ngram-datastore"
ORDER = 3
MIN_SHARE = 0.5  # a 3-gram's next token is kept, and chained, while it follows this share of it or more


class NgramStore:
    def __init__(self, keys: np.ndarray, next_tokens: np.ndarray, shares: np.ndarray, vocab_size: int,
                 source: str = ""):
        self.keys, self.next, self.share = keys, next_tokens, shares
        self.vocab_size, self.source = vocab_size, source
        self._tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # see ``tensors``

    def __len__(self) -> int:
        return len(self.keys)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys int64, next int32, share float32) as tensors sharing this store's memory, for the C++
        drafter (``DraftRules.set_store``)."""
        if self._tensors is None:
            self._tensors = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in
                                  (self.keys.astype(np.int64, copy=False), self.next.astype(np.int32, copy=False),
                                   self.share.astype(np.float32, copy=False)))
        return self._tensors

    @classmethod
    def build(cls, tokens: np.ndarray, vocab_size: int, min_count: int = 3, min_share: float = MIN_SHARE,
              source: str = "") -> "NgramStore":
        """Count every (3-gram, next token) in ``tokens`` and keep each 3-gram's most frequent next token."""
        s = np.asarray(tokens, dtype=np.int64)
        if len(s) <= ORDER:
            raise ValueError("the corpus is too short for a datastore")
        V = vocab_size
        keys = (s[:-3] * V + s[1:-2]) * V + s[2:-1]  # (n-3,) one key per 3-gram: V^3 fits in int64
        # Each distinct (3-gram, next) and how often. Sorted as pairs of columns: one number per pair,
        # key * V + next (V^4), overflowed int64 silently from V = 55,109 on (Llama 3's and Qwen2's
        # vocabularies), merging unrelated n-grams.
        by_pair = np.lexsort((s[3:], keys))
        key_sorted, next_sorted = keys[by_pair], s[3:][by_pair]
        new_pair = (key_sorted[1:] != key_sorted[:-1]) | (next_sorted[1:] != next_sorted[:-1])
        starts = np.flatnonzero(np.r_[True, new_pair])
        counts = np.diff(np.r_[starts, len(key_sorted)])
        k, nxt = key_sorted[starts], next_sorted[starts]
        order = np.lexsort((-counts, k))  # per key, the most frequent next token first
        k, nxt, counts = k[order], nxt[order], counts[order]
        first = np.r_[True, k[1:] != k[:-1]]
        totals = np.add.reduceat(counts, np.flatnonzero(first))
        k, nxt, best = k[first], nxt[first], counts[first]
        share = best / totals
        keep = (totals >= min_count) & (share >= min_share)
        return cls(k[keep], nxt[keep].astype(np.int32), share[keep].astype(np.float32), V, source)

    def propose(self, context: list[int], limit: int, min_share: float = MIN_SHARE) -> tuple[list[int], list[float]]:
        """Up to ``limit`` tokens continuing ``context``, with the share behind each."""
        if len(context) < ORDER or limit <= 0:
            return [], []
        V = self.vocab_size
        t1, t2, t3 = context[-3:]
        tokens, shares = [], []
        for _ in range(limit):
            key = (t1 * V + t2) * V + t3
            i = int(np.searchsorted(self.keys, key))
            if i >= len(self.keys) or int(self.keys[i]) != key or float(self.share[i]) < min_share:
                break
            nxt = int(self.next[i])
            tokens.append(nxt)
            shares.append(float(self.share[i]))
            t1, t2, t3 = t2, t3, nxt
        return tokens, shares

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({"keys": torch.from_numpy(self.keys), "next": torch.from_numpy(self.next),
                   "share": torch.from_numpy(self.share)}, str(path),
                  metadata={"format": DATASTORE_FORMAT, "version": "1", "vocab_size": str(self.vocab_size),
                            "n": str(ORDER), "source": self.source})

    @classmethod
    def load(cls, path: str | Path, vocab_size: int) -> "NgramStore":
        from .exits import read_sidecar

        meta, tensors = read_sidecar(path, DATASTORE_FORMAT, "an n-gram datastore")
        if meta.get("vocab_size") != str(vocab_size) or meta.get("n") != str(ORDER):
            raise CheckpointError(f"{path}: built for vocab_size={meta.get('vocab_size')}, n={meta.get('n')}; "
                                  f"this model has vocab_size={vocab_size}")
        try:
            keys, nxt, share = (tensors[k].numpy() for k in ("keys", "next", "share"))
        except KeyError as e:
            raise CheckpointError(f"{path}: missing tensor {e}") from e
        if not (keys.shape == nxt.shape == share.shape) or keys.ndim != 1 or \
                (len(keys) > 1 and not bool(np.all(keys[1:] > keys[:-1]))):
            raise CheckpointError(f"{path}: keys must be sorted and match next/share in length")
        if len(nxt) and (int(nxt.min()) < 0 or int(nxt.max()) >= vocab_size):
            raise CheckpointError(f"{path}: next-token ids outside the vocabulary")
        return cls(keys, nxt, share, vocab_size, meta.get("source", ""))

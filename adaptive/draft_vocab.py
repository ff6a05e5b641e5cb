"""A shortlist vocabulary for the draft head.

On a small model the LM head is the largest matmul of a draft step (8192 x 192 weights read per token,
several layers' worth), so a draft over the full vocabulary costs nearly half a full step. Drafting
over the most frequent tokens plus the prompt's own tokens cuts that to a few percent; a draft token
outside the shortlist is simply never proposed, and verification stays exact, so nothing is lost but
some acceptance.

File ``draft_vocab.json`` next to a checkpoint: ``{"format": "adaptive-draft-vocab", "version": 1,
"token_ids": [...most frequent first...], "counts": [...], "source": "..."}``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import CheckpointError

DRAFT_VOCAB_FILE = "draft_vocab.json"
DRAFT_VOCAB_FORMAT = "adaptive-draft-vocab"


def load_ranking(path: str | Path, vocab_size: int) -> list[int]:
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != DRAFT_VOCAB_FORMAT:
        raise CheckpointError(f"{path}: not a draft-vocabulary file (format must be {DRAFT_VOCAB_FORMAT!r})")
    ids = payload.get("token_ids")
    if not isinstance(ids, list) or not all(isinstance(t, int) and 0 <= t < vocab_size for t in ids):
        raise CheckpointError(f"{path}: token_ids must be a list of ids in [0, {vocab_size})")
    return ids


def save_ranking(path: str | Path, token_ids: list[int], counts: list[int], source: str) -> None:
    Path(path).write_text(json.dumps({"format": DRAFT_VOCAB_FORMAT, "version": 1, "source": source,
                                      "token_ids": token_ids, "counts": counts}))


def ranking_from_counts(counts) -> tuple[list[int], list[int]]:
    """Token ids by decreasing count (ties by id), with their counts; unseen tokens are left out."""
    order = sorted((i for i, c in enumerate(counts) if c > 0), key=lambda i: (-counts[i], i))
    return order, [int(counts[i]) for i in order]


def shortlist(ranking: list[int], size: int, prompt_ids: list[int], device="cpu") -> torch.Tensor:
    """Sorted unique ids: the ``size`` most frequent tokens plus every token of the prompt."""
    return torch.tensor(sorted(set(ranking[:size]) | set(prompt_ids)), dtype=torch.long, device=device)

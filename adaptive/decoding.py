"""Decode strategies behind one small interface: ``prefill(prompt)`` then ``step(token)`` per token.

Each call returns a ``StepOutcome``: the logits for the *next* token plus what it cost and how it was
decided. The runtime samples from those logits, writes the TokenTrace and feeds the sampled token back
with ``step``. Full depth lives here; early exit in ``early_exit.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .costs import CostModel
from .kv_cache import KVCache
from .model import LeanModel


@dataclass
class StepOutcome:
    logits: torch.Tensor  # (V,) next-token logits
    exit_layer: int  # layers that produced the logits (1..L)
    confidence: float | None = None
    layer_confidence: dict[int, float] = field(default_factory=dict)
    layer_top1: dict[int, int] = field(default_factory=dict)
    kv_fill_layers: int = 0
    deferred_positions: int = 0
    full_head_skipped: bool = False  # full depth, but the token came from the exit shortlist (vocabulary exit)
    macs: int = 0  # spent on this step, overheads included
    full_macs: int = 0  # what full depth spends on the same step


@dataclass
class ComputeTotals:
    """Running sums over decode steps (the prefill is full depth in every mode and is kept apart)."""

    steps: int = 0
    layers_run: int = 0
    macs: int = 0
    full_macs: int = 0
    layer_macs: int = 0
    kv_fill_macs: int = 0
    head_macs: int = 0
    prefill_macs: int = 0

    def add(self, outcome: StepOutcome) -> None:
        self.steps += 1
        self.layers_run += outcome.exit_layer
        self.macs += outcome.macs
        self.full_macs += outcome.full_macs


# Prefill in passes of at most 16 rows (panel_matmul.h's SMALL_ROWS) for prompts of up to 64 tokens. On the
# bundled model (2 threads, warm, /tmp/s21/prefill.py) one pass against 16-row passes: 18 tokens 4.77 vs
# 3.19 ms, 24 tokens 4.89 vs 3.58, 32 tokens 5.64 vs 3.90, 64 tokens 9.84 vs 8.67, 128 tokens 16.4 vs 18.7
# (BLAS wins there). Up to 16 tokens it is one pass either way.
PREFILL_CHUNK = 16
PREFILL_CHUNKED_UP_TO = 64


class Decoder:
    """Owns the cache and the position of one sequence; subclasses decide how deep each step goes."""

    def __init__(self, model: LeanModel, costs: CostModel, max_len: int):
        self.model = model
        self.costs = costs
        self.cache: KVCache = model.new_cache(1, max_len)
        self.pos = 0  # number of positions fed so far
        self.totals = ComputeTotals()

    def prefill(self, prompt_ids: torch.Tensor) -> StepOutcome:
        """Run the whole prompt (1, T) through every layer; logits for the first new token.

        A prompt of up to PREFILL_CHUNKED_UP_TO tokens runs in passes of PREFILL_CHUNK rows: the packed
        panels and the row kernels serve that many, where a longer pass falls to BLAS and SDPA (see
        PREFILL_CHUNK)."""
        L, T = self.model.spec.num_layers, prompt_ids.shape[1]
        chunk = PREFILL_CHUNK if T <= PREFILL_CHUNKED_UP_TO else T
        for start in range(0, T, chunk):
            ids = prompt_ids[:, start:start + chunk]
            h = self.model.run_layers(self.model.embed(ids, start), 0, L, start, self.cache)
        self.pos = T
        macs = self.costs.prefill_macs(T)
        self.totals.prefill_macs += macs
        return StepOutcome(logits=self.model.head(h[0, -1]), exit_layer=L, macs=macs, full_macs=macs)

    def step(self, token_id: int) -> StepOutcome:
        raise NotImplementedError


class FullDecoder(Decoder):
    def step(self, token_id: int) -> StepOutcome:
        model, pos, L = self.model, self.pos, self.model.spec.num_layers
        ids = torch.tensor([[token_id]], device=model.device)
        h = model.run_layers(model.embed(ids, pos), 0, L, pos, self.cache)
        self.pos = pos + 1
        macs = self.costs.full_token_macs(pos)
        self.totals.layer_macs += macs - self.costs.head_macs
        self.totals.head_macs += self.costs.head_macs
        outcome = StepOutcome(logits=model.head(h[0, -1]), exit_layer=L, macs=macs, full_macs=macs)
        self.totals.add(outcome)
        return outcome

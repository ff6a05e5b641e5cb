"""Learning-rate schedule driven by training progress, with budget extension on resume.

Progress p in [0, 1] is measured against the budget: p = max(tokens / max_tokens,
train_seconds / max_seconds) over whichever limits are set. Using the max means a run with both a
token and a wall-time budget still completes its cosine when the first limit is hit (throughput on
a shared CPU varies). Tokens and accumulated train seconds are stored in checkpoints, so a resumed
run continues the same schedule.

The schedule is a list of segments. The first: linear warmup to the peak, cosine to ``min_frac`` of
the peak at the end of the budget. Extending the budget on resume (a larger --max-tokens or
--max-minutes) appends a segment that starts at the current point: a short re-warmup from the current
LR factor up to ``max(current, rewarm_frac)``, then a cosine down to ``min_frac`` at the new end.
Earlier steps therefore keep the LR they were trained with, and the new tokens get a fresh decay.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class Budget:
    max_tokens: int | None = None
    max_seconds: float | None = None

    def __post_init__(self):
        if self.max_tokens is None and self.max_seconds is None:
            raise ValueError("need a token budget or a time budget")


@dataclass
class Segment:
    start_tokens: int
    start_seconds: float
    start_frac: float        # LR factor at the start (warmup starts here)
    peak_frac: float         # LR factor reached after warmup
    budget: Budget

    def progress(self, tokens: int, seconds: float) -> float:
        ps = []
        if self.budget.max_tokens is not None:
            ps.append((tokens - self.start_tokens) / max(1, self.budget.max_tokens - self.start_tokens))
        if self.budget.max_seconds is not None:
            ps.append((seconds - self.start_seconds) / max(1e-9, self.budget.max_seconds - self.start_seconds))
        return min(1.0, max(0.0, max(ps)))


@dataclass
class LRSchedule:
    peak_lr: float
    warmup_frac: float = 0.03
    min_frac: float = 0.1
    rewarm_frac: float = 0.3
    segments: list[Segment] | None = None

    @classmethod
    def fresh(cls, peak_lr: float, budget: Budget, **kw) -> "LRSchedule":
        return cls(peak_lr, segments=[Segment(0, 0.0, 0.0, 1.0, budget)], **kw)

    def factor(self, tokens: int, seconds: float) -> float:
        seg = self.segments[-1]
        p = seg.progress(tokens, seconds)
        if p < self.warmup_frac:
            return seg.start_frac + (seg.peak_frac - seg.start_frac) * p / self.warmup_frac
        q = (p - self.warmup_frac) / max(1e-9, 1 - self.warmup_frac)
        return self.min_frac + (seg.peak_frac - self.min_frac) * 0.5 * (1 + math.cos(math.pi * q))

    def lr(self, tokens: int, seconds: float) -> float:
        return self.peak_lr * self.factor(tokens, seconds)

    def overall_progress(self, tokens: int, seconds: float) -> float:
        """Progress against the whole (latest) budget from zero: drives the exit-weight curriculum."""
        return Segment(0, 0.0, 0, 0, self.segments[-1].budget).progress(tokens, seconds)

    def done(self, tokens: int, seconds: float) -> bool:
        return self.segments[-1].progress(tokens, seconds) >= 1.0

    def extend(self, budget: Budget, tokens: int, seconds: float) -> bool:
        """Append a segment if ``budget`` is larger than the current one; returns whether it did."""
        old = self.segments[-1].budget
        bigger = ((budget.max_tokens or 0) > (old.max_tokens or 0)
                  or (budget.max_seconds or 0) > (old.max_seconds or 0))
        if not bigger:
            return False
        # Only the limits that were raised bound the new segment: a time limit that is already spent
        # must not end an extension that was asked for in tokens (and vice versa).
        new = Budget(budget.max_tokens if (budget.max_tokens or 0) > (old.max_tokens or 0) else None,
                     budget.max_seconds if (budget.max_seconds or 0) > (old.max_seconds or 0) else None)
        cur = self.factor(tokens, seconds)
        self.segments.append(Segment(tokens, seconds, cur, max(cur, self.rewarm_frac), new))
        return True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LRSchedule":
        segs = [Segment(**{**s, "budget": Budget(**s["budget"])}) for s in d["segments"]]
        return cls(d["peak_lr"], d["warmup_frac"], d["min_frac"], d["rewarm_frac"], segs)

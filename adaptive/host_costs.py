"""Wall-clock costs of the model's pieces, measured on this host (not estimated from FLOPs).

At batch 1 on a CPU a layer's time is mostly weight traffic and per-op overhead, so running it on
several positions at once costs far less than several single passes; the LM head, a large matmul, may
not behave the same way. Speculation and scheduling decide from these measured numbers.

Measured once per runtime, lazily (about a quarter of a second for a small model), on a scratch cache.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .model import LeanModel, matvec_layout

PROBE_WIDTHS = (1, 2, 4, 8)  # positions per pass that are timed; others are interpolated


@dataclass(frozen=True)
class HostCosts:
    layer_ms: dict[int, float]  # positions per pass -> ms for one (average) layer
    head_ms: dict[int, float]  # positions per pass -> ms for the final norm + LM head
    num_layers: int

    @staticmethod
    def _interpolate(table: dict[int, float], T: int) -> float:
        widths = sorted(table)
        if T in table:
            return table[T]
        if T > widths[-1]:  # extrapolate linearly from the last two probes
            a, b = widths[-2], widths[-1]
            return table[b] + (table[b] - table[a]) / (b - a) * (T - b)
        lo = max(w for w in widths if w < T)
        hi = min(w for w in widths if w > T)
        return table[lo] + (table[hi] - table[lo]) * (T - lo) / (hi - lo)

    def layers(self, count: int, positions: int = 1) -> float:
        return count * self._interpolate(self.layer_ms, positions)

    def head(self, positions: int = 1) -> float:
        return self._interpolate(self.head_ms, positions)

    def full_step(self) -> float:
        """One plain decode step: every layer plus the head, one position."""
        return self.layers(self.num_layers) + self.head()

    @classmethod
    @torch.inference_mode()
    def measure(cls, model: LeanModel, repeats: int = 7, context: int = 64) -> "HostCosts":
        spec = model.spec
        L = spec.num_layers
        choose_head_layout(model)  # first: the head costs below are those of the layout it picked
        width = max(PROBE_WIDTHS)
        context = max(1, min(context, spec.max_positions - width - 1))  # tiny test models have tiny contexts
        cache = model.new_cache(1, context + width + 1)
        ids = torch.zeros(1, context, dtype=torch.long, device=model.device)
        model.run_layers(model.embed(ids, 0), 0, L, 0, cache)  # a realistic context to attend over
        layer_ms, head_ms = {}, {}
        for T in PROBE_WIDTHS:
            h = torch.randn(1, T, spec.hidden_size, dtype=model.dtype, device=model.device) * 0.1
            per_layer, per_head = [], []
            for _ in range(repeats):
                cache.crop(context)
                start = time.perf_counter()
                out = model.run_layers(h, 0, L, context, cache)
                mid = time.perf_counter()
                model.head(out)
                end = time.perf_counter()
                per_layer.append((mid - start) * 1000 / L)
                per_head.append((end - mid) * 1000)
            # the first repeat pays for allocation; the median of the rest is robust to scheduler noise
            layer_ms[T] = statistics.median(per_layer[1:])
            head_ms[T] = statistics.median(per_head[1:])
        return cls(layer_ms=layer_ms, head_ms=head_ms, num_layers=L)


HEAD_LAYOUT_WIDTHS = (2, 3, 4, 6, 8)
HEAD_LAYOUT_MARGIN = 0.8  # the rows layout must take < 80% of the time: a noisy tie keeps the default


@torch.inference_mode()
def choose_head_layout(model: LeanModel, repeats: int = 7) -> int | None:
    """Time the LM head for 2..8 positions both ways (``F.linear`` on the decode layout, and W @ x.T on the
    (V, d) rows) and set ``model.head_rows_from`` to the fewest positions from which the rows layout is
    clearly faster here (None: never, or no rows copy to use). Verification heads several positions."""
    model.head_rows_from = None
    if model._head_rows is None:
        return None
    for T in HEAD_LAYOUT_WIDTHS:
        x = model.final_norm(torch.randn(1, T, model.spec.hidden_size, dtype=model.dtype, device=model.device))
        linear, rows = [], []
        for _ in range(repeats):  # interleaved, so a change in machine load hits both alike
            start = time.perf_counter()
            torch.nn.functional.linear(x, model.w.lm_head)
            mid = time.perf_counter()
            model.head_by_rows(x)
            rows.append(time.perf_counter() - mid)
            linear.append(mid - start)
        if statistics.median(rows[1:]) < HEAD_LAYOUT_MARGIN * statistics.median(linear[1:]):
            model.head_rows_from = T
            break
    return model.head_rows_from


@torch.inference_mode()
def measure_head_rows(model: LeanModel, rows: int, repeats: int = 25) -> float:
    """ms for a final norm + LM head restricted to ``rows`` vocabulary rows (the draft shortlist)."""
    weight = matvec_layout(model.w.lm_head[:rows])  # the layout ShortlistHead uses
    h = torch.randn(1, 1, model.spec.hidden_size, dtype=model.dtype, device=model.device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.nn.functional.linear(model.final_norm(h), weight)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[1:])

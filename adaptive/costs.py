"""Counting the compute a decode actually spends, in multiply-accumulates (MACs).

Every piece of work the runtime does is charged here when it happens: layers run (weights plus
attention over the visible context), K/V filled for skipped layers, every exit-head evaluation, every
adapter. ``compute_fraction`` divides that by what full depth would have spent on the same tokens, so
a saving is only reported net of the bookkeeping that bought it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from .config import ModelSpec


@dataclass(frozen=True)
class CostModel:
    layer_weight_macs: int  # weight matmuls of one layer for one position
    attention_macs_per_key: int  # QK^T plus AV for one (query, key) pair in one layer
    head_macs: int  # LM head for one position
    kv_fill_macs: int  # K and V projections of one layer for one position
    adapter_macs: int  # one exit adapter (d x d) for one position
    num_layers: int
    sliding_windows: tuple[int | None, ...]
    hidden_size: int = 0

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> "CostModel":
        d, ff = spec.hidden_size, spec.intermediate_size
        attn_weights = d * (2 * spec.q_dim + 2 * spec.kv_dim)
        mlp_weights = d * ff * (3 if spec.mlp_kind == "gated" else 2)
        return cls(layer_weight_macs=attn_weights + mlp_weights, attention_macs_per_key=2 * spec.q_dim,
                   head_macs=d * spec.vocab_size, kv_fill_macs=2 * d * spec.kv_dim, adapter_macs=d * d,
                   num_layers=spec.num_layers, sliding_windows=spec.sliding_windows, hidden_size=d)

    def layer_macs(self, layer: int, position: int) -> int:
        """One layer for one query at ``position`` (it sees position + 1 keys, fewer in a window)."""
        window = self.sliding_windows[layer]
        keys = position + 1 if window is None else min(position + 1, window)
        return self.layer_weight_macs + self.attention_macs_per_key * keys

    @cached_property
    def _no_windows(self) -> bool:
        """Every layer attends to the whole context, so all layers cost the same at one position."""
        return all(window is None for window in self.sliding_windows)

    def layers_macs(self, start: int, end: int, position: int) -> int:
        if self._no_windows:
            # Closed form of the sum below: this is charged per decode step, drafted token and verified
            # position, and the per-layer Python loop cost ~12 us a full step (1% of one on a small model).
            return max(0, end - start) * (self.layer_weight_macs + self.attention_macs_per_key * (position + 1))
        return sum(self.layer_macs(layer, position) for layer in range(start, end))

    def positions_macs(self, start: int, end: int, first_position: int, count: int) -> int:
        """Layers [start, end) for ``count`` consecutive positions from ``first_position`` (a draft pass of
        several rows, a verification, a prompt)."""
        if self._no_windows:
            # closed form of the sum below: the keys seen, sum of (position + 1) over the span
            keys = count * (first_position + 1) + count * (count - 1) // 2
            return max(0, end - start) * (count * self.layer_weight_macs + self.attention_macs_per_key * keys)
        return sum(self.layers_macs(start, end, p) for p in range(first_position, first_position + count))

    def full_token_macs(self, position: int) -> int:
        """Full depth for one token: every layer plus one LM head."""
        return self.layers_macs(0, self.num_layers, position) + self.head_macs

    def prefill_macs(self, length: int) -> int:
        """A prompt of ``length`` tokens at full depth: every layer at every position, one LM head (only the
        last position's prediction is read)."""
        return self.positions_macs(0, self.num_layers, 0, length) + self.head_macs

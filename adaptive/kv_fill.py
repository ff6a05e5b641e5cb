"""Learned K/V fill for the ``propagate`` policy: one linear map per (exit point, skipped layer).

A token that exits after k layers leaves layers k..L-1 without K/V at its position. ``propagate``
(CALM) fills layer j with layer j's own K/V projection of the exit state h_k, as if h_j were h_k. Layer
k is then exact (h_k *is* its input), but the deeper layers read an approximation, and that
approximation, not the exit decision, is what costs agreement: on the bundled model most tokens that
disagree with full depth under ``propagate`` are full-depth tokens that read filled K/V (see the
issue notes).

The projection is one linear map from the normalised exit state to K/V; the least-squares map from the
same input to the *true* K/V of layer j (fitted on the model's own states over training text, see
``adaptive/training/fit_kv_fill.py``) can only be closer in mean square, and it costs exactly the same
MACs: one (2 * kv_dim, d) matmul per skipped layer. So a model that ships this file fills K/V with these
maps, and every figure (compute, agreement) is measured with them; a model without it uses the
projection.

Measured on the bundled model's retrained weights (58.6M tokens, exits [3, 6]): the maps cut the held-out
K/V error to 0.6-0.75 of the projections', yet replayed agreement moved by +0.3 points on one draw of
validation prompts and by -0.1 to -0.3 on another: a smaller K/V error is not the same as less damage to
the tokens that read it. Training the maps on that damage itself (``fit-kv-fill --refine-steps``: KL of the
final layer to the undamaged model at the tokens that run every layer, default exits replayed; a prototype
of it, 2000 steps x 4 windows from the least-squares maps) cut the replayed disagreements of the default
setting's family on the 48 calibration prompts from 71 / 58 / 46 (projection) to 58 / 52 / 43 at thresholds
0.912 / 0.938 / 0.954, and on the 24 held-out validation prompts from 24 / 22 / 17 to 18 / 17 / 13, at the
same compute. A finalize with the refined maps (``finalize-model --with-kv-fill``, still opt-in there) then
calibrated the default to threshold 0.938 at validation compute 0.697 (was 0.954 at 0.712 with the
projection), and on the 48 test prompts of the card that default agrees 0.9935 at compute 0.696 (was
0.9920 at 0.703): the bundled model ships the refined maps.

File ``kv_fill.safetensors`` next to the checkpoint: ``weight`` (P, 2 * kv_dim, d) and ``bias``
(P, 2 * kv_dim), one row per pair (k, j) with 1 <= k < j < L in order (k ascending, then j): the pre-RoPE
K then V of layer j, from the weightless-normalised state after k layers. Pairs with j = k are not
stored (the layer's own projection is exact there). Metadata ``format="adaptive-kv-fill"``,
``version="1"``, ``hidden_size``, ``num_layers``, ``kv_dim``, and how it was fitted (``fitted_on``,
``relative_error``: the held-out mean-square error of the maps relative to the projection's, per k).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from .errors import CheckpointError

KV_FILL_FILE = "kv_fill.safetensors"
KV_FILL_FORMAT = "adaptive-kv-fill"


def fill_pairs(num_layers: int) -> list[tuple[int, int]]:
    """The stored (exit after k layers, filled layer j) pairs, in file order."""
    return [(k, j) for k in range(1, num_layers) for j in range(k + 1, num_layers)]


@dataclass
class KVFill:
    weight: torch.Tensor  # (P, 2*kv_dim, d), pairs in ``fill_pairs`` order
    bias: torch.Tensor  # (P, 2*kv_dim)
    num_layers: int
    fitted_on: str = ""  # what text and how many positions the maps were fitted on
    relative_error: dict[int, float] = field(default_factory=dict)  # k -> held-out MSE / projection MSE

    def __post_init__(self):
        self.index = {pair: i for i, pair in enumerate(fill_pairs(self.num_layers))}

    @cached_property
    def digest(self) -> str:
        """First 12 hex digits of sha256 over the maps (fp32): names this fill in stats and certificates
        (computed once: the maps are not changed in place)."""
        h = hashlib.sha256()
        for t in (self.weight, self.bias):
            h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()[:12]

    def map(self, k: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (2*kv_dim, d), bias (2*kv_dim,)) filling layer j from the state after k layers (j > k)."""
        i = self.index[(k, j)]
        return self.weight[i], self.bias[i]

    def to(self, dtype: torch.dtype, device: torch.device | str) -> "KVFill":
        return KVFill(self.weight.to(dtype=dtype, device=device), self.bias.to(dtype=dtype, device=device),
                      self.num_layers, self.fitted_on, dict(self.relative_error))

    def save(self, path: str | Path, hidden_size: int) -> None:
        from safetensors.torch import save_file

        save_file({"weight": self.weight.float().contiguous(), "bias": self.bias.float().contiguous()}, str(path),
                  metadata={"format": KV_FILL_FORMAT, "version": "1", "hidden_size": str(hidden_size),
                            "num_layers": str(self.num_layers), "kv_dim": str(self.weight.shape[1] // 2),
                            "fitted_on": self.fitted_on,
                            "relative_error": json.dumps({str(k): v for k, v in self.relative_error.items()})})

    @classmethod
    def load(cls, path: str | Path, hidden_size: int, num_layers: int, kv_dim: int) -> "KVFill":
        from .exits import read_sidecar

        meta, tensors = read_sidecar(path, KV_FILL_FORMAT, "a K/V fill file")
        if (meta.get("hidden_size"), meta.get("num_layers"), meta.get("kv_dim")) != (str(hidden_size), str(num_layers), str(kv_dim)):
            raise CheckpointError(f"{path}: K/V fill maps are for hidden_size={meta.get('hidden_size')}, "
                                  f"num_layers={meta.get('num_layers')}, kv_dim={meta.get('kv_dim')}, not "
                                  f"{hidden_size}, {num_layers}, {kv_dim}")
        try:
            weight, bias = tensors["weight"].float(), tensors["bias"].float()
        except KeyError as e:
            raise CheckpointError(f"{path}: missing tensor {e}") from e
        pairs = len(fill_pairs(num_layers))
        if weight.shape != (pairs, 2 * kv_dim, hidden_size) or bias.shape != (pairs, 2 * kv_dim):
            raise CheckpointError(f"{path}: tensor shapes {tuple(weight.shape)}, {tuple(bias.shape)} do not match a "
                                  f"{num_layers}-layer model with hidden_size={hidden_size}, kv_dim={kv_dim}")
        if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
            raise CheckpointError(f"{path}: the K/V fill maps contain NaN or infinite values")
        try:
            relative_error = {int(k): float(v) for k, v in json.loads(meta.get("relative_error") or "{}").items()}
        except (ValueError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path}: unreadable relative_error metadata: {e}") from e
        return cls(weight, bias, num_layers, meta.get("fitted_on", ""), relative_error)

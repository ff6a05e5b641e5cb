"""A learned exit classifier (CALM's): predicts from the hidden state alone whether stopping is safe.

Logit-based measures pay an LM-head evaluation at every check, which on a small model weighs several
layers. This classifier reads the hidden state after k layers and outputs P(the exit head's top-1 at
k equals the final layer's top-1) for a few thousand MACs; the head then runs once, at the exit.

Features after k layers: the weightless RMS-normalised hidden state (d values) and the cosine
similarity with the previous layer's hidden state. One small MLP per exit point:
``sigmoid(w2 . silu(W1 f + b1) + b2)``.

File ``exit_classifier.safetensors`` next to the checkpoint: tensors ``w1`` (L-1, H, d+1), ``b1``
(L-1, H), ``w2`` (L-1, H), ``b2`` (L-1,), row k-1 for the exit after k layers; metadata
``format="adaptive-exit-classifier"``, ``version="1"``, ``hidden_size``, ``num_layers``, ``labels``
(what "agree" meant when it was trained, e.g. the shortlist size).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import CheckpointError

CLASSIFIER_FILE = "exit_classifier.safetensors"
CLASSIFIER_FORMAT = "adaptive-exit-classifier"


def features(hidden: torch.Tensor, prev_hidden: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Hidden states (..., d) after k and k-1 layers -> classifier features (..., d+1)."""
    normed = F.rms_norm(hidden.float(), (hidden.shape[-1],), None, eps)
    cos = F.cosine_similarity(hidden.float(), prev_hidden.float(), dim=-1).unsqueeze(-1)
    return torch.cat((normed, cos), dim=-1)


@dataclass
class ExitClassifier:
    w1: torch.Tensor  # (L-1, H, F)
    b1: torch.Tensor  # (L-1, H)
    w2: torch.Tensor  # (L-1, H)
    b2: torch.Tensor  # (L-1,)
    labels: str = ""

    @property
    def macs(self) -> int:
        """Per check: the two small matmuls (features are a few elementwise ops)."""
        return self.w1.shape[1] * self.w1.shape[2] + self.w1.shape[1]

    def probability(self, layers_run: int, hidden: torch.Tensor, prev_hidden: torch.Tensor) -> torch.Tensor:
        """P(safe to exit after ``layers_run`` layers), shape (...) for hidden (..., d)."""
        i = layers_run - 1
        x = F.silu(F.linear(features(hidden, prev_hidden), self.w1[i], self.b1[i]))  # (..., H)
        return torch.sigmoid(x @ self.w2[i] + self.b2[i])

    def save(self, path: str | Path, hidden_size: int, num_layers: int) -> None:
        from safetensors.torch import save_file

        save_file({"w1": self.w1.detach().contiguous(), "b1": self.b1.detach().contiguous(),
                   "w2": self.w2.detach().contiguous(), "b2": self.b2.detach().contiguous()}, str(path),
                  metadata={"format": CLASSIFIER_FORMAT, "version": "1", "hidden_size": str(hidden_size),
                            "num_layers": str(num_layers), "labels": self.labels})

    @classmethod
    def load(cls, path: str | Path, hidden_size: int, num_layers: int) -> "ExitClassifier":
        from .exits import read_sidecar

        meta, tensors = read_sidecar(path, CLASSIFIER_FORMAT, "an exit-classifier file")
        if meta.get("hidden_size") != str(hidden_size) or meta.get("num_layers") != str(num_layers):
            raise CheckpointError(f"{path}: classifier is for hidden_size={meta.get('hidden_size')}, "
                                  f"num_layers={meta.get('num_layers')}")
        try:
            w1, b1, w2, b2 = (tensors[k].float() for k in ("w1", "b1", "w2", "b2"))
        except KeyError as e:
            raise CheckpointError(f"{path}: missing tensor {e}") from e
        L1, H, Fdim = w1.shape
        if L1 != num_layers - 1 or Fdim != hidden_size + 1 or b1.shape != (L1, H) or w2.shape != (L1, H) or b2.shape != (L1,):
            raise CheckpointError(f"{path}: tensor shapes do not match a {num_layers}-layer, {hidden_size}-wide model")
        return cls(w1, b1, w2, b2, labels=meta.get("labels", ""))

"""The prompt-level gate: which multi-scale path (light / standard / full) is enough for this prompt.

It is a per-path logistic regression on cheap prompt features, answering "would the greedy output of
this path agree with full depth (on at least ``tau`` of the tokens)?" for every shallow path. The
scheduler takes the cheapest path whose probability clears its confidence; full depth always agrees.

Features (``prompt_features``), all from one pass of the prompt through the light path's layers:
the mean and the last position's hidden state after those layers (the gate sees what the light
path will see), the light exit head's confidence at the last position (max probability and margin),
log prompt length, the share of distinct tokens and the share of positions whose bigram occurred
earlier in the prompt (repetitive prompts are easy). Labels come from real runs of every path
(``adaptive.training.train_gate``).

File format (``prompt_gate.safetensors`` next to the checkpoint): tensors ``weight`` (P, F),
``bias`` (P,), ``feature_mean`` (F,), ``feature_std`` (F,); metadata ``format="adaptive-prompt-gate"``,
``version="1"``, ``paths`` (JSON list of the P shallow path names), ``feature_layers`` (int),
``tau`` (agreement that defines a label), ``report`` (JSON: training/held-out metrics).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError
from .exits import read_sidecar

GATE_FILE = "prompt_gate.safetensors"
GATE_FORMAT = "adaptive-prompt-gate"
SCALAR_FEATURES = ("max_prob", "margin", "log_length", "distinct_share", "repeated_bigram_share")


@dataclass
class GateDecision:
    """The gate's answer for one prompt: P(agrees with full depth) per path, and the path it picked."""

    probabilities: dict[str, float]  # path -> P(agreement >= tau); "full" is 1 by construction
    path: str
    confidence: float  # the probability a shallow path had to reach
    tau: float
    feature_ms: float
    feature_macs: int
    features: dict[str, float] = field(default_factory=dict)  # the scalar features, for the app

    def to_dict(self) -> dict:
        return {"probabilities": self.probabilities, "path": self.path, "confidence": self.confidence,
                "tau": self.tau, "feature_ms": self.feature_ms, "feature_macs": self.feature_macs,
                "features": self.features}


@torch.inference_mode()
def prompt_features(runtime, prompt_ids: list[int], layers: int) -> tuple[torch.Tensor, dict[str, float], int]:
    """(F,) feature vector, its scalar part by name, and the MACs spent (one pass through ``layers``)."""
    model = runtime.model
    ids = torch.tensor([prompt_ids], device=model.device)
    cache = model.new_cache(1, len(prompt_ids))
    h = model.run_layers(model.embed(ids, 0), 0, layers, 0, cache)[0]  # (T, d)
    logits = runtime.heads.logits(h[-1:], layers)[0].float()  # (V,): the light exit head at the last position
    top2 = torch.topk(torch.softmax(logits, -1), 2).values
    n = len(prompt_ids)
    bigrams = list(zip(prompt_ids, prompt_ids[1:]))
    seen, repeats = set(), 0
    for bg in bigrams:
        repeats += bg in seen
        seen.add(bg)
    scalars = {"max_prob": float(top2[0]), "margin": float(top2[0] - top2[1]), "log_length": math.log(n),
               "distinct_share": len(set(prompt_ids)) / n,
               "repeated_bigram_share": repeats / max(1, len(bigrams))}
    vec = torch.cat([h.float().mean(0), h[-1].float(), torch.tensor([scalars[k] for k in SCALAR_FEATURES])])
    macs = runtime.costs.positions_macs(0, layers, 0, n) + runtime.costs.head_macs
    return vec, scalars, macs


class PromptGate:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 paths: list[str], feature_layers: int, tau: float, report: dict | None = None):
        self.weight, self.bias, self.mean, self.std = weight.float(), bias.float(), mean.float(), std.float()
        self.paths, self.feature_layers, self.tau = list(paths), int(feature_layers), float(tau)
        self.report = report or {}

    @property
    def num_features(self) -> int:
        return self.weight.shape[1]

    def probabilities(self, features: torch.Tensor) -> dict[str, float]:
        """features (F,) -> P(path agrees with full depth) for each shallow path, plus full = 1."""
        z = (features.float() - self.mean) / self.std
        p = torch.sigmoid(self.weight @ z + self.bias)
        probs = {name: float(v) for name, v in zip(self.paths, p)}
        probs["full"] = 1.0
        return probs

    def decide(self, runtime, prompt_ids: list[int], confidence: float = 0.9) -> GateDecision:
        """Features of this prompt, the per-path probabilities, and the cheapest path that clears
        ``confidence`` (paths are tried from the shallowest)."""
        import time

        start = time.perf_counter()
        features, scalars, macs = prompt_features(runtime, prompt_ids, self.feature_layers)
        probs = self.probabilities(features)
        ms = (time.perf_counter() - start) * 1000
        order = sorted(self.paths, key=lambda name: runtime.paths[name])
        chosen = next((name for name in order if probs[name] >= confidence), "full")
        return GateDecision(probs, chosen, confidence, self.tau, ms, macs, scalars)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous(),
                   "feature_mean": self.mean.contiguous(), "feature_std": self.std.contiguous()}, str(path),
                  metadata={"format": GATE_FORMAT, "version": "1", "paths": json.dumps(self.paths),
                            "feature_layers": str(self.feature_layers), "tau": repr(self.tau),
                            "report": json.dumps(self.report)})

    @classmethod
    def load(cls, path: str | Path, hidden_size: int, runtime_paths: dict[str, int]) -> "PromptGate":
        meta, tensors = read_sidecar(path, GATE_FORMAT, "a prompt-gate file")
        try:
            paths = json.loads(meta["paths"])
            layers, tau = int(meta["feature_layers"]), float(meta["tau"])
            report = json.loads(meta.get("report", "{}"))
            w, b, mean, std = (tensors[k] for k in ("weight", "bias", "feature_mean", "feature_std"))
        except (KeyError, ValueError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: incomplete prompt-gate file ({e})") from e
        features = 2 * hidden_size + len(SCALAR_FEATURES)
        if w.shape != (len(paths), features) or b.shape != (len(paths),) or mean.shape != (features,) \
                or std.shape != (features,):
            raise CheckpointError(f"{path}: tensor shapes do not fit {len(paths)} paths x {features} features "
                                  f"(hidden_size {hidden_size})")
        unknown = [p for p in paths if p not in runtime_paths or p == "full"]
        if unknown:
            raise CheckpointError(f"{path}: unknown shallow path(s) {unknown}")
        return cls(w, b, mean, std, paths, layers, tau, report)

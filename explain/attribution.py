"""Why did a token exit where it did? Captum attributions of one exit decision to its context tokens.

The decision being explained: after ``layer`` layers, the exit head's confidence for the prediction of
generated token ``index`` is compared with the threshold; the token exits if it is reached. Two views:

- **LayerIntegratedGradients** on the input embeddings for the *continuous* score (the confidence at that
  layer): how much each context token pushes the confidence up or down, relative to a baseline where
  every context token is replaced by a neutral token (the end-of-text / pad token). The convergence
  delta (sum of attributions minus score(input) - score(baseline)) says how far the path integral is
  from complete; it shrinks with more steps.
- **FeatureAblation** for the *hard* exit/continue decision: replace one context token at a time by the
  baseline token and record decision(input) - decision(ablated), i.e. +1 where removing that token
  would make the token stop exiting, -1 where it would make it exit, 0 where the decision does not move.

The forward pass is teacher-forced over prompt + earlier generated tokens with exact full-depth K/V,
like the lens, so it can differ slightly from what a run with ``kv_policy="propagate"`` saw. Model
calls happen here only, and only on demand: they cost n_steps forward+backward passes of the context.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from adaptive.errors import InvalidRequestError
from adaptive.exits import make_measure

# Measures whose score is a smooth function of the logits/hidden states. "patience" counts argmax
# agreements: its gradient is zero everywhere, so IG would attribute nothing.
DIFFERENTIABLE = ("max_prob", "margin", "entropy", "cosine", "classifier")


@dataclass
class ExitAttribution:
    """Attribution of one token's exit decision over its T context tokens."""

    token_index: int  # index among the generated tokens
    position: int  # absolute position of the explained token (its prediction is read at position - 1)
    layer: int  # layers run when the decision is taken (the exit point being explained)
    measure: str  # the measure attributed (may differ from the run's if that one is not differentiable)
    threshold: float
    confidence: float  # the measure at `layer` for the actual context (teacher-forced)
    exits: bool  # confidence >= threshold
    context_ids: list[int]  # (T,) prompt + generated tokens before the explained one
    context_text: list[str]  # (T,) decoded text of each context token
    prompt_len: int  # the first prompt_len context tokens are the prompt
    ig: list[float]  # (T,) integrated gradients, summed over the embedding dimension
    ig_delta: float  # convergence delta of the IG approximation
    ig_steps: int
    ablation: list[float]  # (T,) decision(input) - decision(token t replaced by the baseline token)
    baseline_id: int  # the neutral token the baselines are made of
    baseline_confidence: float  # the measure when every context token is the baseline token
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)


class _AutogradCache:
    """Stand-in for ``KVCache`` during attribution (same ``write`` / ``keys_values`` calls).

    ``KVCache`` keeps every layer in one preallocated tensor written in place; autograd then sees layer
    l+1's write modify a tensor that layer l's attention saved for backward, and refuses. Here each layer's
    K/V of the whole context is its own tensor, stored once and never modified.
    """

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:  # (B, Hkv, T, hd)
        if start != 0 or layer in self.k:
            raise RuntimeError("attribution runs each layer once over the whole context")
        self.k[layer], self.v[layer] = k, v

    def keys_values(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer][:, :, start:end], self.v[layer][:, :, start:end]


class _Embedding(torch.nn.Module):
    """The lean model's token (+ learned position) embedding as a module, so Captum can hook its output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, d)
        return self.model.embed(ids, 0)


def decision_layer(trace, num_layers: int) -> tuple[int, str]:
    """The exit point whose decision explains where ``trace`` stopped, and a few words on why that one.

    A token that exited after k < L layers: the decision at k (it exited). A token that ran full depth
    after being checked: the deepest checked exit point (it declined to exit there). A token that was
    never checked (mode="full"): L - 1, the last point where it could have stopped.
    """
    if trace.exit_layer < num_layers:
        return trace.exit_layer, f"it exited after layer {trace.exit_layer}"
    checked = [k for k in trace.layer_confidence if k < num_layers]
    if checked:
        return max(checked), f"it declined to exit at layer {max(checked)}, its deepest check"
    return num_layers - 1, f"no exit was checked (full depth); layer {num_layers - 1} is the last possible exit"


def explain_exit(runtime, prompt_ids: list[int], token_ids: list[int], index: int, layer: int,
                 threshold: float, measure: str = "max_prob", n_steps: int = 32,
                 internal_batch_size: int = 16, perturbations_per_eval: int = 16,
                 max_context: int = 512) -> ExitAttribution:
    """Attribute the exit decision for generated token ``index`` at ``layer`` to its context tokens."""
    from captum.attr import FeatureAblation, LayerIntegratedGradients

    started = time.perf_counter()
    model, heads = runtime.model, runtime.heads
    L = model.spec.num_layers
    if not 0 <= index < len(token_ids):
        raise InvalidRequestError(f"token index {index} is outside the generation (0..{len(token_ids) - 1})")
    if not 1 <= layer <= L:
        raise InvalidRequestError(f"layer must be in 1..{L}, got {layer}")
    if not 0.0 <= threshold <= 1.0:
        raise InvalidRequestError(f"threshold must be in [0, 1], got {threshold}")
    notes = []
    classifier = getattr(runtime, "exit_classifier", None)
    if measure not in DIFFERENTIABLE:
        notes.append(f"measure {measure!r} is not differentiable; attributing max_prob instead")
        measure = "max_prob"
    elif measure == "classifier" and (classifier is None or layer >= L):
        notes.append("the learned exit classifier is not loaded or has no head at this layer; attributing max_prob")
        measure = "max_prob"
    context = list(prompt_ids) + list(token_ids[:index])
    if len(context) > max_context:
        raise InvalidRequestError(f"the context has {len(context)} tokens; attribution is limited to {max_context}")
    scorer = make_measure(measure, classifier=classifier) if measure == "classifier" else make_measure(measure)
    # The learned classifier needs the layer count; the other measures read it from nothing but their inputs.
    extra = {"layer": layer} if measure == "classifier" else {}
    eos = model.spec.eos_token_ids
    baseline_id = int(eos[0]) if eos else 0
    embedding = _Embedding(model)

    def score(ids: torch.Tensor) -> torch.Tensor:
        """(B, T) context ids -> (B,) confidence after `layer` layers for the next token."""
        cache = _AutogradCache()  # fresh per call: the batch differs between Captum's evaluations
        h = embedding(ids)  # (B, T, d); Captum hooks this output
        h_prev = h
        for i in range(layer):
            h_prev = h
            h = model.layer(i, h, 0, cache)
        last, prev = h[:, -1], h_prev[:, -1]  # (B, d): the position that predicts the explained token
        logits = heads.logits(last, layer).float() if scorer.needs_logits else None
        return scorer.score(logits, last, prev, **extra)  # (B,)

    def decision(ids: torch.Tensor) -> torch.Tensor:
        return (score(ids) >= threshold).float()  # (B,) 1 = exit, 0 = continue

    ids = torch.tensor([context], device=model.device)  # (1, T)
    base = torch.full_like(ids, baseline_id)
    # Captum needs autograd: undo any inference_mode a caller (or the UI thread) might be in.
    with torch.inference_mode(False), torch.enable_grad():
        lig = LayerIntegratedGradients(score, embedding)
        attributions, delta = lig.attribute(ids, baselines=base, n_steps=n_steps,
                                            internal_batch_size=internal_batch_size,
                                            return_convergence_delta=True)  # (1, T, d), (1,)
        ig = attributions.sum(dim=-1)[0].detach()  # (T,)
    with torch.no_grad():
        confidence = float(score(ids)[0])
        baseline_confidence = float(score(base)[0])
        ablation = FeatureAblation(decision).attribute(ids, baselines=baseline_id,
                                                       perturbations_per_eval=perturbations_per_eval)  # (1, T)
    text = [runtime.decode([t]) if runtime.tokenizer is not None else f"#{t}" for t in context]
    return ExitAttribution(
        token_index=index, position=len(context), layer=layer, measure=measure, threshold=float(threshold),
        confidence=confidence, exits=confidence >= threshold, context_ids=context, context_text=text,
        prompt_len=len(prompt_ids), ig=ig.tolist(), ig_delta=float(delta.abs().max()), ig_steps=n_steps,
        ablation=ablation[0].tolist(), baseline_id=baseline_id, baseline_confidence=baseline_confidence,
        elapsed_s=time.perf_counter() - started, notes=notes)


@dataclass
class GateAttribution:
    """Attribution of the prompt gate's verdict for one path over the T prompt tokens."""

    path: str
    probability: float  # P(path agrees with full depth) for the actual prompt
    baseline_probability: float  # ... when every prompt token is the baseline token
    context_ids: list[int]  # (T,)
    context_text: list[str]  # (T,)
    ig: list[float]  # (T,) integrated gradients of the gate's logit, summed over the embedding dimension
    ig_delta: float
    ig_steps: int
    baseline_id: int
    elapsed_s: float = 0.0


def explain_gate(runtime, prompt_ids: list[int], path: str, n_steps: int = 32,
                 internal_batch_size: int = 16) -> GateAttribution:
    """LayerIntegratedGradients of the prompt gate's logit for ``path`` on the prompt's input embeddings.

    The gate's features are recomputed differentiably from the embeddings (the light path's layers, the
    pooled and last hidden states, the light exit head's confidence); the token-count features (length,
    distinct and repeated shares) do not depend on the embeddings and are held at the prompt's values.
    """
    from captum.attr import LayerIntegratedGradients

    from adaptive.gating import SCALAR_FEATURES, prompt_features

    started = time.perf_counter()
    gate = runtime.gate
    if gate is None:
        raise InvalidRequestError("this model has no prompt gate (train one with `python -m adaptive train-gate`)")
    if path not in gate.paths:
        raise InvalidRequestError(f"the gate decides between {gate.paths}; got path {path!r}")
    model, layers = runtime.model, gate.feature_layers
    row = gate.paths.index(path)
    _, scalars, _ = prompt_features(runtime, prompt_ids, layers)
    counts = torch.tensor([scalars[k] for k in SCALAR_FEATURES[2:]])  # the embedding-independent features
    embedding = _Embedding(model)

    def logit(ids: torch.Tensor) -> torch.Tensor:
        """(B, T) prompt ids -> (B,) the gate's logit for ``path``."""
        cache = _AutogradCache()
        h = embedding(ids)
        for i in range(layers):
            h = model.layer(i, h, 0, cache)  # (B, T, d)
        probs = torch.softmax(runtime.heads.logits(h[:, -1], layers).float(), dim=-1)  # (B, V)
        top2 = torch.topk(probs, 2, dim=-1).values  # (B, 2)
        B = ids.shape[0]
        feats = torch.cat([h.float().mean(1), h[:, -1].float(), top2[:, :1], top2[:, :1] - top2[:, 1:],
                           counts.expand(B, -1)], dim=-1)  # (B, F), the order of prompt_features
        z = (feats - gate.mean) / gate.std
        return z @ gate.weight[row] + gate.bias[row]

    ids = torch.tensor([list(prompt_ids)], device=model.device)
    eos = model.spec.eos_token_ids
    baseline_id = int(eos[0]) if eos else 0
    base = torch.full_like(ids, baseline_id)
    with torch.inference_mode(False), torch.enable_grad():
        lig = LayerIntegratedGradients(logit, embedding)
        attributions, delta = lig.attribute(ids, baselines=base, n_steps=n_steps, internal_batch_size=internal_batch_size,
                                            return_convergence_delta=True)  # (1, T, d), (1,)
    with torch.no_grad():
        p, p0 = torch.sigmoid(logit(ids))[0], torch.sigmoid(logit(base))[0]
    text = [runtime.decode([t]) if runtime.tokenizer is not None else f"#{t}" for t in prompt_ids]
    return GateAttribution(path=path, probability=float(p), baseline_probability=float(p0),
                           context_ids=list(prompt_ids), context_text=text,
                           ig=attributions.sum(dim=-1)[0].detach().tolist(), ig_delta=float(delta.abs().max()),
                           ig_steps=n_steps, baseline_id=baseline_id, elapsed_s=time.perf_counter() - started)

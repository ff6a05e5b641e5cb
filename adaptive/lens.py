"""The lens: what every exit head says at every layer, for every generated token, in one pass.

After a generation, one full-depth forward over prompt + generated tokens (teacher-forced, batched over
positions) reads the exit head after each layer at the positions that predicted the generated tokens.
This is what the layer x token view draws: confidence by the chosen measure, KL to the final layer and
the top-k tokens per cell. It costs one prefill-sized pass and never changes a generation's cache.

Note: for tokens generated with ``kv_policy="propagate"``, the generation saw approximate K/V for
skipped layers, while the lens uses exact full-depth K/V, so a lens cell can differ slightly from the
confidence the run itself recorded (``TokenTrace.layer_confidence``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .exits import make_measure


@dataclass
class LensReport:
    """Per layer k = 1..L (rows) and generated token (columns); nested lists so it serialises to JSON."""

    measure: str
    token_ids: list[int]  # (N,) the generated tokens the columns stand for
    confidence: list[list[float]]  # (L, N) the measure at layer k for the prediction of token n
    kl_to_final: list[list[float]]  # (L, N) KL(final || layer k) in nats
    top_ids: list[list[list[int]]]  # (L, N, top_k) the exit head's most likely next tokens
    top_probs: list[list[list[float]]]  # (L, N, top_k)
    final_matches: list[list[bool]]  # (L, N) layer k's top-1 equals the final layer's top-1

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def lens(runtime, prompt_ids: list[int], token_ids: list[int], measure: str = "max_prob", top_k: int = 5,
         patience: int = 2) -> LensReport:
    """Note: the final row (k = L) of a hidden-state measure compares the last two layers like any other."""
    """Read every exit head at the positions that predicted ``token_ids`` (which follow ``prompt_ids``)."""
    model, heads = runtime.model, runtime.heads
    L = model.spec.num_layers
    seq = list(prompt_ids) + list(token_ids)
    N = len(token_ids)
    ids = torch.tensor([seq], device=model.device)
    first = len(prompt_ids) - 1  # position whose output predicts the first generated token
    cache = model.new_cache(1, len(seq))
    if measure == "attention":  # reads one decode step's query against the cache; the lens reads max_prob
        measure = "max_prob"
    scorer = make_measure(measure, patience, runtime.exit_classifier)
    h = model.embed(ids, 0)
    per_layer_logp, per_layer_conf = [], []
    for layer in range(L):
        prev = h
        h = model.layer(layer, h, 0, cache)
        sel, prev_sel = h[0, first:first + N], prev[0, first:first + N]  # (N, d)
        logits = heads.logits(sel, layer + 1).float()  # (N, V)
        per_layer_logp.append(torch.log_softmax(logits, dim=-1))
        k = min(layer + 1, L - 1) if scorer.name == "classifier" else layer + 1  # no classifier at the final layer
        per_layer_conf.append(scorer.score(logits, sel, prev_sel, layer=k))
    final_logp = per_layer_logp[-1]
    final_top = final_logp.argmax(dim=-1)
    kl, tops, probs, matches = [], [], [], []
    for logp in per_layer_logp:
        kl.append((final_logp.exp() * (final_logp - logp)).sum(dim=-1).clamp(min=0.0).tolist())
        values, indices = torch.topk(logp.exp(), top_k, dim=-1)
        tops.append(indices.tolist())
        probs.append(values.tolist())
        matches.append((logp.argmax(dim=-1) == final_top).tolist())
    return LensReport(measure=measure, token_ids=list(token_ids), confidence=[c.tolist() for c in per_layer_conf],
                      kl_to_final=kl, top_ids=tops, top_probs=probs, final_matches=matches)

"""``python -m adaptive fit-kv-fill --model PATH``: the learned K/V fill of the ``propagate`` policy.

On windows of training text, one full-depth pass per window gives every layer's input state h_j at every
position. For each exit point k and deeper layer j, ridge regression from the weightless-normalised
h_k (plus a constant) to the true pre-RoPE K/V of layer j gives the fill map (``adaptive/kv_fill.py``).
The runtime then fills a token that exited after k layers with these maps instead of each layer's own
projection of h_k, at the same MACs.

Everything is accumulated as Gram matrices in float64, so memory does not grow with the text; about a
minute on two CPU cores for 512 windows of 256 tokens on the bundled model, nothing to resume. A tenth
of the windows is held out: the file records, per exit point, the held-out fill error (squared K/V
error summed over the filled layers) relative to the projection's.
"""

from __future__ import annotations

import argparse

import torch

from ..kv_fill import KV_FILL_FILE, KVFill, fill_pairs
from ..runtime import Runtime
from .train_exits import prepare


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--text", nargs="*", default=None, help="local UTF-8 text files (default: the stdlib train split)")
    p.add_argument("--out", default=None, help=f"output file (default: MODEL/{KV_FILL_FILE})")
    p.add_argument("--windows", type=int, default=512, help="windows of text (a tenth is held out)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--ridge", type=float, default=1e-3, help="ridge penalty (per fitted position)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)


@torch.inference_mode()
def layer_inputs(rt: Runtime, ids: torch.Tensor) -> list[torch.Tensor]:
    """Weightless-normalised input state of layers 0..L-1 and the final state: L+1 tensors (B*T, d),
    float64, for ids (B, T)."""
    model, d = rt.model, rt.spec.hidden_size
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    h = model.embed(ids, 0)
    states = [model.weightless_norm(h).reshape(-1, d).double()]
    for layer in range(rt.spec.num_layers):
        h = model.layer(layer, h, 0, cache)
        states.append(model.weightless_norm(h).reshape(-1, d).double())
    return states


def _with_one(x: torch.Tensor) -> torch.Tensor:
    return torch.cat((x, torch.ones(x.shape[0], 1, dtype=x.dtype)), dim=1)  # (N, d+1)


def _true_kv(rt: Runtime, states: list[torch.Tensor]) -> list[torch.Tensor]:
    """Pre-RoPE K/V (N, 2*kv) of each layer j, from its real input state."""
    mats, biases = rt.model.kv_projection_stack()
    return [states[j] @ mats[j].double().T + biases[j].double() for j in range(rt.spec.num_layers)]


def fill_errors(fill: KVFill, rt: Runtime, states: list[torch.Tensor], kv: list[torch.Tensor],
                k: int) -> tuple[float, float]:
    """(learned, projection) squared K/V error of filling every position as if it exited after k
    layers, summed over the filled layers j > k and the positions."""
    mats, biases = rt.model.kv_projection_stack()
    x = states[k]
    learned = projected = 0.0
    for j in range(k + 1, rt.spec.num_layers):
        w, b = fill.map(k, j)
        learned += float(((x @ w.double().T + b.double() - kv[j]) ** 2).sum())
        projected += float(((x @ mats[j].double().T + biases[j].double() - kv[j]) ** 2).sum())
    return learned, projected


def fit(rt: Runtime, windows: list[torch.Tensor], held_out: list[torch.Tensor], ridge: float = 1e-3,
        progress: bool = True) -> KVFill:
    """Fill maps fitted on ``windows``, their held-out error on ``held_out`` (each a (1, T) id tensor)."""
    from tqdm import tqdm

    L, d = rt.spec.num_layers, rt.spec.hidden_size
    kv2 = 2 * rt.spec.num_kv_heads * rt.spec.head_dim
    gram = torch.zeros(L, d + 1, d + 1, dtype=torch.float64)  # per k: sum of x x^T over positions
    cross = {pair: torch.zeros(d + 1, kv2, dtype=torch.float64) for pair in fill_pairs(L)}  # sum of x y_j^T
    count = 0
    for ids in tqdm(windows, desc="K/V fill", disable=not progress):
        states = layer_inputs(rt, ids)
        kv = _true_kv(rt, states)
        count += states[0].shape[0]
        for k in range(1, L):
            x = _with_one(states[k])
            gram[k] += x.T @ x
            for j in range(k + 1, L):
                cross[(k, j)] += x.T @ kv[j]
    penalty = torch.eye(d + 1, dtype=torch.float64) * ridge * count
    weight = torch.zeros(len(cross), kv2, d)
    bias = torch.zeros(len(cross), kv2)
    for i, (k, j) in enumerate(fill_pairs(L)):
        solved = torch.linalg.solve(gram[k] + penalty, cross[(k, j)])  # (d+1, 2*kv)
        weight[i], bias[i] = solved[:d].T.float(), solved[d].float()
    fill = KVFill(weight, bias, L, fitted_on=f"{count} positions in {len(windows)} windows")

    sums = {k: [0.0, 0.0] for k in range(1, L - 1)}  # an exit after L-1 layers fills nothing approximate
    for ids in tqdm(held_out, desc="held out", disable=not progress):
        states = layer_inputs(rt, ids)
        kv = _true_kv(rt, states)
        for k in sums:
            learned, projected = fill_errors(fill, rt, states, kv, k)
            sums[k][0] += learned
            sums[k][1] += projected
    fill.relative_error = {k: round(a / max(b, 1e-30), 4) for k, (a, b) in sums.items()}
    return fill


def run(args) -> dict:
    """Fit and save the file; returns what finalize records."""
    rt, out, stream, seq_len = prepare(args, KV_FILL_FILE)
    if rt.spec.num_layers < 3:
        raise SystemExit("error: a K/V fill needs a model with at least 3 layers")
    gen = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, len(stream) - seq_len, (args.windows,), generator=gen).tolist()
    windows = [stream[s:s + seq_len][None] for s in starts]  # each (1, T)
    held = max(1, len(windows) // 10)
    fill = fit(rt, windows[held:], windows[:held], args.ridge)
    fill.save(out, rt.spec.hidden_size)
    print(f"K/V fill maps -> {out}")
    print("held-out fill error relative to the layer projections, per exit point:", fill.relative_error)
    return {"file": str(out), "fitted_on": fill.fitted_on, "relative_error": fill.relative_error}


def main(args) -> int:
    run(args)
    return 0

"""``python -m adaptive train-exit-classifier --model PATH``: CALM's learned exit decision per layer.

Labels come from the model itself, on the train text: a position is "safe to exit after k layers" when
the exit head's top-1 at k (with the model's exit adapters, over the same shortlist the runtime will
use when --shortlist is given) equals the final layer's top-1. One small MLP per exit point is fitted
on hidden-state features (see ``adaptive/exit_classifier.py``); the threshold on its probability is
chosen later by calibration. Backbone and heads stay frozen.

The loss has two objectives. Binary cross-entropy per exit point keeps each probability calibrated.
The decoding objective treats the classifiers as one soft exit policy over the layers: a token exits
after k layers with probability P_k = p_k * prod_{j<k} (1 - p_j) and otherwise reaches full depth, so

    E[disagreement] = sum_k P_k * (1 - agree_k)        E[layers] = sum_k k * P_k + L * prod_k (1 - p_k)

and ``--policy-weight * (--disagree-cost * E[disagreement] + E[layers] / L)`` trades agreement with
full depth against expected layers run (CALM's quality / compute trade-off, made differentiable).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ..exit_classifier import CLASSIFIER_FILE, ExitClassifier, features
from ..runtime import Runtime
from .train_exits import _hidden_states, prepare


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--text", nargs="*", default=None, help="local UTF-8 text files (default: the stdlib train split)")
    p.add_argument("--out", default=None, help=f"output file (default: MODEL/{CLASSIFIER_FILE})")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--max-minutes", type=float, default=15.0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--positions", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=32, help="MLP width")
    p.add_argument("--shortlist", type=int, default=0,
                   help="label agreement as the runtime sees it with exit_vocab_size=N (0: full vocabulary)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--policy-weight", type=float, default=0.5,
                   help="weight of the soft exit-policy objective next to the BCE (0: BCE only)")
    p.add_argument("--disagree-cost", type=float, default=20.0,
                   help="one disagreement with full depth costs as much as this many full-depth passes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)


@torch.inference_mode()
def _batch(rt: Runtime, ids: torch.Tensor, pick: torch.Tensor, shortlist_ids: torch.Tensor | None):
    """Features (L-1, P, d+1) and labels (L-1, P) for the picked positions of ids (B, T)."""
    hidden, final = _hidden_states(rt, ids)
    L, d = rt.spec.num_layers, rt.spec.hidden_size
    embed = rt.model.embed(ids, 0)
    final_top = final.reshape(-1, final.shape[-1])[pick].argmax(-1)  # (P,)
    feats, labels = [], []
    prev = embed
    for k in range(1, L):
        h = hidden[k - 1]
        hp, pp = h.reshape(-1, d)[pick], prev.reshape(-1, d)[pick]
        logits = rt.heads.logits(hp, k)  # (P, V)
        if shortlist_ids is not None:
            top = shortlist_ids[logits[:, shortlist_ids].argmax(-1)]
        else:
            top = logits.argmax(-1)
        feats.append(features(hp, pp))
        labels.append((top == final_top).float())
        prev = h
    return torch.stack(feats), torch.stack(labels)


def soft_exit_policy(p: torch.Tensor, agree: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p, agree (L-1, P): exit probabilities and agreement labels at exits 1..L-1 ->
    (E[disagreement with full depth], E[layers run]), both averaged over positions."""
    L = p.shape[0] + 1
    survive = torch.cumprod(torch.cat([torch.ones_like(p[:1]), 1 - p], dim=0), dim=0)  # (L, P): not exited before k
    exit_at = p * survive[:-1]  # (L-1, P): P(exit exactly after k layers)
    ks = torch.arange(1, L, dtype=p.dtype, device=p.device)[:, None]
    disagree = (exit_at * (1 - agree)).sum(0).mean()
    layers = ((exit_at * ks).sum(0) + L * survive[-1]).mean()
    return disagree, layers


def main(args) -> int:
    from tqdm import tqdm

    rt, out, stream, seq_len = prepare(args, CLASSIFIER_FILE)
    L, d = rt.spec.num_layers, rt.spec.hidden_size
    shortlist_ids = None
    if args.shortlist:
        if not rt.draft_ranking:
            raise SystemExit("error: --shortlist needs draft_vocab.json next to the model")
        shortlist_ids = torch.tensor(sorted(rt.draft_ranking[:args.shortlist]))
    H, Fdim = args.hidden, d + 1
    g = torch.Generator().manual_seed(args.seed)
    w1 = (torch.randn(L - 1, H, Fdim, generator=g) / Fdim ** 0.5).requires_grad_()
    b1 = torch.zeros(L - 1, H, requires_grad=True)
    w2 = (torch.randn(L - 1, H, generator=g) / H ** 0.5).requires_grad_()
    b2 = torch.zeros(L - 1, requires_grad=True)
    opt = torch.optim.Adam([w1, b1, w2, b2], lr=args.lr)
    start = time.time()
    bar = tqdm(total=args.steps, desc="exit classifier")
    positives = total = 0.0
    for step in range(args.steps):
        if (time.time() - start) / 60 > args.max_minutes:
            break
        starts = torch.randint(0, len(stream) - seq_len, (args.batch,), generator=g)
        ids = torch.stack([stream[s:s + seq_len] for s in starts.tolist()])
        pick = torch.randint(0, args.batch * seq_len, (args.positions,), generator=g)
        x, y = _batch(rt, ids, pick, shortlist_ids)
        x, y = x.clone(), y.clone()  # leave inference mode: these feed autograd
        hid = F.silu(torch.einsum("lpf,lhf->lph", x, w1) + b1[:, None, :])  # (L-1, P, H)
        logit = torch.einsum("lph,lh->lp", hid, w2) + b2[:, None]  # (L-1, P)
        bce = F.binary_cross_entropy_with_logits(logit, y)
        disagree, layers = soft_exit_policy(torch.sigmoid(logit), y)
        loss = bce + args.policy_weight * (args.disagree_cost * disagree + layers / L)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        positives += float(y.sum())
        total += y.numel()
        bar.update(1)
        bar.set_postfix(bce=f"{float(bce):.4f}", disagree=f"{float(disagree):.4f}", layers=f"{float(layers):.2f}",
                        safe_share=f"{positives / total:.3f}")
    bar.close()
    labels = f"top-1 agreement with the final layer over {'shortlist ' + str(args.shortlist) if args.shortlist else 'the full vocabulary'}"
    ExitClassifier(w1.detach(), b1.detach(), w2.detach(), b2.detach(), labels=labels).save(out, d, L)
    print(f"wrote {out} after {step + 1} steps")
    return 0

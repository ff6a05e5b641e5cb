"""``python -m adaptive train-gate``: train the prompt-level gate from the runtime's own runs.

1. Prompts: windows of mixed length (8 to 160 tokens, log-uniform, seeded) drawn from the validation
   split (or ``--text``), so short ambiguous prompts and long repetitive ones are both present.
2. Labels, from real runs: the full-depth greedy continuation of ``--tokens`` tokens is the reference;
   every shallow path then decodes the same prompt teacher-forced on that reference (``follow=``), so
   its per-token agreement with full depth is measured on identical prefixes. A path's label is
   agreement >= ``--tau``. Labels are appended to ``<run-dir>/labels.jsonl`` as they are made, so an
   interrupted run resumes where it stopped.
3. Fit: one L2-regularised logistic regression per shallow path on standardised features (LBFGS),
   on 80% of the prompts; the other 20% give the held-out accuracy and the "cheapest agreeing path"
   accuracy reported in the file's metadata.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import torch
from tqdm import tqdm

from ..gating import GATE_FILE, PromptGate, prompt_features
from ..runtime import Runtime
from .ltt_calibrate import _stream


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--text", default=None, help="a local text file instead of the stdlib validation split")
    p.add_argument("--prompts", type=int, default=400)
    p.add_argument("--tokens", type=int, default=32, help="reference tokens per prompt")
    p.add_argument("--tau", type=float, default=0.9, help="agreement with full depth that makes a label positive")
    p.add_argument("--l2", type=float, default=None,
                   help="L2 strength (default: chosen per path from 0.01-30 on a quarter of the training prompts)")
    p.add_argument("--run-dir", default="runs/gate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)


def mixed_windows(stream: list[int], count: int, seed: int, shortest: int = 8, longest: int = 160) -> list[list[int]]:
    """``count`` windows with log-uniform lengths in [shortest, longest] at uniform random offsets."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = int(round(math.exp(rng.uniform(math.log(shortest), math.log(longest)))))
        start = rng.randrange(0, len(stream) - n)
        out.append(stream[start:start + n])
    return out


def path_agreement(rt: Runtime, prompt: list[int], tokens: int) -> dict[str, float]:
    """Per shallow path: share of tokens equal to the full-depth greedy continuation (same prefixes)."""
    reference = rt.generate(prompt, max_new_tokens=tokens, mode="full", stop_at_eos=False).token_ids
    out = {}
    for name in rt.paths:
        if name == "full":
            continue
        res = rt.generate(prompt, max_new_tokens=tokens, mode="full", path=name, follow=reference, stop_at_eos=False)
        out[name] = sum(a == b for a, b in zip(res.token_ids, reference)) / len(reference)
    return out


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float, steps: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, F) standardised, y (N,) in {0, 1} -> (weight (F,), bias ()) of an L2 logistic regression."""
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def choose_l2(z: torch.Tensor, y: torch.Tensor, grid=(0.01, 0.1, 1.0, 3.0, 10.0, 30.0)) -> float:
    """The L2 strength with the best accuracy on the last quarter when fitted on the first three."""
    cut = int(0.75 * len(y))
    best = (-1.0, 0.0)
    for l2 in grid:
        w, b = fit_logistic(z[:cut], y[:cut], l2)
        acc = float(((torch.sigmoid(z[cut:] @ w + b) >= 0.5).float() == y[cut:]).float().mean())
        best = max(best, (acc, l2))  # ties go to the stronger regulariser
    return best[1]


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    rt = Runtime.from_pretrained(args.model)
    shallow = [name for name in rt.paths if name != "full"]
    stream = _stream(rt, "validation", args.text)
    longest = min(160, rt.spec.max_positions - args.tokens - 1)  # prompt + reference must fit the context
    prompts = mixed_windows(stream, args.prompts, args.seed, shortest=min(8, longest), longest=longest)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    labels_path = run_dir / "labels.jsonl"
    done = [json.loads(line) for line in labels_path.read_text().splitlines()] if labels_path.is_file() else []
    done = [d for d in done if d.get("tokens") == args.tokens and d.get("model") == rt.name]
    with labels_path.open("a") as f:
        for i in tqdm(range(len(done), len(prompts)), desc="gate labels (real runs)", initial=len(done),
                      total=len(prompts)):
            row = {"index": i, "model": rt.name, "tokens": args.tokens, "prompt": prompts[i],
                   "agreement": path_agreement(rt, prompts[i], args.tokens)}
            f.write(json.dumps(row) + "\n")
            f.flush()
            done.append(row)
    layers = rt.paths["light"]
    feats = torch.stack([prompt_features(rt, d["prompt"], layers)[0] for d in done])  # (N, F)
    agree = {name: torch.tensor([d["agreement"][name] for d in done]) for name in shallow}
    n_train = int(0.8 * len(done))
    mean, std = feats[:n_train].mean(0), feats[:n_train].std(0).clamp_min(1e-6)
    z = (feats - mean) / std
    weights, biases, report = [], [], {"prompts": len(done), "train": n_train, "held_out": len(done) - n_train,
                                       "tokens": args.tokens, "tau": args.tau, "paths": {}}
    for name in shallow:
        y = (agree[name] >= args.tau).float()
        l2 = args.l2 if args.l2 is not None else choose_l2(z[:n_train], y[:n_train])
        w, b = fit_logistic(z[:n_train], y[:n_train], l2)
        pred = (torch.sigmoid(z[n_train:] @ w + b) >= 0.5).float()
        report["paths"][name] = {"positive_rate": float(y.mean()), "held_out_accuracy": float((pred == y[n_train:]).float().mean()),
                                 "held_out_majority_baseline": float(max(y[n_train:].mean(), 1 - y[n_train:].mean())),
                                 "mean_agreement": float(agree[name].mean()), "l2": l2}
        weights.append(w)
        biases.append(b)
    gate = PromptGate(torch.stack(weights), torch.stack(biases), mean, std, shallow, layers, args.tau, report)
    out = Path(rt.directory) / GATE_FILE
    gate.save(out)
    print(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0

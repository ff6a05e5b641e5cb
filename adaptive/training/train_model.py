"""Train the bundled default model (8-layer Llama on the Python stdlib) with early-exit losses.

    python -m adaptive.training.train_model --max-minutes 125 --max-tokens 20000000

Pipeline: corpus (stdlib *.py) -> byte-level BPE 8192 (cached in data/tokenizer) -> token arrays
(cached in data/tokens) -> training with the multi-exit objective of ``losses.py`` -> HF export to
--out (safetensors + tokenizer) at every checkpoint, so an interrupted run leaves a usable model.

Resuming: a checkpoint in --run-dir is picked up automatically (``--no-resume`` starts fresh). Data
windows, layer drop and exit choice of step s are drawn from a generator seeded by (seed, s), so the
step counter is the whole data position.

``--propagate-exits 4,6`` trains under the runtime's ``propagate`` KV policy (``stack.PropagatePlan``):
positions whose exit head is confident lend the deeper layers K/V computed from their exit state, so
the model learns to decode well with the approximate K/V that early exit leaves behind. Each eval then
logs the teacher-forced early-exit agreement under propagate (``propagate_agreement``). Budgets (--max-tokens / --max-minutes) are totals over all
resumes; larger ones on resume extend the schedule (see ``schedule.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import parse_exit_layers
from . import tokenizer as tok_mod
from .losses import ExitLossConfig, early_exit_loss
from .schedule import Budget, LRSchedule
from .stack import ModelShape, PropagatePlan, build_model, forward_layers, forward_layers_propagate, head
from .token_cache import TokenSplit, load_splits

LN2 = math.log(2)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="assets/pycoder-8l", help="HF export folder")
    p.add_argument("--run-dir", default=None, help="checkpoints + log.jsonl (default runs/pycoder-8l)")
    p.add_argument("--data-dir", default="data", help="tokenizer and token caches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=224)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--max-tokens", type=int, default=None, help="token budget (total over resumes)")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-time budget (total over resumes)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="ignore an existing checkpoint (default: resume if one exists)")
    p.add_argument("--resume", dest="resume", action="store_true")
    p.set_defaults(resume=True)
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--eval-windows", type=int, default=32, help="validation windows per periodic eval")
    p.add_argument("--no-exits", action="store_true", help="plain LM training (throughput baseline)")
    p.add_argument("--exits-per-step", type=int, default=2)
    p.add_argument("--position-frac", type=float, default=0.25)
    p.add_argument("--layer-drop", type=float, default=0.1)
    p.add_argument("--exit-total", type=float, default=ExitLossConfig.exit_total,
                   help="sum of the exit losses' weights relative to the final CE (raise it on a resume "
                        "to keep the shallow exits up with an improving final layer)")
    p.add_argument("--beta-kl", type=float, default=ExitLossConfig.beta_kl,
                   help="share of KL-to-final (vs CE) inside each exit term")
    p.add_argument("--propagate-exits", default=None, type=_layer_list,
                   help="train under the runtime's propagate KV policy with exits after these layers, "
                        "e.g. 4,6 (see stack.PropagatePlan); off by default")
    p.add_argument("--propagate-threshold", default=(0.5, 0.9), type=_threshold_range,
                   help="LO:HI; each step draws its exit threshold uniformly from this range")
    p.add_argument("--pilot", action="store_true",
                   help="short run, no export, no checkpoint; prints a JSON summary (default 4 min)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast for forward and loss (fp32 master weights and optimizer); "
                        "2-3x faster on CPUs with AMX/AVX512-BF16")
    p.add_argument("--full-eval", action=argparse.BooleanOptionalAction, default=None,
                   help="evaluate the whole validation split at the end (default on unless --pilot)")


def _layer_list(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(sorted(set(parse_exit_layers(text) or ())))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not layers or layers[0] < 1:
        raise argparse.ArgumentTypeError(f"exit layers must be >= 1, got {text!r}")
    return layers


def _threshold_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO:HI like 0.5:0.9, got {text!r}") from None
    if not 0 < lo <= hi < 1:
        raise argparse.ArgumentTypeError(f"need 0 < LO <= HI < 1, got {text!r}")
    return lo, hi


# ----------------------------------------------------------------------------- evaluation
def window_starts(num_tokens: int, seq_len: int, n_windows: int | None) -> np.ndarray:
    """Starts of the validation windows: ``n_windows`` evenly spaced ones (fixed, so runs compare), or
    None for every disjoint window of the split. Each window reads seq_len + 1 tokens (inputs, targets)."""
    if n_windows is None:
        return np.arange((num_tokens - 1) // seq_len) * seq_len
    return np.linspace(0, num_tokens - seq_len - 2, n_windows).astype(np.int64)


@torch.no_grad()
def evaluate(model, split: TokenSplit, seq_len: int, n_windows: int | None, batch: int = 8,
             per_layer: bool = True) -> dict:
    """Mean next-token loss on fixed validation windows (evenly spaced, non-random: comparable
    across runs). bits/byte = nats/token * tokens/byte (of the whole split) / ln 2."""
    was_training = model.training
    model.eval()
    toks = split.tokens
    starts = window_starts(len(toks), seq_len, n_windows)
    L = model.config.num_hidden_layers
    keep = set(range(1, L)) if per_layer else set()
    sums = {l: 0.0 for l in list(keep) + [L]}
    count = 0
    for i in range(0, len(starts), batch):
        st = starts[i:i + batch]
        win = torch.from_numpy(np.stack([toks[s:s + seq_len + 1] for s in st]).astype(np.int64))
        x, y = win[:, :-1], win[:, 1:]                            # [b, T] each
        h, kept = forward_layers(model, x, keep=keep)
        kept[L] = h
        for l, hl in kept.items():
            logits = head(model, hl)                              # [b, T, V]
            sums[l] += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    nats = {l: s / count for l, s in sums.items()}
    return {"val_nats": nats[L], "val_bpb": nats[L] * split.tokens_per_byte / LN2,
            "val_tokens": count,
            "per_layer_nats": {str(l): round(v, 4) for l, v in sorted(nats.items())},
            "per_layer_bpb": {str(l): round(v * split.tokens_per_byte / LN2, 4)
                              for l, v in sorted(nats.items())}}


@torch.no_grad()
def propagate_agreement(model, split: TokenSplit, seq_len: int, n_windows: int, plan: PropagatePlan,
                        batch: int = 8) -> dict:
    """Teacher-forced early exit under propagate, read through the shared head (no adapters): each
    position predicts from its exit layer and sees propagated K/V of earlier exited positions. Returns
    its top-1 agreement with exact full depth and the mean share of layers run. This is the runtime's
    calibration quantity without the adapters, cheap enough to log at every eval."""
    was_training = model.training
    model.eval()
    toks = split.tokens
    starts = window_starts(len(toks), seq_len, n_windows)
    L = model.config.num_hidden_layers
    keep = set(plan.exit_layers)
    agree = layers = count = 0
    for i in range(0, len(starts), batch):
        x = torch.from_numpy(np.stack([toks[s:s + seq_len] for s in starts[i:i + batch]]).astype(np.int64))
        exact = head(model, forward_layers(model, x)[0]).argmax(-1)                 # [b, T]
        h, kept, _, exit_layer = forward_layers_propagate(model, x, plan, keep=keep)
        pred = head(model, h).argmax(-1)
        for l in plan.exit_layers:
            pred = torch.where(exit_layer == l, head(model, kept[l]).argmax(-1), pred)
        agree += (pred == exact).sum().item()
        layers += exit_layer.sum().item()
        count += exact.numel()
    model.train(was_training)
    return {"threshold": plan.threshold, "exits": list(plan.exit_layers),
            "agreement": round(agree / count, 5), "layers_frac": round(layers / count / L, 4)}


# ----------------------------------------------------------------------------- checkpoints/export
def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a torn checkpoint


def export_hf(model, tokenizer_dir: Path, out: Path, context: int, info: dict) -> None:
    """save_pretrained (safetensors) + tokenizer files, written next to --out and swapped in."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp"
    old = out.parent / f".{out.name}.old"
    for d in (tmp, old):
        if d.exists():
            shutil.rmtree(d)
    model.save_pretrained(tmp)
    for name in ("tokenizer.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, tmp / name)
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = context
    (tmp / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (tmp / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)


def _log(log_path: Path, rec: dict) -> None:
    with open(log_path, "a") as f:
        f.write(json.dumps(rec) + "\n")


# ----------------------------------------------------------------------------- step randomness
def step_generator(seed: int, step: int) -> torch.Generator:
    # One generator per step: data position and all training randomness follow from the step count.
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def sample_batch(tokens: np.ndarray, batch: int, seq_len: int, g: torch.Generator):
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch,), generator=g).numpy()
    win = torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64))
    return win[:, :-1], win[:, 1:]                                # inputs, targets: [B, T] each


def _propagate_diagnostics(args, model, val: TokenSplit) -> dict:
    if not args.propagate_exits:
        return {}
    return {"propagate": [propagate_agreement(model, val, args.seq_len, args.eval_windows,
                                              PropagatePlan(args.propagate_exits, t))
                          for t in (0.6, 0.8)]}


# ----------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    if args.pilot and args.max_minutes is None and args.max_tokens is None:
        args.max_minutes = 4.0
    if args.max_minutes is None and args.max_tokens is None:
        print("need --max-tokens and/or --max-minutes", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir or (f"runs/pilot-w{args.width}" if args.pilot else "runs/pycoder-8l"))
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = run_dir / "checkpoint.pt", run_dir / "log.jsonl"
    data_dir = Path(args.data_dir)
    tok_dir = data_dir / "tokenizer"
    full_eval = (not args.pilot) if args.full_eval is None else args.full_eval

    tok = tok_mod.get_tokenizer(tok_dir, context_length=args.context)
    splits = load_splits(tok, tok_dir / "tokenizer.json", data_dir / "tokens", ("train", "validation"))
    train, val = splits["train"], splits["validation"]
    eot = tok.token_to_id(tok_mod.EOT)

    torch.manual_seed(args.seed)
    shape = ModelShape(args.width, args.layers, tok.get_vocab_size(), args.context)
    model = build_model(shape, eot)
    n_params = sum(p.numel() for p in model.parameters())
    exit_cfg = ExitLossConfig(num_layers=args.layers, exits_per_step=args.exits_per_step,
                              position_frac=args.position_frac, layer_drop_max=args.layer_drop,
                              exit_total=args.exit_total, beta_kl=args.beta_kl)
    # No weight decay on norms/biases-like 1-D tensors (standard AdamW practice).
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    budget = Budget(args.max_tokens, args.max_minutes * 60 if args.max_minutes else None)
    sched = LRSchedule.fresh(args.lr, budget)
    step, tokens, seconds = 0, 0, 0.0

    if args.resume and not args.pilot and ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=True)  # our own checkpoint only
        if state["shape"] != asdict(shape):
            print(f"checkpoint shape {state['shape']} != requested {asdict(shape)}", file=sys.stderr)
            return 2
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        torch.set_rng_state(state["rng"])
        step, tokens, seconds = state["step"], state["tokens"], state["seconds"]
        sched = LRSchedule.from_dict(json.loads(state["schedule"]))
        if sched.extend(budget, tokens, seconds):
            print(f"budget extended: new schedule segment from {tokens} tokens", file=sys.stderr)
        print(f"resumed from step {step} ({tokens} tokens, {seconds / 60:.1f} min)", file=sys.stderr)

    print(f"model: width {shape.width}, heads {shape.heads}x{shape.head_dim}, mlp {shape.intermediate}, "
          f"{n_params / 1e6:.2f}M params; train {len(train.tokens)} tokens, val {len(val.tokens)}",
          file=sys.stderr)
    _log(log_path, {"kind": "start", "step": step, "tokens": tokens, "params": n_params,
                    "shape": asdict(shape), "args": vars(args), "time": time.time()})

    def checkpoint_and_export(ev: dict | None) -> None:
        if args.pilot:
            return
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optim": opt.state_dict(), "rng": torch.get_rng_state(),
            "step": step, "tokens": tokens, "seconds": seconds, "shape": asdict(shape),
            "schedule": json.dumps(sched.to_dict()), "seed": args.seed})
        info = {"step": step, "tokens": tokens, "train_minutes": round(seconds / 60, 2),
                "params": n_params, "corpus": "Python stdlib (see adaptive/training/corpus.py)",
                "objective": asdict(exit_cfg), **(ev or {})}
        if args.propagate_exits:
            info["propagate_kv"] = {"exit_layers": list(args.propagate_exits),
                                    "threshold_range": list(args.propagate_threshold)}
        export_hf(model, tok_dir, Path(args.out), args.context, info)

    model.train()
    tokens_per_step = args.batch * args.seq_len
    bar = tqdm(total=args.max_tokens, initial=tokens, unit="tok", unit_scale=True, dynamic_ncols=True,
               mininterval=2.0)
    t_last = time.time()
    last_ckpt = seconds
    ema_loss, ema_tps = None, None
    L = args.layers
    while not sched.done(tokens, seconds):
        t0 = time.time()
        g = step_generator(args.seed, step)
        x, y = sample_batch(train.tokens, args.batch, args.seq_len, g)
        progress = sched.overall_progress(tokens, seconds)
        lr = sched.lr(tokens, seconds)
        for group in opt.param_groups:
            group["lr"] = lr
        if args.no_exits:
            drop, exits = set(), set()
        else:
            r = torch.rand(L, generator=g)
            drop = {i for i in range(L) if r[i].item() < exit_cfg.layer_drop_rate(i)}
            perm = torch.randperm(L - 1, generator=g)[:exit_cfg.exits_per_step] + 1
            exits = set(perm.tolist()) if exit_cfg.ramp(progress) > 0 else set()
        plan = None
        if args.propagate_exits and not args.no_exits:
            lo, hi = args.propagate_threshold
            plan = PropagatePlan(args.propagate_exits, lo + (hi - lo) * torch.rand(1, generator=g).item())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            if plan is None:
                h, kept = forward_layers(model, x, keep=exits, drop=drop)
                exited = {}
            else:
                h, kept, pstats, _ = forward_layers_propagate(model, x, plan, keep=exits, drop=drop)
                exited = {str(k): round(v, 3) for k, v in pstats.exited.items()}
            parts = early_exit_loss(exit_cfg, lambda z: head(model, z), head(model, h), y, kept, progress, g)
        opt.zero_grad(set_to_none=True)
        parts.total.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()

        step += 1
        tokens += tokens_per_step
        now = time.time()
        seconds += now - t_last
        t_last = now
        tps = tokens_per_step / (now - t0)
        ema_loss = parts.final_ce if ema_loss is None else 0.95 * ema_loss + 0.05 * parts.final_ce
        ema_tps = tps if ema_tps is None else 0.9 * ema_tps + 0.1 * tps
        bar.update(tokens_per_step)
        bar.set_postfix(loss=f"{ema_loss:.3f}", tok_s=f"{ema_tps:.0f}", lr=f"{lr:.2e}",
                        min=f"{seconds / 60:.1f}")
        if step % 20 == 0:
            _log(log_path, {"kind": "train", "step": step, "tokens": tokens, "seconds": round(seconds, 1),
                            "loss": round(parts.final_ce, 4), "total": round(parts.total.item(), 4),
                            "exit_ce": {str(k): round(v, 4) for k, v in parts.exit_ce.items()},
                            "exit_kl": {str(k): round(v, 4) for k, v in parts.exit_kl.items()},
                            "lr": lr, "gnorm": round(gnorm, 3), "tok_s": round(ema_tps, 1),
                            "dropped": sorted(drop), **({"exited": exited} if exited else {})})
        if seconds - last_ckpt >= args.checkpoint_minutes * 60:
            ev = evaluate(model, val, args.seq_len, args.eval_windows)
            ev.update(_propagate_diagnostics(args, model, val))
            _log(log_path, {"kind": "eval", "step": step, "tokens": tokens, "seconds": round(seconds, 1), **ev})
            bar.write(f"step {step} tokens {tokens}: val {ev['val_nats']:.4f} nats/tok, "
                      f"{ev['val_bpb']:.4f} bits/byte; per layer bpb {ev['per_layer_bpb']}")
            checkpoint_and_export(ev)
            last_ckpt = seconds
            t_last = time.time()  # eval/export time is not training time... but see below
            seconds += t_last - now  # ...it is wall time, and the budget is wall time: count it
    bar.close()

    ev = evaluate(model, val, args.seq_len, args.eval_windows)
    ev.update(_propagate_diagnostics(args, model, val))
    summary = {"kind": "final", "step": step, "tokens": tokens, "seconds": round(seconds, 1),
               "tok_s_mean": round(tokens / max(seconds, 1e-9), 1), "width": args.width,
               "params": n_params, **ev}
    if full_eval:
        full = evaluate(model, val, args.seq_len, None, per_layer=False)
        summary.update({"full_val_nats": full["val_nats"], "full_val_bpb": full["val_bpb"],
                        "full_val_tokens": full["val_tokens"]})
    _log(log_path, summary)
    checkpoint_and_export(summary)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m adaptive.training.train_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))

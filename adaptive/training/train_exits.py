"""``python -m adaptive train-exits --model PATH``: per-layer exit adapters on a frozen backbone.

For every exit point k = 1..L-1, an adapter ``h + W_k h + b_k`` (zero-initialised, i.e. the logit lens)
is trained so that head(adapter(h_k)) matches the final layer's distribution: KL(p_final || p_k), the
tuned-lens objective. The backbone runs in inference mode through the runtime's own lean forward, so
any supported checkpoint works; only the adapters get gradients.

Text: the stdlib train split (the bundled model's corpus) by default, or local text files (--text).
Long job habits: tqdm progress, a checkpoint of the adapters and optimiser every --checkpoint-minutes
(safetensors + JSON, never pickle), resume from it, a seed, and a time and step budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..exits import ADAPTER_FILE, save_adapters
from ..runtime import Runtime


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--text", nargs="*", default=None, help="local UTF-8 text files (default: the stdlib train split)")
    p.add_argument("--out", default=None, help=f"adapter file (default: MODEL/{ADAPTER_FILE})")
    p.add_argument("--run-dir", default="runs/exits", help="checkpoints for resuming")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--max-minutes", type=float, default=30.0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--positions", type=int, default=512, help="positions per step that get the KL loss")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=None)


def _token_stream(rt: Runtime, text_files: list[str] | None) -> torch.Tensor:
    if text_files:
        texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in text_files]
    else:
        from .corpus import iter_documents
        texts = [d.text for d in iter_documents("train")]
    if rt.tokenizer is None:
        raise SystemExit("error: the model has no tokenizer; exits need text to train on")
    ids: list[int] = []
    eos = rt.spec.eos_token_ids[0] if rt.spec.eos_token_ids else None
    for text in texts:
        ids.extend(rt.tokenizer.encode(text, add_special_tokens=False))
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def prepare(args, default_file: str) -> tuple[Runtime, Path, torch.Tensor, int]:
    """Shared set-up of the exit trainers: (runtime, output path, token stream, sequence length)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rt = Runtime.from_pretrained(args.model)
    out = Path(args.out) if args.out else Path(rt.directory) / default_file
    stream = _token_stream(rt, args.text)
    seq_len = min(args.seq_len, rt.spec.max_positions)
    if len(stream) <= seq_len + 1:
        raise SystemExit(f"error: the text has only {len(stream)} tokens; need more than {seq_len + 1}")
    return rt, out, stream, seq_len


@torch.inference_mode()
def _hidden_states(rt: Runtime, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Hidden states after each layer k = 1..L-1 and the final log-probs, for ids (B, T)."""
    model = rt.model
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    h = model.embed(ids, 0)
    per_layer = []
    for layer in range(model.spec.num_layers):
        h = model.layer(layer, h, 0, cache)
        per_layer.append(h)
    final = torch.log_softmax(model.head(h).float(), dim=-1)
    return per_layer[:-1], final


def _save_state(run_dir: Path, adapters, opt: torch.optim.Optimizer, step: int, d: int, L: int) -> None:
    from safetensors.torch import save_file

    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, (w, b) in adapters.items():
        tensors[f"exit.{k}.weight"], tensors[f"exit.{k}.bias"] = w.detach(), b.detach()
        for name, p in (("weight", w), ("bias", b)):
            st = opt.state.get(p, {})
            if st:
                tensors[f"adam.{k}.{name}.m"] = st["exp_avg"]
                tensors[f"adam.{k}.{name}.v"] = st["exp_avg_sq"]
    tmp = run_dir / "state.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, run_dir / "state.safetensors")
    (run_dir / "state.json").write_text(json.dumps({"step": step, "hidden_size": d, "num_layers": L}))


def _load_state(run_dir: Path, adapters, opt: torch.optim.Optimizer, d: int, L: int) -> int:
    from safetensors.torch import load_file

    meta_path = run_dir / "state.json"
    if not meta_path.is_file():
        return 0
    meta = json.loads(meta_path.read_text())
    if meta.get("hidden_size") != d or meta.get("num_layers") != L:
        return 0  # a checkpoint of another model: start afresh
    tensors = load_file(str(run_dir / "state.safetensors"))
    with torch.no_grad():
        for k, (w, b) in adapters.items():
            w.copy_(tensors[f"exit.{k}.weight"])
            b.copy_(tensors[f"exit.{k}.bias"])
            for name, p in (("weight", w), ("bias", b)):
                if f"adam.{k}.{name}.m" in tensors:
                    opt.state[p] = {"step": torch.tensor(float(meta["step"])),
                                    "exp_avg": tensors[f"adam.{k}.{name}.m"],
                                    "exp_avg_sq": tensors[f"adam.{k}.{name}.v"]}
    return int(meta["step"])


def main(args) -> int:
    from tqdm import tqdm

    rt, out, stream, seq_len = prepare(args, ADAPTER_FILE)
    model = rt.model
    d, L = model.spec.hidden_size, model.spec.num_layers
    adapters = {k: (torch.zeros(d, d, requires_grad=True), torch.zeros(d, requires_grad=True)) for k in range(1, L)}
    params = [p for pair in adapters.values() for p in pair]
    opt = torch.optim.Adam(params, lr=args.lr)
    run_dir = Path(args.run_dir)
    step = _load_state(run_dir, adapters, opt, d, L)
    g = torch.Generator().manual_seed(args.seed)
    for _ in range(step):  # replay the data order so a resumed run sees what an uninterrupted one would
        torch.randint(0, len(stream) - seq_len, (args.batch,), generator=g)
        torch.randint(0, args.batch * seq_len, (args.positions,), generator=g)
    start, last_ckpt = time.time(), time.time()
    bar = tqdm(total=args.steps, initial=step, desc="exit adapters")
    while step < args.steps and (time.time() - start) / 60 < args.max_minutes:
        starts = torch.randint(0, len(stream) - seq_len, (args.batch,), generator=g)
        ids = torch.stack([stream[s:s + seq_len] for s in starts.tolist()])  # (B, T)
        hidden, final = _hidden_states(rt, ids)
        pick = torch.randint(0, args.batch * seq_len, (args.positions,), generator=g)
        target = final.reshape(-1, final.shape[-1])[pick]  # (P, V) log p_final
        p_target = target.exp()
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))  # cosine decay
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for k, (w, b) in adapters.items():
            h = hidden[k - 1].reshape(-1, d)[pick].clone()  # (P, d), outside inference mode
            logp = torch.log_softmax(F.linear(model.final_norm(h + F.linear(h, w, b)), model.w.lm_head).float(), -1)
            loss = (p_target * (target - logp)).sum(-1).mean()  # KL(p_final || p_k)
            loss.backward()
            total += loss.item()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(kl_mean=f"{total / (L - 1):.4f}", lr=f"{lr:.1e}")
        if (time.time() - last_ckpt) / 60 >= args.checkpoint_minutes:
            _save_state(run_dir, adapters, opt, step, d, L)
            save_adapters(out, {k: (w, b) for k, (w, b) in adapters.items()}, d, L)
            last_ckpt = time.time()
    bar.close()
    _save_state(run_dir, adapters, opt, step, d, L)
    save_adapters(out, {k: (w, b) for k, (w, b) in adapters.items()}, d, L)
    print(f"wrote {out} after {step} steps")
    return 0

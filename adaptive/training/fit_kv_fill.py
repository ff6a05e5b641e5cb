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

A smaller K/V error is not the same as less damage to the tokens that read it, so ``--refine-steps``
then trains the maps on the damage itself (``refine``): windows are decoded as ``propagate`` decodes them
(the model's default exits and thresholds, replayed layer by layer as calibration does), and the loss is
the KL divergence of the final layer from the undamaged model's at the positions that run full depth,
through the frozen model, with only the maps trained. Progress bar, checkpoints, resume.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from ..config import LOGIT_MEASURES
from ..draft_vocab import shortlist
from ..exits import make_measure
from ..kv_fill import KV_FILL_FILE, KVFill, fill_pairs
from ..loading import weights_hash
from ..runtime import Runtime
from .calibrate_exits import replay_pass
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
    g = p.add_argument_group("refine (train the maps on downstream damage)")
    g.add_argument("--refine-steps", type=int, default=0, help="optimizer steps (0: least squares only)")
    g.add_argument("--refine-batch", type=int, default=4, help="windows per step")
    g.add_argument("--refine-lr", type=float, default=2e-4)
    g.add_argument("--refine-run-dir", default=None,
                   help="checkpoint folder to resume from (default: runs/kv-fill/<model name>)")


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
    """Fit (and refine) and save the file; returns what finalize records."""
    rt, out, stream, seq_len = prepare(args, KV_FILL_FILE)
    if rt.spec.num_layers < 3:
        raise SystemExit("error: a K/V fill needs a model with at least 3 layers")
    steps = args.refine_steps
    if steps < 0 or args.refine_batch < 1 or not args.refine_lr > 0:
        raise SystemExit("error: --refine-steps must be >= 0, --refine-batch >= 1 and --refine-lr > 0")
    gen = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, len(stream) - seq_len, (args.windows,), generator=gen).tolist()
    windows = [stream[s:s + seq_len][None] for s in starts]  # each (1, T)
    held = max(1, len(windows) // 10)
    rt.model.set_kv_fill(None)  # fitted from the model's own states, whatever fill it ships now
    fill = fit(rt, windows[held:], windows[:held], args.ridge)
    report = {"file": str(out), "fitted_on": fill.fitted_on, "relative_error": fill.relative_error}
    if steps:
        from pathlib import Path

        run_dir = Path(args.refine_run_dir) if args.refine_run_dir else Path("runs/kv-fill") / Path(rt.directory).name
        fill, report["refine"] = refine(rt, fill, stream, windows[:held], RefineSetting.from_runtime(rt), steps,
                                        args.refine_batch, args.refine_lr, seq_len, run_dir, seed=args.seed)
    fill.save(out, rt.spec.hidden_size)
    print(f"K/V fill maps -> {out}")
    print("held-out fill error relative to the layer projections, per exit point:", fill.relative_error)
    if steps:
        r = report["refine"]
        print(f"held-out full-depth tokens that the filled K/V flip: {r['held_out_flips_before']} of "
              f"{r['held_out_deep_tokens_before']} with the least-squares maps, {r['held_out_flips_after']} of "
              f"{r['held_out_deep_tokens_after']} refined")
    return report


# ---- refine: train the maps on the damage they do downstream ----------------------------------------
@dataclass(frozen=True)
class RefineSetting:
    """Which tokens exit where while the maps are refined: the model's default early exit."""

    thresholds: tuple[tuple[int, float], ...]  # (exit point k, its threshold), ascending k
    measure: str
    exit_vocab_size: int  # exit heads read this shortlist (plus the window's prompt tokens); 0: all rows
    adapters: bool
    prompt_len: int = 96  # leading positions of a window that act as the prompt: full depth, no exit
    jitter: tuple[float, float] = (-0.06, 0.03)  # thresholds move by a uniform draw from this per window,
    # so the maps serve the neighbourhood the calibration later picks from, not one threshold

    @classmethod
    def from_runtime(cls, rt: Runtime) -> "RefineSetting":
        cfg = rt.early_exit_config()
        if cfg.kv_policy != "propagate" or cfg.measure not in LOGIT_MEASURES:
            raise SystemExit(f"error: refining the K/V fill needs the model's default early exit to be propagate with "
                             f"a logit measure, not {cfg.kv_policy} / {cfg.measure}")
        points = sorted(cfg.exit_points(rt.spec.num_layers))
        return cls(tuple((k, cfg.threshold_at(k)) for k in points), cfg.measure, cfg.exit_vocab_size,
                   cfg.exit_adapters)


def damaged_forward(rt: Runtime, ids: torch.Tensor, setting: RefineSetting, shift: float = 0.0):
    """Replay ``propagate`` decoding of ids (1, T) with the model's current fill maps, gradients flowing
    into them (``calibrate_exits.replay_pass``): positions after the prompt exit at the first exit point
    whose confidence reaches its threshold + ``shift``, decided without gradients from the states this
    very pass computes, and deeper layers read the K/V filled from their exit state.
    Returns (final-layer logits (T, V), exit layer per position (T,), L where none)."""
    model, T = rt.model, ids.shape[1]
    heads = rt.heads.for_request(setting.adapters)
    rows = model.w.lm_head
    if setting.exit_vocab_size and rt.draft_ranking:  # as the runtime does: no ranking, no shortlist
        prompt = ids[0, :setting.prompt_len].tolist()
        rows = rows.index_select(0, shortlist(rt.draft_ranking, setting.exit_vocab_size, prompt))
    measure, thresholds = make_measure(setting.measure), dict(setting.thresholds)

    def confident(k: int, h: torch.Tensor, prev: torch.Tensor) -> torch.Tensor | None:
        if k not in thresholds:
            return None
        with torch.no_grad():
            logits = torch.nn.functional.linear(model.final_norm(heads.adapt(h[0], k)), rows)  # (T, rows)
            conf = measure.score(logits, h[0], prev[0], layer=k).reshape(T)
        return conf >= thresholds[k] + shift

    replayed = replay_pass(model, ids, model.new_cache(1, T, for_autograd=True),
                           torch.arange(T) >= setting.prompt_len, confident)
    return model.head(replayed.final)[0].float(), replayed.exit_layer


@torch.inference_mode()
def _undamaged_log_probs(rt: Runtime, ids: torch.Tensor) -> torch.Tensor:
    cache = rt.model.new_cache(1, ids.shape[1])
    h = rt.model.run_layers(rt.model.embed(ids, 0), 0, rt.spec.num_layers, 0, cache)
    return torch.log_softmax(rt.model.head(h)[0].float(), dim=-1)  # (T, V)


def damage(rt: Runtime, ids: torch.Tensor, setting: RefineSetting, shift: float = 0.0):
    """(mean KL of the damaged final layer from the undamaged one over the positions that run full depth,
    how many of them change their argmax, how many there are) for one window (1, T)."""
    teacher = _undamaged_log_probs(rt, ids).clone()  # (T, V); clone: out of inference mode, for autograd
    logits, exit_layer = damaged_forward(rt, ids, setting, shift)
    deep = (exit_layer == rt.spec.num_layers) & (torch.arange(ids.shape[1]) >= setting.prompt_len)
    log_probs = torch.log_softmax(logits, dim=-1)
    kl = (teacher.exp() * (teacher - log_probs)).sum(-1)[deep]  # (deep,)
    flips = int((log_probs.argmax(-1) != teacher.argmax(-1))[deep].sum())
    return (kl.mean() if len(kl) else None), flips, int(deep.sum())


def _held_out_flips(rt: Runtime, windows: list[torch.Tensor], setting: RefineSetting) -> tuple[int, int]:
    flips = deep = 0
    with torch.no_grad():
        for ids in windows:
            _, f, n = damage(rt, ids, setting)
            flips, deep = flips + f, deep + n
    return flips, deep


def refine(rt: Runtime, fill: KVFill, stream: torch.Tensor, held_out: list[torch.Tensor], setting: RefineSetting,
           steps: int, batch: int, lr: float, seq_len: int, run_dir, seed: int = 0,
           checkpoint_every: int = 50, progress: bool = True) -> tuple[KVFill, dict]:
    """Train ``fill``'s maps (Adam, ``batch`` windows of ``stream`` per step) on ``damage``; resumes from
    ``run_dir`` when it holds a checkpoint of the same model and setting. Returns the refined fill and a
    report with the held-out flips before and after (measured, same windows and setting)."""
    import json
    import random

    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    if rt.directory is None:
        raise ValueError("refining the K/V fill needs a runtime loaded from a checkpoint directory: "
                         "its weight files name the run, so that a retrained model never resumes another's")
    model = rt.model
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path, meta_path = run_dir / "refine_state.safetensors", run_dir / "refine_state.json"
    identity = {"model": str(rt.directory), "weights": weights_hash(rt.directory), "start": fill.digest,
                "setting": repr(setting), "lr": lr, "batch": batch, "seed": seed}
    weight, bias = torch.nn.Parameter(fill.weight.clone()), torch.nn.Parameter(fill.bias.clone())
    opt = torch.optim.Adam([weight, bias], lr=lr)
    model.set_kv_fill(KVFill(fill.weight, fill.bias, fill.num_layers))
    before = _held_out_flips(rt, held_out, setting)
    step, losses = 0, []
    if meta_path.is_file() and state_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("identity") == identity:
            tensors = load_file(str(state_path))
            with torch.no_grad():
                weight.copy_(tensors["weight"])
                bias.copy_(tensors["bias"])
            if "adam_step" in tensors:  # (absent while no step has had anything to learn from)
                moments = {i: {"step": tensors["adam_step"].clone(), "exp_avg": tensors[f"avg_{i}"],
                               "exp_avg_sq": tensors[f"sq_{i}"]} for i in (0, 1)}
                opt.load_state_dict({"state": moments, "param_groups": opt.state_dict()["param_groups"]})
            step, losses = meta["step"], meta["losses"]
            print(f"resuming the K/V fill refinement from step {step} ({run_dir})")
    gen = torch.Generator().manual_seed(seed + 7919 * step)  # a resumed run draws new windows, not the same again
    rng = random.Random(seed + step)
    model.set_kv_fill(KVFill(weight, bias, fill.num_layers))  # the parameters themselves: gradients reach them

    def save() -> None:
        tensors = {"weight": weight.detach().contiguous(), "bias": bias.detach().contiguous()}
        moments = opt.state_dict()["state"]  # {0: weight's, 1: bias's}; empty before the first real step
        if moments:
            tensors["adam_step"] = moments[0]["step"]
            for i in (0, 1):
                tensors[f"avg_{i}"], tensors[f"sq_{i}"] = moments[i]["exp_avg"], moments[i]["exp_avg_sq"]
        save_file(tensors, str(state_path))
        meta_path.write_text(json.dumps({"identity": identity, "step": step, "losses": losses}))

    with tqdm(total=steps, initial=step, desc="K/V fill refine", disable=not progress) as bar:
        while step < steps:
            opt.zero_grad()
            total = 0.0
            for _ in range(batch):
                start = int(torch.randint(0, len(stream) - seq_len + 1, (1,), generator=gen))
                kl, _, _ = damage(rt, stream[start:start + seq_len][None], setting, rng.uniform(*setting.jitter))
                # (nothing to learn from where no deeper position read a map: no exit, or only exits that
                # fill nothing approximate)
                if kl is not None and kl.requires_grad:
                    (kl / batch).backward()
                    total += float(kl.detach()) / batch
            opt.step()
            model.set_kv_fill(KVFill(weight, bias, fill.num_layers))  # drop the stacks built from old values
            step += 1
            losses.append(round(total, 6))
            bar.update(1)
            bar.set_postfix(kl=f"{sum(losses[-20:]) / len(losses[-20:]):.5f}")
            if step % checkpoint_every == 0 or step == steps:
                save()
    refined = KVFill(weight.detach().clone(), bias.detach().clone(), fill.num_layers,
                     f"{fill.fitted_on}; refined on downstream damage: {steps} steps x {batch} windows of {seq_len}",
                     dict(fill.relative_error))
    model.set_kv_fill(refined)
    after = _held_out_flips(rt, held_out, setting)
    head = max(1, len(losses) // 10)
    return refined, {"steps": steps, "batch": batch, "lr": lr, "setting": repr(setting),
                     "train_kl_first": sum(losses[:head]) / head, "train_kl_last": sum(losses[-head:]) / head,
                     "held_out_flips_before": before[0], "held_out_deep_tokens_before": before[1],
                     "held_out_flips_after": after[0], "held_out_deep_tokens_after": after[1]}


def main(args) -> int:
    run(args)
    return 0

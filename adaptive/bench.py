"""``python -m adaptive bench``: side-by-side decode measurements in one process.

Every row decodes the same prompts, batch 1, greedy, with EOS disabled so each run produces exactly
``--max-new-tokens`` tokens. Rows are interleaved inside each repeat (so drift in machine load hits all
rows alike) and the reported speed is the median over repeats of (tokens / wall seconds) summed over
the prompt set. Agreement is measured against our own full-depth output of the same prompt: the share
of positions where the tokens match, and the share of prompts whose outputs match exactly. Early-exit
rows are judged by teacher forcing (full depth's tokens fed back), and their mean layers and compute
fraction come from that same forced run, so both numbers describe the same tokens.

Per-prompt comparisons with ``full`` (``slower_than_full``, ``worst_vs_full``) are paired: in each repeat
a row's time on a prompt is divided by full's time on the same prompt in the same repeat (decoded moments
apart), and the median of those ratios over repeats is the prompt's figure. A ``full_control`` row, our
full decoder run a second time as a row of its own, is judged by the same rule: its slowest-prompt ratio
is what measurement noise alone shows on this host in this run, the yardstick for every other row's.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .runtime import ASSETS_DIR, Runtime
from .speculation_ceiling import depth_ceilings

CONTROL_ROW = "full_control"
NOGUESS_ROW = "self_noguess"  # a --speculative entry: the self drafter with guess_drafts=False
OVERLAP_ROW = "self_overlap"  # a --speculative entry: the self drafter with overlap=True
RANDOM_LLAMA = dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                    intermediate_size=688, vocab_size=8192, max_position_embeddings=512, tie_word_embeddings=True)
DEFAULT_PROMPTS = [
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n\ndef main():\n",
    "class Stack:\n    def __init__(self):\n",
    "    for i in range(len(items)):\n",
    "def read_config(path):\n    \"\"\"Read a JSON config file.\"\"\"\n",
    "# Copyright 2001 Python Software Foundation\n",
]


@dataclass
class Row:
    name: str
    mode: str
    options: dict = field(default_factory=dict)
    tokens_per_s: float = 0.0
    ms_per_token: float = 0.0
    ratio_to_hf: float | None = None
    ratio_to_full: float | None = None
    layers_run_mean: float | None = None
    compute_fraction: float | None = None  # teacher-forced (same tokens as agreement) where agreement is
    free_compute_fraction: float | None = None  # on the row's own free-running output
    agreement: float | None = None  # teacher-forced: share of steps choosing full depth's token on its prefix
    free_agreement: float | None = None  # free-running: share of positions equal to full's output
    exact_prompts: float | None = None  # free-running: share of prompts whose whole output equals full's
    mean_accepted: float | None = None  # speculative rows: accepted drafted tokens per verifier pass
    acceptance_rate: float | None = None
    slower_than_full: float | None = None  # share of prompts where this row was slower than our full
    worst_vs_full: float | None = None  # max over prompts of (this row's time / full's time): 1.05 = 5% slower
    prompt_vs_full: list | None = None  # per prompt: median over repeats of (this row's time / full's, same repeat)
    easy_ms_per_token: float | None = None  # wall ms/token over the "easy" prompts (each prompt's median time)
    hard_ms_per_token: float | None = None  # ... and over the rest (medium + hard)
    served_by: dict | None = None  # auto rows: which candidate served how many prompts
    # speculative rows, per prompt (first repeat): plain steps, drafted rounds, accepted per drafted round
    prompt_speculation: list | None = None
    # self-drafting rows: per draft depth, the bound its measured step costs put on the speedup
    # (``speculation_ceiling.DepthCeiling`` as dicts)
    ceilings: list | None = None
    repeat_tokens_per_s: list = field(default_factory=list)


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--random-llama", action="store_true",
                   help="a random-weight 8-layer, 256-wide Llama (vocab 8192), no checkpoint needed")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompts", default=None, help="JSON file with a list of prompt strings")
    p.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--thresholds", default="0.5,0.8,0.9,0.95", help="early-exit thresholds to measure")
    p.add_argument("--measure", default=None, help="early-exit measure (default: the model's default)")
    p.add_argument("--kv-policy", default=None, help="propagate | defer (default: the model's default)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face generate() rows")
    p.add_argument("--no-early-exit", action="store_true", help="skip the early-exit rows")
    p.add_argument("--speculative", default="self,lookup",
                   help=f"speculative drafters to measure (comma-separated; '' for none; {NOGUESS_ROW}: self-drafting "
                        f"without checking context guesses in its passes, guess_drafts=False; {OVERLAP_ROW}: self-drafting "
                        "that drafts the next block while a worker thread verifies, overlap=True)")
    p.add_argument("--hf-assistant", action=argparse.BooleanOptionalAction, default=True,
                   help="HF generate() with assistant_early_exit and prompt_lookup_num_tokens=10")
    p.add_argument("--paths", action=argparse.BooleanOptionalAction, default=False,
                   help="rows for the fixed light and standard paths")
    p.add_argument("--auto", default="",
                   help="mode='auto' rows, comma-separated policy specs: quality, quality@EPS, latency@MS, "
                        "budget@FRACTION, load@QUEUE (e.g. 'quality,budget@0.6,load@4')")
    p.add_argument("--audit-rate", type=float, default=0.1, help="audit rate of the auto rows")
    p.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                   help="a full_control row (our full decoder again): the noise yardstick for per-prompt ratios")
    p.add_argument("--python-layers", action="store_true",
                   help="run our decoder layers in Python instead of the C++ loop (adaptive/native_layers.py)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the table as JSON")


def _build(args):
    """(runtime, hf_model, prompts as token-id lists, model description)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.random_llama:
        torch.manual_seed(0)
        hf = LlamaForCausalLM(LlamaConfig(**RANDOM_LLAMA, bos_token_id=None, eos_token_id=None)).eval()
        rt = Runtime.from_model(hf, share_weights=False)  # the fused layout from_pretrained uses
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, RANDOM_LLAMA["vocab_size"], (12 + 4 * i,), generator=gen).tolist() for i in range(6)]
        return rt, hf, prompts, "random-llama-8x256"
    rt = Runtime.from_pretrained(args.model)
    hf = AutoModelForCausalLM.from_pretrained(str(rt.directory), dtype=torch.float32).eval()
    texts = DEFAULT_PROMPTS
    if args.prompts:
        texts = json.loads(Path(args.prompts).read_text())
    elif (ASSETS_DIR / "prompts.json").is_file() and rt.directory and rt.directory.parent == ASSETS_DIR:
        texts = [p["prompt"] for p in json.loads((ASSETS_DIR / "prompts.json").read_text())]
    return rt, hf, [rt.encode(t) for t in texts], str(rt.directory)


def _difficulties(args, rt) -> list[str] | None:
    """Difficulty labels of the bundled prompt set ("easy" / "medium" / "hard"), when it is the one used."""
    if args.random_llama or args.prompts or not (rt.directory and rt.directory.parent == ASSETS_DIR):
        return None
    if not (ASSETS_DIR / "prompts.json").is_file():
        return None
    return [p.get("difficulty", "") for p in json.loads((ASSETS_DIR / "prompts.json").read_text())]


def _auto_row(spec: str, audit_rate: float) -> "Row":
    """'quality', 'quality@0.01', 'latency@2.5', 'budget@0.6', 'load@4' -> a mode='auto' row."""
    policy, _, value = spec.partition("@")
    knobs = {"policy": policy, "audit_rate": audit_rate}
    if value:
        key = {"quality": "epsilon", "latency": "latency_ms", "budget": "budget", "load": "queue_depth"}.get(policy)
        if key is None:
            raise SystemExit(f"error: unknown auto policy {policy!r} in --auto")
        knobs[key] = int(value) if key == "queue_depth" else float(value)
    return Row(f"auto_{spec}", "auto", knobs)


def _forced_run(rt, prompt: list[int], reference: list[int], mode: str, options: dict) -> tuple[int, dict]:
    """Untimed teacher forcing: (positions where ``mode`` picks full depth's token when fed full depth's
    tokens, so every step is judged on the same prefix; that run's stats)."""
    forced = rt.generate(prompt, max_new_tokens=len(reference), mode=mode, stop_at_eos=False, follow=reference,
                         **options)
    return sum(a == b for a, b in zip(forced.token_ids, reference)), forced.stats


def _compute_fraction(stats: list[dict]) -> float:
    # compute_fraction * full_macs: an auto row's own request cost includes its gate pass
    return sum(s["compute_fraction"] * s["full_macs"] for s in stats) / sum(s["full_macs"] for s in stats)


def _hf_generate(hf, prompt: list[int], n: int, **extra) -> list[int]:
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0, **extra)
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), generation_config=cfg)
    return out[0, len(prompt):].tolist()


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    rt, hf, prompts, description = _build(args)
    rt.model.use_native = not getattr(args, "python_layers", False)
    if args.num_prompts:
        prompts = prompts[:args.num_prompts]
    n = args.max_new_tokens
    ee_knobs = {k: v for k, v in (("measure", args.measure), ("kv_policy", args.kv_policy)) if v is not None}
    rows = [] if args.no_hf else [Row("hf_generate", "hf")]
    if not args.no_hf and args.hf_assistant:
        # HF's layer-skip assistant at each of our shallow paths' depths: ours is compared with its best
        for depth in rt.draft_depths:
            rows.append(Row(f"hf_assistant_early_exit@{depth}", "hf", {"assistant_early_exit": depth}))
        rows.append(Row("hf_prompt_lookup@10", "hf", {"prompt_lookup_num_tokens": 10}))
    rows.append(Row("full", "full"))
    if not args.no_early_exit:
        for thr in (float(t) for t in args.thresholds.split(",") if t):
            rows.append(Row(f"early_exit@{thr:g}", "early_exit", {"threshold": thr, **ee_knobs}))
    for drafter in (d for d in args.speculative.split(",") if d):
        options = ({"drafter": "self", "guess_drafts": False} if drafter == NOGUESS_ROW else
                   {"drafter": "self", "overlap": True} if drafter == OVERLAP_ROW else {"drafter": drafter})
        rows.append(Row(f"speculative_{drafter}", "speculative", options))
    # (getattr: callers such as finalize-model build their own Namespace without these newer options)
    if getattr(args, "paths", False):
        rows += [Row(f"path_{name}", "full", {"path": name}) for name in ("light", "standard")]
    rows += [_auto_row(spec, getattr(args, "audit_rate", 0.1)) for spec in getattr(args, "auto", "").split(",") if spec]
    if getattr(args, "control", False) and len([r for r in rows if r.mode != "hf"]) > 1:
        # last, so it is as far from full in each prompt's loop as the rows it is the yardstick for
        rows.append(Row(CONTROL_ROW, "full"))
    difficulty = _difficulties(args, rt)
    if difficulty is not None and args.num_prompts:
        difficulty = difficulty[:args.num_prompts]

    def decode(row: Row, prompt: list[int]):
        """(new token ids, stats or None for HF rows, speculative rounds)."""
        if row.mode == "hf":
            return _hf_generate(hf, prompt, n, **row.options), None, []
        res = rt.generate(prompt, max_new_tokens=n, mode=row.mode, stop_at_eos=False, **row.options)
        return res.token_ids, res.stats, res.rounds

    # Warm-up: first calls pay for allocation and lazy initialisation.
    for row in rows:
        decode(row, prompts[0])
    outputs: dict[str, list] = {row.name: [] for row in rows}
    stats: dict[str, list] = {row.name: [] for row in rows}
    rounds: dict[str, list] = {row.name: [] for row in rows}  # first repeat, every prompt's rounds
    from tqdm import tqdm

    per_prompt: dict[str, list[list[float]]] = {row.name: [[] for _ in prompts] for row in rows}  # seconds
    for rep in tqdm(range(args.repeats), desc="bench repeats"):
        elapsed = {row.name: 0.0 for row in rows}
        for i, prompt in enumerate(prompts):
            for row in rows:
                start = time.perf_counter()
                tokens, st, row_rounds = decode(row, prompt)
                seconds = time.perf_counter() - start
                elapsed[row.name] += seconds
                per_prompt[row.name][i].append(seconds)
                if rep == 0:
                    outputs[row.name].append(tokens)
                    stats[row.name].append(st)
                    rounds[row.name].extend(row_rounds)
        for row in rows:
            row.repeat_tokens_per_s.append(len(prompts) * n / elapsed[row.name])
    median_seconds = {name: [statistics.median(t) for t in times] for name, times in per_prompt.items()}

    full_out = outputs["full"]  # the row named "full" (path rows are mode "full" too)
    for row in rows:
        row.tokens_per_s = statistics.median(row.repeat_tokens_per_s)
        row.ms_per_token = 1000.0 / row.tokens_per_s
        matches = [sum(a == b for a, b in zip(out, ref)) for out, ref in zip(outputs[row.name], full_out)]
        row.free_agreement = sum(matches) / (len(prompts) * n)
        row.agreement = row.free_agreement
        row.exact_prompts = sum(o == r for o, r in zip(outputs[row.name], full_out)) / len(prompts)
        measured = stats[row.name]  # None per prompt for Hugging Face rows
        if measured[0] is not None:
            row.free_compute_fraction = _compute_fraction(measured)
        if row.mode == "early_exit" or (row.mode == "full" and row.options):
            # Agreement and compute are reported on the same tokens: full depth's, fed back (teacher
            # forcing). The free-running compute, on the row's own output, is kept as free_compute_fraction.
            forced = [_forced_run(rt, p, ref, row.mode, row.options) for p, ref in zip(prompts, full_out)]
            row.agreement = sum(m for m, _ in forced) / (len(prompts) * n)
            measured = [st for _, st in forced]
        if measured[0] is not None:
            row.layers_run_mean = statistics.fmean(s["layers_run_mean"] for s in measured)
            row.compute_fraction = _compute_fraction(measured)
        if row.mode == "speculative":
            row.mean_accepted = statistics.fmean(s["mean_accepted_per_round"] for s in stats[row.name])
            row.acceptance_rate = statistics.fmean(s["acceptance_rate"] for s in stats[row.name])
            row.prompt_speculation = [{k: s[k] for k in ("plain_steps", "speculative_rounds", "mean_accepted_per_round",
                                                         "acceptance_rate", "draft_depth_histogram")}
                                      for s in stats[row.name]]
        if row.mode == "auto":
            # teacher-forced agreement of whatever served each prompt, on full depth's prefixes
            # (speculation is lossless: its free-running matches are the count; it takes no follow=)
            served = [s["auto"] for s in stats[row.name]]
            row.served_by = dict(Counter(a["chosen"] for a in served))
            row.agreement = sum(m if a["mode"] == "speculative" else _forced_run(rt, p, ref, a["mode"], a["options"])[0]
                                for p, ref, a, m in zip(prompts, full_out, served, matches)) / (len(prompts) * n)
        if difficulty is not None:
            easy = [median_seconds[row.name][i] for i, d in enumerate(difficulty) if d == "easy"]
            hard = [median_seconds[row.name][i] for i, d in enumerate(difficulty) if d != "easy"]
            row.easy_ms_per_token = 1000 * sum(easy) / (len(easy) * n) if easy else None
            row.hard_ms_per_token = 1000 * sum(hard) / (len(hard) * n) if hard else None
        if row.mode != "full" or row.options or row.name == CONTROL_ROW:
            ratios = [statistics.median(a / b for a, b in zip(mine, full))
                      for mine, full in zip(per_prompt[row.name], per_prompt["full"])]  # paired within a repeat
            row.prompt_vs_full = ratios
            row.slower_than_full = sum(r > 1.0 for r in ratios) / len(prompts)
            row.worst_vs_full = max(ratios)
    hf_row = next((r for r in rows if r.mode == "hf"), None)
    full_row = next(r for r in rows if r.name == "full")
    for row in rows:
        row.ratio_to_hf = row.tokens_per_s / hf_row.tokens_per_s if hf_row else None
        row.ratio_to_full = row.tokens_per_s / full_row.tokens_per_s
        if row.mode == "speculative":
            row.ceilings = [asdict(c) for c in depth_ceilings(rounds[row.name], full_row.ms_per_token)] or None
    return {"model": description, "max_new_tokens": n, "prompts": len(prompts), "repeats": args.repeats,
            "batch_size": 1, "greedy": True, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
            "layer_code": rt.model.layer_backend(),
            "early_exit_defaults": {k: v for k, v in rt.early_exit_config(**ee_knobs).__dict__.items() if k != "num_layers"},
            "exit_heads": rt.heads.source, "rows": [asdict(r) for r in rows]}


def _fmt(v, spec):
    return format("-", spec.replace(".2f", "").replace(".3f", "")) if v is None else format(v, spec)


def format_table(report: dict) -> str:
    head = (f"{'row':<28}{'tok/s':>9}{'ms/tok':>9}{'x HF':>7}{'x full':>8}{'layers':>8}{'compute':>9}{'agree':>8}"
            f"{'exact':>7}{'acc/rnd':>9}{'slower':>8}{'easy ms':>9}{'hard ms':>9}")
    lines = [f"model {report['model']}, {report['prompts']} prompts x {report['max_new_tokens']} tokens, "
             f"median of {report['repeats']} repeats, batch 1, greedy, {report['torch_threads']} threads, "
             f"layers: {report.get('layer_code', 'python')}", head]
    for r in report["rows"]:
        lines.append(f"{r['name']:<28}{r['tokens_per_s']:>9.1f}{r['ms_per_token']:>9.2f}{_fmt(r['ratio_to_hf'], '>7.2f')}"
                     f"{_fmt(r['ratio_to_full'], '>8.2f')}{_fmt(r['layers_run_mean'], '>8.2f')}"
                     f"{_fmt(r['compute_fraction'], '>9.3f')}{_fmt(r['agreement'], '>8.3f')}{_fmt(r['exact_prompts'], '>7.2f')}"
                     f"{_fmt(r['mean_accepted'], '>9.2f')}{_fmt(r['slower_than_full'], '>8.2f')}"
                     f"{_fmt(r['easy_ms_per_token'], '>9.2f')}{_fmt(r['hard_ms_per_token'], '>9.2f')}")
    worst = [f"{r['name']} {r['worst_vs_full']:.3f}" for r in report["rows"] if r.get("worst_vs_full") is not None]
    if worst:
        lines.append("slowest prompt vs full (time ratio, median of paired repeats): " + ", ".join(worst))
    control = next((r for r in report["rows"] if r["name"] == CONTROL_ROW), None)
    if control is not None:
        lines.append(f"  ({CONTROL_ROW} is full decoded again: {control['worst_vs_full']:.3f} is this run's noise)")
    assistants = [r for r in report["rows"] if r["name"].startswith("hf_assistant_early_exit")]
    if assistants:
        best = max(assistants, key=lambda r: r["tokens_per_s"])
        ours = [f"{r['name']} {r['tokens_per_s'] / best['tokens_per_s']:.2f}x" for r in report["rows"]
                if r["mode"] == "speculative"]
        if ours:
            lines.append(f"vs the fastest HF assistant row ({best['name']}): " + ", ".join(ours))
    for r in report["rows"]:
        for c in r.get("ceilings") or []:
            lines.append(f"  {r['name']} depth {c['depth']} ({c['rounds']} rounds): draft "
                         f"{c['draft_ms_per_token']:.2f} ms/token ({c['passes_per_token']:.2f} passes), verify {c['verify_ms']:.2f} ms at k={c['length']}; "
                         f"every draft accepted would give {c['ceiling']:.2f}x full, its measured acceptance "
                         f"{c['acceptance']:.2f} gives {c['at_measured_acceptance']:.2f}x")
        if r.get("prompt_speculation"):
            plain = [f"{p['plain_steps'] / max(1, p['plain_steps'] + p['speculative_rounds']):.2f}"
                     for p in r["prompt_speculation"]]
            accepted = [f"{p['mean_accepted_per_round']:.1f}" for p in r["prompt_speculation"]]
            lines.append(f"  {r['name']} per prompt: plain-step share of rounds {' '.join(plain)}; "
                         f"accepted per drafted round {' '.join(accepted)}")
        if r.get("served_by"):
            lines.append(f"  {r['name']} served by {r['served_by']}")
    return "\n".join(lines)


def main(args) -> int:
    report = run(args)
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0

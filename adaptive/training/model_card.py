"""The model card (``README.md`` next to the checkpoint) and the measurements only it needs.

Everything the card states comes from files or measurements, never typed in: ``config.json`` and
``training_info.json`` (shape, parameters, tokens), the training log (time, threads), the finalize
report (per-layer tables, calibration, decoding table, completions), and this machine (hardware).

Measured here:
- ``decoding_table``: early exit at a few thresholds around the calibrated one on test-split prompts,
  through ``adaptive.bench`` (one process, rows interleaved inside each repeat, medians of repeats).
- ``completions``: greedy full-depth completions of function headers (``def ...:`` with the docstring
  if any) from test-split files, cut where the function body ends.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

REPORT_FILE = "finalize_report.json"  # the measurements the card is rendered from
CARD_FILE = "README.md"


# ---- measurements -----------------------------------------------------------------------------------
def decoding_table(model_dir: str | Path, thresholds: list[float], num_prompts: int = 12, new_tokens: int = 128,
                   repeats: int = 3, seed: int = 1, split: str = "test") -> dict:
    """Full depth and early exit at ``thresholds`` (other knobs: the model's calibrated defaults)."""
    from ..bench import run
    from ..runtime import Runtime
    from .calibrate_exits import sample_prompts

    rt = Runtime.from_pretrained(model_dir)
    max_context = min(128, rt.spec.max_positions - new_tokens)  # prompt + continuation fit the context
    cases = sample_prompts(rt, split, num_prompts, min(64, max_context), max_context, seed)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([rt.decode(c.prompt_ids) for c in cases], f)
    try:
        args = argparse.Namespace(model=str(model_dir), random_llama=False, max_new_tokens=new_tokens, repeats=repeats,
                                  prompts=f.name, num_prompts=None, thresholds=",".join(f"{t:.6g}" for t in thresholds),
                                  measure=None, kv_policy=None, threads=None, no_hf=True, no_early_exit=False,
                                  speculative="", hf_assistant=False, json=None)
        report = run(args)
    finally:
        os.unlink(f.name)
    report["split"], report["seed"], report["sources"] = split, seed, [c.source for c in cases]
    return report


@dataclass
class Completion:
    source: str  # test-split file the header comes from
    prompt: str  # the def line and its docstring, as in the file, without the final newline
    completion: str  # greedy full depth, cut where the body ends
    raw: str  # the whole greedy completion, uncut
    early_exit_same: bool  # the calibrated early-exit default produced the same tokens


_DEF = re.compile(r"^([ \t]*)def \w+\(.*\)(?:\s*->\s*[^:]+)?:[ \t]*$")


def function_headers(split: str = "test", seed: int = 0):
    """Yield (file, header text, indent): one one-line ``def`` header with a docstring per file of
    ``split``, files in a seeded shuffle.

    The header ends at the docstring's closing quotes, without the newline: byte-level BPE merges a
    newline with the next line's indentation into one token, so a prompt that ends in a bare newline
    sits on a token boundary the model never saw in training and derails it."""
    from .corpus import iter_documents

    docs = list(iter_documents(split))
    random.Random(seed).shuffle(docs)
    for doc in docs:
        lines = doc.text.splitlines(keepends=True)
        for i, line in enumerate(lines[:-1]):
            m = _DEF.match(line.rstrip("\n"))
            if not m:
                continue
            nxt = lines[i + 1].strip()
            quote = nxt[:3]
            if quote not in ('"""', "'''"):
                continue
            end = i + 1  # the docstring's last line
            if not (len(nxt) > 6 and nxt.endswith(quote)):
                end = next((j for j in range(i + 2, len(lines)) if quote in lines[j]), None)
                if end is None or end - i > 12:
                    continue
            yield doc.relpath, "".join(lines[i:end + 1]).rstrip("\n"), len(m.group(1).expandtabs())
            break


def function_body(text: str, indent: int) -> str:
    """The completion up to the first non-blank line indented at or left of the ``def`` (the body ended).
    ``text`` continues the docstring's last line, so its first line is not checked."""
    lines = text.splitlines(keepends=True)
    kept = lines[:1]
    for line in lines[1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        kept.append(line)
    return "".join(kept).rstrip()


def completions(model_dir: str | Path, count: int = 5, max_new_tokens: int = 96, split: str = "test",
                seed: int = 0) -> list[Completion]:
    """Greedy completions of the first ``count`` headers whose prompt leaves room for the new tokens."""
    from ..runtime import Runtime

    rt = Runtime.from_pretrained(model_dir)
    out = []
    for source, prompt, indent in function_headers(split, seed):
        if len(out) == count:
            break
        if len(rt.encode(prompt)) + max_new_tokens > rt.spec.max_positions:
            continue
        full = rt.generate(prompt, max_new_tokens, mode="full")
        early = rt.generate(prompt, max_new_tokens, mode="early_exit")
        out.append(Completion(source, prompt, function_body(full.text, indent), full.text,
                              early.token_ids == full.token_ids))
    return out


# ---- rendering --------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass
class TrainingPhase:
    """A stretch of training under one recipe: the (re)starts between two changes of the loss weights or
    of propagate-in-the-loop. A weight a start did not record (the flag did not exist yet) is ``None``."""
    from_tokens: int
    to_tokens: int | None
    exit_total: float | None
    beta_kl: float | None
    propagate_exits: list[int] | None
    propagate_threshold: list[float] | None

    def recipe(self) -> tuple:
        return (self.exit_total, self.beta_kl, self.propagate_exits, self.propagate_threshold)


def training_phases(starts: list[dict], final_tokens: int | None) -> list[TrainingPhase]:
    """Consecutive (re)starts with the same recipe merged into one phase, in training order."""
    phases: list[TrainingPhase] = []
    for r in starts:
        a = r.get("args", {})
        phase = TrainingPhase(r.get("tokens", 0), None, a.get("exit_total"), a.get("beta_kl"),
                              a.get("propagate_exits"), a.get("propagate_threshold"))
        if phases and phases[-1].recipe() == phase.recipe():
            continue
        if phases:
            phases[-1].to_tokens = phase.from_tokens
        phases.append(phase)
    if phases:
        phases[-1].to_tokens = final_tokens
    return phases


# sidecars a finalize stage writes only where it ran: (file, what the card's Files table says of it)
OPTIONAL_FILES = (
    ("ngram_datastore.safetensors", "corpus 3-grams of the train split for `lookup` drafting (`build_datastore`)"),
    ("kv_fill.safetensors", "learned K/V fill of `propagate`: one linear map per (exit point, skipped layer), "
                            "see `adaptive/kv_fill.py`"),
    ("prompt_gate.safetensors", "the prompt-level gate that picks the light / standard / full path (`train_gate`)"),
)


def training_summary(log_path: Path) -> dict:
    """The training log's summary as JSON: finished or not, wall seconds, restarts, threads per (re)start,
    recipe phases, and ``hardware``: the machine reading the log, i.e. the one that trained. Empty when there
    is no log. Kept in the report too: the log lives in ``runs/`` on the machine that trained (never in the
    repository), so a card re-rendered from a clone reads that copy instead."""
    if not log_path.is_file():
        return {}
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    ends = [i for i, r in enumerate(records) if r.get("kind") == "final"]
    if ends:  # a run resumed after the shipped export finished is not part of that model
        records = records[:ends[-1] + 1]
    starts = [r for r in records if r.get("kind") == "start"]
    last = records[-1] if records else {}
    return {"finished": bool(ends), "seconds": last.get("seconds"), "restarts": max(0, len(starts) - 1),
            "threads": sorted({r.get("args", {}).get("threads") for r in starts} - {None}), "hardware": _hardware(),
            "phases": [asdict(p) for p in training_phases(starts, last.get("tokens"))]}


def _phase_rows(phases: list[TrainingPhase]) -> list[str]:
    """The card's table of training phases; nothing when one recipe ran throughout without propagate."""
    if len(phases) < 2 and not any(p.propagate_exits for p in phases):
        return []
    rows = ["Training phases (the recipe changed between resumes; `exit_total` / `beta_kl` are the weights of the "
            "early-exit losses and of their distillation, see `adaptive/training/losses.py`; – where the log did not record "
            "them: the flags did not exist yet). *Propagate in the loop*: "
            "positions whose exit head is confident lend the deeper layers K/V computed from their exit state, as the "
            "runtime's `propagate` policy does (see `adaptive/training/stack.py`).", "",
            "| tokens | exit_total | beta_kl | propagate in the loop |", "|---|---:|---:|---|"]
    for p in phases:
        span = f"{p.from_tokens:,} – {p.to_tokens:,}" if p.to_tokens is not None else f"{p.from_tokens:,} –"
        prop = (f"exits after layers {p.propagate_exits}, thresholds drawn from {p.propagate_threshold}"
                if p.propagate_exits else "off")
        rows.append(f"| {span} | {_fmt(p.exit_total, 'g')} | {_fmt(p.beta_kl, 'g')} | {prop} |")
    return rows + [""]


def _hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, CPU only"


def _finalist_rows(finalists: list[dict], replayed_shown: int = 12) -> tuple[list[dict], int]:
    """Every decoded finalist, and the ``replayed_shown`` cheapest replayed ones (a replay search leaves
    one row per family, dozens of them); returns the rows in their original order and how many were cut."""
    replayed = [m for m in finalists if m.get("method") == "replayed"]
    keep = {id(m) for m in sorted(replayed, key=lambda m: m["compute_fraction"])[:replayed_shown]}
    shown = [m for m in finalists if m.get("method") != "replayed" or id(m) in keep]
    return shown, len(finalists) - len(shown)


def _threshold_text(knobs: dict) -> str:
    """'0.9' or, with per-layer offsets, '0.9 (6: 0.75)': the thresholds the offset exit points use."""
    offsets = knobs.get("threshold_offsets") or {}
    extra = ", ".join(f"{k}: {knobs['threshold'] + v:.4g}" for k, v in sorted(offsets.items(), key=lambda kv: int(kv[0])))
    return f"{knobs['threshold']:.4g}" + (f" ({extra})" if extra else "")


def _refine_text(refine: dict | None) -> str:
    """The K/V fill refinement (``fit_kv_fill.refine``), when the maps had one."""
    if not refine:
        return ""
    return (f" The least-squares maps were then trained on the damage itself ({refine['steps']} steps of "
            f"{refine['batch']} windows: KL of the final layer to the undamaged model at the tokens that run every "
            f"layer, with the model's default exits replayed; `fit-kv-fill --refine-steps`): on the fit's held-out "
            f"windows, full-depth tokens whose argmax the filled K/V flip went from {refine['held_out_flips_before']} "
            f"of {refine['held_out_deep_tokens_before']:,} to {refine['held_out_flips_after']} of "
            f"{refine['held_out_deep_tokens_after']:,}.")


def _vocab_exit_text(knobs: dict) -> str:
    """'–', '0.68' or, over a shortlist of its own, '0.68 (2048 rows)'."""
    size = knobs.get("vocab_exit_size") or 0
    return _fmt(knobs.get("vocab_exit"), ".4g") + (f" ({size} rows)" if size and knobs.get("vocab_exit") is not None else "")


def _margin_text(rule: dict) -> str:
    """How the selection margin was measured (``calibrate_exits.sampling_margin``), or '' for a fixed one."""
    if not rule:
        return ""
    k = rule["knobs"]
    return (f"; the margin is {rule['z']} prompt-level standard errors of agreement, {rule['standard_error']:.4f} = "
            f"sd over prompts / √{rule['prompts']}, measured ({rule['method']}) at a setting near the target: "
            f"{k['measure']} {k['exit_layers']} at {_threshold_text(k)}, agreement {rule['agreement']:.4f}")


def _lens_text(knobs: dict) -> str:
    """'' or, when exits skip the trained adapters (``exit_adapters=False``), ' (logit lens)'."""
    return "" if knobs.get("exit_adapters", True) else " (logit lens)"


def _fmt(v, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def _shown_path(path: Path) -> str:
    """The model folder as a command line would name it: relative to the working directory when inside it."""
    rel = os.path.relpath(path.resolve())
    return rel if not rel.startswith("..") else str(path)


def default_log_path(model_dir: str | Path) -> Path:
    """Where ``train-model`` logs a model exported to ``assets/<name>``: ``runs/<name>/log.jsonl``."""
    return Path("runs") / Path(model_dir).name / "log.jsonl"


def render(model_dir: str | Path, report: dict, log_path: str | Path | None = None) -> str:
    from .evaluate import Evaluation, format_table

    model_dir = Path(model_dir)
    cfg = _read_json(model_dir / "config.json")
    info = _read_json(model_dir / "training_info.json")
    # the log where this machine has it, else the copy finalize kept in the report
    log = (training_summary(Path(log_path) if log_path else default_log_path(model_dir))
           or report.get("training_log", {}))
    phases = [TrainingPhase(**p) for p in log.get("phases", [])]
    defaults = _read_json(model_dir / "adaptive_defaults.json")
    name = model_dir.name
    size_mb = sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file()) / 1e6
    L = cfg.get("num_hidden_layers")
    out = [f"# {name}", "",
           f"A small Python code model trained from scratch on the Python standard library, shipped as the "
           f"default model of the Adaptive Inference Runtime: {L} Llama layers built and trained for early exit "
           "(exit losses at every layer, self-distillation, layer dropout), plus per-layer exit adapters, a "
           "draft vocabulary and calibrated early-exit defaults. It is a demonstrator of adaptive inference, "
           "not a useful code assistant.", ""]

    # -- model and training
    out += ["## Model", "", "| | |", "|---|---|",
            f"| architecture | `{(cfg.get('architectures') or ['?'])[0]}`, {L} layers, width {cfg.get('hidden_size')}, "
            f"{cfg.get('num_attention_heads')} heads (head dim {cfg.get('head_dim')}), MLP {cfg.get('intermediate_size')} (SwiGLU), "
            f"RMSNorm, RoPE |",
            f"| vocabulary | {cfg.get('vocab_size')} byte-level BPE tokens, `<|endoftext|>` = id 0 between files |",
            f"| context | {cfg.get('max_position_embeddings')} tokens |",
            f"| tied embeddings | {cfg.get('tie_word_embeddings')} |",
            f"| parameters | {info.get('params', 0):,} |",
            f"| files | {size_mb:.1f} MB in this folder |", ""]
    seconds = log.get("seconds")
    resumed = f", resumed {log['restarts']} times" if log.get("restarts") else ""
    out += ["## Training", "", "| | |", "|---|---|",
            f"| tokens seen | {info.get('tokens', 0):,} ({info.get('step')} steps) |",
            f"| training time | {_fmt((seconds or 0) / 60, '.1f')} min wall clock"
            f"{resumed} |",
            f"| hardware | {log.get('hardware', '?')}; torch threads {', '.join(map(str, log.get('threads', []))) or '?'} |",
            f"| validation loss (final layer) | {_fmt(info.get('val_nats'))} nats/token, {_fmt(info.get('val_bpb'))} bits/byte "
            f"on {info.get('val_tokens', '?')} tokens (training's own evaluation) |",
            f"| objective{' (last phase)' if len(phases) > 1 else ''} | "
            f"`{json.dumps(info.get('objective', {}))}` (see `adaptive/training/losses.py`) |",
            "", *_phase_rows(phases),
            "Training finished" if log.get("finished") else
            "**Training had not finished when this card was written; the numbers are of an intermediate checkpoint.**"
            if log else "*No training log was at hand when this card was written.*",
            ""]

    out += ["## Corpus and split", "",
            "Every `*.py` file under the running interpreter's standard library (`sysconfig.get_paths()['stdlib']`), "
            "tests included, nothing under `site-packages`/`dist-packages`. Split by the file's path relative to the "
            "stdlib root (`/` separators):", "",
            "```python", "bucket = int(sha256(relpath.encode('utf-8')).hexdigest(), 16) % 100",
            "split = 'train' if bucket < 90 else 'validation' if bucket < 95 else 'test'", "```", "",
            "The tokenizer and the draft vocabulary are built from the train split only; calibration uses validation "
            "prompts; every table below is on the test split.", ""]

    # -- per-layer tables
    ev = report.get("evaluation")
    if ev:
        e = Evaluation.from_dict(ev)
        out += ["## Exit heads per layer (test split)", "",
                f"{e.num_windows} windows of {e.window} tokens at evenly spaced offsets of the test split's token stream "
                f"({e.num_targets:,} predicted tokens, {e.target_bytes:,} UTF-8 bytes counted exactly per token). The exit "
                "head after k layers is the final norm + LM head (logit lens), with the trained adapter where stated "
                f"(adapters: {e.adapters}). bits/byte = total nats / bytes / ln 2. Agreement = top-1 equals the final "
                "layer's top-1.", "", format_table(e), ""]

    # -- calibration and decoding
    cal = report.get("calibration")
    if cal:
        k = cal["chosen"]
        out += ["## Early-exit defaults (calibrated)", "",
                f"`adaptive_defaults.json` → `early_exit`: `{json.dumps(defaults.get('early_exit', k))}`", "",
                f"Chosen on {cal['num_prompts']} validation prompts ({cal['context'][0]}–{cal['context'][1]} tokens of "
                f"context from distinct files, {cal['new_tokens']} new tokens, teacher-forced against full-depth greedy): "
                f"the lowest compute fraction whose agreement is at least {cal['target']:.2f} + a margin of "
                f"{cal.get('margin', 0):.4f} (the cheapest of many passing settings is an optimistic pick"
                + _margin_text(cal.get("margin_rule") or {}) + "), among "
                f"{cal['settings_simulated']:,} simulated settings (measure × exit layers × threshold × exit vocabulary × "
                "exit adapters on / off × KV policy × vocabulary exit) of which the cheapest families were confirmed by real decoding "
                "(a miss is retried at a stricter setting, and the thresholds between a miss and a pass are "
                "bisected; see `adaptive/training/calibrate_exits.py`)"
                + (f"; before that, {cal['settings_replayed']} `propagate` settings were *replayed*: one pass per "
                   "prompt that reproduces teacher-forced decoding exactly, approximate K/V included, which "
                   "finds each family's cheapest passing threshold by bisection; the winner is decoded as well"
                   if cal.get("settings_replayed") else "") + ".", "",
                f"On the validation prompts: agreement **{cal['agreement']:.4f}** at compute fraction "
                f"**{cal['compute_fraction']:.3f}** ({cal['layers_run_mean']:.2f} layers on average)"
                + ("." if cal["meets_target"] else
                   f" — **the target of {cal['target']:.2f} was not reached by any confirmed setting; this is the most "
                   "faithful one found.**"), ""]
        if cal.get("holdout"):
            runs = cal["holdout"]
            last = runs[-1]
            out += [f"**Held-out check** on {cal['holdout_prompts']} other validation prompts (files the selection never "
                    "saw): the passing settings, cheapest first, decoded there until one reaches the target — "
                    + ("; ".join(f"{m['knobs']['measure']} {m['knobs']['exit_layers']} at {_threshold_text(m['knobs'])}"
                                 f"{', vocabulary exit ' + _vocab_exit_text(m['knobs']) if m['knobs'].get('vocab_exit') is not None else ''}"
                                 f" (selection {m['sim_agreement']:.4f} at {m['sim_compute']:.3f}): {m['agreement']:.4f} at "
                                 f"{m['compute_fraction']:.3f}" for m in runs))
                    + (f". Kept: the last one ({last['agreement']:.4f} held out)." if cal.get("holdout_passed") else
                       f". **None of the {len(runs)} checked reached {cal['target']:.2f} held out**; the selection's "
                       "choice is kept."), ""]
        out += ["| measure | exit layers | vocab | KV | threshold | vocab exit | simulated agreement | simulated compute | "
                "agreement | compute | measured by |",
                "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
        shown, hidden = _finalist_rows(cal["finalists"])
        for m in shown:
            kk = m["knobs"]
            meas = kk["measure"] + (f"({kk['patience']})" if kk["measure"] == "patience" else "")
            out.append(f"| {meas} | {kk['exit_layers']} | {kk['exit_vocab_size'] or 'full'}{_lens_text(kk)} | {kk['kv_policy']} | "
                       f"{_threshold_text(kk)} | {_vocab_exit_text(kk)} | {m['sim_agreement']:.4f} | {m['sim_compute']:.3f} | {m['agreement']:.4f} | "
                       f"{m['compute_fraction']:.3f} | {m.get('method', 'decoded')} |")
        if hidden:
            out.append(f"\n{hidden} more replayed families (dearer passes or misses) are listed in "
                       "`finalize_report.json` → `calibration.finalists`.")
        out += ["", "Simulated numbers come from one full-depth pass (exact for `defer`, approximate K/V for "
                "`propagate`); agreement and compute are real teacher-forced decoding (*decoded*) or its exact one-pass "
                "replay (*replayed*, same numbers; one row per replayed family: its cheapest pass, or its strictest "
                "miss). *Vocab exit*: a token that runs "
                "every layer reads a shortlist of the LM head first (its own `vocab_exit_size`, else the exit shortlist) and skips the full 8192-row LM head when the measure "
                "reaches this separate threshold; otherwise only the rows outside the shortlist are added (the check is charged either way; `EarlyExitConfig.vocab_exit`). *(logit lens)* after the exit vocabulary: exits read the plain logit lens, not the trained adapters (`exit_adapters=False`; an adapter is a d × d matmul on every check).", ""]
        if cal.get("misses"):
            rows = cal["misses"]
            out += ["Where the chosen setting's disagreements with full depth come from, on the validation prompts "
                    "(exact replay): a token that ran every layer can only disagree because it read the "
                    "approximate K/V that `propagate` filled for earlier exits.", "",
                    "| token came from | tokens | disagree |", "|---|---:|---:|",
                    *(f"| {name} | {n:,} | {wrong} |" for name, (wrong, n) in rows.items()), ""]
        fill = report.get("kv_fill")
        if fill:
            out += [f"*K/V fill* (`propagate`): a token that exits after k layers gets the K/V of the skipped layers "
                    f"from least-squares maps of its exit state (`kv_fill.safetensors`, fitted on {fill['fitted_on']} of "
                    "the train split; `adaptive/kv_fill.py`) instead of each layer's own projection, at the same MACs. "
                    "Held-out squared K/V error relative to the projections, per exit point k: "
                    + ", ".join(f"{k}: {v:.2f}" for k, v in fill["relative_error"].items())
                    + "." + _refine_text(fill.get("refine"))
                    + " Every `propagate` figure on this card was measured with these maps.", ""]
    dec = report.get("decoding")
    if dec:
        rows = dec["rows"]
        full = next(r for r in rows if r["mode"] == "full")
        out += ["## Early-exit decoding on test prompts", "",
                f"{dec['prompts']} test-split prompts (64–128 tokens of context from distinct files), {dec['max_new_tokens']} "
                f"new tokens each, greedy, batch 1, EOS ignored, {dec['torch_threads']} torch thread(s); rows interleaved in "
                f"one process, speed = median of {dec['repeats']} repeats (`adaptive.bench`). Other knobs: the calibrated "
                f"defaults. Compute fraction counts every MAC (layers, K/V fill, every exit-head check, adapters) relative to "
                f"full depth. Agreement is teacher-forced (each step on full depth's prefix), and mean layers and compute "
                f"fraction are measured in that same forced run, so they describe the same tokens; exact = share of prompts "
                f"whose free-running output equals full depth's.", "",
                "| row | threshold | mean layers | compute fraction | agreement | exact outputs | tokens/s | × full |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            thr = r["options"].get("threshold")
            out.append(f"| {r['name']} | {_fmt(thr, '.4g')} | {_fmt(r['layers_run_mean'], '.2f')} | "
                       f"{_fmt(r['compute_fraction'])} | {_fmt(r['agreement'], '.4f')} | {_fmt(r['exact_prompts'], '.2f')} | "
                       f"{r['tokens_per_s']:.1f} | {r['tokens_per_s'] / full['tokens_per_s']:.2f} |")
        out += ["", "Tokens/s includes the prefill. On a model this small the Python overhead per layer and per exit "
                "check weighs as much as the arithmetic, so the compute saving shows only partly as speed.", ""]
    if defaults.get("speculative"):
        sp = defaults["speculative"]
        out += ["## Speculative decoding priors", "",
                f"`speculative`: `{json.dumps(sp)}` — `acceptance_priors[d]` is the measured teacher-forced agreement of "
                f"the exit head after d layers with the final layer on the calibration prompts, read as the drafter "
                f"reads it: over the {sp.get('acceptance_priors_vocab_size', sp.get('draft_vocab_size'))}-token draft "
                f"shortlist plus the prompt's tokens, which "
                "every produced token joins, at every step but the prefill's; the runtime starts from it and updates "
                "it as requests run." + _shortlist_note(sp), ""]

    cert = report.get("certificate")
    if cert is None and "certificate" in report:  # the stage ran and certified nothing
        out += ["## Learn-then-Test certificate", "",
                "None: no threshold of the calibrated setting could be certified at the requested ε and δ "
                "(fixed-sequence testing stopped at its first, strictest threshold; see the certify stage's "
                "output). The runtime therefore reports no certificate for this model.", ""]
    if cert:
        out += ["## Learn-then-Test certificate", "",
                f"For measure `{cert['measure']}`, exit layers {cert['exit_layers']}, exit shortlist "
                f"{cert['exit_vocab_size']}{_lens_text(cert)}, `{cert['kv_policy']}`"
                + (f", vocabulary exit at {cert['vocab_exit']:.4g}" if cert.get("vocab_exit") is not None else "")
                + (f" over its own shortlist of {cert['vocab_exit_size']}"
                   if cert.get("vocab_exit") is not None and cert.get("vocab_exit_size") else "")
                + (f", threshold offsets {cert['threshold_offsets']} (fixed; exit point k uses λ + offset)"
                   if cert.get("threshold_offsets") else "")
                + f": threshold **{cert['threshold']}** keeps the "
                f"expected teacher-forced disagreement with full depth at most ε = {cert['epsilon']} with probability "
                f"at least 1 − δ = {1 - cert['delta']:.2f}, certified on n = {cert['n']} i.i.d. validation windows "
                f"({cert['tokens_per_prompt']} tokens each; observed risk {cert['observed_risk']:.4f}, p = "
                f"{cert['p_value']:.3g}). Held-out check by real decoding on {cert.get('test_tokens')} test-split "
                f"tokens: agreement {cert.get('test_agreement', float('nan')):.4f}. "
                "The runtime reports the certificate in `stats['certificate']` when a request uses exactly these "
                "settings (`calibration_certificate.json`).", ""]

    # -- completions
    comps = report.get("completions")
    if comps:
        out += ["## Greedy completions of test-split function headers", "",
                "Prompt = a one-line `def` and its docstring from a test-split file (shown first); completion = full-depth "
                "greedy, at most 96 new tokens, cut at the first line indented at or left of the `def` (the body ended) "
                "and shown uncut in `finalize_report.json`.", ""]
        for c in comps:
            out += [f"From `{c['source']}`"
                    f" (calibrated early exit gives {'the same' if c['early_exit_same'] else 'a different'} output):", "",
                    "```python", c["prompt"] + c["completion"], "```", ""]
            if not c["completion"].strip():
                out += [f"(The body ended at once; the uncut completion starts `{c['raw'][:120]!r}`.)", ""]

    # -- files and reproduction
    out += ["## Files", "",
            "| file | content |", "|---|---|",
            "| `config.json`, `model.safetensors`, `generation_config.json` | Hugging Face `LlamaForCausalLM` checkpoint |",
            "| `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json` | byte-level BPE, loadable by `AutoTokenizer` |",
            "| `training_info.json` | step, tokens, minutes, parameters, objective, validation losses of the export |",
            "| `exit_adapters.safetensors` | tensors `exit.{k}.weight` (d, d) and `exit.{k}.bias` (d,) for k in 1..L-1; "
            "metadata `format=adaptive-exit-adapters`, `version=1`, `kind=residual_affine`, `hidden_size`, `num_layers`. "
            "Exit head after k layers = `head(h + W_k h + b_k)` |",
            "| `draft_vocab.json` | `{\"format\": \"adaptive-draft-vocab\", \"version\": 1, \"token_ids\": [...], \"counts\": "
            "[...], \"source\": ...}`: token ids by decreasing count over the train split; shortlists for draft and exit heads |",
            "| `exit_classifier.safetensors` | learned exit classifier (measure `classifier`): per exit point an MLP "
            "on the RMS-normalised hidden state and its cosine with the previous layer's; see `adaptive/exit_classifier.py` |",
            "| `calibration_certificate.json` | the Learn-then-Test certificate (ε, δ, n, measure, threshold, "
            "calibration-set hash, held-out agreement) |",
            "| `adaptive_defaults.json` | per-mode default knobs: `early_exit` (threshold, measure, exit_layers, "
            "exit_vocab_size, kv_policy, min_layer) and `speculative` (draft_vocab_size, acceptance_priors by depth) |",
            *[f"| `{name}` | {what} |" for name, what in OPTIONAL_FILES if (model_dir / name).is_file()],
            f"| `{REPORT_FILE}` | every measurement on this card, as JSON |",
            "| `README.md` | this card |", "",
            "## Reproduce", "",
            "```bash",
            "python -m adaptive train-model                      # the checkpoint (resumable; see Training for this one's time)",
            f"python -m adaptive finalize-model --model {_shown_path(model_dir)}"
            f"{' --with-kv-fill' if report.get('kv_fill') else ''}"
            "   # draft vocab, datastore, exit adapters, exit classifier, evaluation, calibration, certificate, gate, this card",
            "```", "",
            "`train-model` writes the arguments of every (re)start to `runs/<model>/log.jsonl` (not shipped); the "
            "Training table above names this model's restarts. "
            "Stages can be skipped (`--skip-draft-vocab`, `--skip-datastore`, `--skip-exits`, `--skip-classifier`, "
            "`--skip-evaluate`, `--skip-calibrate`, `--skip-certify`, `--skip-gate`, `--skip-card`) and the learned "
            "K/V fill added (`--with-kv-fill`, opt-in); the card is re-rendered from the stored report. Speed "
            "numbers depend on the host; losses, agreements and compute fractions are deterministic.", ""]
    return "\n".join(out)


def _shortlist_note(sp: dict) -> str:
    """A sentence for when the drafter's shortlist differs from the one the priors were read over."""
    used, read = sp.get("draft_vocab_size"), sp.get("acceptance_priors_vocab_size")
    if used is None or read is None or used == read:
        return ""
    return (f" The drafter's shortlist is {used} tokens while the priors were read over {read} (why, and what it "
            "changes in accepted drafts: the note at `DEFAULT_DRAFT_VOCAB_SIZE` in `adaptive/runtime.py`).")


def write_card(model_dir: str | Path, report: dict, log_path: str | Path | None = None) -> Path:
    path = Path(model_dir) / CARD_FILE
    path.write_text(render(model_dir, report, log_path))
    return path


def completions_to_dicts(items: list[Completion]) -> list[dict]:
    return [asdict(c) for c in items]

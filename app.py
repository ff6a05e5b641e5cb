"""Gradio app: type a prompt, pick a mode, watch where the compute went, token by token, and why.

Wiring only. The runtime (``adaptive``) generates and records traces; ``explain.views`` turns traces into
figures; ``explain.attribution`` runs Captum on demand. Run ``python app.py [--port N] [--model PATH]``;
``ADAPTIVE_MODEL`` picks the default model (for a Space), ``GRADIO_SERVER_PORT`` / ``GRADIO_SERVER_NAME``
the address, ``ADAPTIVE_THREADS`` the torch threads (default 1: batch-1 decoding of small models gains
nothing from more).

State: every browser session (and every ``gradio_client.Client``) has its own ``gr.State`` holding a
``Session``; models are loaded once per path into a small shared cache and only read afterwards.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import queue
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from adaptive import AdaptiveError, GenerationResult, Runtime, TraceFormatError
from adaptive.config import KV_POLICIES, MEASURES, parse_exit_layers
from adaptive.speculative import DRAFTERS
from adaptive import runtime as runtime_module
from adaptive.scheduler import POLICIES
from explain import scheduler_views as sched_views
from explain import speculative_views as spec_views
from explain import views

ROOT = Path(__file__).resolve().parent
PROMPTS_FILE = ROOT / "assets" / "prompts.json"
BUNDLED = "bundled (assets/pycoder-8l)"
MAX_NEW_TOKENS = 512  # the app's cap; the runtime's own limit is the model's context
MAX_TRACE_BYTES = 20 * 1024 * 1024
LIVE_REDRAW_S = 0.1  # while streaming, redraw the token view at most this often
TRACE_DIR = Path(tempfile.gettempdir()) / "adaptive-traces"
CSS = """
.air-tok { cursor: help; }
#air-status p { margin: 0; }
"""


def _error(message: str) -> gr.Error:
    """A gr.Error whose text is shown as typed: the page renders error messages as HTML, and they quote
    user input (paths, file names, knob values)."""
    return gr.Error(html.escape(message, quote=False))


# ---- models: loaded once per path, shared read-only ------------------------------------------------------
class ModelCache:
    """Runtimes by model key. Loading holds the lock so two sessions never load the same model twice;
    after that a Runtime is only read (each stream builds its own decoder and KV cache)."""

    def __init__(self, capacity: int = 3):
        self.capacity = capacity
        self._models: OrderedDict[str, Runtime] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(name: str | None) -> str:
        name = (name or "").strip()
        if name in ("", BUNDLED, "bundled"):
            return "bundled"
        path = Path(name).expanduser()
        return str(path.resolve()) if path.exists() else name  # a hub id stays as typed

    def get(self, name: str | None) -> Runtime:
        key = self.key(name)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            runtime = Runtime.from_pretrained(None if key == "bundled" else key)
            self._models[key] = runtime
            while len(self._models) > self.capacity:  # typed paths must not grow memory without bound
                self._models.popitem(last=False)
            return runtime

    def loaded(self, name: str | None) -> bool:
        return self.key(name) in self._models


MODELS = ModelCache()


def default_model() -> str:
    return os.environ.get("ADAPTIVE_MODEL", "").strip() or BUNDLED


def load_model(name: str | None) -> Runtime:
    """The runtime for ``name``, or a gr.Error a person can act on."""
    try:
        return MODELS.get(name)
    except AdaptiveError as e:
        hint = " Type a local checkpoint directory or a hub id in the Model box." if MODELS.key(name) == "bundled" else ""
        raise _error(f"Could not load the model: {e}.{hint}") from e
    except Exception as e:  # noqa: BLE001 - anything from transformers/hub must still reach the page
        raise _error(f"Could not load the model {name!r}: {type(e).__name__}: {e}") from e


def model_info(runtime: Runtime) -> str:
    spec, cfg = runtime.spec, runtime.early_exit_config()
    return (f"**{html.escape(Path(runtime.name).name or runtime.name)}**: {spec.architecture or spec.family}, "
            f"{spec.num_layers} layers, d={spec.hidden_size}, vocab {spec.vocab_size}, context {spec.max_positions}; "
            f"exit heads: {runtime.heads.source}"
            + ("" if cfg.exit_adapters or not runtime.heads.adapters else " (the default exits read the plain logit lens)")
            + f"; propagate K/V fill: {runtime.kv_fill_source()}; "
            f"default early-exit knobs: threshold {cfg.threshold:g}, "
            f"{cfg.measure}, {cfg.kv_policy}, exit layers {sorted(cfg.exit_points(spec.num_layers))}"
            + (f", vocabulary exit at {cfg.vocab_exit:g}" if cfg.vocab_exit is not None else "")
            + (f" over its own shortlist of {cfg.vocab_exit_size}" if cfg.vocab_exit is not None and cfg.vocab_exit_size else "")
            + "".join(f", exit after {k} layers at threshold {cfg.threshold_at(k):g} (offset {off:+g})"
                      for k, off in cfg.threshold_offsets if k in cfg.exit_points(spec.num_layers)) + ".")


def startup_message() -> str:
    bundled_dir = runtime_module.DEFAULT_MODEL_DIR
    if default_model() == BUNDLED and not (bundled_dir / "config.json").is_file():
        shown = bundled_dir.relative_to(ROOT) if bundled_dir.is_relative_to(ROOT) else bundled_dir
        return (f"⚠️ The bundled model is not in `{shown}` yet (train it with "
                "`python -m adaptive train-model`). Type a local checkpoint directory or a hub id in **Model**, "
                "or upload a trace in the **Traces** tab.")
    return ""


# ---- per-session state -------------------------------------------------------------------------------------
@dataclass
class Session:
    """One user's current run and what has been computed about it (all plain data)."""

    result: GenerationResult
    model: str | None  # the model name that produced or analysed it; None: an uploaded trace, no model yet
    lens: Any = None  # adaptive.lens.LensReport of the same tokens, or None
    baseline: GenerationResult | None = None  # the full-depth run of the same prompt
    token_text: dict[int, str] = field(default_factory=dict)  # decoded text of ids the lens mentions
    trace_path: str | None = None
    source: str = "generated"  # or "uploaded"


def _analyse(session: Session, runtime: Runtime, max_new_tokens: int, temperature: float, seed: int | None,
             with_baseline: bool = True) -> Session:
    """The model passes the views need beyond the trace: the lens, and a full-depth run for the audit."""
    from adaptive.lens import lens

    res = session.result
    session.lens = lens(runtime, res.prompt_ids, res.token_ids, measure=res.stats.get("measure") or "max_prob")
    ids = {i for layer in session.lens.top_ids for row in layer for i in row} | set(res.token_ids)
    ids |= {i for r in res.rounds for i in r.drafted}  # rejected drafts are shown, struck through
    session.token_text = {i: runtime.decode([i]) for i in ids}
    if res.stats.get("mode") == "full":
        session.baseline = res  # a full-depth run is its own baseline
    elif with_baseline:
        session.baseline = runtime.generate(list(res.prompt_ids), max_new_tokens=max_new_tokens, mode="full",
                                            temperature=temperature, seed=seed)
    return session


def _write_trace(session: Session) -> str:
    TRACE_DIR.mkdir(parents=True, exist_ok=True)
    if session.trace_path:  # one file per session: replace the previous run's
        Path(session.trace_path).unlink(missing_ok=True)
    path = TRACE_DIR / f"trace-{uuid.uuid4().hex[:12]}.json"
    path.write_text(session.result.to_json())
    session.trace_path = str(path)
    return str(path)


# ---- drawing: one place that turns a Session into every view ------------------------------------------------
OUTPUT_NAMES = ("status", "tokens", "text", "heatmap", "ledger", "ledger_plot", "audit", "stats", "token_pick",
                "download", "spec_tokens", "spec_plot", "spec_rounds", "auto_gate", "auto_plan", "auto_paths", "session")


def _client_safe(stats: dict) -> dict:
    """The stats as shown in the JSON panel. gradio_client takes any dict with a string "path" for a file to
    download (its pre-4.21 FileData check), so the runtime's multi-scale "path" keys (top level, and nested in
    mode="auto"'s plan) would make every API call fail with a 403; they are shown as "path_name" instead. The
    trace file keeps the runtime's own keys."""
    if isinstance(stats, dict):
        return {("path_name" if k == "path" and isinstance(v, str) else k): _client_safe(v) for k, v in stats.items()}
    if isinstance(stats, list):
        return [_client_safe(v) for v in stats]
    return stats


def render(session: Session, heat_value: str, status: str, pending: bool = False) -> tuple:
    res = session.result
    # Outline per-decision disagreements (lens) when known; else what the free-running comparison found.
    if session.lens is not None:
        diverged = set(views.lens_disagreements(res, session.lens))
    else:
        diverged = set(views.audit(res, session.baseline).diverged) if session.baseline is not None else set()
    choices = views.token_choices(res)
    L = views.num_layers_of(res)
    first_early = next((i for i, t in enumerate(res.traces) if t.exit_layer < L), 0)
    return (
        status,
        views.token_view_html(res, session.lens, session.token_text, diverged),
        res.text,
        views.heatmap_figure(res, session.lens, "kl" if heat_value.startswith("KL") else "confidence",
                             session.token_text),
        views.ledger_markdown(res, session.baseline, pending),
        views.ledger_figure(res),
        views.audit_html(res, session.baseline, session.lens, session.token_text, pending),
        _client_safe(res.stats),
        gr.Dropdown(choices=choices, value=first_early if choices else None),
        session.trace_path,
        spec_views.speculative_token_html(res, session.token_text),
        spec_views.speculative_figure(res, session.token_text),
        spec_views.rounds_table_html(res, session.token_text),
        sched_views.gate_figure(res),
        sched_views.plan_html(res),
        sched_views.path_gate_figure(res, session.lens),
        session,
    )


def _parse_exit_layers(text: str) -> tuple[int, ...] | None:
    try:
        return parse_exit_layers(text)
    except ValueError as e:
        message = str(e)
        raise _error(message[:1].upper() + message[1:]) from None  # not capitalize(): it lowercases the echo


def _whole(name: str, value, low: int, high: int) -> int:
    """A knob that must be a whole number in [low, high] (API clients can send anything)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not number.is_integer() or not low <= number <= high:
        raise _error(f"{name} must be a whole number from {low} to {high}; got {value!r}.")
    return int(number)


def _speculative_options(drafter: str, draft_model: str, draft_depth, draft_length, max_draft,
                         draft_vocab_size) -> dict[str, Any]:
    """Runtime knobs for mode="speculative". 0 means adaptive for depth and length, so those are left out and
    the runtime's controller picks them; a blank vocabulary size leaves the model's own default."""
    if drafter not in DRAFTERS:
        raise _error(f"Unknown drafter {drafter!r}: choose one of {', '.join(DRAFTERS)}.")
    options: dict[str, Any] = {"drafter": drafter, "max_draft": _whole("Longest adaptive draft", max_draft, 1, 64)}
    if drafter == "draft_model":
        path = (draft_model or "").strip()
        if not path:
            raise _error("The draft_model drafter needs a draft model: type a checkpoint directory with the same "
                         "tokenizer in Draft model path.")
        options["draft_model"] = path
    depth = _whole("Draft depth", draft_depth, 0, 1024)
    if depth:
        options["draft_depth"] = depth
    length = _whole("Draft length", draft_length, 0, 64)
    if length:
        options["draft_length"] = length
    if draft_vocab_size is not None and draft_vocab_size != "":
        options["draft_vocab_size"] = _whole("Draft vocabulary size", draft_vocab_size, 0, 10**7)
    return options


def _auto_options(policy: str, epsilon, latency_ms, budget, queue_depth, audit_rate) -> dict[str, Any]:
    """Runtime knobs for mode="auto": only the target the chosen policy reads is sent."""
    if policy not in POLICIES:
        raise _error(f"Unknown policy {policy!r}: choose one of {', '.join(POLICIES)}.")
    try:
        options: dict[str, Any] = {"policy": policy, "epsilon": float(epsilon), "audit_rate": float(audit_rate),
                                   "queue_depth": _whole("Queue depth", queue_depth, 0, 1000)}
        if policy == "latency":
            if latency_ms is None or latency_ms == "":
                raise _error("The latency policy needs a target in ms per token.")
            options["latency_ms"] = float(latency_ms)
        if policy == "budget":
            options["budget"] = float(budget)
    except (TypeError, ValueError) as e:
        raise _error(f"Scheduler knobs must be numbers: {e}") from e
    return options


def _drain_in_thread(stream, stop: threading.Event, interval: float) -> Iterator[list]:
    """Run the runtime's generator on one worker thread and hand batches of traces to the caller.

    Gradio advances a sync generator from whichever pool thread is free, but the decode loop holds a
    thread-local ``torch.inference_mode`` for its whole life; one dedicated thread keeps it balanced, and the
    decoder never waits for the browser. The caller is handed the first token at once, then whatever
    arrived every ``interval`` seconds: waking it per token would take the GIL from the decoder each time.
    """
    inbox: queue.Queue = queue.Queue()

    def work():
        try:
            for trace in stream:
                inbox.put(trace)
                if stop.is_set():
                    break
            inbox.put(("done", None))
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            inbox.put(("error", e))

    threading.Thread(target=work, name="adaptive-decode", daemon=True).start()
    first = True
    while True:
        if not first:
            time.sleep(interval)
        first = False
        batch = [inbox.get()]
        while not inbox.empty():
            batch.append(inbox.get_nowait())
        tail = batch[-1]
        if isinstance(tail, tuple):
            if tail[0] == "error":
                raise tail[1]
            if batch[:-1]:
                yield batch[:-1]
            return
        yield batch


# ---- event handlers ------------------------------------------------------------------------------------------
def on_page_load():
    """Model line at the top of the page, and the knobs set to the default model's calibrated defaults
    (so Generate uses them unless the user changes them); says plainly when the bundled model is missing."""
    name = default_model()
    message = startup_message()
    if message:
        return (message, *[gr.skip()] * 5)
    try:
        return on_load_model(name)
    except Exception:  # noqa: BLE001 - a model that fails to load is reported on first use, not at page load
        return (f"Model **{html.escape(name)}** loads on first use.", *[gr.skip()] * 5)


def on_load_model(model: str):
    runtime = load_model(model)
    cfg = runtime.early_exit_config()
    draft_vocab = runtime.defaults.get("speculative", {}).get("draft_vocab_size")
    return (model_info(runtime), gr.Slider(value=cfg.threshold), gr.Dropdown(choices=list(MEASURES), value=cfg.measure),
            gr.Radio(value=cfg.kv_policy), ",".join(str(k) for k in sorted(cfg.exit_points(runtime.spec.num_layers))),
            gr.Number(value=draft_vocab) if isinstance(draft_vocab, int) else gr.skip())


def on_generate(model: str, prompt: str, mode: str, threshold: float, measure: str, kv_policy: str,
                exit_layers: str, max_new_tokens: int, temperature: float, seed: float | None, heat_value: str,
                drafter: str = "self", draft_model: str = "", draft_depth: float = 0, draft_length: float = 0,
                max_draft: float = 8, draft_vocab_size: float | None = None, policy: str = "quality",
                epsilon: float = 0.01, latency_ms: float | None = None, budget: float = 0.6, queue_depth: float = 0,
                audit_rate: float = 0.1):
    """Stream tokens into the token view, then draw every view (lens, full-depth audit, ledger, speculation).

    The speculative and scheduler knobs come last so that API clients written before they existed keep working."""
    if not prompt or not prompt.strip():
        raise _error("The prompt is empty: type some code to continue, or pick an example.")
    if not isinstance(max_new_tokens, (int, float)) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise _error(f"Max new tokens must be between 1 and {MAX_NEW_TOKENS}; got {max_new_tokens!r}.")
    max_new_tokens = int(max_new_tokens)
    seed = None if seed is None or seed == "" else int(seed)
    options: dict[str, Any] = {}
    if mode == "early_exit":
        options = dict(threshold=float(threshold), measure=measure, kv_policy=kv_policy)
        layers = _parse_exit_layers(exit_layers)
        if layers is not None:
            options["exit_layers"] = layers
    elif mode == "speculative":
        options = _speculative_options(drafter, draft_model, draft_depth, draft_length, max_draft, draft_vocab_size)
    elif mode == "auto":
        options = _auto_options(policy, epsilon, latency_ms, budget, queue_depth, audit_rate)
    elif mode != "full":
        raise _error(f"Unknown mode {mode!r}: choose full, early_exit, speculative or auto.")
    skip = tuple(gr.skip() for _ in OUTPUT_NAMES[1:])
    if not MODELS.loaded(model):
        yield ("Loading the model…", *skip)
    runtime = load_model(model)
    try:
        stream = runtime.stream(prompt, max_new_tokens=max_new_tokens, mode=mode, temperature=float(temperature),
                                seed=seed, **options)
    except AdaptiveError as e:
        raise _error(str(e)) from e
    except Exception as e:  # noqa: BLE001 - a draft model that transformers cannot read must reach the page
        if options.get("drafter") != "draft_model":
            raise
        raise _error(f"Could not load the draft model {options['draft_model']!r}: {type(e).__name__}: {e}") from e
    live = GenerationResult(token_ids=[], text="", traces=[], prompt_text=prompt,
                            stats={"num_layers": runtime.spec.num_layers, "mode": mode})
    stop = threading.Event()
    try:
        for batch in _drain_in_thread(stream, stop, LIVE_REDRAW_S):
            live.traces.extend(batch)
            yield (f"Generating… {len(live.traces)} / {max_new_tokens} tokens",
                   views.token_view_html(live, live=True), *skip[1:])
    except AdaptiveError as e:
        raise _error(str(e)) from e
    finally:
        stop.set()  # the browser went away or Stop was pressed: let the decode thread finish early
    result = stream.result
    current = Session(result=result, model=model)
    _write_trace(current)
    # Stage 2: the lens (one teacher-forced pass) gives the heatmap every layer and the hovers their top-k.
    started = time.perf_counter()
    _analyse(current, runtime, max_new_tokens, float(temperature), seed, with_baseline=False)
    lens_s = time.perf_counter() - started
    done = (f"{len(result.traces)} tokens, {result.stats['tokens_per_s']:.1f} tokens/s, stop: {result.stop_reason}. "
            f"Lens pass {lens_s:.2f} s")
    if mode == "full":
        current.baseline = result
        yield render(current, heat_value, done + ".")
        return
    yield render(current, heat_value, done + ". Running full depth on the same prompt for the audit…", pending=True)
    # Stage 3: the full-depth run of the same prompt: measured speedup and divergence audit.
    started = time.perf_counter()
    current.baseline = runtime.generate(list(result.prompt_ids), max_new_tokens=max_new_tokens, mode="full",
                                        temperature=float(temperature), seed=seed)
    yield render(current, heat_value, done + f", full-depth run {time.perf_counter() - started:.2f} s.")


def on_redraw_heatmap(heat_value: str, session: Session | None):
    """Switch the heatmap between the confidence measure and KL to final: from the session, no model call."""
    if session is None:
        return views.empty_figure("Generate or upload a trace first.")
    return views.heatmap_figure(session.result, session.lens, "kl" if heat_value.startswith("KL") else "confidence",
                                session.token_text)


def on_load_trace(file: str | None, heat_value: str, session: Session | None):
    """Redraw every view from an uploaded JSON trace, without the model."""
    if not file:
        raise _error("Choose a JSON trace file first.")
    path = Path(file)
    if path.stat().st_size > MAX_TRACE_BYTES:
        raise _error(f"The trace file is larger than {MAX_TRACE_BYTES // 2**20} MB.")
    try:
        result = GenerationResult.from_json(path.read_bytes())
    except TraceFormatError as e:
        raise _error(f"Could not read {path.name} as an adaptive trace: {e}") from e
    if not result.traces:
        raise _error(f"{path.name} holds no generated tokens.")
    L = result.stats.get("num_layers")
    if not isinstance(L, int) or L < 1 or any(not 1 <= t.exit_layer <= L for t in result.traces):
        raise _error(f"{path.name}: stats.num_layers is missing or an exit layer lies outside 1..num_layers.")
    if any(t.round is not None and not 0 <= t.round < len(result.rounds) for t in result.traces):
        raise _error(f"{path.name}: a token refers to a speculative round that the file does not hold.")
    current = Session(result=result, model=None, source="uploaded")
    _write_trace(current)
    if result.stats.get("mode") == "full":
        current.baseline = result
    return render(current, heat_value,
                  f"Loaded {len(result.traces)} tokens from {html.escape(path.name)}. Drawn from the trace "
                  "alone: the heatmap shows only the layers the run checked and hovers lack top-k predictions. "
                  "Press **Analyse with model** to run the lens and a full-depth audit with the selected model.")


def on_analyse(model: str, heat_value: str, session: Session | None):
    """Lens + full-depth audit for the current run (typically an uploaded trace) with the selected model."""
    if session is None:
        raise _error("Generate or upload a trace first.")
    runtime = load_model(model)
    res = session.result
    L = res.stats.get("num_layers")
    if L != runtime.spec.num_layers or any(i >= runtime.spec.vocab_size for i in [*res.prompt_ids, *res.token_ids]):
        raise _error(f"This trace was made with a {L}-layer model; the selected model has "
                       f"{runtime.spec.num_layers} layers and a vocabulary of {runtime.spec.vocab_size}.")
    if not res.prompt_ids:
        raise _error("This trace has no prompt_ids, so its context cannot be replayed.")
    try:
        _analyse(session, runtime, len(res.token_ids), 0.0, None)
    except AdaptiveError as e:
        raise _error(str(e)) from e
    session.model = model
    return render(session, heat_value, f"Analysed with {html.escape(str(model))}: lens on every layer, "
                                       "greedy full-depth run for the audit.")


def on_explain(token_index: int | None, layer: int, n_steps: int, model: str, threshold: float, measure: str,
               session: Session | None):
    """Captum attribution of one token's exit decision (on demand: seconds of CPU)."""
    from explain.attribution import decision_layer, explain_exit

    if session is None:
        raise _error("Generate or upload a trace first.")
    res = session.result
    try:
        index = int(token_index)
    except (TypeError, ValueError):
        index = -1
    if not 0 <= index < len(res.traces):
        raise _error(f"Pick a generated token (0..{len(res.traces) - 1}).")
    runtime = load_model(session.model or model)
    L = runtime.spec.num_layers
    if res.stats.get("num_layers") != L:
        raise _error(f"The run used a {res.stats.get('num_layers')}-layer model; the loaded one has {L}.")
    auto_layer, why = decision_layer(res.traces[index], L)
    layer = int(layer) if layer else auto_layer
    thr = res.stats.get("threshold", threshold) if res.stats.get("mode") == "early_exit" else threshold
    try:
        attr = explain_exit(runtime, res.prompt_ids, res.token_ids, index, layer, float(thr),
                            res.stats.get("measure") or measure, n_steps=int(n_steps))
    except AdaptiveError as e:
        raise _error(str(e)) from e
    if layer == auto_layer:
        attr.notes.append(f"layer {layer} chosen because {why}")
    return views.attribution_figure(attr), views.attribution_markdown(attr)


def on_explain_gate(path: str, n_steps: int, model: str, session: Session | None):
    """Captum attribution of the prompt gate's verdict for one path over the prompt tokens."""
    from explain.attribution import explain_gate

    if session is None or not session.result.prompt_ids:
        raise _error("Generate first (any mode): the gate is explained for the current prompt.")
    runtime = load_model(session.model or model)
    try:
        att = explain_gate(runtime, session.result.prompt_ids, path, n_steps=int(n_steps))
    except AdaptiveError as e:
        raise _error(str(e)) from e
    return sched_views.gate_attribution_figure(att)


# ---- layout -------------------------------------------------------------------------------------------------
def load_prompts() -> list[dict]:
    try:
        prompts = json.loads(PROMPTS_FILE.read_text())
        return [p for p in prompts if isinstance(p, dict) and isinstance(p.get("prompt"), str)]
    except (OSError, json.JSONDecodeError):
        return []


def build_app() -> gr.Blocks:
    prompts = load_prompts()
    model_choices = list(dict.fromkeys([default_model(), BUNDLED]))
    with gr.Blocks(title="Adaptive Inference Runtime", delete_cache=(3600, 7200)) as demo:
        session = gr.State(None)
        gr.Markdown("# Adaptive Inference Runtime\nEarly exit over a causal LM: each token stops at the first layer "
                    "whose exit head is confident enough; or speculative decoding: the model's shallow layers draft, "
                    "all layers verify in one pass, and the output equals full depth. Every decision is drawn below.")
        banner = gr.Markdown(startup_message(), elem_id="air-banner")
        with gr.Row():
            with gr.Column(scale=1, min_width=340):
                model = gr.Dropdown(model_choices, value=default_model(), allow_custom_value=True,
                                    label="Model (bundled, a local checkpoint directory or a hub id)")
                load_btn = gr.Button("Load model and its default knobs", size="sm")
                prompt = gr.Textbox(label="Prompt", lines=6, max_lines=20, value=prompts[3]["prompt"] if len(prompts) > 3 else "",
                                    elem_id="air-prompt")
                if prompts:
                    gr.Examples([[p["prompt"]] for p in prompts], inputs=[prompt], label="Example prompts",
                                example_labels=[f'{p.get("name", "prompt")} ({p.get("difficulty", "?")})' for p in prompts],
                                api_name="load_example", examples_per_page=9)
                mode = gr.Radio(["early_exit", "full", "speculative", "auto"], value="early_exit", label="Mode",
                                elem_id="air-mode")
                with gr.Accordion("Early-exit knobs", open=True):
                    threshold = gr.Slider(0.0, 1.0, value=0.9, step=0.01, label="Threshold")
                    with gr.Row():
                        measure = gr.Dropdown(list(MEASURES), value="max_prob", label="Confidence measure")
                        kv_policy = gr.Radio(list(KV_POLICIES), value="propagate", label="KV policy")
                    exit_layers = gr.Textbox(label="Exit layers", placeholder="blank: the model's default, e.g. 2,4,6")
                with gr.Accordion("Speculative knobs", open=False):
                    drafter = gr.Radio(list(DRAFTERS), value="self", label="Drafter (lookup falls back to self)")
                    draft_model = gr.Textbox(label="Draft model path (drafter draft_model: same tokenizer)",
                                             placeholder="a local checkpoint directory")
                    with gr.Row():
                        draft_depth = gr.Slider(0, 32, value=0, step=1, label="Draft depth (0 = adaptive: L/4 .. L/2)")
                        draft_length = gr.Slider(0, 16, value=0, step=1, label="Draft length (0 = adaptive)")
                    with gr.Row():
                        max_draft = gr.Slider(1, 16, value=8, step=1, label="Longest adaptive draft")
                        # A placeholder, or Gradio draws a blank Number as a misleading 0 (0 means full here).
                        draft_vocab_size = gr.Number(value=None, precision=0, minimum=0, placeholder="model default",
                                                     label="Draft vocabulary (blank = model default, 0 = full)")
                with gr.Accordion("Scheduler knobs (mode auto)", open=False):
                    policy = gr.Radio(list(POLICIES), value="quality", label="Policy", elem_id="air-policy")
                    with gr.Row():
                        epsilon = gr.Number(value=0.01, minimum=0, maximum=1, label="ε: allowed disagreement (quality, load)")
                        latency_ms = gr.Number(value=None, minimum=0, label="Latency target, ms/token (latency)",
                                               placeholder="e.g. 2.0")
                    with gr.Row():
                        budget = gr.Slider(0.05, 1.0, value=0.6, step=0.05, label="Compute budget (budget)")
                        queue_depth = gr.Slider(0, 20, value=0, step=1, label="Requests waiting (load)")
                    audit_rate = gr.Slider(0.0, 1.0, value=0.1, step=0.05, label="Audit rate (full-depth checks)")
                with gr.Accordion("Length and sampling", open=False):
                    max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=64, step=1, label="Max new tokens")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                    seed = gr.Number(value=None, precision=0, label="Seed (blank = none)", placeholder="none")
                with gr.Row():
                    generate_btn = gr.Button("Generate", variant="primary", elem_id="air-generate")
                    stop_btn = gr.Button("Stop", variant="stop")
                status = gr.Markdown("", elem_id="air-status")
            with gr.Column(scale=2, min_width=480):
                with gr.Tabs():
                    with gr.Tab("Tokens & layers", id="tokens"):
                        tokens = gr.HTML(views.token_view_html(
                            GenerationResult(token_ids=[], text="", traces=[], stats={"num_layers": 8})),
                            elem_id="air-tokens")
                        heat_value = gr.Radio(["confidence measure", "KL to final layer"], value="confidence measure",
                                              label="Heatmap colour", elem_id="air-heat-value")
                        heatmap = gr.Plot(views.empty_figure("Generate to see every layer's prediction for every token."),
                                          label="Layer × token", show_label=False, elem_id="air-heatmap")
                        with gr.Accordion("Plain text", open=False):
                            text = gr.Textbox(label="Generated text", lines=4, interactive=False)
                    with gr.Tab("Compute ledger", id="ledger"):
                        ledger = gr.Markdown("Generate to see where the compute went.")
                        ledger_plot = gr.Plot(views.empty_figure("no run yet", views.LEDGER_HEIGHT), label="Exits and compute", show_label=False)
                        with gr.Accordion("Raw stats", open=False):
                            stats = gr.JSON(label="stats")
                    with gr.Tab("Speculative", id="speculative"):
                        spec_tokens = gr.HTML(spec_views.speculative_token_html(GenerationResult([], "", [], {})),
                                              elem_id="air-spec-tokens")
                        spec_plot = gr.Plot(views.empty_figure("Generate with mode speculative to see its rounds.",
                                                               spec_views.SPECULATIVE_HEIGHT),
                                            label="Speculative rounds", show_label=False, elem_id="air-spec-plot")
                        with gr.Accordion("Rounds (one per verifier pass)", open=True):
                            spec_rounds = gr.HTML("", elem_id="air-spec-rounds")
                    with gr.Tab("Scheduler", id="scheduler"):
                        auto_gate = gr.Plot(sched_views.gate_figure(GenerationResult([], "", [], {})),
                                            label="Prompt gate", show_label=False, elem_id="air-gate-plot")
                        auto_plan = gr.HTML(sched_views.plan_html(GenerationResult([], "", [], {})), elem_id="air-plan")
                        auto_paths = gr.Plot(sched_views.path_gate_figure(GenerationResult([], "", [], {}), None),
                                             label="Token-level gate per path", show_label=False,
                                             elem_id="air-path-gates")
                        with gr.Row():
                            gate_path = gr.Dropdown(["light", "standard"], value="light", label="Gate verdict to explain",
                                                    scale=2)
                            gate_steps = gr.Slider(8, 128, value=32, step=8, label="IG steps", scale=2)
                        gate_btn = gr.Button("Explain the gate's verdict (Captum)")
                        gate_why = gr.Plot(views.empty_figure("Generate with mode auto, then press Explain.",
                                                              sched_views.GATE_HEIGHT),
                                           label="Gate attribution", show_label=False, elem_id="air-gate-why")
                    with gr.Tab("Audit", id="audit"):
                        audit = gr.HTML(views.audit_html(GenerationResult([], "", [], {}), None), elem_id="air-audit")
                    with gr.Tab("Why did it exit here?", id="why"):
                        gr.Markdown("Attribute one token's exit decision to its context: Integrated Gradients on the "
                                    "input embeddings for the confidence at the exit layer, feature ablation for the "
                                    "hard exit/continue decision. Takes a few seconds of CPU.")
                        with gr.Row():
                            # Custom values let API clients pass any index; on_explain checks the range.
                            token_pick = gr.Dropdown([], label="Token", scale=3, allow_custom_value=True)
                            why_layer = gr.Slider(0, 64, value=0, step=1, label="Layer (0 = its decision layer)", scale=2)
                            n_steps = gr.Slider(8, 128, value=32, step=8, label="IG steps", scale=2)
                        explain_btn = gr.Button("Explain this token's exit")
                        why_plot = gr.Plot(views.empty_figure("Pick a token and press Explain.", views.ATTRIBUTION_HEIGHT),
                                           label="Attribution over the context", show_label=False,
                                           elem_id="air-why-plot")
                        why_text = gr.Markdown()
                    with gr.Tab("Traces", id="traces"):
                        gr.Markdown("Download this run as JSON, or upload a trace (e.g. from `python -m adaptive "
                                    "generate --json run.json`) to redraw every view without running the model.")
                        download = gr.DownloadButton("Download trace (JSON)", value=None)
                        upload = gr.File(label="Upload a trace", file_types=[".json"], type="filepath")
                        analyse_btn = gr.Button("Analyse with model (lens + full-depth audit)")

        outputs = [status, tokens, text, heatmap, ledger, ledger_plot, audit, stats, token_pick, download,
                   spec_tokens, spec_plot, spec_rounds, auto_gate, auto_plan, auto_paths, session]
        demo.load(on_page_load, outputs=[banner, threshold, measure, kv_policy, exit_layers, draft_vocab_size],
                  api_name="init")
        load_btn.click(on_load_model, inputs=[model],
                       outputs=[banner, threshold, measure, kv_policy, exit_layers, draft_vocab_size],
                       api_name="load_model")
        gen = generate_btn.click(on_generate, inputs=[model, prompt, mode, threshold, measure, kv_policy, exit_layers,
                                                      max_new_tokens, temperature, seed, heat_value, drafter,
                                                      draft_model, draft_depth, draft_length, max_draft,
                                                      draft_vocab_size, policy, epsilon, latency_ms, budget,
                                                      queue_depth, audit_rate],
                                 outputs=outputs, api_name="generate", show_progress="minimal")
        stop_btn.click(None, cancels=[gen], api_name="stop")
        heat_value.change(on_redraw_heatmap, inputs=[heat_value, session], outputs=[heatmap],
                          api_name="redraw_heatmap")
        upload.upload(on_load_trace, inputs=[upload, heat_value, session], outputs=outputs, api_name="load_trace")
        analyse_btn.click(on_analyse, inputs=[model, heat_value, session], outputs=outputs, api_name="analyse")
        gate_btn.click(on_explain_gate, inputs=[gate_path, gate_steps, model, session], outputs=[gate_why],
                       api_name="explain_gate")
        explain_btn.click(on_explain, inputs=[token_pick, why_layer, n_steps, model, threshold, measure, session],
                          outputs=[why_plot, why_text], api_name="explain")
    return demo


def preload(name: str) -> None:
    """Load the default model and run a few tokens before the first user arrives (first-token latency)."""
    try:
        runtime = MODELS.get(name)
        runtime.host_costs()  # measured once per model; speculation's first request would otherwise wait for it
        # One short request through the whole handler warms every path a user's first Generate takes:
        # decoding, the lens, the full-depth audit, figure building and trace writing.
        cfg = runtime.early_exit_config()
        exits = ",".join(str(k) for k in sorted(cfg.exit_points(runtime.spec.num_layers)))
        for _ in on_generate(name, "def f(x):\n", "early_exit", cfg.threshold, cfg.measure, cfg.kv_policy, exits,
                             8, 0.0, None, "confidence measure"):
            pass
    except Exception as e:  # noqa: BLE001 - a missing model is reported in the page, never fatal
        print(f"[app] default model not preloaded: {e}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Adaptive Inference Runtime app")
    parser.add_argument("--port", type=int, default=None, help="default: GRADIO_SERVER_PORT or 7860")
    parser.add_argument("--host", default=None, help="default: GRADIO_SERVER_NAME or 127.0.0.1")
    parser.add_argument("--model", default=None, help="default model (overrides ADAPTIVE_MODEL)")
    parser.add_argument("--no-preload", action="store_true", help="load the model on first use instead")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("ADAPTIVE_THREADS", "1")))
    if args.model:
        os.environ["ADAPTIVE_MODEL"] = args.model
    if not args.no_preload:
        threading.Thread(target=preload, args=(default_model(),), daemon=True).start()
    demo = build_app()
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, max_file_size="20mb", css=CSS,
                theme=gr.themes.Soft(), footer_links=["api", "gradio"])


if __name__ == "__main__":
    main()

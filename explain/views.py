"""Figures and HTML views built from traces only: no model calls here.

Inputs are plain data: a ``GenerationResult`` (its traces and stats), optionally the ``LensReport`` of the
same tokens, the full-depth baseline run of the same prompt, an ``ExitAttribution``, and a
``token_text`` map {token id: decoded text} for ids that only the lens mentions (top-k predictions), which
the caller decodes with its tokenizer. Every view degrades to what the trace alone holds when the lens or
the baseline is missing (an uploaded trace file, no model loaded).

Token text is untrusted: it is HTML-escaped everywhere it lands (HTML views, and Plotly labels and hovers,
which interpret a subset of HTML tags).
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from adaptive.trace import GenerationResult

# Fixed heights: Plotly's autosize can render at zero height inside Gradio 6 tabs that are hidden at draw time.
HEATMAP_HEIGHT = 460
LEDGER_HEIGHT = 320
ATTRIBUTION_HEIGHT = 420
COLORSCALE = "Viridis"
TOP_K_SHOWN = 5

TokenText = dict[int, str]


# ---- small helpers ------------------------------------------------------------------------------------
def visible(text: str) -> str:
    """Make whitespace visible for labels: a token that is a newline or a space must not look empty."""
    return text.replace("\n", "↵").replace("\t", "⇥").replace(" ", "·") or "∅"


def label(text: str, limit: int = 12) -> str:
    """An escaped, whitespace-visible, length-capped label for Plotly ticks and hovers."""
    v = visible(text)
    return html.escape(v if len(v) <= limit else v[:limit - 1] + "…")


def num_layers_of(result: GenerationResult) -> int:
    L = result.stats.get("num_layers")
    if isinstance(L, int) and L > 0:
        return L
    return max([t.exit_layer for t in result.traces] + [1])


def layer_colours(num_layers: int) -> list[str]:
    """One colour per exit layer 1..L (index 0 is layer 1), from the same scale as the heatmap."""
    if num_layers == 1:
        return sample_colorscale(COLORSCALE, [1.0])
    return sample_colorscale(COLORSCALE, [i / (num_layers - 1) for i in range(num_layers)])


def _ink(colour: str) -> str:
    """Black or white text, whichever reads better on ``colour`` ('rgb(r, g, b)' or '#rrggbb')."""
    if colour.startswith("#"):
        r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    else:
        r, g, b = (float(x) for x in colour[colour.index("(") + 1:colour.index(")")].split(",")[:3])
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"


def _tok(token_text: TokenText | None, token_id: int) -> str:
    return (token_text or {}).get(token_id, f"#{token_id}")


# ---- token view ---------------------------------------------------------------------------------------
def token_tooltip(result: GenerationResult, index: int, lens=None, token_text: TokenText | None = None) -> str:
    """Plain text for one token's hover: exit decision, per-layer confidence, top-k at exit vs final."""
    t = result.traces[index]
    L = num_layers_of(result)
    measure = result.stats.get("measure", "max_prob")
    lines = [f"token {index} (position {t.position}): {t.text!r}",
             f"exit after layer {t.exit_layer} of {L}"
             + (f", {measure} = {t.confidence:.3f}" if t.confidence is not None else "")]
    if t.layer_confidence:
        checked = " ".join(f"L{k}:{v:.2f}" for k, v in sorted(t.layer_confidence.items()))
        lines.append(f"checked during the run: {checked}")
    if lens is not None and index < len(lens.token_ids):
        per_layer = " ".join(f"L{k + 1}:{lens.confidence[k][index]:.2f}" for k in range(len(lens.confidence)))
        lines.append(f"lens {lens.measure}: {per_layer}")
        final = len(lens.top_ids)
        for name, k in ((("exit", t.exit_layer),) if t.exit_layer < final else ()) + (("final", final),):
            tops = ", ".join(f"{_tok(token_text, i)!r} {p:.2f}"
                             for i, p in zip(lens.top_ids[k - 1][index][:TOP_K_SHOWN], lens.top_probs[k - 1][index]))
            lines.append(f"top-{TOP_K_SHOWN} at {name} layer {k}: {tops}")
    else:
        lines.append("top-k per layer: needs the lens (a model pass)")
    if t.full_head_skipped:
        lines.append("vocabulary exit: every layer ran, the exit shortlist was confident, the full LM head was skipped")
    if t.kv_fill_layers:
        lines.append(f"K/V filled for {t.kv_fill_layers} skipped layers")
    if t.deferred_positions:
        lines.append(f"carried {t.deferred_positions} deferred positions")
    if t.full_macs:
        lines.append(f"compute {t.macs / t.full_macs:.2f}x of full depth")
    return "\n".join(lines)


def _legend(num_layers: int) -> str:
    colours = layer_colours(num_layers)
    chips = "".join(f'<span style="background:{c};color:{_ink(c)};padding:0 6px;border-radius:3px;'
                    f'margin-right:2px;font-size:12px">{k + 1}</span>' for k, c in enumerate(colours))
    return (f'<div class="air-legend" style="margin-bottom:6px;font-size:12px">exit layer: {chips}'
            f'<span style="margin-left:8px;text-decoration:underline dotted">dotted</span>: full LM head skipped'
            f'<span style="margin-left:8px;opacity:.75">(hover a token for details)</span></div>')


def token_view_html(result: GenerationResult, lens=None, token_text: TokenText | None = None,
                    diverged: set[int] | None = None, live: bool = False) -> str:
    """The generated text, each token coloured by its exit layer, with a hover of its decisions.

    ``live=True`` (while streaming) skips the tooltips: they need the lens, and the page redraws per token.
    ``diverged`` holds token indices where the full-depth run chose a different token: outlined in red.
    """
    L = num_layers_of(result)
    colours = layer_colours(L)
    diverged = diverged or set()
    spans = []
    prompt = html.escape(result.prompt_text)
    for i, t in enumerate(result.traces):
        colour = colours[min(max(t.exit_layer, 1), L) - 1]
        text = html.escape(t.text.replace("\n", "↵\n") if t.text != "" else "∅")
        style = f"background:{colour};color:{_ink(colour)};border-radius:2px"
        if t.full_head_skipped:  # a vocabulary exit
            style += ";text-decoration:underline dotted"
        if i in diverged:
            style += ";outline:2px solid #e0245e;outline-offset:-1px"
        title = "" if live else f' title="{html.escape(token_tooltip(result, i, lens, token_text), quote=True)}"'
        spans.append(f'<span class="air-tok" data-index="{i}" data-exit="{t.exit_layer}" style="{style}"{title}>'
                     f'{text}</span>')
    body = (f'<span class="air-prompt" style="opacity:.6">{prompt}</span>{"".join(spans)}'
            if result.traces or prompt else '<span style="opacity:.6">nothing generated yet</span>')
    return (f'<div class="air-tokens">{_legend(L)}<div style="white-space:pre-wrap;font-family:ui-monospace,'
            f'SFMono-Regular,Menlo,monospace;font-size:14px;line-height:1.6">{body}</div></div>')


# ---- layer x token view -------------------------------------------------------------------------------
@dataclass
class LayerGrid:
    """What the heatmap draws: one value per (layer, generated token); NaN where nothing is known."""

    values: list[list[float]]  # (L, N)
    top1: list[list[str]]  # (L, N) the escaped top-1 token text per cell ("" when unknown)
    positions: list[int]  # (N,) x coordinates: positions keep repeated tokens in separate columns
    tick_text: list[str]  # (N,) escaped token labels
    exit_layers: list[int]  # (N,)
    value_name: str  # "max_prob", ..., or "KL to final (nats)"
    source: str  # "lens" (every layer, one teacher-forced pass) or "trace" (only the layers checked in the run)
    zmin: float
    zmax: float


def layer_grid(result: GenerationResult, lens=None, value: str = "confidence",
               token_text: TokenText | None = None) -> LayerGrid:
    """Cells from the lens when there is one, else from what the run itself recorded (checked layers only)."""
    L, N = num_layers_of(result), len(result.traces)
    positions = [t.position for t in result.traces]
    ticks = [label(t.text) for t in result.traces]
    exits = [t.exit_layer for t in result.traces]
    measure = result.stats.get("measure") or (lens.measure if lens is not None else "max_prob")
    if lens is not None and len(lens.token_ids) == N and len(lens.confidence) == L:
        if value == "kl":
            values = [list(row) for row in lens.kl_to_final]
            name, zmin = "KL to final (nats)", 0.0
            zmax = max([v for row in values for v in row] + [1e-6])
        else:
            values = [list(row) for row in lens.confidence]
            name = lens.measure
            zmin, zmax = (-1.0 if lens.measure == "cosine" else 0.0), 1.0
        top1 = [[label(_tok(token_text, lens.top_ids[k][n][0])) for n in range(N)] for k in range(L)]
        return LayerGrid(values, top1, positions, ticks, exits, name, "lens", zmin, zmax)
    # No lens: only the layers checked during the run are known; KL is not recorded at all.
    values = [[t.layer_confidence.get(k + 1, math.nan) for t in result.traces] for k in range(L)]
    top1 = [[label(_tok(token_text, t.layer_top1[k + 1])) if k + 1 in t.layer_top1 else "" for t in result.traces]
            for k in range(L)]
    return LayerGrid(values, top1, positions, ticks, exits, measure, "trace",
                     -1.0 if measure == "cosine" else 0.0, 1.0)


def heatmap_figure(result: GenerationResult, lens=None, value: str = "confidence",
                   token_text: TokenText | None = None, threshold: float | None = None) -> go.Figure:
    """Rows = layers (1 at the bottom), columns = generated tokens; exit layers marked; threshold contour."""
    grid = layer_grid(result, lens, value, token_text)
    L = len(grid.values)
    if threshold is None and result.stats.get("mode") == "early_exit":
        threshold = result.stats.get("threshold")
    layers = list(range(1, L + 1))
    fig = go.Figure()
    fig.add_trace(go.Heatmap(
        z=grid.values, x=grid.positions, y=layers, customdata=grid.top1, colorscale=COLORSCALE,
        zmin=grid.zmin, zmax=grid.zmax, colorbar=dict(title=dict(text=html.escape(grid.value_name)), thickness=12),
        hovertemplate="layer %{y}, position %{x}<br>" + html.escape(grid.value_name)
                      + " %{z:.3f}<br>top-1: %{customdata}<extra></extra>",
        name=grid.value_name, xgap=1, ygap=1))
    if threshold is not None and value != "kl" and grid.source == "lens" and L > 1 and len(grid.positions) > 1:
        # The contour (white, dotted) where the measure equals the threshold: cells above it could exit there.
        fig.add_trace(go.Contour(
            z=grid.values, x=grid.positions, y=layers, showscale=False, hoverinfo="skip", name="threshold",
            contours=dict(start=threshold, end=threshold, size=1.0, coloring="none", showlabels=False),
            line=dict(color="#ffffff", width=2, dash="dot")))
    tick_hover = ["<br>".join(f"L{k + 1}:{grid.top1[k][n]}" for k in range(L) if grid.top1[k][n])
                  for n in range(len(grid.positions))]
    fig.add_trace(go.Scatter(
        x=grid.positions, y=grid.exit_layers, mode="markers", name="exit layer",
        marker=dict(symbol="line-ew-open", size=14, color="#ff4d4d", line=dict(width=3, color="#ff4d4d")),
        customdata=grid.tick_text, text=tick_hover,
        hovertemplate="%{customdata} exited after layer %{y}<extra></extra>"))
    step = max(1, math.ceil(len(grid.positions) / 64))  # at most ~64 tick labels; hover shows every column
    title = f"Layer × token: {html.escape(grid.value_name)}"
    if grid.source == "trace":
        title += " (from the trace: checked layers only; run the lens for every layer)"
    if threshold is not None and value != "kl":
        title += f" · threshold {threshold:g}"
    fig.update_layout(
        height=HEATMAP_HEIGHT, margin=dict(l=60, r=20, t=40, b=90), title=dict(text=title, font=dict(size=14)),
        showlegend=False, plot_bgcolor="#f0f0f0",
        xaxis=dict(title="generated token (position)", tickmode="array", tickvals=grid.positions[::step],
                   ticktext=grid.tick_text[::step], tickangle=-60, tickfont=dict(size=10, family="monospace")),
        yaxis=dict(title="layers run", tickmode="array", tickvals=layers, range=[0.5, L + 0.5]))
    return fig


# ---- compute ledger -----------------------------------------------------------------------------------
def _fmt(v, spec: str = ".3f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else "—"


def speedup(result: GenerationResult, baseline: GenerationResult | None) -> float | None:
    """Measured wall-clock speedup: full-depth ms per token / adaptive ms per token (prefill included)."""
    if baseline is None:
        return None
    a, b = result.stats.get("ms_per_token"), baseline.stats.get("ms_per_token")
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or a <= 0:
        return None
    return b / a


def ledger_markdown(result: GenerationResult, baseline: GenerationResult | None = None, pending: bool = False) -> str:
    """Where the compute went, against full depth: MAC-based fractions and measured wall clock."""
    s, b = result.stats, (baseline.stats if baseline is not None else {})
    L = num_layers_of(result)
    speculative = s.get("mode") == "speculative"
    rows = [
        ("mode", html.escape(str(s.get("mode", "?"))), "full"),
        ("tokens generated", _fmt(len(result.traces), "d"), _fmt(len(baseline.traces), "d") if baseline else "—"),
        ("layers run per token (mean)", f"{_fmt(s.get('layers_run_mean'), '.2f')} / {L}",
         f"{_fmt(b.get('layers_run_mean'), '.2f')} / {L}" if baseline else f"{L} / {L}"),
        ("compute fraction (MACs, all overheads)", _fmt(s.get("compute_fraction")), "1.000"),
    ]
    if speculative:
        # Every token is produced at full depth; what changes is how many passes read the weights. The
        # compute fraction above already counts the drafts (rejected ones too) and every head evaluation.
        passes = s.get("verifier_passes")
        after_prefill = len(result.traces) - 1  # the first token comes from the prefill in every mode
        rows += [
            ("verifier passes (full-depth passes after the prefill)", _fmt(passes, "d"),
             _fmt(len(baseline.traces) - 1, "d") if baseline else "—"),
            ("tokens per verifier pass", _fmt(after_prefill / passes if isinstance(passes, int) and passes else None, ".2f"),
             "1.00"),
            ("accepted drafts per round with a draft (mean)", _fmt(s.get("mean_accepted_per_round"), ".2f"), "—"),
            ("acceptance rate of judged drafts", _fmt(s.get("acceptance_rate")), "—"),
            ("draft ms / verify ms (all rounds)",
             f"{_fmt(s.get('draft_ms'), '.1f')} / {_fmt(s.get('verify_ms'), '.1f')}", "—"),
        ]
    else:
        rows += [
            ("· of which K/V fill of skipped layers", _fmt(s.get("kv_fill_fraction")), "0.000"),
            ("· of which exit heads (incl. final head)", _fmt(s.get("head_fraction")), _fmt(b.get("head_fraction"))),
            ("vocabulary exits (full depth, full LM head skipped)", _fmt(s.get("vocab_exits"), "d"), "0"),
        ]
    rows += [
        ("tokens / s (wall clock, prefill included)", _fmt(s.get("tokens_per_s"), ".1f"), _fmt(b.get("tokens_per_s"), ".1f")),
        ("ms / token", _fmt(s.get("ms_per_token"), ".2f"), _fmt(b.get("ms_per_token"), ".2f")),
        ("prefill ms", _fmt(s.get("prefill_ms"), ".1f"), _fmt(b.get("prefill_ms"), ".1f")),
        # which code produced these timings: the C++ layer loop or the Python layer (and why)
        ("decoder layers ran in", html.escape(s.get("layer_code", "—")),
         html.escape(b.get("layer_code", "—")) if baseline else "—"),
    ]
    lines = ["| | this run | full depth, same prompt |", "|---|---:|---:|"]
    lines += [f"| {name} | {mine} | {full} |" for name, mine, full in rows]
    sp = speedup(result, baseline)
    if s.get("mode") == "full":
        lines.append("\nThis run is full depth: it is its own baseline (speedup 1.00×).")
    elif sp is not None:
        lines.append(f"\n**Measured speedup vs full depth: {sp:.2f}×** (ms per token, one run each on this host; "
                     "other load on the machine moves it).")
    elif pending:
        lines.append("\nRunning full depth on the same prompt to measure the speedup…")
    else:
        lines.append("\nNo full-depth run of this prompt yet: speedup unknown (use *Analyse with model*).")
    knob_names = (("drafter", "draft_depth", "draft_length", "max_draft", "draft_vocab", "exit_heads") if speculative
                  else ("threshold", "measure", "kv_policy", "exit_layers", "exit_heads", "exit_vocab", "vocab_exit",
                        "vocab_exit_size", "threshold_offsets"))
    knobs = [f"{k}={html.escape(str(s[k]))}" for k in knob_names if k in s and s[k] != {}]
    if knobs:
        lines.append("\nKnobs: " + ", ".join(knobs))
    return "\n".join(lines)


def ledger_figure(result: GenerationResult) -> go.Figure:
    """Left: how many tokens exited after each layer. Right: each token's compute against full depth."""
    L = num_layers_of(result)
    counts = [0] * L
    for t in result.traces:
        counts[min(max(t.exit_layer, 1), L) - 1] += 1
    fig = make_subplots(rows=1, cols=2, column_widths=[0.4, 0.6],
                        subplot_titles=("exit-layer distribution", "compute per token (MACs / full depth)"))
    fig.add_trace(go.Bar(x=list(range(1, L + 1)), y=counts, marker_color=layer_colours(L), name="tokens",
                         hovertemplate="exit after layer %{x}: %{y} tokens<extra></extra>"), row=1, col=1)
    fractions = [t.macs / t.full_macs if t.full_macs else math.nan for t in result.traces]
    fig.add_trace(go.Bar(x=[t.position for t in result.traces], y=fractions, name="compute",
                         marker_color=[layer_colours(L)[min(max(t.exit_layer, 1), L) - 1] for t in result.traces],
                         customdata=[label(t.text) for t in result.traces],
                         hovertemplate="%{customdata} (position %{x}): %{y:.2f}× full<extra></extra>"), row=1, col=2)
    fig.add_hline(y=1.0, line=dict(color="#888", dash="dash"), row=1, col=2)
    fig.update_xaxes(title_text="layers run", dtick=1, row=1, col=1)
    fig.update_xaxes(title_text="position", row=1, col=2)
    fig.update_yaxes(title_text="tokens", row=1, col=1)
    fig.update_layout(height=LEDGER_HEIGHT, margin=dict(l=50, r=20, t=40, b=50), showlegend=False)
    return fig


# ---- audit ----------------------------------------------------------------------------------------------
@dataclass
class Audit:
    """Token-by-token comparison of a run with the full-depth run of the same prompt."""

    compared: int  # tokens compared (the shorter of the two runs)
    diverged: list[int] = field(default_factory=list)  # token indices where the two runs differ
    first_divergence: int | None = None  # after it, the two runs continue from different text

    @property
    def agreement(self) -> float:
        return 1.0 - len(self.diverged) / self.compared if self.compared else 1.0


def audit(result: GenerationResult, baseline: GenerationResult) -> Audit:
    a, b = result.token_ids, baseline.token_ids
    n = min(len(a), len(b))
    diverged = [i for i in range(n) if a[i] != b[i]] + list(range(n, max(len(a), len(b))))
    return Audit(compared=max(len(a), len(b)), diverged=diverged, first_divergence=diverged[0] if diverged else None)


def lens_disagreements(result: GenerationResult, lens) -> list[int]:
    """Token indices where full depth, given the same prefix, would rank another token first.

    Read off the lens's final layer (teacher-forced on this run's own tokens), so each index is one
    decision of this run, not a consequence of an earlier one. With sampling (temperature > 0) a chosen
    token may differ from full depth's top-1 even at full depth.
    """
    if lens is None or len(lens.token_ids) != len(result.traces) or not lens.top_ids:
        return []
    final = lens.top_ids[-1]
    return [n for n, t in enumerate(result.traces) if final[n][0] != t.token_id]


def _text_row(result: GenerationResult, marked: set[int], notes: dict[int, str] | None = None) -> str:
    parts = []
    for i, t in enumerate(result.traces):
        text = html.escape(t.text.replace("\n", "↵\n") if t.text else "∅")
        if i in marked:
            title = f' title="{html.escape((notes or {}).get(i, ""), quote=True)}"' if notes and i in notes else ""
            parts.append(f'<mark class="air-diff" style="background:#ffd0dc;color:#000"{title}>{text}</mark>')
        else:
            parts.append(text)
    return "".join(parts)


_BOX = ("white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:13px;border:1px solid #ccc;"
        "border-radius:4px;padding:6px;margin:4px 0")


def audit_html(result: GenerationResult, baseline: GenerationResult | None, lens=None,
               token_text: TokenText | None = None, pending: bool = False) -> str:
    """Two audits. Per decision (from the lens): where full depth, given the same prefix, would have picked
    another token. Free running (from the full-depth run of the same prompt): the two texts side by side."""
    parts = ['<div class="air-audit">']
    if lens is not None:
        flips = lens_disagreements(result, lens)
        notes = {n: f"full depth would pick {_tok(token_text, lens.top_ids[-1][n][0])!r} here" for n in flips}
        parts.append(f"<h4>Per decision (teacher-forced, from the lens)</h4><p>{len(flips)} of {len(result.traces)} "
                     "tokens differ from full depth's top-1 given the same prefix (hover a marked token).</p>"
                     f'<div style="{_BOX}">{_text_row(result, set(flips), notes)}</div>')
    parts.append("<h4>Free running: the full-depth run of the same prompt</h4>")
    if baseline is None:
        parts.append("<p>Running full depth on the same prompt…</p>" if pending else
                     "<p>No full-depth run to compare with: generate with the model, or press "
                     "<em>Analyse with model</em> after uploading a trace.</p>")
        return "".join(parts) + "</div>"
    rep = audit(result, baseline)
    if not rep.diverged:
        summary = f"All {rep.compared} tokens equal the full-depth run's."
    else:
        summary = (f"{len(rep.diverged)} of {rep.compared} tokens differ (agreement {rep.agreement:.0%}); first "
                   f"divergence at token {rep.first_divergence}. After it the two runs continue from different "
                   "text, so later differences are consequences, not separate decisions.")
    marked = set(rep.diverged)
    parts.append(f'<p>{html.escape(summary)}</p>'
                 f'<div><strong>{html.escape(str(result.stats.get("mode", "this run")))}</strong></div>'
                 f'<div style="{_BOX}">{_text_row(result, marked)}</div>'
                 f'<div><strong>full depth</strong></div><div style="{_BOX}">{_text_row(baseline, marked)}</div>')
    return "".join(parts) + "</div>"


# ---- token choices and attribution ----------------------------------------------------------------------
def token_choices(result: GenerationResult) -> list[tuple[str, int]]:
    """(label, index) pairs for the attribution selector; labels are plain text (the dropdown escapes)."""
    return [(f"{i}: {visible(t.text)[:20]}  (exit {t.exit_layer})", i) for i, t in enumerate(result.traces)]


def attribution_figure(attr) -> go.Figure:
    """Bars of integrated gradients over the context tokens, with the ablation flips of the decision below."""
    x = list(range(len(attr.context_ids)))
    ticks = [label(t, 10) for t in attr.context_text]
    kind = ["prompt" if i < attr.prompt_len else "generated" for i in x]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.72, 0.28], vertical_spacing=0.06,
                        subplot_titles=(f"Integrated gradients of {html.escape(attr.measure)} at layer {attr.layer} "
                                        f"(convergence delta {attr.ig_delta:.2e})",
                                        "Feature ablation of the exit decision (+1: removing the token stops the exit)"))
    fig.add_trace(go.Bar(x=x, y=attr.ig, name="IG", customdata=list(zip(ticks, kind)),
                         marker_color=["#3b6fb6" if v >= 0 else "#d0523c" for v in attr.ig],
                         hovertemplate="%{customdata[0]} (%{customdata[1]} token %{x}): %{y:.4f}<extra></extra>"),
                  row=1, col=1)
    # Markers, not bars: most tokens do not move a hard decision, and a zero must still be visible.
    fig.add_trace(go.Scatter(x=x, y=attr.ablation, name="ablation", customdata=ticks, mode="markers",
                             marker=dict(size=[11 if v else 6 for v in attr.ablation],
                                         color=["#7a4fb0" if v else "#aaa" for v in attr.ablation]),
                             hovertemplate="%{customdata} (token %{x}): %{y:+.0f}<extra></extra>"), row=2, col=1)
    if attr.prompt_len < len(x):
        fig.add_vline(x=attr.prompt_len - 0.5, line=dict(color="#888", dash="dash"))
    step = max(1, math.ceil(len(x) / 64))
    fig.update_xaxes(tickmode="array", tickvals=x[::step], ticktext=ticks[::step], tickangle=-60,
                     tickfont=dict(size=10, family="monospace"), row=2, col=1)
    fig.update_yaxes(range=[-1.2, 1.2], dtick=1, row=2, col=1)
    fig.update_layout(height=ATTRIBUTION_HEIGHT, margin=dict(l=50, r=20, t=50, b=90), showlegend=False,
                      font=dict(size=11))
    return fig


def attribution_markdown(attr) -> str:
    decision = "exit" if attr.exits else "continue"
    lines = [f"**Token {attr.token_index}** at layer {attr.layer}: {html.escape(attr.measure)} = "
             f"{attr.confidence:.3f} vs threshold {attr.threshold:g} → **{decision}** "
             f"(baseline context: {attr.baseline_confidence:.3f}).",
             f"IG: {attr.ig_steps} steps, sum of attributions {sum(attr.ig):+.4f}, convergence delta "
             f"{attr.ig_delta:.2e}. Ablation flips the decision at {sum(1 for v in attr.ablation if v)} of "
             f"{len(attr.ablation)} context tokens. Took {attr.elapsed_s:.1f} s."]
    lines += [f"_Note: {html.escape(n)}_" for n in attr.notes]
    return "\n\n".join(lines)


def empty_figure(message: str, height: int = HEATMAP_HEIGHT) -> go.Figure:
    """A placeholder with a message, so a panel never renders as a blank (or zero-height) box."""
    fig = go.Figure()
    fig.add_annotation(text=html.escape(message), showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font=dict(size=14, color="#666"))
    fig.update_layout(height=height, xaxis=dict(visible=False), yaxis=dict(visible=False),
                      margin=dict(l=20, r=20, t=20, b=20))
    return fig

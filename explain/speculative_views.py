"""The speculative decoding panel, built from a run's traces and rounds only: no model calls here.

A speculative run leaves one ``SpecRound`` per verifier pass (``result.rounds``) and marks every token with
its ``source``: "draft" (drafted and kept), "correction" (the verifier's token after a rejection) or
"verified" (the verifier's own token after a draft-free pass; the first token comes from the prefill and has
no round). Rejected drafts are not tokens of the output, so they are read back from the rounds: in round r
the verifier judged drafts 0..accepted (the first ``accepted`` kept, the next one rejected) and never looked
at the rest, which were thrown away with it.

Token text is untrusted and is HTML-escaped wherever it lands. Drafted ids that never became output tokens
have no text in the trace: the caller passes ``token_text`` (decoded with its tokenizer); without it they are
shown as ``#id``.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from adaptive.trace import GenerationResult, SpecRound
from explain.views import TokenText, empty_figure, label, visible

SPECULATIVE_HEIGHT = 640  # fixed: Plotly autosize can render at zero height in hidden Gradio tabs
ROLLING_WINDOW = 16  # judged drafts per point of the rolling acceptance
# Colour per token source; "rejected"/"discarded" are drafts that never became output tokens.
SOURCE_COLOURS = {"draft": "#3a9d5d", "correction": "#e8833a", "verified": "#8fa3bf"}
REJECTED_COLOUR = "#d62f4b"
DISCARDED_COLOUR = "#9a9a9a"
DRAFTER_COLOURS = {"self": "#3b6fb6", "lookup": "#b07aa1", "draft_model": "#59a14f"}
SOURCE_NAMES = {"draft": "accepted draft", "correction": "correction (verifier's token after a rejection)",
                "verified": "verified (plain step)"}


# ---- data read off the rounds -----------------------------------------------------------------------------
@dataclass
class Judgement:
    """One drafted token the verifier looked at."""

    round: int  # index into result.rounds
    slot: int  # 0-based place in its draft
    position: int  # sequence position the token was proposed for
    token_id: int
    accepted: bool
    drafter: str
    q: float  # the draft's probability of the token (1.0 for prompt lookup: a point mass)
    p: float | None  # the verifier's probability of it (None if the round did not record it)


def _ratio(part: int, whole: int) -> float:
    """part / whole, NaN (drawn as a gap, never as 0) when there is nothing to divide by."""
    return part / whole if whole else math.nan


@dataclass
class PositionRate:
    """Acceptance at one draft slot: a slot is judged only when every earlier draft was accepted."""

    slot: int  # 0-based
    accepted: int
    judged: int

    @property
    def rate(self) -> float:
        return _ratio(self.accepted, self.judged)


@dataclass
class SpecSummary:
    """Counts for the headline and the ledger, all from the rounds."""

    verifier_passes: int
    speculative_rounds: int  # rounds that verified at least one draft
    plain_steps: int  # rounds with speculation off (or nothing to draft)
    drafted: int  # drafted tokens in all rounds, judged or not
    judged: int
    accepted: int
    round_tokens: int  # output tokens produced by the rounds (every token but the prefill's)
    draft_ms: float
    verify_ms: float
    draft_passes: int = 0  # model passes the drafts took
    guessed: int = 0  # drafts that came from a context guess the shallow path checked in the same pass
    drafted_ahead: int = 0  # rounds that verified a block drafted during the previous verification (overlap)
    next_drafted: int = 0  # drafts made during verifications for the block after them, kept or dropped

    @property
    def acceptance_rate(self) -> float:
        return _ratio(self.accepted, self.judged)

    @property
    def tokens_per_pass(self) -> float:
        return _ratio(self.round_tokens, self.verifier_passes)

    @property
    def accepted_per_round(self) -> float:
        return _ratio(self.accepted, self.speculative_rounds)


def has_rounds(result: GenerationResult) -> bool:
    return bool(result.rounds)


def judgements(result: GenerationResult) -> list[Judgement]:
    """Every drafted token the verifier judged, in generation order."""
    out = []
    for r in result.rounds:
        for j in range(r.judged):  # drafts after the first rejection were never judged
            out.append(Judgement(round=r.index, slot=j, position=r.position + 1 + j, token_id=r.drafted[j],
                                 accepted=j < r.accepted, drafter=r.drafter,
                                 q=r.q_probs[j] if j < len(r.q_probs) else math.nan,
                                 p=r.p_probs[j] if j < len(r.p_probs) else None))
    return out


def acceptance_by_position(result: GenerationResult) -> list[PositionRate]:
    """Acceptance per draft slot (the same counting as the runtime's ``acceptance_by_position`` stat)."""
    rates: list[PositionRate] = []
    for j in judgements(result):
        while len(rates) <= j.slot:
            rates.append(PositionRate(slot=len(rates), accepted=0, judged=0))
        rates[j.slot].judged += 1
        rates[j.slot].accepted += j.accepted
    return rates


def accepted_length_counts(result: GenerationResult) -> dict[str, list[int]]:
    """Per drafter: how many rounds kept 0, 1, 2, ... drafts (plain steps are not rounds with a draft)."""
    drafted = [r for r in result.rounds if r.drafted]
    longest = max([len(r.drafted) for r in drafted] + [0])
    counts: dict[str, list[int]] = {}
    for r in drafted:
        counts.setdefault(r.drafter, [0] * (longest + 1))[min(max(r.accepted, 0), longest)] += 1
    return counts


@dataclass
class RollingPoint:
    position: int  # of the judged draft that closes the window
    rolling: float  # acceptance over the last ROLLING_WINDOW judged drafts (fewer at the start)
    cumulative: float  # acceptance over every judged draft so far


def rolling_acceptance(result: GenerationResult, window: int = ROLLING_WINDOW) -> list[RollingPoint]:
    points, flags = [], []
    for j in judgements(result):
        flags.append(j.accepted)
        recent = flags[-window:]
        points.append(RollingPoint(j.position, sum(recent) / len(recent), sum(flags) / len(flags)))
    return points


def summary(result: GenerationResult) -> SpecSummary:
    js = judgements(result)
    drafted_rounds = [r for r in result.rounds if r.drafted]
    round_tokens = sum(1 for t in result.traces if t.round is not None)
    return SpecSummary(verifier_passes=len(result.rounds), speculative_rounds=len(drafted_rounds),
                       plain_steps=len(result.rounds) - len(drafted_rounds),
                       drafted=sum(len(r.drafted) for r in result.rounds), judged=len(js),
                       accepted=sum(j.accepted for j in js), round_tokens=round_tokens,
                       draft_ms=sum(r.draft_ms for r in result.rounds),
                       verify_ms=sum(r.verify_ms for r in result.rounds),
                       draft_passes=sum(r.draft_passes for r in result.rounds),
                       guessed=sum(r.guessed for r in result.rounds),
                       drafted_ahead=sum(1 for r in result.rounds if r.drafted_ahead),
                       next_drafted=sum(r.next_drafted for r in result.rounds))


# ---- token view -------------------------------------------------------------------------------------------
def _text_of(result: GenerationResult, token_text: TokenText | None) -> dict[int, str]:
    """Text per id: the caller's decoded map, else whatever the trace itself holds for that id."""
    known = {t.token_id: t.text for t in result.traces}
    known.update(token_text or {})
    return known


def _shown(text: str) -> str:
    return html.escape(text.replace("\n", "↵\n") if text != "" else "∅")


def _round_of(result: GenerationResult, index: int | None) -> SpecRound | None:
    return result.rounds[index] if index is not None and 0 <= index < len(result.rounds) else None


def _fmt_p(v) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and math.isfinite(v) else "?"


def _token_title(result: GenerationResult, index: int) -> str:
    t = result.traces[index]
    r = _round_of(result, t.round)
    lines = [f"token {index} (position {t.position}): {t.text!r}"]
    if r is None:
        lines.append("from the prefill (full depth)" if index == 0 else "no round recorded")
        return "\n".join(lines)
    where = f"round {r.index}: drafter {r.drafter}" + (f", depth {r.depth}" if r.depth else "")
    slot = t.position - r.position - 1  # 0-based place of this token in the round's output
    if t.source == "draft" and 0 <= slot < len(r.drafted):
        lines.append(f"{where}; draft {slot + 1} of {len(r.drafted)}, accepted")
        p = r.p_probs[slot] if slot < len(r.p_probs) else None
        lines.append(f"q(draft) {_fmt_p(r.q_probs[slot] if slot < len(r.q_probs) else None)}, p(verifier) {_fmt_p(p)}")
    elif t.source == "correction":
        lines.append(f"{where}; the verifier's token after rejecting draft {slot + 1} of {len(r.drafted)}")
    else:
        lines.append(f"{where}; {'plain step (speculation off)' if not r.drafted else 'verified'}")
    return "\n".join(lines)


def _legend() -> str:
    chip = 'display:inline-block;padding:0 6px;border-radius:3px;margin:0 4px 2px 0;font-size:12px'
    chips = [f'<span style="background:{c};color:#000;{chip}">{html.escape(SOURCE_NAMES[s])}</span>'
             for s, c in SOURCE_COLOURS.items()]
    chips.append(f'<span style="color:{REJECTED_COLOUR};text-decoration:line-through;{chip}">rejected draft</span>')
    chips.append(f'<span style="color:{DISCARDED_COLOUR};text-decoration:line-through;{chip}">'
                 'discarded after the rejection</span>')
    return f'<div class="air-spec-legend" style="margin-bottom:6px">{"".join(chips)}</div>'


def headline(result: GenerationResult) -> str:
    """One line: passes, acceptance and tokens per pass (escaped HTML)."""
    s = summary(result)
    parts = [f"{len(result.traces)} tokens from {s.verifier_passes} verifier pass{'' if s.verifier_passes == 1 else 'es'} "
             f"({s.tokens_per_pass:.2f} tokens per pass after the prefill's token)",
             f"{s.speculative_rounds} rounds with a draft, {s.plain_steps} plain steps",
             f"{s.accepted} of {s.judged} judged drafts accepted"
             + (f" ({s.acceptance_rate:.0%})" if s.judged else ""),
             f"draft {s.draft_ms:.1f} ms, verify {s.verify_ms:.1f} ms"]
    if s.draft_passes:  # a model pass drafts one token, plus each context guess it checked and agreed with
        parts.append(f"{s.draft_passes + s.guessed} model drafts from {s.draft_passes} draft "
                     f"pass{'' if s.draft_passes == 1 else 'es'}"
                     + (f" ({s.guessed} were context guesses the shallow path agreed with in the same pass)"
                        if s.guessed else ""))
    if s.next_drafted:  # overlap=True: drafting beside verification
        parts.append(f"{s.drafted_ahead} round{'' if s.drafted_ahead == 1 else 's'} verified a block drafted "
                     f"during the previous verification ({s.next_drafted} drafts made that way in all)")
    knobs = [f"{k}={result.stats[k]}" for k in ("drafter", "draft_depth", "draft_length", "max_draft", "draft_vocab")
             if k in result.stats]
    if knobs:
        parts.append("knobs: " + ", ".join(knobs))
    if result.stats.get("draft_vocab_added"):
        parts.append(f"{result.stats['draft_vocab_added']} emitted tokens joined the draft shortlist")
    return html.escape("; ".join(parts) + ".")


def speculative_token_html(result: GenerationResult, token_text: TokenText | None = None) -> str:
    """The output coloured by source, each rejected draft struck through where the verifier rejected it
    (just before the correction that replaced it), followed by the drafts thrown away with it."""
    if not has_rounds(result):
        return ('<div class="air-spec-tokens" style="opacity:.7">No speculative rounds in this run: generate '
                'with mode <em>speculative</em> (or upload a speculative trace).</div>')
    text_of = _text_of(result, token_text)
    spans = []
    for i, t in enumerate(result.traces):
        r = _round_of(result, t.round)
        if t.source == "correction" and r is not None and r.accepted < len(r.drafted):
            rejected = r.drafted[r.accepted]
            q = r.q_probs[r.accepted] if r.accepted < len(r.q_probs) else None
            p = r.p_probs[r.accepted] if r.accepted < len(r.p_probs) else None
            why = (f"round {r.index}: draft {r.accepted + 1} of {len(r.drafted)} rejected by the verifier\n"
                   f"q(draft) {_fmt_p(q)}, p(verifier) {_fmt_p(p)}")
            spans.append(f'<s class="air-spec-tok" data-source="rejected" data-round="{r.index}" '
                         f'style="color:{REJECTED_COLOUR}" title="{html.escape(why, quote=True)}">'
                         f'{_shown(text_of.get(rejected, f"#{rejected}"))}</s>')
            for j, tok in enumerate(r.drafted[r.accepted + 1:], start=r.accepted + 2):
                note = f"round {r.index}: draft {j} of {len(r.drafted)}, discarded unjudged after the rejection"
                spans.append(f'<s class="air-spec-tok" data-source="discarded" data-round="{r.index}" '
                             f'style="color:{DISCARDED_COLOUR};font-size:11px" '
                             f'title="{html.escape(note, quote=True)}">{_shown(text_of.get(tok, f"#{tok}"))}</s>')
        source = t.source if t.source in SOURCE_COLOURS else "verified"  # the prefill token is full depth
        title = html.escape(_token_title(result, i), quote=True)
        spans.append(f'<span class="air-spec-tok" data-index="{i}" data-source="{source}" '
                     f'style="background:{SOURCE_COLOURS[source]};color:#000;border-radius:2px" title="{title}">'
                     f'{_shown(t.text)}</span>')
    body = f'<span style="opacity:.6">{html.escape(result.prompt_text)}</span>{"".join(spans)}'
    return (f'<div class="air-spec-tokens"><p style="font-size:13px;margin:0 0 6px">{headline(result)}</p>'
            f'{_legend()}<div style="white-space:pre-wrap;font-family:ui-monospace,SFMono-Regular,Menlo,monospace;'
            f'font-size:14px;line-height:1.7">{body}</div></div>')


# ---- figure -----------------------------------------------------------------------------------------------
def speculative_figure(result: GenerationResult, token_text: TokenText | None = None) -> go.Figure:
    """Four panels: accepted length per round, acceptance by draft slot, rolling acceptance over the
    generation, and q(draft) vs p(verifier) of every judged draft (rejections in red)."""
    if not has_rounds(result):
        return empty_figure("No speculative rounds in this run.", SPECULATIVE_HEIGHT)
    if not any(r.drafted for r in result.rounds):  # empty axes would look like a drawing bug
        return empty_figure(f"Speculation stayed off in all {len(result.rounds)} rounds (predicted gain < 1): "
                            "plain full-depth steps only.", SPECULATIVE_HEIGHT)
    fig = make_subplots(rows=2, cols=2, vertical_spacing=0.16, horizontal_spacing=0.12,
                        subplot_titles=("accepted drafts per round", "acceptance by draft position",
                                        f"rolling acceptance (last {ROLLING_WINDOW} judged drafts)",
                                        "draft q vs verifier p of each judged draft"))
    counts = accepted_length_counts(result)
    for drafter, ys in counts.items():
        fig.add_trace(go.Bar(x=list(range(len(ys))), y=ys, name=f"rounds ({drafter})",
                             marker_color=DRAFTER_COLOURS.get(drafter, "#777"), legendgroup="rounds",
                             hovertemplate=f"{html.escape(drafter)}: %{{y}} rounds kept %{{x}} drafts<extra></extra>"),
                      row=1, col=1)
    rates = acceptance_by_position(result)
    fig.add_trace(go.Bar(x=[r.slot + 1 for r in rates], y=[r.rate for r in rates], name="acceptance by position",
                         marker_color="#3a9d5d", customdata=[[r.accepted, r.judged] for r in rates],
                         text=[f"{r.accepted}/{r.judged}" for r in rates], textposition="outside",
                         hovertemplate="draft %{x}: %{customdata[0]} of %{customdata[1]} accepted<extra></extra>",
                         showlegend=False), row=1, col=2)
    rolling = rolling_acceptance(result)
    fig.add_trace(go.Scatter(x=[p.position for p in rolling], y=[p.rolling for p in rolling], mode="lines+markers",
                             name="rolling", line=dict(color="#3b6fb6"), marker=dict(size=4),
                             hovertemplate="position %{x}: %{y:.2f}<extra>rolling</extra>"), row=2, col=1)
    fig.add_trace(go.Scatter(x=[p.position for p in rolling], y=[p.cumulative for p in rolling], mode="lines",
                             name="cumulative", line=dict(color="#888", dash="dash"),
                             hovertemplate="position %{x}: %{y:.2f}<extra>cumulative</extra>"), row=2, col=1)
    _add_q_vs_p(fig, result, token_text)
    fig.update_xaxes(title_text="drafts kept in the round", dtick=1, row=1, col=1)
    fig.update_yaxes(title_text="rounds", row=1, col=1)
    fig.update_xaxes(title_text="draft position", dtick=1, row=1, col=2)
    fig.update_yaxes(range=[0, 1.15], title_text="accepted", row=1, col=2)
    fig.update_xaxes(title_text="position of the judged draft", row=2, col=1)
    fig.update_yaxes(range=[-0.05, 1.05], row=2, col=1)
    fig.update_layout(height=SPECULATIVE_HEIGHT, margin=dict(l=55, r=20, t=40, b=50), barmode="stack",
                      legend=dict(orientation="h", y=-0.12, font=dict(size=11)), font=dict(size=11))
    return fig


def _add_q_vs_p(fig: go.Figure, result: GenerationResult, token_text: TokenText | None) -> None:
    """Log-log scatter: small probabilities are the interesting ones, and a linear axis piles them at 0.
    Values are clamped at FLOOR for drawing only; hovers show the recorded values."""
    floor = 1e-6
    text_of = _text_of(result, token_text)
    judged = [j for j in judgements(result) if j.p is not None and math.isfinite(j.q)]
    values = [max(v, floor) for j in judged for v in (j.q, j.p)]
    low = math.floor(math.log10(min(values + [0.1])))
    for accepted, name, colour, symbol in ((True, "accepted draft", SOURCE_COLOURS["draft"], "circle"),
                                           (False, "rejected draft", REJECTED_COLOUR, "x")):
        group = [j for j in judged if j.accepted == accepted]
        fig.add_trace(go.Scatter(
            x=[max(j.q, floor) for j in group], y=[max(j.p, floor) for j in group], mode="markers", name=name,
            marker=dict(color=colour, symbol=symbol, size=9 if not accepted else 6, opacity=1.0 if not accepted else 0.6),
            customdata=[[label(text_of.get(j.token_id, f"#{j.token_id}")), j.round, j.slot + 1, j.q, j.p]
                        for j in group],
            hovertemplate="%{customdata[0]}: round %{customdata[1]}, draft %{customdata[2]}<br>"
                          "q %{customdata[3]:.4f}, p %{customdata[4]:.4f}<extra></extra>"), row=2, col=2)
    fig.add_trace(go.Scatter(x=[10 ** low, 1.0], y=[10 ** low, 1.0], mode="lines", name="p = q",
                             line=dict(color="#aaa", dash="dot"), hoverinfo="skip", showlegend=False), row=2, col=2)
    fig.update_xaxes(type="log", range=[low, 0.05], title_text="q(token): draft", row=2, col=2)
    fig.update_yaxes(type="log", range=[low, 0.05], title_text="p(token): verifier", row=2, col=2)


# ---- rounds table -----------------------------------------------------------------------------------------
ROUND_COLUMNS = ("round", "position", "drafter", "depth", "drafted", "accepted", "stop reason", "predicted gain",
                 "draft passes (guessed)", "draft ms", "verify ms", "drafts")


def rounds_table_html(result: GenerationResult, token_text: TokenText | None = None) -> str:
    """One row per verifier pass; the drafts column shows the kept prefix, then the rejected draft struck."""
    if not has_rounds(result):
        return ""
    text_of = _text_of(result, token_text)
    head = "".join(f'<th style="text-align:left;padding:2px 6px">{c}</th>' for c in ROUND_COLUMNS)
    rows = []
    for r in result.rounds:
        drafts = []
        for j, tok in enumerate(r.drafted):
            shown = html.escape(visible(text_of.get(tok, f"#{tok}")))
            if j < r.accepted:
                drafts.append(f'<span style="background:{SOURCE_COLOURS["draft"]};color:#000">{shown}</span>')
            else:
                colour = REJECTED_COLOUR if j == r.accepted else DISCARDED_COLOUR
                drafts.append(f'<s style="color:{colour}">{shown}</s>')
        cells = (r.index, r.position, html.escape(r.drafter), r.depth, len(r.drafted), r.accepted,
                 html.escape(r.stop_reason), "–" if r.predicted_gain is None else f"{r.predicted_gain:.2f}",
                 f"{r.draft_passes} ({r.guessed})" if r.draft_passes else "–",
                 f"{r.draft_ms:.2f}", f"{r.verify_ms:.2f}", " ".join(drafts))
        rows.append("<tr>" + "".join(f'<td style="padding:1px 6px">{c}</td>' for c in cells) + "</tr>")
    return (f'<div class="air-spec-rounds" style="max-height:320px;overflow:auto;font-size:12px">'
            f'<table style="border-collapse:collapse;font-family:ui-monospace,monospace">'
            f'<thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')

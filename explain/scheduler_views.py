"""Views of a mode="auto" run: the prompt gate's verdict, the scheduler's plan and its running state.

Everything is drawn from ``result.stats["auto"]`` (the Plan the runtime recorded), so an uploaded trace
redraws without the model. The gate's attribution over the prompt (Captum) is computed on demand.
"""

from __future__ import annotations

import html

import plotly.graph_objects as go

from adaptive.trace import GenerationResult

GATE_HEIGHT = 260
PATH_ORDER = ("light", "standard", "full")


def _plan(result: GenerationResult) -> dict | None:
    return (result.stats or {}).get("auto")


def gate_figure(result: GenerationResult) -> go.Figure:
    """P(agreement with full depth >= tau) per path, the confidence the scheduler required, the pick."""
    plan = _plan(result)
    fig = go.Figure()
    gate = plan.get("gate") if plan else None
    if not gate:
        msg = "Generate with mode auto to see the gate." if not plan else "This model has no prompt gate."
        fig.add_annotation(text=msg, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
        fig.update_layout(height=GATE_HEIGHT, xaxis_visible=False, yaxis_visible=False, margin=dict(l=10, r=10, t=10, b=10))
        return fig
    probs = gate["probabilities"]
    paths = [p for p in PATH_ORDER if p in probs]
    colours = ["#2a9d8f" if p == gate["path"] else "#adb5bd" for p in paths]
    fig.add_bar(x=paths, y=[probs[p] for p in paths], marker_color=colours,
                text=[f"{probs[p]:.2f}" for p in paths], textposition="outside",
                hovertemplate="%{x}: P(agreement >= " + f"{gate['tau']:g}" + ") = %{y:.3f}<extra></extra>")
    fig.add_hline(y=gate["confidence"], line_dash="dash", line_color="#e76f51",
                  annotation_text=f"required {gate['confidence']:g}", annotation_position="top left")
    fig.update_layout(height=GATE_HEIGHT, yaxis=dict(range=[0, 1.15], title="P(path agrees)"),
                      title=dict(text=f"Prompt gate: cheapest confident path = {gate['path']}", font_size=13),
                      margin=dict(l=50, r=10, t=40, b=30), showlegend=False)
    return fig


def path_gate_figure(result: GenerationResult, lens, paths: dict[str, int] | None = None) -> go.Figure:
    """Token-level gate per path (paths x tokens): the uncertainty gate's value — the lens confidence of
    each path's exit head for each generated token — with an x where that path's top-1 would differ
    from full depth's. Needs the lens (one teacher-forced pass after the run)."""
    fig = go.Figure()
    L = (result.stats or {}).get("num_layers")
    if lens is None or not L or not lens.confidence:
        fig.add_annotation(text="Generate (any mode) to see each path's confidence per token.", showarrow=False,
                           x=0.5, y=0.5, xref="paper", yref="paper")
        fig.update_layout(height=GATE_HEIGHT, xaxis_visible=False, yaxis_visible=False,
                          margin=dict(l=10, r=10, t=10, b=10))
        return fig
    paths = paths or {"light": max(1, L // 4), "standard": max(1, L // 2), "full": L}
    names = [p for p in PATH_ORDER if p in paths]
    z = [lens.confidence[paths[p] - 1] for p in names]  # (paths, N)
    text = [[("" if lens.final_matches[paths[p] - 1][n] else "x") for n in range(len(lens.token_ids))] for p in names]
    tokens = [t.text for t in result.traces][:len(lens.token_ids)]
    fig.add_heatmap(z=z, y=[f"{p} ({paths[p]})" for p in names], x=list(range(len(tokens))), text=text,
                    texttemplate="%{text}", colorscale="Viridis", zmin=0, zmax=1,
                    customdata=[[repr(t) for t in tokens]] * len(names),
                    hovertemplate="token %{x} %{customdata}<br>%{y}: " + lens.measure + " %{z:.3f}<extra></extra>",
                    colorbar=dict(title=lens.measure))
    fig.update_layout(height=GATE_HEIGHT, margin=dict(l=90, r=10, t=40, b=30), xaxis_title="generated token",
                      title=dict(text="Token-level gate per path (x: that path's token would differ from full depth)",
                                 font_size=13))
    return fig


def plan_html(result: GenerationResult) -> str:
    """The policy, its target, the decision and the reason; every candidate's predictions; audits."""
    plan = _plan(result)
    if not plan:
        return "<p>Generate with mode <b>auto</b>: the scheduler picks a mode and path for the stated goal.</p>"
    esc = html.escape
    target = {k: v for k, v in plan["target"].items() if v is not None}
    rows = []
    for c in plan["candidates"]:
        style = ' style="font-weight:600;background:#e9f5f3"' if c["name"] == plan["chosen"] else ""
        rows.append(f"<tr{style}><td>{esc(c['name'])}</td><td>{c['agreement']:.3f}</td><td>{c['ms_per_token']:.2f}</td>"
                    f"<td>{c['compute']:.2f}</td><td>{esc(c['basis'])}</td></tr>")
    parts = [f"<p><b>Policy</b> {esc(plan['policy'])} &middot; <b>target</b> {esc(str(target))} &middot; "
             f"<b>queue</b> {plan['queue_depth']} &middot; <b>chose</b> {esc(plan['chosen'])} "
             f"(served by mode {esc(plan['mode'])} {esc(str(plan['options']) if plan['options'] else '')})</p>",
             f"<p><b>Why:</b> {esc(plan['reason'])}</p>",
             "<table><tr><th>candidate</th><th>agreement (pred.)</th><th>ms/token (pred.)</th>"
             "<th>compute (pred.)</th><th>basis</th></tr>" + "".join(rows) + "</table>"]
    audit = plan.get("audit")
    if audit:
        parts.append(f"<p><b>Audit</b> (full depth, teacher-forced over this output): {audit['agree']}/{audit['tokens']} "
                     f"tokens agree ({audit['agreement']:.3f}); running audited agreement of {esc(plan['chosen'])}: "
                     f"{audit['running_agreement']:.3f} over {audit['running_tokens']} tokens; "
                     f"cost {audit['ms']:.1f} ms.</p>")
    elif plan.get("audited") is False:
        parts.append("<p>Not audited this time (lossless choice, or not drawn at the audit rate).</p>")
    state = plan.get("state") or {}
    if state:
        srows = "".join(
            f"<tr><td>{esc(n)}</td><td>{s['requests']}</td><td>{s['ms_per_token']:.2f}</td><td>{s['compute']:.2f}</td>"
            f"<td>{s['audited_tokens']}</td><td>{'' if s['audited_agreement'] is None else format(s['audited_agreement'], '.3f')}</td></tr>"
            for n, s in sorted(state.items()))
        parts.append("<p><b>Live state</b> before this request (measured on this host):</p><table><tr><th>candidate</th>"
                     "<th>requests</th><th>ms/token</th><th>compute</th><th>audited tokens</th><th>audited agreement</th>"
                     "</tr>" + srows + "</table>")
    return "\n".join(parts)


def gate_attribution_figure(att) -> go.Figure:
    """Integrated gradients of the gate's logit for one path over the prompt tokens."""
    labels = [f"{i}:{t!r}"[:24] for i, t in enumerate(att.context_text)]
    colours = ["#2a9d8f" if v >= 0 else "#e76f51" for v in att.ig]
    fig = go.Figure(go.Bar(x=list(range(len(att.ig))), y=att.ig, marker_color=colours, customdata=labels,
                           hovertemplate="%{customdata}: %{y:.4f}<extra></extra>"))
    fig.update_layout(height=GATE_HEIGHT, margin=dict(l=50, r=10, t=40, b=30), xaxis_title="prompt token",
                      yaxis_title="attribution to the gate logit",
                      title=dict(text=f"Why P({att.path} agrees) = {att.probability:.2f} (baseline prompt: "
                                      f"{att.baseline_probability:.2f}; IG delta {att.ig_delta:.3f})", font_size=13))
    return fig

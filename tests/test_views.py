"""explain.views: figures and HTML built from small hand-made traces, checked through their data."""

import math

import pytest

from adaptive.lens import LensReport
from adaptive.trace import GenerationResult, TokenTrace
from explain import views

L = 4


def make_result(texts=("a", "<b>", "a", "\n"), exits=(1, 4, 2, 4), mode="early_exit", ids=None) -> GenerationResult:
    """Four tokens, two of them the same text (and id), one an HTML tag, one a newline."""
    ids = list(ids or [5 if t == "a" else 10 + i for i, t in enumerate(texts)])
    traces = []
    for i, (text, k) in enumerate(zip(texts, exits)):
        checked = {j: 0.2 * j for j in range(1, min(k, L - 1) + 1)}
        traces.append(TokenTrace(token_id=ids[i], position=3 + i, exit_layer=k, confidence=checked.get(k),
                                 text=text, layer_confidence=checked, layer_top1={j: ids[i] for j in checked},
                                 macs=100 * k, full_macs=400))
    stats = {"mode": mode, "num_layers": L, "threshold": 0.5, "measure": "max_prob", "layers_run_mean": 2.75,
             "compute_fraction": 0.69, "kv_fill_fraction": 0.05, "head_fraction": 0.2, "tokens_per_s": 50.0,
             "ms_per_token": 20.0, "prefill_ms": 3.0}
    return GenerationResult(token_ids=ids, text="".join(texts), traces=traces, stats=stats, prompt_ids=[1, 2, 3],
                            prompt_text="x <= 1 &")


def make_lens(result: GenerationResult) -> LensReport:
    N = len(result.traces)
    conf = [[0.1 * (k + 1) + 0.01 * n for n in range(N)] for k in range(L)]  # (L, N) rising with depth
    kl = [[float(L - 1 - k) for n in range(N)] for k in range(L)]
    top_ids = [[[result.token_ids[n], 99, 98] for n in range(N)] for k in range(L)]
    top_probs = [[[0.6, 0.3, 0.1] for n in range(N)] for k in range(L)]
    return LensReport(measure="max_prob", token_ids=result.token_ids, confidence=conf, kl_to_final=kl,
                      top_ids=top_ids, top_probs=top_probs, final_matches=[[True] * N for _ in range(L)])


TOKEN_TEXT = {5: "a", 11: "<b>", 13: "\n", 99: "<script>", 98: "&"}


def test_token_view_colours_by_exit_layer_and_escapes_text():
    res = make_result()
    page = views.token_view_html(res, make_lens(res), TOKEN_TEXT)
    colours = views.layer_colours(L)
    assert page.count('class="air-tok"') == 4
    assert f'data-exit="1" style="background:{colours[0]}' in page
    assert f'data-exit="4" style="background:{colours[3]}' in page
    assert "<b>" not in page and "&lt;b&gt;" in page  # the token and the prompt are escaped
    assert "<script>" not in page and "x &lt;= 1 &amp;" in page
    assert "top-5 at exit layer 1" in page and "top-5 at final layer 4" in page  # hover: exit vs final


def test_token_view_without_lens_says_what_is_missing():
    res = make_result()
    page = views.token_view_html(res)
    assert "needs the lens" in page
    assert "checked during the run: L1:0.20" in page
    live = views.token_view_html(res, live=True)
    assert "title=" not in live and live.count('class="air-tok"') == 4


def test_token_view_marks_divergence():
    res = make_result()
    page = views.token_view_html(res, diverged={2})
    assert page.count("outline:2px solid") == 1
    assert 'data-index="2" data-exit="2" style="background' in page and "outline" in page.split('data-index="2"')[1].split(">")[0]


def test_heatmap_from_lens_keeps_repeated_tokens_apart():
    res = make_result()
    fig = views.heatmap_figure(res, make_lens(res), token_text=TOKEN_TEXT)
    heat, contour, exits = fig.data
    assert heat.type == "heatmap" and list(heat.x) == [3, 4, 5, 6]  # positions, not texts: "a" twice
    assert list(heat.y) == [1, 2, 3, 4]
    assert [list(r) for r in heat.z] == make_lens(res).confidence
    assert heat.customdata[0][0] == "a" and heat.customdata[0][1] == "&lt;b&gt;"  # top-1 per cell, escaped
    ticks = list(fig.layout.xaxis.ticktext)
    assert ticks == ["a", "&lt;b&gt;", "a", "↵"]
    assert contour.type == "contour" and contour.contours.start == 0.5 == contour.contours.end
    assert list(exits.x) == [3, 4, 5, 6] and list(exits.y) == [1, 4, 2, 4]
    assert fig.layout.height == views.HEATMAP_HEIGHT


def test_heatmap_kl_and_trace_only_fallback():
    res = make_result()
    kl = views.heatmap_figure(res, make_lens(res), value="kl", token_text=TOKEN_TEXT)
    assert [list(r) for r in kl.data[0].z] == make_lens(res).kl_to_final
    assert all(t.type != "contour" for t in kl.data)  # no threshold on a KL scale
    grid = views.layer_grid(res)  # no lens: only the layers the run checked
    assert grid.source == "trace"
    assert grid.values[0][0] == pytest.approx(0.2) and math.isnan(grid.values[1][0])  # token 0 exited at 1
    assert math.isnan(grid.values[3][1])  # layer 4 is never "checked"
    fig = views.heatmap_figure(res)
    assert "checked layers only" in fig.layout.title.text
    assert all(t.type != "contour" for t in fig.data)


def test_ledger_reports_fractions_speedup_and_histogram():
    res = make_result()
    base = make_result(exits=(4, 4, 4, 4), mode="full")
    base.stats.update(ms_per_token=30.0, tokens_per_s=33.3, compute_fraction=1.0)
    text = views.ledger_markdown(res, base)
    assert "| compute fraction (MACs, all overheads) | 0.690 | 1.000 |" in text
    assert "2.75 / 4" in text and "1.50×" in text
    assert views.speedup(res, base) == pytest.approx(1.5)
    assert "speedup unknown" in views.ledger_markdown(res, None)
    assert "| decoder layers ran in | — | — |" in text  # a trace from before the stat existed
    res.stats["layer_code"], base.stats["layer_code"] = "native", "python (ADAPTIVE_NATIVE=0)"
    assert "| decoder layers ran in | native | python (ADAPTIVE_NATIVE=0) |" in views.ledger_markdown(res, base)
    res.stats.update(exit_vocab=530, vocab_exit=0.5, vocab_exit_size=2048)  # both shortlists reach the knob line
    assert "exit_vocab=530, vocab_exit=0.5, vocab_exit_size=2048" in views.ledger_markdown(res, None)
    fig = views.ledger_figure(res)
    hist, per_token = fig.data[0], fig.data[1]
    assert list(hist.x) == [1, 2, 3, 4] and list(hist.y) == [1, 1, 0, 2]
    assert list(per_token.y) == [0.25, 1.0, 0.5, 1.0]
    assert fig.layout.height == views.LEDGER_HEIGHT


def test_audit_finds_divergence():
    res = make_result()
    base = make_result(ids=[5, 11, 7, 13], texts=("a", "<b>", "c", "\n"), exits=(4, 4, 4, 4), mode="full")
    rep = views.audit(res, base)
    assert rep.diverged == [2] and rep.first_divergence == 2 and rep.agreement == 0.75
    page = views.audit_html(res, base)
    assert page.count('class="air-diff"') == 2  # the token in both rows
    assert "&lt;b&gt;" in page and "<b>" not in page
    assert views.audit(res, make_result()).diverged == []
    short = make_result(texts=("a", "<b>"), exits=(4, 4), ids=[5, 11])
    assert views.audit(res, short).diverged == [2, 3]  # a run that stopped early differs from there on


def test_audit_per_decision_from_the_lens():
    res = make_result()
    lens = make_lens(res)
    lens.top_ids[-1][1] = [99, 11, 98]  # full depth, given the same prefix, prefers "<script>" at token 1
    assert views.lens_disagreements(res, lens) == [1]
    page = views.audit_html(res, None, lens, TOKEN_TEXT, pending=True)
    assert "1 of 4 tokens differ from full depth" in page and "Running full depth" in page
    assert "full depth would pick &#x27;&lt;script&gt;&#x27; here" in page and "<script>" not in page
    assert views.token_view_html(res, lens, TOKEN_TEXT, diverged={1}).count("outline:2px") == 1
    assert "Running full depth" in views.ledger_markdown(res, None, pending=True)


def test_attribution_figure_and_choices():
    from explain.attribution import ExitAttribution

    attr = ExitAttribution(token_index=1, position=4, layer=2, measure="max_prob", threshold=0.5, confidence=0.7,
                           exits=True, context_ids=[1, 2, 3, 5], context_text=["x", " <=", "\n", "a"], prompt_len=3,
                           ig=[0.1, -0.2, 0.0, 0.3], ig_delta=1e-3, ig_steps=16, ablation=[0.0, 1.0, 0.0, 0.0],
                           baseline_id=0, baseline_confidence=0.1)
    fig = views.attribution_figure(attr)
    ig, abl = fig.data
    assert list(ig.y) == [0.1, -0.2, 0.0, 0.3] and list(abl.y) == [0.0, 1.0, 0.0, 0.0]
    assert "·&lt;=" in list(fig.layout.xaxis2.ticktext)
    assert "convergence delta 1.00e-03" in fig.layout.annotations[0].text
    assert "**exit**" in views.attribution_markdown(attr)
    assert views.token_choices(make_result())[3] == ("3: ↵  (exit 4)", 3)


def test_from_json_roundtrip_draws_the_same():
    res = make_result()
    back = GenerationResult.from_json(res.to_json())
    assert views.token_view_html(back) == views.token_view_html(res)
    assert views.layer_grid(back).exit_layers == [1, 4, 2, 4]


# ---- speculative panel ------------------------------------------------------------------------------------
def make_speculative() -> GenerationResult:
    """Four verifier passes after the prefill's token, at positions 3, 5, 6, 8:
    round 0 (self, depth 2) drafts 5 "<script>" "&" and keeps 5, then the verifier corrects to 9;
    round 1 is a plain step (10); round 2 (lookup) drafts 11 12 and keeps both; round 3 drafts 13, rejected -> 14."""
    from adaptive.trace import SpecRound

    rounds = [
        SpecRound(index=0, position=3, drafter="self", depth=2, drafted=[5, 6, 7], accepted=1, stop_reason="max_len",
                  draft_ms=1.0, verify_ms=2.0, q_probs=[0.9, 0.6, 0.5], p_probs=[0.8, 0.1], predicted_gain=1.234,
                  draft_passes=2, guessed=1),
        SpecRound(index=1, position=5, drafter="none", depth=0, drafted=[], accepted=0, stop_reason="off",
                  draft_ms=0.0, verify_ms=1.5, q_probs=[], p_probs=[], predicted_gain=0.9),
        SpecRound(index=2, position=6, drafter="lookup", depth=0, drafted=[11, 12], accepted=2,
                  stop_reason="predicted_reject", draft_ms=0.1, verify_ms=2.5, q_probs=[1.0, 1.0], p_probs=[0.7, 0.4]),
        SpecRound(index=3, position=8, drafter="self", depth=2, drafted=[13], accepted=0, stop_reason="eos",
                  draft_ms=0.5, verify_ms=1.0, q_probs=[0.3], p_probs=[0.01], draft_passes=1),
    ]
    emitted = [(4, None, "", "x"), (5, 0, "draft", "a"), (9, 0, "correction", "<i>"), (10, 1, "verified", "\n"),
               (11, 2, "draft", "b"), (12, 2, "draft", "c"), (14, 3, "correction", "d")]
    traces = [TokenTrace(token_id=tid, position=3 + n, exit_layer=L, text=text, source=source, round=r,
                         drafted=source == "draft", accepted=True if source == "draft" else None,
                         macs=500, full_macs=400)
              for n, (tid, r, source, text) in enumerate(emitted)]
    stats = {"mode": "speculative", "num_layers": L, "layers_run_mean": float(L), "compute_fraction": 1.25,
             "tokens_per_s": 40.0, "ms_per_token": 25.0, "prefill_ms": 3.0, "drafter": "self",
             "draft_depth": "adaptive", "draft_length": "adaptive", "max_draft": 8, "draft_vocab": 50}
    from adaptive.runtime import _speculation_stats

    stats.update(_speculation_stats(rounds))
    return GenerationResult(token_ids=[t.token_id for t in traces], text="".join(t.text for t in traces), traces=traces,
                            stats=stats, prompt_ids=[1, 2, 3], prompt_text="<p>", rounds=rounds)


SPEC_TEXT = {6: "<script>", 7: "&", 13: "z"}


def test_speculative_judgements_and_acceptance_match_the_runtime_stats():
    from explain import speculative_views as sv

    res = make_speculative()
    judged = sv.judgements(res)
    assert [(j.round, j.slot, j.token_id, j.accepted) for j in judged] == [
        (0, 0, 5, True), (0, 1, 6, False), (2, 0, 11, True), (2, 1, 12, True), (3, 0, 13, False)]
    assert [j.position for j in judged] == [4, 5, 7, 8, 9]  # each draft sits where its output token would
    rates = sv.acceptance_by_position(res)
    assert [(r.accepted, r.judged) for r in rates] == [(2, 3), (1, 2)]  # draft 3 of round 0 was never judged
    assert [r.rate for r in rates] == pytest.approx(res.stats["acceptance_by_position"])  # same counting
    s = sv.summary(res)
    assert (s.verifier_passes, s.speculative_rounds, s.plain_steps, s.judged, s.accepted) == (4, 3, 1, 5, 3)
    assert s.acceptance_rate == pytest.approx(res.stats["acceptance_rate"])
    assert s.accepted_per_round == pytest.approx(res.stats["mean_accepted_per_round"])
    assert s.tokens_per_pass == 1.5  # 6 tokens after the prefill's, 4 passes
    assert sv.accepted_length_counts(res) == {"self": [1, 1, 0, 0], "lookup": [0, 0, 1, 0]}
    rolling = sv.rolling_acceptance(res, window=2)
    assert [p.rolling for p in rolling] == [1.0, 0.5, 0.5, 1.0, 0.5]
    assert [p.cumulative for p in rolling] == pytest.approx([1.0, 0.5, 2 / 3, 0.75, 0.6])


def test_speculative_token_view_strikes_rejected_drafts_where_they_were_rejected():
    from explain import speculative_views as sv

    res = make_speculative()
    page = sv.speculative_token_html(res, SPEC_TEXT)
    sources = [part.split('"')[0] for part in page.split('data-source="')[1:]]
    assert sources == ["verified", "draft", "rejected", "discarded", "correction", "verified", "draft", "draft",
                       "rejected", "correction"]
    assert page.count("<s ") == 3  # two rejected drafts and one discarded after the first rejection
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;i&gt;" in page and "&lt;p&gt;" in page
    assert "q(draft) 0.600, p(verifier) 0.100" in page  # the rejected draft's hover
    assert "draft 1 of 3, accepted" in page and "from the prefill" in page
    assert f'background:{sv.SOURCE_COLOURS["correction"]}' in page
    assert "6 tokens per pass" not in page and "1.50 tokens per pass" in page
    # Without decoded text, a draft that never became output is shown by id; one that did, by its text.
    plain = sv.speculative_token_html(res)
    assert "#6" in plain and "#13" in plain
    assert "No speculative rounds" in sv.speculative_token_html(make_result())


def test_speculative_figure_data():
    from explain import speculative_views as sv

    res = make_speculative()
    fig = sv.speculative_figure(res, SPEC_TEXT)
    by_name = {t.name: t for t in fig.data}
    assert list(by_name["rounds (self)"].y) == [1, 1, 0, 0] and list(by_name["rounds (lookup)"].y) == [0, 0, 1, 0]
    pos = by_name["acceptance by position"]
    assert list(pos.x) == [1, 2] and list(pos.y) == pytest.approx([2 / 3, 0.5]) and list(pos.text) == ["2/3", "1/2"]
    assert list(by_name["rolling"].x) == [4, 5, 7, 8, 9]
    assert list(by_name["cumulative"].y) == pytest.approx([1.0, 0.5, 2 / 3, 0.75, 0.6])
    rejected, accepted = by_name["rejected draft"], by_name["accepted draft"]
    assert list(rejected.x) == [0.6, 0.3] and list(rejected.y) == [0.1, 0.01]  # q vs p of each rejection
    assert list(accepted.x) == [0.9, 1.0, 1.0] and list(accepted.y) == [0.8, 0.7, 0.4]
    assert rejected.customdata[0][0] == "&lt;script&gt;"
    assert fig.layout.xaxis4.type == "log" and fig.layout.xaxis4.range[0] <= -2  # p = 0.01 stays in view
    assert fig.layout.height == sv.SPECULATIVE_HEIGHT
    empty = sv.speculative_figure(make_result())
    assert not empty.data and empty.layout.height == sv.SPECULATIVE_HEIGHT
    res.rounds = [r for r in res.rounds if not r.drafted]  # speculation off throughout: say so, no empty axes
    off = sv.speculative_figure(res)
    assert not off.data and "stayed off in all 1 rounds" in off.layout.annotations[0].text


def test_rounds_table_and_speculative_ledger():
    from explain import speculative_views as sv

    res = make_speculative()
    table = sv.rounds_table_html(res, SPEC_TEXT)
    assert table.count("<tr>") == 1 + 4  # header + one row per verifier pass
    assert "predicted_reject" in table and "<td" in table and "&lt;script&gt;" in table and "<script>" not in table
    row0 = table.split("<tbody>")[1].split("</tr>")[0]
    cells = [c.split(">", 1)[1].split("</td")[0] for c in row0.split("<td")[1:]]
    assert cells[:11] == ["0", "3", "self", "2", "3", "1", "max_len", "1.23", "2 (1)", "1.00", "2.00"]
    rows = table.split("<tbody>")[1].split("</tr>")
    assert "<td style=\"padding:1px 6px\">off</td><td style=\"padding:1px 6px\">0.90</td>" in rows[1]  # why it was off
    assert ">lookup<" in rows[2] and ">predicted_reject</td><td style=\"padding:1px 6px\">–<" in rows[2]  # not evaluated
    text = views.ledger_markdown(res, None)
    assert "| layers run per token (mean) | 4.00 / 4 |" in text
    assert "| compute fraction (MACs, all overheads) | 1.250 |" in text
    assert "| verifier passes (full-depth passes after the prefill) | 4 | — |" in text
    assert "| tokens per verifier pass | 1.50 | 1.00 |" in text
    assert "| accepted drafts per round with a draft (mean) | 1.00 |" in text
    assert "K/V fill" not in text and "drafter=self" in text
    base = make_result(exits=(4, 4, 4, 4), mode="full")
    assert "| verifier passes (full-depth passes after the prefill) | 4 | 3 |" in views.ledger_markdown(res, base)


def test_speculative_panel_redraws_from_json():
    from explain import speculative_views as sv

    res = make_speculative()
    back = GenerationResult.from_json(res.to_json())
    assert sv.speculative_token_html(back, SPEC_TEXT) == sv.speculative_token_html(res, SPEC_TEXT)
    assert sv.rounds_table_html(back) == sv.rounds_table_html(res)
    assert sv.speculative_figure(back).to_dict() == sv.speculative_figure(res).to_dict()


def test_vocabulary_exits_are_marked_in_the_token_view():
    from adaptive import Runtime
    from conftest import make_model, random_prompt
    from explain.views import token_tooltip, token_view_html

    rt = Runtime.from_model(make_model("llama"))
    rt.draft_ranking = list(range(0, 97, 2))
    res = rt.generate(random_prompt(6), max_new_tokens=4, mode="early_exit", threshold=1.0, exit_vocab_size=20,
                      vocab_exit=0.0)
    assert [t.full_head_skipped for t in res.traces] == [False, True, True, True]
    page = token_view_html(res)
    assert page.count("underline dotted") == 1 + 3  # the legend + three tokens
    assert "full LM head was skipped" in token_tooltip(res, 1) and "skipped" not in token_tooltip(res, 0)


def test_the_speculative_headline_says_how_many_emitted_tokens_joined_the_draft_shortlist():
    from explain import speculative_views as sv

    res = make_speculative()
    assert "joined the draft shortlist" not in sv.headline(res)  # none joined (or an older trace)
    res.stats["draft_vocab_added"] = 3
    line = sv.headline(res)
    assert "knobs: drafter=self" in line and "3 emitted tokens joined the draft shortlist" in line
    # rounds 0 and 3: 3 + 1 drafts from 2 + 1 passes, one of them a context guess checked in round 0's pass
    assert "4 model drafts from 3 draft passes (1 were context guesses" in line

"""Speculative decoding is lossless: greedy equals full, sampling follows the target distribution."""

import pytest
import torch

from adaptive import Runtime, native_layers
from adaptive.config import SamplingConfig
from adaptive.sampling import Sampler
from adaptive.speculative import Draft, LookupDrafter, SpeculativeDecoder

from conftest import build_tiny_checkpoint, make_model, random_prompt

SETTINGS = [dict(), dict(draft_depth=1, draft_length=3), dict(draft_depth=2, draft_length=6), dict(drafter="lookup"),
            dict(draft_depth=3, draft_length=1)]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "adaptive")
def test_greedy_equals_full(family, settings):
    rt = Runtime.from_model(make_model(family))
    for seed, (length, new) in enumerate([(3, 30), (9, 17), (1, 40)]):
        prompt = random_prompt(length, seed)
        full = rt.generate(prompt, max_new_tokens=new).token_ids
        spec = rt.generate(prompt, max_new_tokens=new, mode="speculative", **settings)
        assert spec.token_ids == full
        assert len(spec.traces) == new
        assert [t.position for t in spec.traces] == list(range(length, length + new))


def test_greedy_equals_full_with_a_draft_model(tmp_path):
    target_dir = build_tiny_checkpoint(tmp_path / "target")
    draft_dir = tmp_path / "draft"
    from transformers import AutoModelForCausalLM
    import shutil
    shutil.copytree(target_dir, draft_dir)
    draft = AutoModelForCausalLM.from_pretrained(draft_dir)
    draft.model.layers = draft.model.layers[:2]  # a shallower model with the same tokenizer
    draft.config.num_hidden_layers = 2
    draft.save_pretrained(draft_dir)
    rt = Runtime.from_pretrained(target_dir)
    for prompt in ("def main():", "import os\nprint("):
        full = rt.generate(prompt, max_new_tokens=30, stop_at_eos=False).token_ids
        spec = rt.generate(prompt, max_new_tokens=30, stop_at_eos=False, mode="speculative", drafter="draft_model",
                           draft_model=str(draft_dir), draft_length=4)
        assert spec.token_ids == full
        assert spec.stats["drafter_histogram"].get("draft_model", 0) > 0


def test_greedy_equals_full_with_a_draft_shortlist(family):
    rt = Runtime.from_model(make_model(family))
    prompt = random_prompt(6, seed=11)
    full = rt.generate(prompt, max_new_tokens=30).token_ids
    # a third of the vocabulary but none of the tokens full depth will emit, plus the prompt's tokens
    rt.draft_ranking = [t for t in range(0, 97, 3) if t not in full]
    spec = rt.generate(prompt, max_new_tokens=30, mode="speculative", draft_depth=2, draft_length=4, draft_vocab_size=20)
    assert spec.token_ids == full
    start = set(rt.draft_ranking[:20]) | set(prompt)
    assert spec.stats["draft_vocab"] == len(start)
    # every emitted token joins the draft shortlist after its round, and nothing else does
    assert spec.stats["draft_vocab_added"] == len(set(full) - start)
    drafted_new = False
    for r in spec.rounds:
        known = start | set(full[:r.position - len(prompt) + 1])  # the prompt's, and those emitted so far
        assert all(t in known for t in r.drafted)
        drafted_new |= any(t not in start for t in r.drafted)
    # a token outside the starting shortlist was drafted once emitted (llama, gpt2: some tiny random models
    # only repeat prompt tokens)
    assert drafted_new == bool(set(full) - start)


def test_the_native_greedy_verdict_and_torchs_agree(monkeypatch):
    """_accept judges greedy drafts with row_kernels.h's greedy_verdict; torch's softmax and max(dim) are
    its fallback: the same tokens, verdicts and (to rounding) verifier probabilities either way."""
    ext = native_layers.extension()
    if ext is None:
        pytest.skip(native_layers.status())
    rt = Runtime.from_model(make_model("llama"))  # a tiny model whose drafts get rejected (some only repeat)
    prompt = random_prompt(5, seed=3)
    settings = dict(max_new_tokens=30, mode="speculative", draft_depth=1, draft_length=4, guess_drafts=False)
    native = rt.generate(prompt, **settings)
    monkeypatch.setattr(ext, "greedy_verdict", lambda logits, tokens: None)
    fallback = rt.generate(prompt, **settings)
    assert native.token_ids == fallback.token_ids
    assert [(r.drafted, r.accepted) for r in native.rounds] == [(r.drafted, r.accepted) for r in fallback.rounds]
    assert any(r.accepted < len(r.drafted) for r in native.rounds)  # a rejection was judged too
    for a, b in zip(native.rounds, fallback.rounds):
        torch.testing.assert_close(a.p_probs, b.p_probs, rtol=5e-6, atol=1e-12)


def test_eos_inside_a_drafted_block_stops_there():
    hf = make_model("gpt2")  # random GPT-2 repeats itself: long accepted drafts
    rt = Runtime.from_model(hf)
    prompt = random_prompt(5, seed=3)
    free = rt.generate(prompt, max_new_tokens=30, mode="speculative", draft_depth=2, draft_length=8).token_ids
    eos = free[12]  # make a token in the middle of a drafted block the end-of-sequence token
    rt.spec = type(rt.spec)(**{**rt.spec.__dict__, "eos_token_ids": (eos,)})
    full = rt.generate(prompt, max_new_tokens=30)
    spec = rt.generate(prompt, max_new_tokens=30, mode="speculative", draft_depth=2, draft_length=8)
    assert spec.token_ids == full.token_ids and spec.token_ids[-1] == eos and spec.stop_reason == "eos"


def test_context_limit(family):
    rt = Runtime.from_model(make_model(family))
    context = rt.spec.max_positions
    prompt = random_prompt(context - 20, seed=4)
    full = rt.generate(prompt, max_new_tokens=20).token_ids
    spec = rt.generate(prompt, max_new_tokens=20, mode="speculative", draft_depth=1, draft_length=8)
    assert spec.token_ids == full and len(full) == 20


# ---- stub drafters: acceptance logic and rollback ----------------------------------------------------

class OracleDrafter:
    """Proposes from a known continuation, corrupting the tokens where ``wrong(j)`` says so."""

    def __init__(self, reference: list[int], vocab: int, wrong, length: int = 4):
        self.reference, self.vocab, self.wrong, self.length = reference, vocab, wrong, length
        self.calls = 0

    def draft(self, dec, t0, limit):
        self.calls += 1
        n = len(dec.context) + 1  # tokens known so far, t0 included
        truth = self.reference[n:n + min(limit, self.length)]
        tokens = [(t + 1) % self.vocab if self.wrong(j) else t for j, t in enumerate(truth)]
        return Draft(tokens=tokens, q=[None] * len(tokens), q_probs=[1.0] * len(tokens), depth=0, hidden=None,
                     stop_reason="max_len", confidences=[1.0] * len(tokens), drafter="lookup") if tokens else None


@pytest.mark.parametrize("name, wrong, expect_accepted", [
    ("always", lambda j: False, 4), ("never", lambda j: True, 0), ("sometimes", lambda j: j == 2, 2)])
def test_stub_drafters(name, wrong, expect_accepted):
    rt = Runtime.from_model(make_model("llama"))
    prompt = random_prompt(5, seed=7)
    full = rt.generate(prompt, max_new_tokens=33).token_ids
    reference = prompt + full
    stream = rt.stream(prompt, max_new_tokens=33, mode="speculative", drafter="lookup")
    # swap in the stub before the first round
    records = iter(stream)
    first = next(records)
    decoder = stream._records.gi_frame.f_locals["decoder"]
    decoder.free_drafter = OracleDrafter(reference, rt.spec.vocab_size, wrong)
    rest = list(records)
    result = stream.result
    assert [first.token_id] + [t.token_id for t in rest] == full
    drafted = [r for r in result.rounds if r.drafted]
    assert drafted and all(r.accepted == min(expect_accepted, len(r.drafted)) for r in drafted[:-1])
    # rollback by position: the cache holds exactly the fed positions after every round
    assert decoder.cache.fill == [decoder.pos] * rt.spec.num_layers
    sources = {t.source for t in rest}
    assert ("draft" in sources) == (expect_accepted > 0)
    assert ("correction" in sources) == (expect_accepted < 4)


def test_lookup_proposes_the_latest_match():
    drafter = LookupDrafter(max_ngram=3, min_ngram=2, length=4)
    context = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert drafter.propose(context, 10) == [7, 8, 5, 1]
    assert drafter.propose([4, 5, 6], 10) == []
    # a run of one token: the latest match overlaps the tail; an earlier one gives a full continuation
    assert drafter.propose([7] * 10, 10) == [7, 7, 7, 7]


# ---- sampling keeps the target distribution -----------------------------------------------------------

def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


def test_acceptance_rule_reproduces_p_chi_square():
    """The min(1, p/q) rule with residual resampling: accepted-or-corrected tokens are distributed as p."""
    p_logits = torch.log(torch.tensor([0.05, 0.30, 0.10, 0.25, 0.05, 0.15, 0.06, 0.04]))
    q_logits = torch.log(torch.tensor([0.30, 0.05, 0.20, 0.05, 0.20, 0.05, 0.10, 0.05]))
    sampler = Sampler(SamplingConfig(temperature=1.0, seed=0))
    dec = SpeculativeDecoder.__new__(SpeculativeDecoder)  # only the acceptance rule is exercised
    dec.sampler = sampler
    q = sampler.distribution(q_logits)
    counts = torch.zeros(8)
    n = 20000
    for _ in range(n):
        t = int(torch.multinomial(q, 1, generator=sampler.generator))
        draft = Draft(tokens=[t], q=[q], q_probs=[float(q[t])], depth=1, hidden=None, stop_reason="max_len")
        accepted, correction, _ = dec._accept(draft, p_logits[None, :])
        counts[t if accepted else correction] += 1
    assert _chi_square(counts, torch.softmax(p_logits, -1)) < 24.3  # chi2(df=7) at p = 0.001


@pytest.mark.parametrize("shortlist", [False, True])
def test_speculative_sampling_matches_the_model_distribution(shortlist):
    """On a tiny model: the 2nd and 3rd generated tokens (drafted at depth 1, verified) follow p exactly,
    also when the draft only sees a shortlist of the vocabulary (q is zero elsewhere)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    V = 6
    hf = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                      vocab_size=V, max_position_embeddings=16, bos_token_id=None,
                                      eos_token_id=None)).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(6.0)
    rt = Runtime.from_model(hf)
    if shortlist:
        rt.draft_ranking = [0, 3]  # + the prompt's tokens {1, 2, 4}: token 5 can never be drafted
    prompt = [1, 4, 2]
    # exact marginals of tokens 2 and 3 by enumeration over the full model
    with torch.inference_mode():
        p1 = torch.softmax(hf(torch.tensor([prompt])).logits[0, -1], -1)
        p2 = torch.zeros(V)
        p3 = torch.zeros(V)
        for a in range(V):
            pa = torch.softmax(hf(torch.tensor([prompt + [a]])).logits[0, -1], -1)
            p2 += p1[a] * pa
            for b in range(V):
                pb = torch.softmax(hf(torch.tensor([prompt + [a, b]])).logits[0, -1], -1)
                p3 += p1[a] * pa[b] * pb
    counts2, counts3 = torch.zeros(V), torch.zeros(V)
    drafted = 0
    n = 2500
    for seed in range(n):
        res = rt.generate(prompt, max_new_tokens=3, temperature=1.0, seed=seed, mode="speculative", draft_depth=1,
                          draft_length=2, draft_vocab_size=2)
        assert res.stats["draft_vocab"] == (5 if shortlist else V)
        counts2[res.token_ids[1]] += 1
        counts3[res.token_ids[2]] += 1
        drafted += sum(t.drafted for t in res.traces)
    assert drafted > n // 4  # the draft path was really used
    assert _chi_square(counts2, p2) < 20.5  # chi2(df=5) at p = 0.001
    assert _chi_square(counts3, p3) < 20.5


def test_controller_switches_off_and_probes_again():
    """With a pessimistic acceptance estimate speculation turns off, but re-probes after a pause."""
    from adaptive.host_costs import HostCosts
    from adaptive.speculative import AcceptanceStats, SpeculationController

    host = HostCosts(layer_ms={1: 1.0, 2: 1.1, 4: 1.3, 8: 1.7}, head_ms={1: 1.0, 2: 1.1, 4: 1.3, 8: 1.7}, num_layers=8)
    stats = AcceptanceStats({2: 0.05, 4: 0.05})
    ctl = SpeculationController(host, 8, stats, depths=(2, 4))
    # A fresh runtime first times plain steps (what speculation is compared against).
    assert [ctl.plan() for _ in range(2)] == [None, None] and ctl.plain_reason == "measure"
    for _ in range(3):
        ctl.record_round(None, 0, 0.0, ctl.raw_full_step())  # three plain steps at the predicted cost
    ctl.rounds_planned = 0
    plans = [ctl.plan() for _ in range(20)]
    assert plans[0] is None and plans[1:9] == [None] * 8 and plans[9] in (2, 4)  # off, pause, then one probe
    assert plans[15] is None  # every 16th round is a timing plain step
    stats.record(2, [0.9] * 200, [True] * 200)  # the probe found drafts accepted: speculation resumes
    assert ctl.predicted_speedup(2)[0] > 1.0
    ctl.off_for = 0
    assert ctl.plan() == 2


def test_round_timings_judge_every_side_by_the_median():
    from adaptive.speculative import RoundTimings

    t = RoundTimings(window=5)
    assert t.get(("full",)) == 1.0  # nothing measured yet: the start-up costs stand
    t.record(("verify", 2), 32.0, 1.0)  # a first-call spike alone does not overrule them
    t.record(("verify", 2), 1.5, 1.0)
    assert t.get(("verify", 2)) == 1.0
    t.record(("verify", 2), 1.4, 1.0)
    assert t.get(("verify", 2)) == pytest.approx(1.5)  # from the third round on, the median of what ran
    for measured in (1.0, 1.2, 9.0, 1.1, 1.3):  # one scheduler spike among ordinary steps
        t.record(("full",), measured, 1.0)
        t.record(("draft", 4), measured, 1.0)
    assert t.get(("full",)) == pytest.approx(1.2) and t.get(("draft", 4)) == t.get(("full",))
    for _ in range(5):  # only the window's latest ratios count
        t.record(("full",), 2.0, 1.0)
    assert t.get(("full",)) == pytest.approx(2.0) and t.count[("full",)] == 10
    t.record(("full",), 1.0, 0.0)  # no prediction: nothing to compare against
    assert t.count[("full",)] == 10


def test_controller_follows_the_requests_own_acceptance():
    """The runtime-wide rate is only a prior: a request whose drafts keep failing turns speculation off."""
    from adaptive.host_costs import HostCosts
    from adaptive.speculative import REQUEST_PRIOR, AcceptanceStats, SpeculationController

    host = HostCosts(layer_ms={1: 1.0, 2: 1.05, 4: 1.1, 8: 1.2}, head_ms={1: 0.5, 2: 0.5, 4: 0.55, 8: 0.6}, num_layers=8)
    stats = AcceptanceStats({4: 0.9})
    stats.record(4, [0.9] * 1000, [True] * 900 + [False] * 100)  # earlier requests: 90% accepted
    ctl = SpeculationController(host, 8, stats, depths=(4,))
    assert ctl.alpha(4) == pytest.approx(stats.alpha(4))
    assert ctl.predicted_speedup(4)[0] > 1.0
    ctl.observe(4, [False] * 40)  # this request: every draft rejected (only the latest 32 are kept)
    assert len(ctl.recent[4]) == 32
    assert ctl.alpha(4) == pytest.approx(REQUEST_PRIOR * stats.alpha(4) / (32 + REQUEST_PRIOR))
    assert ctl.predicted_speedup(4)[0] < 1.0
    fresh = SpeculationController(host, 8, stats, depths=(4,))  # the next request starts from the prior again
    assert fresh.alpha(4) == pytest.approx(stats.alpha(4))


def test_a_calibrated_prior_outweighs_one_hard_prompt():
    """A model's calibrated acceptance priors are measured over thousands of tokens: the first request's
    few rejections must not turn speculation off for every request after it (a guess gives way at once)."""
    from adaptive.speculative import CALIBRATED_PRIOR_WEIGHT, AcceptanceStats

    calibrated, guessed = AcceptanceStats({4: 0.89}, CALIBRATED_PRIOR_WEIGHT), AcceptanceStats({})
    for stats in (calibrated, guessed):
        stats.record(4, [0.5] * 4, [True, False, False, False])  # a hard first prompt
    assert calibrated.alpha(4) > 0.85 and guessed.alpha(4) < 0.45
    calibrated.record(4, [0.5] * 640, [False] * 640)  # what a runtime measures does take over
    assert calibrated.alpha(4) < 0.1


def _round(depth, drafted, accepted, draft_ms, verify_ms, drafter="self", passes=None):
    from adaptive.trace import SpecRound
    passes = drafted if passes is None else passes
    return SpecRound(index=0, position=0, drafter=drafter, depth=depth, drafted=list(range(drafted)), accepted=accepted,
                     stop_reason="max_len", draft_ms=draft_ms, verify_ms=verify_ms, q_probs=[], p_probs=[],
                     draft_passes=passes, guessed=drafted - passes)


def test_speculation_ceiling_from_measured_rounds():
    from adaptive.speculation_ceiling import depth_ceilings
    # depth 4: 1 ms per drafted token, a 4-token verification takes 2 ms (median of 2.0, 2.0, 9.0);
    # accepted 4 + 4 + 2 of 4 + 4 + 3 judged (the third round's 4th draft came after its rejection)
    rounds = [_round(4, 4, 4, 4.0, 2.0, passes=1), _round(4, 4, 4, 4.0, 9.0, passes=2), _round(4, 4, 2, 4.0, 2.0),
              _round(2, 4, 4, 1.0, 1.0), _round(2, 4, 4, 1.0, 1.0),  # depth 2: too few rounds of one length
              _round(0, 4, 4, 0.0, 1.0, drafter="lookup"),  # not the model's own shallow path
              _round(0, 0, 0, 0.0, 1.3, drafter="none")]  # a plain step
    (c,) = depth_ceilings(rounds, full_ms_per_token=2.0)
    alpha = 10 / 11
    assert (c.depth, c.rounds, c.length) == (4, 3, 4)
    assert c.draft_ms_per_token == pytest.approx(1.0) and c.verify_ms == pytest.approx(2.0)
    assert c.passes_per_token == pytest.approx((1 + 2 + 4) / 12)  # two rounds drafted behind checked guesses
    assert c.acceptance == pytest.approx(alpha)
    assert c.ceiling == pytest.approx(4 * 2.0 / (4 * 1.0 + 2.0))
    assert c.at_measured_acceptance == pytest.approx((1 + alpha + alpha ** 2 + alpha ** 3) * 2.0 / 6.0)
    assert c.at_measured_acceptance < c.ceiling


@pytest.mark.parametrize("layers, depths", [(1, ()), (2, (1,)), (4, (1, 2, 3)), (8, (2, 3, 4, 5, 6)),
                                            (12, (3, 5, 6, 7, 9)), (32, (8, 12, 16, 20, 24))])
def test_draft_depths_run_from_the_light_path_to_three_quarters_of_the_layers(layers, depths):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    rt = Runtime.from_model(LlamaForCausalLM(config).eval())
    assert rt.draft_depths == depths
    assert not depths or (depths[0], depths[-1]) == (rt.paths["light"], max(rt.paths["standard"], 3 * layers // 4))
    assert not depths or rt.paths["standard"] in depths
    assert all(d < layers for d in depths)


def test_a_request_ramps_its_draft_length_up_from_two():
    """A model drafter drafts at most 2 tokens in a request's first round and after each pause (a failed
    round then costs about one step), doubling after every round that had a draft accepted; prompt lookup
    drafts cost nothing and a fixed draft_length is the user's choice, so neither is capped."""
    from adaptive.host_costs import HostCosts
    from adaptive.speculative import FIRST_LENGTH_CAP, LOOKUP_KEY, AcceptanceStats, SpeculationController

    # per-layer and head costs that hardly grow with the positions verified (batch-1 decoding's regime)
    flat = {1: 0.1, 2: 0.1, 4: 0.11, 8: 0.12}
    host = HostCosts(layer_ms=flat, head_ms=flat, num_layers=8)
    stats = AcceptanceStats({4: 0.99}, prior_weight=1000)
    ctl = SpeculationController(host, 8, stats, depths=(4,))
    assert FIRST_LENGTH_CAP == 2 and ctl.keep_drafting(4, 1, 1.0) and not ctl.keep_drafting(4, 2, 1.0)
    assert ctl.keep_drafting(LOOKUP_KEY, 5, 1.0)
    ctl.observe(4, [False])  # first draft rejected: still 2
    assert not ctl.keep_drafting(4, 2, 1.0)
    ctl.observe(4, [True, False])  # one accepted: 4, then 8 (max_draft)
    assert ctl.keep_drafting(4, 3, 1.0) and not ctl.keep_drafting(4, 4, 1.0)
    ctl.observe(4, [True, True, True, True])
    assert ctl.keep_drafting(4, 7, 1.0) and not ctl.keep_drafting(4, 8, 1.0)
    ctl.observe(4, [True] * 8)
    assert ctl.length_cap == 8
    ctl.recent[4] = [False] * 32  # this request's drafts now all fail: speculation switches off ...
    for _ in range(3):
        ctl.record_round(None, 0, 0.0, ctl.raw_full_step())
    ctl.rounds_planned = 1
    assert ctl.plan() is None and ctl.off_for > 0
    assert not ctl.keep_drafting(4, 2, 1.0)  # ... and the probe after the pause starts at 2 again
    fixed = SpeculationController(host, 8, stats, depths=(4,), fixed_length=6)
    assert fixed.keep_drafting(4, 5, 1.0) and not fixed.keep_drafting(4, 6, 1.0)


def test_a_capped_round_says_so_in_its_trace(tiny_checkpoint):
    from adaptive.speculative import AcceptanceStats

    rt = Runtime.from_pretrained(tiny_checkpoint)
    rt.acceptance = AcceptanceStats({1: 0.99, 2: 0.99}, prior_weight=1000)  # drafts look certain to pass
    for depth in (1, 2):  # at every draft confidence: else the predictor tempers a random model's low
        # confidences to ~0.5, and whether a second draft pays then hangs on this host's timings
        rt.acceptance.record(depth, [(b + 0.5) / 10 for b in range(10)] * 100, [True] * 1000)
    res = rt.generate([1, 2, 3, 4], max_new_tokens=40, mode="speculative", stop_at_eos=False)
    drafted = [r for r in res.rounds if r.drafted]
    assert drafted[0].stop_reason == "length_cap" and len(drafted[0].drafted) == 2


def test_a_rounds_cost_snapshot_equals_the_controllers_live_costs():
    """A drafted round reads the controller's costs once (DraftCosts) instead of after every drafted token:
    the snapshot must hold exactly the live figures, and the stop rule must decide the same with it."""
    from adaptive.host_costs import HostCosts
    from adaptive.speculative import LOOKUP_KEY, MIN_TIMINGS, AcceptanceStats, SpeculationController

    host = HostCosts(layer_ms={1: 1.0, 2: 1.1, 4: 1.3, 8: 1.7}, head_ms={1: 0.5, 2: 0.6, 4: 0.8, 8: 1.1}, num_layers=8)
    ctl = SpeculationController(host, 8, AcceptanceStats({4: 0.8}), depths=(4,), draft_head_ms=0.2)
    for i in range(MIN_TIMINGS):  # measured ratios away from 1 on every side the snapshot reads
        ctl.record_round(None, 0, 0.0, ctl.raw_full_step() * 1.3)
        ctl.record_round(4, 6, 5.0 + i, 2.5, rest_ms=3.0, rest_drafts=4, first_rows=2)
        for rows in (1, 2, 9):
            ctl.record_pass(4, rows, ctl.draft_pass_ms(4, rows) * (0.7 + rows / 10))
    costs = ctl.draft_costs(4)
    assert costs.full_step == ctl.full_step() and costs.draft_step == ctl.draft_step_ms(4)
    assert costs.marginal_verify == tuple(ctl.verify_ms(4, n + 1) - ctl.verify_ms(4, n) for n in range(8))
    assert costs.pass_ms == tuple(ctl.measured_pass_ms(4, rows) for rows in range(1, 10))
    assert costs.pass_ms[1] != ctl.draft_pass_ms(4, 2)  # the measured ratio is in
    ctl.length_cap = 8
    for key in (4, LOOKUP_KEY):
        snapshot = ctl.draft_costs(key)
        decisions = [(ctl.draft_stop(key, n, survive), ctl.draft_stop(key, n, survive, snapshot))
                     for n in range(1, 10) for survive in (0.05, 0.3, 0.6, 0.9, 1.0)]
        assert all(live == fixed for live, fixed in decisions)
        assert {live for live, _ in decisions} >= {None, "predicted_reject", "max_len"}  # the grid spans the rule


def test_a_rounds_first_draft_pass_is_predicted_apart_from_the_rest():
    """The first pass of a round follows a verification (the draft layers' weights left the cache) and
    carries the round's planning: the controller times it apart, so short probe rounds, made almost only
    of first passes, do not make every drafted token look as dear as they are."""
    from adaptive.host_costs import HostCosts
    from adaptive.speculative import MIN_TIMINGS, AcceptanceStats, SpeculationController

    host = HostCosts(layer_ms={1: 1.0, 2: 1.1, 4: 1.3, 8: 1.7}, head_ms={1: 1.0, 2: 1.1, 4: 1.3, 8: 1.7}, num_layers=8)
    ctl = SpeculationController(host, 8, AcceptanceStats({2: 0.9}), depths=(2,), draft_variant="guess")
    raw = ctl.raw_draft_step_ms(2)  # 2 layers + the head: 3 ms
    for _ in range(MIN_TIMINGS):  # a first pass at 3x its prediction, then 4 drafts at 1x
        ctl.record_round(2, 5, draft_ms=3 * raw + 4 * raw, verify_ms=1.0, rest_ms=4 * raw, rest_drafts=4)
    assert ctl.draft_first_ms(2) == pytest.approx(3 * raw) and ctl.draft_step_ms(2) == pytest.approx(raw)
    assert ctl.draft_round_ms(2, 8) == pytest.approx(3 * raw + 7 * raw) and ctl.draft_round_ms(2, 0) == 0.0
    other = SpeculationController(host, 8, AcceptanceStats({2: 0.9}), depths=(2,), timings=ctl.timings)
    assert other.draft_step_ms(2) == pytest.approx(raw)  # one-token-pass requests keep their own timings
    for _ in range(MIN_TIMINGS):  # a drafter that does not time passes apart: every token alike
        other.record_round(2, 4, draft_ms=8 * raw, verify_ms=1.0)
    assert other.draft_first_ms(2) == pytest.approx(2 * raw) and other.draft_step_ms(2) == pytest.approx(2 * raw)
    # a first pass that checked a guess fed 3 rows: it is judged against a 3-row pass
    third = SpeculationController(host, 8, AcceptanceStats({2: 0.9}), depths=(2,), draft_variant="rows")
    three_rows = third.draft_pass_ms(2, 3)
    assert three_rows > raw
    for _ in range(MIN_TIMINGS):
        third.record_round(2, 3, draft_ms=three_rows, verify_ms=1.0, rest_ms=0.0, rest_drafts=0, first_rows=3)
    assert third.draft_first_ms(2) == pytest.approx(raw)


def test_pass_costs_follow_what_passes_measured_in_rounds():
    """Guess lengths are chosen from pass costs corrected by passes timed in the decode loop: a row count
    that turns out dear there is priced as it ran."""
    from adaptive.host_costs import HostCosts
    from adaptive.speculative import MIN_TIMINGS, AcceptanceStats, SpeculationController

    host = HostCosts(layer_ms={1: 1.0, 2: 1.05, 4: 1.1, 8: 1.2}, head_ms={1: 1.0, 2: 1.05, 4: 1.1, 8: 1.2}, num_layers=8)
    ctl = SpeculationController(host, 8, AcceptanceStats({2: 0.9}), depths=(2,))
    assert ctl.measured_pass_ms(2, 4) == pytest.approx(ctl.draft_pass_ms(2, 4))
    for _ in range(MIN_TIMINGS):
        ctl.record_pass(2, 4, 3 * ctl.draft_pass_ms(2, 4))
    assert ctl.measured_pass_ms(2, 4) == pytest.approx(3 * ctl.draft_pass_ms(2, 4))
    assert ctl.measured_pass_ms(2, 1) == pytest.approx(ctl.draft_pass_ms(2, 1))  # other row counts keep theirs


def test_overlapped_verification_is_lossless_and_keeps_only_a_block_after_full_acceptance(family):
    """overlap=True: the next block is drafted while a worker thread verifies; output is full's, a block drafted
    ahead is used only after a round that kept every draft, and torch's thread count comes back."""
    from adaptive import native_layers
    from adaptive.speculative import usable_cores

    threads = torch.get_num_threads()
    used = dropped = 0
    for agreeing in (False, True):
        rt = Runtime.from_model(make_model(family))
        rt.draft_ranking = list(range(rt.spec.vocab_size))  # a shortlist head (the overlapped drafter's)
        # Layers >= 2 add nothing to the residual stream (the exit after 2 layers is full depth's: every
        # draft kept), or they dominate it (drafts rejected, blocks drafted ahead dropped).
        for lw in rt.model.w.layers[2:]:
            for name in ("o_w", "o_b", "down_w", "down_b"):
                if getattr(lw, name) is not None:
                    getattr(lw, name).mul_(0.0 if agreeing else 100.0)
        for seed, (length, new) in enumerate([(3, 40), (9, 33), (1, 48)]):
            prompt = random_prompt(length, seed)
            full = rt.generate(prompt, max_new_tokens=new).token_ids
            for knobs in (dict(draft_depth=2, draft_length=3), dict(draft_depth=2)):
                spec = rt.generate(prompt, max_new_tokens=new, mode="speculative", overlap=True, draft_vocab_size=40,
                                   **knobs)
                assert spec.token_ids == full
                assert torch.get_num_threads() == threads
                if any(r.drafted_ahead for r in spec.rounds):
                    from explain.speculative_views import headline
                    assert "verified a block drafted during the previous verification" in headline(spec)
                for before, r in zip(spec.rounds, spec.rounds[1:]):
                    if r.drafted_ahead:  # drafted during the previous verification, kept only after it kept all
                        assert before.next_drafted == len(r.drafted) and before.accepted == len(before.drafted)
                        used += 1
                    elif before.next_drafted:
                        dropped += 1
    if native_layers.status() == "native" and usable_cores() >= 2:
        assert used > 0 and dropped > 0  # both outcomes were exercised

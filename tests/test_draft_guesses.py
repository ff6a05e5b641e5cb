"""Self-drafting checks context guesses in the same pass: the same drafts, fewer passes, nothing leaks."""

import dataclasses

import pytest
import torch

from adaptive import Runtime
from adaptive.draft_guesses import ContextNgrams, GuessLength
from adaptive.errors import InvalidRequestError
from adaptive.host_costs import HostCosts
from adaptive.speculative import RoundTimings
from adaptive.trace import SpecRound, TraceFormatError

from conftest import make_model, prefilled_speculative_decoder, random_prompt


def test_context_ngrams_guess_the_latest_full_continuation_of_the_longest_ngram():
    ngrams = ContextNgrams(max_ngram=3)
    ngrams.extend([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 6])
    assert ngrams.guess([2, 3], 2) == [7, 8]  # the latest occurrence of (2, 3)
    assert ngrams.guess([1, 2, 3], 2) == [4, 5]  # the longest n-gram wins over a later shorter one
    assert ngrams.guess([0, 0, 3], 3) == [7, 8, 6]  # no (0, 0, 3) or (0, 3): falls back to (3,)
    assert ngrams.guess([3], 4) == [4, 5, 9, 2]  # the latest (3,) has only 3 tokens after it: take a full one
    assert ngrams.guess([42], 3) == [] and ngrams.guess([2, 3], 0) == []
    assert ngrams.guess([6], 2) == []  # its only occurrence is the last token: nothing followed it yet
    ngrams.extend([6, 1])
    assert ngrams.guess([6], 2) == [6, 1]


def test_context_ngrams_read_their_owners_list_as_it_grows():
    committed = [1, 2, 3, 1, 2]
    ngrams = ContextNgrams(committed)  # shared, not copied: the decoder appends, the index catches up
    assert ngrams.guess([2], 1) == [3]  # the latest (2,) ends the list: nothing after it yet
    committed.append(4)
    assert ngrams.guess([2], 1) == [4] and ngrams.tokens is committed


def test_context_ngrams_refuse_bad_sizes():
    with pytest.raises(ValueError):
        ContextNgrams(max_ngram=2, min_ngram=3)


def test_guess_length_pays_only_where_rows_are_cheap():
    cheap = GuessLength(lambda depth, rows: 1.0 + 0.01 * (rows - 1))  # another row costs 1% of a pass
    dear = GuessLength(lambda depth, rows: float(rows))  # rows cost as much as passes: never worth it
    assert cheap.choose(2, 6) == 6 and dear.choose(2, 6) == 0
    # 5% a row at the prior agreement 0.6: (1 + .6 + .36 + .216 + .1296) / 1.2 = 1.92 drafts per unit at 4
    # guessed tokens beats 1.90 at 5 (the 5th guess adds 0.078 expected drafts for 0.05 of cost)
    assert GuessLength(lambda depth, rows: 1.0 + 0.05 * (rows - 1)).choose(2, 6) == 4
    assert cheap.choose(2, 0) == 0
    fifth = GuessLength(lambda depth, rows: 1.0 + 0.2 * (rows - 1))  # another row costs a fifth of a pass
    assert fifth.choose(2, 6) >= 1  # at the prior agreement 0.6: 1.6 drafts for 1.2
    fifth.record(2, agreed=0, compared=40)  # guesses at depth 2 never agreed: stop guessing there
    assert fifth.beta(2) < 0.15 and fifth.choose(2, 6) == 0
    assert fifth.choose(3, 6) >= 1  # agreement is kept per depth


class _StartupCostsStand(RoundTimings):
    """Round timings that never correct the start-up costs."""

    def get(self, key):
        return 1.0


def cheap_rows(rt) -> Runtime:
    """Fix the runtime's costs to ones where another row in a pass costs 5%, whatever rounds measure:
    guess lengths (and so this test) must not hang on how this machine's timings came out."""
    widths = {1: 1.0, 2: 1.05, 4: 1.15, 8: 1.35}
    rt._host_costs = HostCosts(layer_ms=dict(widths), head_ms=dict(widths), num_layers=rt.spec.num_layers)
    rt.round_timings = _StartupCostsStand()
    return rt


def test_guessed_drafts_are_the_drafts_of_one_token_passes(family):
    rt = cheap_rows(Runtime.from_model(make_model(family)))
    guessed = 0
    for seed in range(4):
        prompt = random_prompt(5, seed) * 3  # repeated text: the context has n-grams to guess from
        knobs = dict(max_new_tokens=40, mode="speculative", draft_depth=2, draft_length=6)
        with_guesses = rt.generate(prompt, guess_drafts=True, **knobs)
        without = rt.generate(prompt, guess_drafts=False, **knobs)
        full = rt.generate(prompt, max_new_tokens=40).token_ids
        assert with_guesses.token_ids == without.token_ids == full
        assert [(r.drafted, r.accepted) for r in with_guesses.rounds] == [(r.drafted, r.accepted) for r in without.rounds]
        for r in with_guesses.rounds:
            assert r.draft_passes + r.guessed == len(r.drafted)  # each pass drafts one token plus its agreed guesses
        assert all(r.guessed == 0 and r.draft_passes == len(r.drafted) for r in without.rounds)
        guessed += sum(r.guessed for r in with_guesses.rounds)
    assert guessed > 0  # guesses were checked and some agreed (else this test proves nothing)


class _StubNgrams:
    """Guesses ``guess_fn(call)`` on its call-th guess (0, 1, ...); max_ngram as ContextNgrams'."""
    max_ngram = 3

    def __init__(self, guess_fn):
        self.guess_fn, self.calls = guess_fn, 0

    def guess(self, tail, length):
        self.calls += 1
        return self.guess_fn(self.calls - 1)[:length]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_wrong_guess_costs_rows_but_never_leaks_into_the_cache_or_the_draft(family):
    rt = Runtime.from_model(make_model(family))
    prompt = random_prompt(6, seed=5)
    reference, t0 = prefilled_speculative_decoder(rt, prompt, draft_depth=2, draft_length=5, guess_drafts=False)
    expected = reference.self_drafter.draft(reference, t0, 2, 5)

    vocab = rt.spec.vocab_size
    dec, t0 = prefilled_speculative_decoder(rt, prompt, draft_depth=2, draft_length=5, guess_drafts=True)
    dec.guesses.choose = lambda depth, room, pass_ms=None: room  # always check as long a guess as the round allows
    # always wrong: one past the token the draft chooses next (each pass then drafts exactly one token)
    dec.ngrams = _StubNgrams(lambda call: [(t + 1) % vocab for t in expected.tokens[call:]])
    draft = dec.self_drafter.draft(dec, t0, 2, 5)
    assert draft.tokens == expected.tokens
    assert torch.allclose(draft.hidden, expected.hidden, atol=1e-5)
    assert draft.passes == len(draft.tokens) and draft.guessed == 0
    assert draft.macs > expected.macs  # the rows fed wrong guesses were computed, and are counted
    # layers < 2 hold exactly the drafted positions (t0 .. t_{k-1}); deeper layers nothing new
    assert dec.cache.fill[:2] == [len(prompt) + len(draft.tokens)] * 2
    assert dec.cache.fill[2:] == [len(prompt)] * (rt.spec.num_layers - 2)


def test_a_right_guess_drafts_the_whole_block_in_one_pass():
    rt = Runtime.from_model(make_model("llama"))
    prompt = random_prompt(6, seed=5)
    reference, t0 = prefilled_speculative_decoder(rt, prompt, draft_depth=2, draft_length=5, guess_drafts=False)
    expected = reference.self_drafter.draft(reference, t0, 2, 5)
    dec, t0 = prefilled_speculative_decoder(rt, prompt, draft_depth=2, draft_length=5, guess_drafts=True)
    dec.guesses.choose = lambda depth, room, pass_ms=None: room
    dec.ngrams = _StubNgrams(lambda call: list(expected.tokens))  # the draft's own tokens, from the start
    draft = dec.self_drafter.draft(dec, t0, 2, 5)
    assert draft.tokens == expected.tokens and draft.passes == 1 and draft.guessed == len(expected.tokens) - 1
    assert torch.allclose(draft.hidden, expected.hidden, atol=1e-5)
    assert dec.cache.fill[:2] == [len(prompt) + len(draft.tokens)] * 2


def test_guess_drafts_are_on_by_default_can_be_switched_off_and_must_be_a_bool():
    rt = cheap_rows(Runtime.from_model(make_model("llama")))
    knobs = dict(max_new_tokens=30, mode="speculative", draft_depth=2, draft_length=6)
    default = rt.generate(random_prompt(5, 1) * 3, **knobs)
    assert default.stats["guess_drafts"] is True
    plain = rt.generate(random_prompt(5, 1) * 3, guess_drafts=False, **knobs)
    assert plain.stats["guess_drafts"] is False and all(r.guessed == 0 for r in plain.rounds)
    assert plain.token_ids == default.token_ids
    sampled = rt.generate(random_prompt(5, 1) * 3, temperature=0.8, seed=1, **knobs)
    assert sampled.stats["guess_drafts"] is False  # sampling draws one token per pass
    with pytest.raises(InvalidRequestError, match="guess_drafts"):
        rt.generate(random_prompt(3, 0), max_new_tokens=4, mode="speculative", guess_drafts="yes")


def test_round_pass_counts_survive_a_trace_and_bad_ones_are_refused():
    r = SpecRound(index=0, position=3, drafter="self", depth=2, drafted=[5, 6, 7], accepted=2, stop_reason="max_len",
                  draft_ms=1.0, verify_ms=2.0, q_probs=[0.9] * 3, p_probs=[0.8] * 3, draft_passes=2, guessed=1)
    d = dataclasses.asdict(r)
    assert SpecRound.from_dict(d) == r
    old = {k: v for k, v in d.items() if k not in ("draft_passes", "guessed")}  # a trace from before these fields
    assert SpecRound.from_dict(old).draft_passes == 0
    with pytest.raises(TraceFormatError, match="draft_passes"):
        SpecRound.from_dict({**d, "draft_passes": -1})
    with pytest.raises(TraceFormatError, match="guessed"):
        SpecRound.from_dict({**d, "guessed": "2"})

"""The corpus n-gram datastore: counts, chained proposals, file checks, lossless lookup drafting, and the
self drafter's guesses from it."""

import numpy as np
import pytest
import torch

from adaptive import Runtime
from adaptive.datastore import DATASTORE_FILE, NgramStore
from adaptive.errors import CheckpointError

from conftest import make_model, random_prompt


def test_build_keeps_the_majority_continuation():
    # 1 2 3 -> 4 three times, -> 5 once; 2 3 4 -> 1 three times
    corpus = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 5]
    store = NgramStore.build(np.array(corpus), vocab_size=10, min_count=3, min_share=0.5)
    tokens, shares = store.propose([9, 1, 2, 3], limit=5)
    assert tokens[:3] == [4, 1, 2] and shares[0] == pytest.approx(0.75)
    assert store.propose([7, 7, 7], limit=5) == ([], [])  # unseen 3-gram: nothing
    strict = NgramStore.build(np.array(corpus), vocab_size=10, min_count=3, min_share=0.8)
    assert strict.propose([1, 2, 3], limit=5)[0] == []  # 1 2 3 -> 4 only 75% of the time


def test_round_trip_and_bad_files(tmp_path):
    store = NgramStore.build(np.array([1, 2, 3, 4] * 5), vocab_size=10, min_count=2)
    store.save(tmp_path / DATASTORE_FILE)
    loaded = NgramStore.load(tmp_path / DATASTORE_FILE, vocab_size=10)
    assert loaded.propose([1, 2, 3], 4) == store.propose([1, 2, 3], 4)
    with pytest.raises(CheckpointError, match="vocab_size"):
        NgramStore.load(tmp_path / DATASTORE_FILE, vocab_size=11)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError):
        NgramStore.load(tmp_path / "junk.safetensors", vocab_size=10)


def test_lookup_with_a_datastore_is_lossless():
    rt = Runtime.from_model(make_model("llama"), share_weights=False)
    prompt = random_prompt(12, seed=4)
    full = rt.generate(prompt, max_new_tokens=40, mode="full", stop_at_eos=False)
    # A datastore built from the model's own output proposes long runs the verifier mostly accepts,
    # and a corrupted copy proposes wrong tokens: the output must equal full depth either way.
    good = NgramStore.build(np.array(prompt + full.token_ids), rt.spec.vocab_size, min_count=1, min_share=0.0)
    bad = NgramStore(good.keys, (good.next + 1) % rt.spec.vocab_size, good.share, rt.spec.vocab_size)
    for store in (good, bad):
        rt.datastore = store
        res = rt.generate(prompt, max_new_tokens=40, mode="speculative", drafter="lookup", stop_at_eos=False)
        assert res.token_ids == full.token_ids
        assert res.stats["drafter_histogram"].get("datastore", 0) > 0
    off = rt.generate(prompt, max_new_tokens=40, mode="speculative", drafter="lookup", stop_at_eos=False,
                      datastore=False)
    assert off.token_ids == full.token_ids and "datastore" not in off.stats["drafter_histogram"]


def test_self_drafts_guess_from_the_datastore_where_the_context_has_no_match():
    from adaptive.config import SamplingConfig
    from adaptive.sampling import Sampler

    rt = Runtime.from_model(make_model("llama"), share_weights=False)
    prompt = random_prompt(12, seed=4)
    full = rt.generate(prompt, max_new_tokens=40, mode="full", stop_at_eos=False)
    store = NgramStore.build(np.array(prompt + full.token_ids), rt.spec.vocab_size, min_count=1, min_share=0.0)
    rt.datastore = store
    dec, settings = rt._speculative_decoder({}, 60, Sampler(SamplingConfig()), set(), prompt)
    dec.prefill(torch.tensor([prompt]))
    assert settings["datastore"] is not None
    seen = prompt[2:5]  # occurs in the context: its continuation there comes first
    assert dec.guess(seen, 4) == dec.ngrams.guess(seen, 4) == prompt[5:9]
    novel = [t for t in range(rt.spec.vocab_size) if t not in prompt][:3]  # no match: the corpus's guess
    assert dec.ngrams.guess(novel, 4) == [] and dec.guess(novel, 4) == store.propose(novel, 4)[0]
    off, off_settings = rt._speculative_decoder({"datastore": False}, 60, Sampler(SamplingConfig()), set(), prompt)
    assert off.guess(novel, 4) == [] and off_settings["datastore"] is None
    # no guesses (switched off, or sampling: a pass draws one token), no datastore for them
    unguessed = rt._speculative_decoder({"guess_drafts": False}, 60, Sampler(SamplingConfig()), set(), prompt)[1]
    sampled = rt._speculative_decoder({}, 60, Sampler(SamplingConfig(temperature=0.8)), set(), prompt)[1]
    assert unguessed["datastore"] is None and sampled["datastore"] is None
    # lossless with the corpus's guesses, right or corrupted
    bad = NgramStore(store.keys, (store.next + 1) % rt.spec.vocab_size, store.share, rt.spec.vocab_size)
    for table in (store, bad):
        rt.datastore = table
        res = rt.generate(prompt, max_new_tokens=40, mode="speculative", stop_at_eos=False)
        assert res.token_ids == full.token_ids and res.stats["datastore"] is not None


def test_build_counts_pairs_exactly_with_a_large_vocabulary():
    """A 3-gram and its next token were once packed into one int64 (key * V + next, V^4): from V = 55,109
    on that overflowed and merged unrelated n-grams. Counts must match a plain count at any vocabulary."""
    from collections import Counter

    g = np.random.default_rng(5)
    V = 152_064  # Qwen2's vocabulary
    corpus = g.choice(np.array([3, 70_001, 151_999, 120_000]), size=3000)  # few ids: every 3-gram recurs
    store = NgramStore.build(corpus, V, min_count=1, min_share=0.0)
    follows: dict[tuple, Counter] = {}
    for i in range(len(corpus) - 3):
        follows.setdefault(tuple(corpus[i:i + 3]), Counter())[int(corpus[i + 3])] += 1
    assert len(store) == len(follows)
    for gram, counter in follows.items():
        tokens, shares = store.propose([int(t) for t in gram], 1, min_share=0.0)
        count = max(counter.values())  # (a tie may go to any of the tied tokens)
        assert counter[tokens[0]] == count and shares[0] == pytest.approx(count / sum(counter.values()))

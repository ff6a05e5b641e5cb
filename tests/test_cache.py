"""The positional KV cache: no holes, crop, and cached decoding equal to recomputing without a cache."""

import pytest
import torch

from adaptive import Runtime
from adaptive.kv_cache import CacheHoleError, KVCache
from adaptive.loading import from_hf_model
from adaptive.model import LeanModel

from conftest import make_model, random_prompt


def test_cached_greedy_equals_uncached_greedy(family):
    """Greedy with the cache vs. recomputing the whole sequence from scratch at every step."""
    hf = make_model(family)
    loaded = from_hf_model(hf)
    model = LeanModel(loaded.spec, loaded.weights)
    prompt = random_prompt(7, seed=2)
    cached = Runtime.from_model(hf).generate(prompt, max_new_tokens=25).token_ids
    seq = list(prompt)
    with torch.inference_mode():
        for _ in range(25):
            cache = model.new_cache(1, 64)
            ids = torch.tensor([seq])
            logits = model.head(model.run_layers(model.embed(ids, 0), 0, model.spec.num_layers, 0, cache))[0, -1]
            seq.append(int(torch.argmax(logits)))
    assert seq[len(prompt):] == cached


def test_cache_refuses_holes_and_unfilled_reads():
    cache = KVCache(num_layers=2, batch_size=1, num_kv_heads=1, max_len=8, head_dim=4)
    kv = torch.ones(1, 1, 2, 4)
    cache.write(0, 0, kv, kv)
    assert cache.fill == [2, 0]
    with pytest.raises(CacheHoleError):
        cache.write(1, 1, kv, kv)  # position 0 of layer 1 was never written
    with pytest.raises(CacheHoleError):
        cache.keys_values(0, 0, 3)  # only 2 positions are filled
    with pytest.raises(CacheHoleError):
        cache.write(0, 7, kv, kv)  # past the end
    cache.crop(1)
    assert cache.fill == [1, 0]
    cache.write(0, 1, kv * 2, kv * 2)  # rollback then overwrite by position
    k, _ = cache.keys_values(0, 0, 3)
    assert k[0, 0, :, 0].tolist() == [1.0, 2.0, 2.0]


def test_full_decode_fills_every_layer():
    hf = make_model("llama")
    rt = Runtime.from_model(hf)
    stream = rt.stream(random_prompt(5), max_new_tokens=6)
    list(stream)
    # the 6th token was sampled but never fed back: 5 prompt + 5 fed tokens are cached
    assert stream.result.traces[-1].position == 10


@pytest.mark.parametrize("length,passes", [(16, 1), (40, 3), (64, 4), (65, 1)])
def test_a_short_prompt_prefills_in_passes_of_sixteen_rows(family, length, passes, monkeypatch):
    """Up to 64 prompt tokens run in passes of 16 rows (the panels' few-row path), longer prompts in one
    pass; either way the first token's logits and the cache agree with one pass over the whole prompt."""
    from adaptive.costs import CostModel
    from adaptive.decoding import FullDecoder

    hf = make_model(family)
    loaded = from_hf_model(hf)
    model = LeanModel(loaded.spec, loaded.weights)
    prompt = torch.tensor([random_prompt(length, seed=4)])
    L = model.spec.num_layers
    with torch.inference_mode():
        whole = model.new_cache(1, 96)
        expected = model.head(model.run_layers(model.embed(prompt, 0), 0, L, 0, whole))[0, -1]
        decoder = FullDecoder(model, CostModel.from_spec(model.spec), 96)
        calls = []
        run_layers = model.run_layers
        monkeypatch.setattr(model, "run_layers", lambda h, *a, **k: calls.append(h.shape[1]) or run_layers(h, *a, **k))
        outcome = decoder.prefill(prompt)
    assert len(calls) == passes and sum(calls) == length and max(calls) <= max(16, length * (passes == 1))
    assert decoder.pos == length and decoder.cache.fill == [length] * L
    torch.testing.assert_close(outcome.logits, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(decoder.cache.k[:, :, :, :length], whole.k[:, :, :, :length], rtol=1e-4, atol=1e-4)

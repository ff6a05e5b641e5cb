"""Seeded sampling is reproducible; the filters do what they say."""

import pytest
import torch

from adaptive import Runtime
from adaptive.config import SamplingConfig
from adaptive.sampling import Sampler

from conftest import make_model, random_prompt


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    rt = Runtime.from_model(make_model("llama"))
    prompt = random_prompt(5)
    a = rt.generate(prompt, max_new_tokens=30, temperature=1.5, seed=123).token_ids
    b = rt.generate(prompt, max_new_tokens=30, temperature=1.5, seed=123).token_ids
    c = rt.generate(prompt, max_new_tokens=30, temperature=1.5, seed=124).token_ids
    assert a == b
    assert a != c


def test_seeded_early_exit_sampling_is_reproducible():
    rt = Runtime.from_model(make_model("gpt2"))
    kw = dict(max_new_tokens=20, temperature=1.0, seed=7, mode="early_exit", threshold=0.05, kv_policy="defer")
    assert rt.generate(random_prompt(4), **kw).token_ids == rt.generate(random_prompt(4), **kw).token_ids


def test_top_k_one_and_tiny_top_p_are_greedy():
    rt = Runtime.from_model(make_model("qwen2"))
    prompt = random_prompt(6, seed=9)
    greedy = rt.generate(prompt, max_new_tokens=15).token_ids
    assert rt.generate(prompt, max_new_tokens=15, temperature=1.0, seed=1, top_k=1).token_ids == greedy
    assert rt.generate(prompt, max_new_tokens=15, temperature=1.0, seed=1, top_p=1e-6).token_ids == greedy


def test_distribution_filters():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    p = Sampler(SamplingConfig(temperature=1.0, top_k=2, seed=0)).distribution(logits)
    assert p[2:].sum() == 0 and p.sum().item() == pytest.approx(1.0)
    full = torch.softmax(logits, -1)
    p = Sampler(SamplingConfig(temperature=1.0, top_p=0.8, seed=0)).distribution(logits)
    # the smallest prefix of ranked tokens whose mass reaches 0.8
    keep = int((torch.cumsum(full, 0) < 0.8).sum()) + 1
    assert (p > 0).sum().item() == keep
    hot = Sampler(SamplingConfig(temperature=2.0, seed=0)).distribution(logits)
    assert torch.allclose(hot, torch.softmax(logits / 2, -1))


def test_sampling_follows_the_distribution():
    sampler = Sampler(SamplingConfig(temperature=1.0, seed=0))
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    counts = torch.bincount(torch.tensor([sampler.sample(logits) for _ in range(3000)]), minlength=3)
    assert torch.allclose(counts / 3000.0, torch.tensor([0.5, 0.3, 0.2]), atol=0.04)


def test_greedy_picks_the_first_of_tied_maxima_like_argmax():
    greedy = Sampler(SamplingConfig(temperature=0.0))
    logits = torch.zeros(8192)
    logits[[4000, 77, 5000]] = 3.0  # three tied maxima: the lowest id wins, as torch.argmax picks it
    assert greedy.sample(logits) == 77 == int(torch.argmax(logits))
    rows = torch.randn(64, 8192).round()  # many ties among rounded values
    assert [greedy.sample(r) for r in rows] == rows.argmax(-1).tolist()

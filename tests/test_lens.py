"""The lens pass agrees with what a decode computes at the same layer and position."""

import pytest

from adaptive import Runtime
from adaptive.lens import lens

from conftest import make_model, random_prompt


def test_lens_final_layer_matches_full_decode(family):
    rt = Runtime.from_model(make_model(family))
    prompt = random_prompt(6, seed=8)
    res = rt.generate(prompt, max_new_tokens=10)
    report = lens(rt, prompt, res.token_ids, measure="max_prob", top_k=3)
    L = rt.spec.num_layers
    assert len(report.confidence) == L and all(len(row) == 10 for row in report.confidence)
    # greedy: the final layer's top-1 at each column is the generated token itself
    assert [ids[0] for ids in report.top_ids[-1]] == res.token_ids
    assert report.kl_to_final[-1] == pytest.approx([0.0] * 10, abs=1e-6)
    assert all(report.final_matches[-1])


def test_lens_matches_recorded_exit_confidences_with_defer():
    """With defer, the run's K/V are exact, so its recorded confidences equal the lens cells."""
    rt = Runtime.from_model(make_model("llama"))
    prompt = random_prompt(6, seed=2)
    res = rt.generate(prompt, max_new_tokens=12, mode="early_exit", threshold=0.03, kv_policy="defer")
    report = lens(rt, prompt, res.token_ids, measure="max_prob")
    checked = 0
    for n, trace in enumerate(res.traces[1:], start=1):
        for k, conf in trace.layer_confidence.items():
            assert report.confidence[k - 1][n] == pytest.approx(conf, abs=1e-5)
            checked += 1
    assert checked > 0

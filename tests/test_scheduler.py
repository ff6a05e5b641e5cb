"""Prompt gate and runtime scheduler (mode="auto"): labels from real runs, policies, audits, bad input."""

import pytest
import torch

from adaptive.errors import CheckpointError, InvalidRequestError
from adaptive.gating import GATE_FILE, SCALAR_FEATURES, PromptGate, prompt_features
from adaptive.runtime import Runtime
from adaptive.training.train_gate import choose_l2, fit_logistic, mixed_windows, path_agreement

from conftest import make_model, random_prompt


def _runtime(silence_deep_layers: bool = False) -> Runtime:
    model = make_model("llama")
    if silence_deep_layers:
        # Layers after the light path add nothing to the residual stream, so every path's exit head sees
        # the final hidden state: every shallow path must agree with full depth exactly.
        with torch.no_grad():
            for layer in model.model.layers[1:]:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    return Runtime.from_model(model, share_weights=False)


def test_gate_labels_come_from_real_runs():
    rt = _runtime()
    prompt = random_prompt(12, seed=3)
    agreement = path_agreement(rt, prompt, tokens=16)
    assert set(agreement) == {"light", "standard"}
    reference = rt.generate(prompt, max_new_tokens=16, mode="full", stop_at_eos=False).token_ids
    for path, value in agreement.items():
        run = rt.generate(prompt, max_new_tokens=16, mode="full", path=path, follow=reference, stop_at_eos=False)
        assert value == sum(a == b for a, b in zip(run.token_ids, reference)) / 16
    assert min(agreement.values()) < 1.0  # random weights: shallow paths do disagree

    silent = _runtime(silence_deep_layers=True)
    assert path_agreement(silent, prompt, tokens=16) == {"light": 1.0, "standard": 1.0}


def test_gate_fit_learns_a_separable_rule_and_round_trips(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(200, 5)
    y = (x[:, 0] > 0).float()
    w, b = fit_logistic(x, y, l2=0.01)
    assert ((torch.sigmoid(x @ w + b) >= 0.5).float() == y).float().mean() > 0.95
    assert choose_l2(x, y) in (0.01, 0.1, 1.0, 3.0, 10.0, 30.0)

    rt = _runtime()
    d = rt.spec.hidden_size
    features, scalars, macs = prompt_features(rt, random_prompt(10), layers=rt.paths["light"])
    assert features.shape == (2 * d + len(SCALAR_FEATURES),) and set(scalars) == set(SCALAR_FEATURES) and macs > 0
    F = features.numel()
    gate = PromptGate(torch.randn(2, F), torch.zeros(2), torch.zeros(F), torch.ones(F), ["light", "standard"],
                      rt.paths["light"], 0.9, {"note": "test"})
    gate.save(tmp_path / GATE_FILE)
    loaded = PromptGate.load(tmp_path / GATE_FILE, d, rt.paths)
    assert loaded.probabilities(features) == pytest.approx(gate.probabilities(features))
    assert loaded.probabilities(features)["full"] == 1.0
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError):
        PromptGate.load(tmp_path / "broken.safetensors", d, rt.paths)
    with pytest.raises(CheckpointError, match="shapes"):
        PromptGate.load(tmp_path / GATE_FILE, d + 1, rt.paths)


def test_mixed_windows_have_mixed_lengths():
    windows = mixed_windows(list(range(5000)), 200, seed=0)
    lengths = [len(w) for w in windows]
    assert min(lengths) < 16 and max(lengths) > 100


def test_quality_policy_is_lossless_without_a_certificate():
    rt = _runtime()
    prompt = random_prompt(10, seed=1)
    full = rt.generate(prompt, max_new_tokens=24, mode="full")
    auto = rt.generate(prompt, max_new_tokens=24, mode="auto", policy="quality", epsilon=0.01)
    assert auto.token_ids == full.token_ids
    plan = auto.stats["auto"]
    assert plan["chosen"] in ("full", "speculative") and auto.stats["mode"] == "auto"
    assert auto.stats["served_by"] == plan["mode"] and plan["reason"]


def test_load_policy_moves_to_cheaper_paths_as_the_queue_grows():
    rt = _runtime()
    prompt = random_prompt(10, seed=2)
    computes = []
    for queue in (0, 2, 4, 6, 8, 20):
        plan = rt.scheduler.plan(prompt, {"policy": "load", "queue_depth": queue})
        chosen = next(c for c in plan.candidates if c["name"] == plan.chosen)
        computes.append(chosen["compute"])
    assert all(a >= b for a, b in zip(computes, computes[1:]))
    assert computes[-1] < computes[0]
    assert rt.scheduler.plan(prompt, {"policy": "load", "queue_depth": 20}).chosen == "path_light"


def test_budget_and_latency_policies_respect_their_targets():
    rt = _runtime()
    prompt = random_prompt(10, seed=4)
    plan = rt.scheduler.plan(prompt, {"policy": "budget", "budget": 0.5})
    chosen = next(c for c in plan.candidates if c["name"] == plan.chosen)
    assert chosen["compute"] <= 0.5
    fastest = min(plan.candidates, key=lambda c: c["ms_per_token"])
    plan = rt.scheduler.plan(prompt, {"policy": "latency", "latency_ms": 1e-6})
    assert plan.chosen == fastest["name"] and "no candidate" in plan.reason


def test_audits_measure_agreement_and_drive_the_fallback():
    silent = _runtime(silence_deep_layers=True)
    prompt = random_prompt(10, seed=5)
    res = silent.generate(prompt, max_new_tokens=16, mode="auto", policy="budget", budget=0.5, audit_rate=1.0)
    audit = res.stats["auto"]["audit"]
    assert res.stats["auto"]["chosen"].startswith("path_") and audit["tokens"] == 16 and audit["agreement"] == 1.0
    assert res.stats["audit_compute_fraction"] > 0
    costs, n = silent.costs, len(res.token_ids)  # layers over prompt + output, the head on the n predictions
    assert audit["macs"] == costs.prefill_macs(len(prompt) + n - 1) + (n - 1) * costs.head_macs

    rt = _runtime()
    res = rt.generate(prompt, max_new_tokens=16, mode="auto", policy="budget", budget=0.5, audit_rate=1.0)
    # The audit's full-depth pass must agree with a real full-depth decode of the same prefixes.
    ref = rt.generate(prompt, max_new_tokens=16, mode="full", follow=res.token_ids)
    expected = sum(a == b for a, b in zip(ref.token_ids, res.token_ids))
    assert res.stats["auto"]["audit"]["agree"] == expected
    # Enough audited disagreement makes a lossy candidate ineligible under the quality policy.
    name = res.stats["auto"]["chosen"]
    run = rt.scheduler.running[name]
    run.audited_tokens, run.audited_agree = 100, 20
    cands = {c.name: c for c in rt.scheduler.candidates(prompt, None)}
    assert cands[name].agreement == 0.2 and cands[name].basis.startswith("audited")


@pytest.mark.parametrize("knobs, message", [
    ({"policy": "fastest"}, "unknown policy"),
    ({"policy": "latency"}, "latency_ms"),
    ({"policy": "budget", "budget": 1.5}, "budget"),
    ({"epsilon": -0.1}, "epsilon"),
    ({"queue_depth": -1}, "queue_depth"),
    ({"threshold": 0.5}, "unknown option"),
])
def test_bad_auto_knobs_get_clear_errors(knobs, message):
    rt = _runtime()
    with pytest.raises(InvalidRequestError, match=message):
        rt.generate(random_prompt(5), max_new_tokens=4, mode="auto", **knobs)


def test_gate_attribution_is_complete():
    from explain.attribution import explain_gate

    rt = _runtime()
    F = 2 * rt.spec.hidden_size + len(SCALAR_FEATURES)
    torch.manual_seed(1)
    rt.gate = PromptGate(torch.randn(2, F) * 0.1, torch.zeros(2), torch.zeros(F), torch.ones(F),
                         ["light", "standard"], rt.paths["light"], 0.9)
    prompt = random_prompt(9, seed=6)
    res = rt.generate(prompt, max_new_tokens=5, mode="auto")  # every token carries the gate's verdict
    assert all(t.gate == res.stats["auto"]["gate"]["probabilities"] and t.gate["full"] == 1.0 for t in res.traces)
    att = explain_gate(rt, prompt, "light", n_steps=64)
    assert len(att.ig) == 9
    # Completeness: attributions sum to logit(input) - logit(baseline), up to the path integral's error.
    logit = lambda p: torch.logit(torch.tensor(p)).item()
    assert sum(att.ig) == pytest.approx(logit(att.probability) - logit(att.baseline_probability), abs=0.05)
    assert att.probability == pytest.approx(rt.gate.decide(rt, prompt).probabilities["light"], abs=1e-4)
    with pytest.raises(InvalidRequestError):
        explain_gate(rt, prompt, "full")


def test_generate_many_equals_one_by_one_and_serves_cheap_first():
    rt = _runtime()
    prompts = [random_prompt(n, seed=n) for n in (30, 5, 17, 9)]
    many = rt.generate_many(prompts, max_new_tokens=12, mode="full")
    for prompt, res in zip(prompts, many):
        assert res.token_ids == rt.generate(prompt, max_new_tokens=12, mode="full").token_ids
    served = sorted(many, key=lambda r: r.stats["batch"]["served_as"])
    assert [len(r.prompt_ids) for r in served] == [5, 9, 17, 30]  # without a gate: shortest job first
    assert served[0].stats["batch"]["queue_wait_ms"] <= served[-1].stats["batch"]["queue_wait_ms"]
    # The load policy sees the queue shrink as requests are served.
    auto = rt.generate_many(prompts, max_new_tokens=6, mode="auto", policy="load")
    queue = {r.stats["batch"]["served_as"]: r.stats["auto"]["queue_depth"] for r in auto}
    assert [queue[k] for k in sorted(queue)] == [3, 2, 1, 0]
    with pytest.raises(InvalidRequestError):
        rt.generate_many([], max_new_tokens=4)
    with pytest.raises(InvalidRequestError):
        rt.generate_many(prompts + [[]], max_new_tokens=4)  # one bad prompt: refused before any work


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2", "smollm"])
def test_batched_generation_equals_one_by_one(family):
    """Rows of different lengths decoded as one batch (left padding, per-row positions and masks) give
    exactly the tokens each prompt gets alone in mode full; padding never leaks into a row."""
    rt = Runtime.from_model(make_model(family), share_weights=False)
    prompts = [random_prompt(n, seed=n) for n in (14, 3, 9, 20)]
    batch = rt.generate_batch(prompts, max_new_tokens=12, stop_at_eos=False)
    for prompt, res in zip(prompts, batch):
        alone = rt.generate(prompt, max_new_tokens=12, mode="full", stop_at_eos=False)
        assert res.token_ids == alone.token_ids
    stats = batch[0].stats["batch"]
    assert stats["size"] == 4 and stats["pad_slots"] == (20 - 14) + (20 - 3) + (20 - 9)
    assert all(r.stats["compute_fraction"] > 1.0 for r in batch)  # padding is counted as spent work
    with pytest.raises(InvalidRequestError):
        rt.generate_batch([], max_new_tokens=4)


def test_generate_many_batches_groups_of_similar_cost():
    rt = _runtime()
    prompts = [random_prompt(n, seed=n) for n in (30, 5, 17, 9, 6)]
    many = rt.generate_many(prompts, max_new_tokens=8, mode="full", batch_size=2, stop_at_eos=False)
    for prompt, res in zip(prompts, many):
        assert res.token_ids == rt.generate(prompt, max_new_tokens=8, mode="full", stop_at_eos=False).token_ids
    groups = {}
    for r in many:
        groups.setdefault(r.stats["batch"]["queue_wait_ms"], []).append(len(r.prompt_ids))
    assert sorted(sorted(g) for g in groups.values()) == [[5, 6], [9, 17], [30]]  # cheap together, first
    with pytest.raises(InvalidRequestError):
        rt.generate_many(prompts, mode="early_exit", batch_size=2)

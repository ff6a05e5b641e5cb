"""Learned K/V fill (propagate): the file, the runtime's use of it, the fit, and the exact replay."""

import numpy as np
import pytest
import torch

from adaptive import CheckpointError, Runtime
from adaptive.kv_fill import KV_FILL_FILE, KVFill, fill_pairs
from adaptive.training import calibrate_exits as C
from adaptive.training.fit_kv_fill import fit

from conftest import make_model, random_prompt, run_command_on_copy


def projection_fill(rt: Runtime) -> KVFill:
    """A fill file whose maps are the layers' own projections: what propagate does without one."""
    mats, biases = rt.model.kv_projection_stack()
    pairs = fill_pairs(rt.spec.num_layers)
    return KVFill(torch.stack([mats[j] for _, j in pairs]), torch.stack([biases[j] for _, j in pairs]),
                  rt.spec.num_layers)


def saved_llama(directory) -> Runtime:
    make_model("llama").save_pretrained(directory)
    return Runtime.from_pretrained(directory)


EXITING = dict(mode="early_exit", threshold=0.02, exit_layers=(1, 2), kv_policy="propagate", max_new_tokens=12)


def test_projection_maps_in_the_file_decode_exactly_as_without_it(tmp_path):
    plain = saved_llama(tmp_path)
    projection_fill(plain).save(tmp_path / KV_FILL_FILE, plain.spec.hidden_size)
    filled = Runtime.from_pretrained(tmp_path)
    assert filled.model.kv_fill is not None and plain.model.kv_fill is None
    a, b = plain.generate(random_prompt(6), **EXITING), filled.generate(random_prompt(6), **EXITING)
    assert a.stats["kv_fill"] == "layer projections" and b.stats["kv_fill"] == f"learned maps ({KV_FILL_FILE}, {filled.model.kv_fill.digest})"
    assert any(t.kv_fill_layers for t in a.traces)  # tokens did exit and fill
    assert a.token_ids == b.token_ids
    assert b.stats["compute_fraction"] == pytest.approx(a.stats["compute_fraction"], rel=1e-12)  # same MACs


def test_other_maps_change_what_deep_tokens_read_at_the_same_cost(tmp_path):
    rt = saved_llama(tmp_path)
    fill = projection_fill(rt)
    fill.weight = fill.weight + 0.5 * torch.randn(fill.weight.shape, generator=torch.Generator().manual_seed(1))
    follow = list(range(3, 19))
    probe = rt.generate(random_prompt(6), mode="early_exit", threshold=1.0, exit_layers=(1,), max_new_tokens=16,
                        follow=follow)
    knobs = dict(mode="early_exit", exit_layers=(1,), max_new_tokens=16, follow=follow,
                 threshold=float(np.median([t.layer_confidence[1] for t in probe.traces if 1 in t.layer_confidence])))
    a = rt.generate(random_prompt(6), **knobs)
    rt.model.set_kv_fill(fill)
    b = rt.generate(random_prompt(6), **knobs)
    L = rt.spec.num_layers
    assert {t.exit_layer for t in a.traces} == {1, L}
    # deep tokens after an exit read the filled K/V of layers 2..L-1: their greedy choice moves
    free = {k: v for k, v in knobs.items() if k != "follow"}
    rt.model.set_kv_fill(None)
    c = rt.generate(random_prompt(6), **free)
    rt.model.set_kv_fill(fill)
    assert rt.generate(random_prompt(6), **free).token_ids != c.token_ids
    # the cost of a fill does not depend on the maps
    for ta, tb in zip(a.traces, b.traces):
        if ta.exit_layer == tb.exit_layer:
            assert ta.kv_fill_layers == tb.kv_fill_layers and ta.macs == tb.macs


def test_the_least_squares_fill_is_closer_to_the_true_kv_on_held_out_text():
    torch.manual_seed(0)
    rt = Runtime.from_model(make_model("llama"))
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, rt.spec.vocab_size, (1, 48), generator=g) for _ in range(40)]
    fill = fit(rt, windows[4:], windows[:4], progress=False)
    assert set(fill.relative_error) == set(range(1, rt.spec.num_layers - 1))
    assert all(0 < r < 1 for r in fill.relative_error.values()), fill.relative_error


def test_replayed_propagate_with_a_learned_fill_equals_real_decoding(tiny_checkpoint):
    rt = Runtime.from_pretrained(tiny_checkpoint)
    cases = C.sample_prompts(rt, "validation", 3, 20, 30, seed=0)
    C.add_references(rt, cases, 16, progress=False)
    tables, costs, _ = C.build_tables(rt, cases, (0,), progress=False)
    fam = C.Family("max_prob", (1, 2), 0, "propagate")
    thr = float(np.median(tables[0].conf["max_prob"][[1, 2]]))
    without = C.replay_outcome(rt, cases, costs, fam, thr)
    fill = projection_fill(rt)  # maps far from the projections, so that the outcome surely moves
    fill.weight = fill.weight + 0.5 * torch.randn(fill.weight.shape, generator=torch.Generator().manual_seed(2))
    rt.model.set_kv_fill(fill)
    replayed = C.replay_outcome(rt, cases, costs, fam, thr)
    assert replayed == pytest.approx(C.decode_forced(rt, cases, fam.knobs(thr)), rel=1e-9)
    assert replayed != pytest.approx(without, rel=1e-9)  # the replay really read the learned maps


def test_the_refinements_damaged_pass_exits_and_predicts_as_real_decoding(tiny_checkpoint):
    """fit_kv_fill trains through damaged_forward: its exit per position and its final-depth tokens are
    those of real teacher-forced propagate decoding with the same (learned) fill maps and thresholds."""
    from adaptive.training.fit_kv_fill import RefineSetting, damaged_forward
    rt = Runtime.from_pretrained(tiny_checkpoint)
    fill = projection_fill(rt)
    fill.weight = fill.weight + 0.5 * torch.randn(fill.weight.shape, generator=torch.Generator().manual_seed(2))
    rt.model.set_kv_fill(fill)
    L = rt.spec.num_layers
    cases = C.sample_prompts(rt, "validation", 3, 20, 30, seed=0)
    C.add_references(rt, cases, 16, progress=False)
    tables, _, _ = C.build_tables(rt, cases, (0,), progress=False)
    fam = C.Family("max_prob", (1, 2), 0, "propagate")
    thr = float(np.median(tables[0].conf["max_prob"][[1, 2]]))
    exits = set()
    for c in cases:
        P, N = len(c.prompt_ids), len(c.reference)
        setting = RefineSetting(((1, thr), (2, thr)), "max_prob", 0, True, prompt_len=P, jitter=(0.0, 0.0))
        with torch.no_grad():
            logits, exit_layer = damaged_forward(rt, torch.tensor([c.prompt_ids + c.reference]), setting)
        real = rt.generate(c.prompt_ids, N, mode="early_exit", stop_at_eos=False, follow=c.reference,
                           **fam.knobs(thr))
        # real token i is predicted at position P-1+i (token 0 by the prefill, at full depth)
        assert exit_layer[P - 1:P - 1 + N].tolist() == [t.exit_layer for t in real.traces]
        deep = [i for i, t in enumerate(real.traces) if t.exit_layer == L]
        assert [int(logits[P - 1 + i].argmax()) for i in deep] == [real.token_ids[i] for i in deep]
        exits |= set(exit_layer.tolist())
    assert exits == {1, 2, L}  # some positions exited at each point, others ran full depth


def test_a_broken_or_mismatched_fill_file_is_a_clear_error(tmp_path):
    rt = saved_llama(tmp_path)
    path = tmp_path / KV_FILL_FILE
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        Runtime.from_pretrained(tmp_path)
    good = projection_fill(rt)
    KVFill(good.weight[:-1], good.bias[:-1], rt.spec.num_layers).save(path, rt.spec.hidden_size)
    with pytest.raises(CheckpointError, match="do not match"):
        Runtime.from_pretrained(tmp_path)
    bad = projection_fill(rt)
    bad.bias[0, 0] = float("nan")
    bad.save(path, rt.spec.hidden_size)
    with pytest.raises(CheckpointError, match="NaN"):
        Runtime.from_pretrained(tmp_path)
    good.save(path, rt.spec.hidden_size + 1)  # metadata for another model
    with pytest.raises(CheckpointError, match="hidden_size"):
        Runtime.from_pretrained(tmp_path)


def test_fit_kv_fill_command_writes_a_file_the_runtime_loads(tmp_path, tiny_checkpoint):
    model_dir, proc = run_command_on_copy(tmp_path, tiny_checkpoint, "fit-kv-fill", "--windows", "20", "--seq-len", "32",
                                          "--refine-steps", "2", "--refine-batch", "1",
                                          "--refine-run-dir", str(tmp_path / "refine"))
    assert proc.returncode == 0, proc.stderr
    assert "relative to the layer projections" in proc.stdout
    assert "held-out full-depth tokens that the filled K/V flip" in proc.stdout
    assert (tmp_path / "refine" / "refine_state.safetensors").is_file()
    rt = Runtime.from_pretrained(model_dir)
    assert rt.model.kv_fill is not None and rt.model.kv_fill.relative_error


def test_a_certificate_holds_only_for_the_fill_it_was_made_with(tmp_path):
    from adaptive.calibration import CERTIFICATE_FILE, Certificate

    rt = saved_llama(tmp_path)
    knobs = dict(threshold=0.5, measure="max_prob", exit_layers=[1, 2], exit_vocab_size=0, kv_policy="propagate")
    cert = Certificate(epsilon=0.1, delta=0.1, n=10, calibration_set_sha256="0" * 64, observed_risk=0.0, p_value=0.01,
                       tokens_per_prompt=4, **knobs)  # made before learned fills existed: projections
    cert.save(tmp_path / CERTIFICATE_FILE)
    res = Runtime.from_pretrained(tmp_path).generate(random_prompt(5), max_new_tokens=3, mode="early_exit", **knobs)
    assert res.stats["certificate"] is not None
    fill = projection_fill(rt)
    fill.weight = fill.weight * 1.01
    fill.save(tmp_path / KV_FILL_FILE, rt.spec.hidden_size)
    with pytest.warns(UserWarning, match="certificate is ignored"):
        filled = Runtime.from_pretrained(tmp_path)
    assert filled.certificate is None
    assert "early_exit_certified" not in [c.name for c in filled.scheduler.candidates(random_prompt(5), None)]
    cert.kv_fill = filled.kv_fill_source()  # certified with these very maps: in force again
    cert.save(tmp_path / CERTIFICATE_FILE)
    again = Runtime.from_pretrained(tmp_path)
    assert again.generate(random_prompt(5), max_new_tokens=3, mode="early_exit", **knobs).stats["certificate"] is not None
    again.model.set_kv_fill(None)  # other maps at run time: the certificate no longer covers the request
    assert again.generate(random_prompt(5), max_new_tokens=3, mode="early_exit", **knobs).stats["certificate"] is None


def test_the_autograd_cache_stores_and_reads_like_the_shared_one():
    from adaptive.kv_cache import KVCache
    g = torch.Generator().manual_seed(0)
    caches = [KVCache(3, 1, 2, 8, 4), KVCache(3, 1, 2, 8, 4, for_autograd=True)]
    k, v = torch.randn(1, 2, 3, 4, generator=g), torch.randn(1, 2, 3, 4, generator=g)
    k2, v2 = torch.randn(2, 1, 2, 1, 4, generator=g), torch.randn(2, 1, 2, 1, 4, generator=g)
    for cache in caches:
        cache.write(0, 0, k, v)
        cache.write(1, 0, k, v)
        cache.write(2, 0, k, v)
        cache.write_layers(1, 3, k2, v2)  # layers 1 and 2 at position 3
    for layer in range(3):
        end = 4 if layer else 3
        for a, b in zip(caches[0].keys_values(layer, 0, end), caches[1].keys_values(layer, 0, end)):
            assert torch.equal(a, b)
    assert caches[0].fill == caches[1].fill == [3, 4, 4]


def _refine_setup(tmp_path):
    """A tiny random Llama (saved: a refinement is named by its weight files), a stream of random windows,
    and an exit setting under which about half of the positions after the prompt exit after one layer (so
    deeper tokens read filled K/V)."""
    from adaptive.training.fit_kv_fill import RefineSetting
    rt = saved_llama(tmp_path / "tiny")
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, rt.spec.vocab_size, (400,), generator=g)
    with torch.no_grad():
        h = rt.model.run_layers(rt.model.embed(stream[None, :64], 0), 0, 1, 0, rt.model.new_cache(1, 64))
        conf = torch.softmax(rt.heads.logits(h, 1)[0], -1).max(-1).values
    setting = RefineSetting(((1, float(conf.median())),), "max_prob", 0, True, prompt_len=8, jitter=(0.0, 0.0))
    return rt, stream, setting


def test_refining_the_fill_lowers_the_damage_it_was_trained_on(tmp_path):
    from adaptive.training.fit_kv_fill import damage, refine
    rt, stream, setting = _refine_setup(tmp_path)
    stream = stream[:40]  # one window of 40 tokens: refine draws it every time
    fill = projection_fill(rt)
    rt.model.set_kv_fill(fill)
    before, flips, deep = damage(rt, stream[None], setting)
    assert before is not None and deep > 0  # some positions exited and some ran full depth after them
    refined, report = refine(rt, fill, stream, [stream[None]], setting, steps=12, batch=1, lr=3e-3, seq_len=40,
                             run_dir=tmp_path / "run", progress=False)
    rt.model.set_kv_fill(refined)
    with torch.no_grad():
        after, _, _ = damage(rt, stream[None], setting)
    assert float(after) < 0.8 * float(before), (float(before), float(after))
    assert report["train_kl_last"] < report["train_kl_first"]
    assert report["held_out_deep_tokens_before"] == deep and report["held_out_flips_before"] == flips
    # only the maps of layers deeper than the exit point (k = 1) were trained; the file keeps the rest
    untouched = [i for i, (k, _) in enumerate(fill_pairs(rt.spec.num_layers)) if k != 1]
    assert torch.equal(refined.weight[untouched], fill.weight[untouched])


def test_an_interrupted_refinement_resumes_where_it_stopped(tmp_path, capsys):
    import json
    from adaptive.training.fit_kv_fill import refine
    rt, stream, setting = _refine_setup(tmp_path)
    args = dict(held_out=[stream[None, :40]], setting=setting, batch=1, lr=1e-3, seq_len=40, run_dir=tmp_path / "run",
                progress=False, checkpoint_every=1)
    refine(rt, projection_fill(rt), stream, steps=2, **args)
    first = json.loads((tmp_path / "run" / "refine_state.json").read_text())["losses"]
    _, report = refine(rt, projection_fill(rt), stream, steps=4, **args)
    assert "resuming the K/V fill refinement from step 2" in capsys.readouterr().out
    losses = json.loads((tmp_path / "run" / "refine_state.json").read_text())["losses"]
    assert report["steps"] == 4 and len(losses) == 4 and losses[:2] == first

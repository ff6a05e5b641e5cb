"""finalize-model's parts on tiny checkpoints: bits/byte arithmetic, the calibration search, the card."""

import argparse
import itertools
import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from adaptive.runtime import Runtime
from adaptive.training import calibrate_exits as C
from adaptive.training import evaluate as E
from adaptive.training import finalize, model_card


@pytest.fixture
def tiny_rt(tiny_checkpoint):
    return Runtime.from_pretrained(tiny_checkpoint)


# ---- evaluate ---------------------------------------------------------------------------------------
def test_token_bytes_are_exact_even_inside_multibyte_characters(tiny_rt):
    text = "def café(ü):\n    return 'Grüße ✓ 日本'\n"
    ids = tiny_rt.encode(text)
    lengths = E.token_byte_lengths(tiny_rt.tokenizer, tiny_rt.spec.vocab_size)
    # Each non-ASCII character is split into byte tokens here (vocab 300), so decoding tokens one by
    # one would miscount; the byte alphabet gives the exact total.
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert lengths[0] == 0  # <|endoftext|> stands for no source bytes


def test_bits_per_byte_arithmetic():
    assert E.bits_per_byte(10 * math.log(2), 5) == pytest.approx(2.0)


def test_windows_are_evenly_spaced_and_count_target_bytes():
    stream = np.arange(100) % 7
    lengths = np.array([0, 1, 2, 3, 4, 5, 6])
    w = E.select_windows(stream, 3, 9, lengths)
    assert w.starts == [0, 45, 90] and tuple(w.ids.shape) == (3, 10)
    assert w.target_bytes == int(sum(lengths[stream[s + 1:s + 10]].sum() for s in w.starts))


def test_uniform_head_gives_log_vocab_nats_and_hand_checkable_bits_per_byte(tiny_rt):
    """A zero LM head predicts uniformly: every exit costs exactly ln V nats per token."""
    rt = tiny_rt
    rt.model.w.lm_head = torch.zeros_like(rt.model.w.lm_head)
    V = rt.spec.vocab_size
    stream = np.array(rt.encode("import os\nprint('hello world')\n" * 4))
    lengths = E.token_byte_lengths(rt.tokenizer, V)
    w = E.select_windows(stream, 2, 8, lengths)
    ev = E.evaluate_windows(rt, w, batch=1, progress=False)
    assert ev.num_targets == 16 and ev.adapters == "none"
    for row in ev.rows:
        assert row.nats == pytest.approx(math.log(V), rel=1e-5)
        assert row.bits_per_byte == pytest.approx(16 * math.log2(V) / w.target_bytes, rel=1e-5)
        assert row.agreement == 1.0 and row.tuned_nats is None


# ---- calibration ------------------------------------------------------------------------------------
def _synthetic(L=4, N=5):
    """One prompt, N steps, unit costs: each layer 10 MACs, full head 20, shortlisted check 2, K/V fill 1."""
    ref = np.arange(N)
    top1 = np.tile(ref, (L + 1, 1, 1))
    top1[1, 0, 2] = 99  # layer 1 is wrong on step 2; layers 2 and 3 are always right
    conf = np.zeros((L + 1, 1, N))
    conf[1] = 0.9  # confident everywhere at layer 1, including the wrong step
    conf[2] = 0.8
    conf[3] = 0.95
    table = C.SimTable(64, {m: conf for m in (*C.LOGIT_MEASURES, "cosine")}, top1, np.full((L + 1, 1), 2.0))
    layer_macs = np.full((L, 1, N), 10.0)
    costs = C.SimCosts(np.concatenate([np.zeros((1, 1, N)), np.cumsum(layer_macs, 0)]), layer_macs,
                       np.full((1, N), 60.0), kv_fill=1, head_full=20)
    return table, costs


def test_simulated_costs_follow_the_decoders_accounting():
    table, costs = _synthetic()
    res = C.simulate(table, costs, C.Family("max_prob", (2,), 64, "propagate"), np.array([0.5, 0.85]))
    # thr 0.5: steps 1..4 exit after 2 layers: 20 layers + 2 check + 2 K/V fills = 24 MACs; step 0 is the prefill's (60)
    assert res.compute[0] == pytest.approx((60 + 4 * 24) / 300)
    # thr 0.85: nobody exits: 40 layers + 2 check + 20 head = 62 per step
    assert res.compute[1] == pytest.approx((60 + 4 * 62) / 300)
    assert list(res.agreement) == [1.0, 1.0] and res.layers_mean[0] == pytest.approx((4 + 4 * 2) / 5)
    # defer: the skipped layers are never caught up (no later token goes deeper), so layers 2-3 are free
    d = C.simulate(table, costs, C.Family("max_prob", (2,), 64, "defer"), np.array([0.5]))
    assert d.compute[0] == pytest.approx((60 + 4 * 22) / 300)


def test_search_picks_the_cheapest_setting_that_meets_the_target():
    table, costs = _synthetic()
    found, simulated = C.search([table], costs, target=0.99, measures=("max_prob",), kv_policies=("propagate",),
                                progress=False)
    assert simulated > 0
    compute, res, i = found[0]
    # Exiting after layer 1 is cheapest but wrong on step 2 (agreement 0.8); exits at 2 are right.
    assert res.family.exit_layers == (2,) and res.agreement[i] >= 0.99
    assert compute == pytest.approx((60 + 4 * 24) / 300)
    assert all(c >= compute for c, _, _ in found)
    # Relaxing the target lets layer 1 win.
    found, _ = C.search([table], costs, target=0.75, measures=("max_prob",), kv_policies=("propagate",), progress=False)
    assert found[0][1].family.exit_layers == (1,)


def test_simulation_matches_real_decoding_for_defer(tiny_rt):
    """defer keeps exact K/V, so the simulation's exits, agreement and compute equal the decoder's."""
    rt = tiny_rt
    cases = C.sample_prompts(rt, "validation", 2, 20, 30, seed=0)
    C.add_references(rt, cases, 12, progress=False)
    rt.draft_ranking = list(range(rt.spec.vocab_size))
    tables, costs, final_match = C.build_tables(rt, cases, (0, 16, 64), progress=False)
    assert final_match == 1.0
    by_key = C.tables_by_key(tables)
    for fam, thr in [(C.Family("max_prob", (1, 3), 0, "defer"), 0.05), (C.Family("cosine", (2,), 0, "defer"), 0.5),
                     # the vocabulary exit over a shortlist of its own, bigger than the exit checks'
                     (C.Family("max_prob", (2,), 16, "defer", vocab_exit=0.0, vocab_exit_size=64), 0.3)]:
        sim = C.simulate(C.table_of(by_key, fam), costs, fam, np.array([thr]))
        agree, compute, layers = C.decode_forced(rt, cases, fam.knobs(thr))
        assert agree == pytest.approx(sim.agreement[0]) and layers == pytest.approx(sim.layers_mean[0])
        assert compute == pytest.approx(sim.compute[0], rel=1e-9)


def test_replayed_propagate_equals_real_decoding(tiny_rt):
    """The one-pass replay of propagate decoding gives the decoder's tokens, exits and compute, where the
    plain simulation (exact K/V) does not: the replay is a faithful stand-in for decode_forced."""
    rt = tiny_rt
    rt.draft_ranking = list(range(rt.spec.vocab_size))
    L = rt.spec.num_layers
    cases = C.sample_prompts(rt, "validation", 3, 20, 30, seed=0)
    C.add_references(rt, cases, 16, progress=False)
    tables, costs, _ = C.build_tables(rt, cases, (0, 16, 64), progress=False)
    by_key = C.tables_by_key(tables)
    differs = False
    for fam in [C.Family("max_prob", (1, 3), 0, "propagate"), C.Family("margin", (2,), 64, "propagate"),
                C.Family("entropy", (1, 2), 64, "propagate", vocab_exit=0.0),
                C.Family("max_prob", (1, 2), 16, "propagate", vocab_exit=0.0, vocab_exit_size=64),
                C.Family("max_prob", (1, 3), 0, "propagate", offsets=((3, -0.1),))]:
        table = C.table_of(by_key, replace(fam, vocab_exit=0.0) if fam.vocab_exit is not None else fam)
        conf = table.conf[fam.measure][list(fam.exit_layers)]
        thr = float(np.median(conf))  # about half the tokens exit somewhere
        if fam.vocab_exit is not None:
            fam = replace(fam, vocab_exit=float(np.median(table.conf[fam.measure][L])))
        replayed = C.replay_outcome(rt, cases, costs, fam, thr)
        real = C.decode_forced(rt, cases, fam.knobs(thr))
        assert replayed == pytest.approx(real, rel=1e-9), fam
        sim = C.simulate(table, costs, fam, np.array([thr]))
        differs |= (float(sim.agreement[0]), float(sim.compute[0])) != pytest.approx(real[:2], rel=1e-9)
    assert differs  # the random tiny model's K/V approximation changes something the simulation misses
    with pytest.raises(ValueError, match="logit measure"):
        C.replay_propagate(rt, cases, C.Family("cosine", (1,), 0, "propagate"), 0.5)


def test_acceptance_priors_are_what_self_drafting_one_token_a_round_accepts(tiny_rt):
    """The prior of depth d is the drafter's agreement as it runs: drafting one token per round at depth d
    along the same greedy continuations accepts exactly that share of drafts (up to float ties), with a
    shortlist that reference tokens join once produced (none of them is in the frequent tokens here)."""
    rt = tiny_rt
    cases = C.sample_prompts(rt, "validation", 3, 20, 30, seed=0)
    C.add_references(rt, cases, 16, progress=False)
    produced = {t for c in cases for t in c.reference}
    rt.draft_ranking = [t for t in range(rt.spec.vocab_size) if t not in produced]
    priors = C._acceptance_priors(rt, cases, 24)
    assert set(priors) == {str(d) for d in rt.draft_depths}
    joined = 0  # accepted drafts of tokens neither frequent nor in the prompt: draftable only once produced
    for d in rt.draft_depths:
        accepted = drafted = 0
        for c in cases:
            # N + 1 new tokens: the greedy reference plus one; the steps predicting reference[1:] are drafted
            res = rt.generate(c.prompt_ids, len(c.reference) + 1, mode="speculative", stop_at_eos=False,
                              draft_depth=d, draft_length=1, draft_vocab_size=24)
            assert res.token_ids[:-1] == c.reference
            assert [len(r.drafted) for r in res.rounds] == [1] * (len(c.reference) - 1) + [0]
            accepted += sum(r.accepted for r in res.rounds)
            drafted += len(c.reference) - 1
            joined += sum(r.accepted for r in res.rounds if r.drafted and r.drafted[0] not in c.prompt_ids)
        assert abs(priors[str(d)] * drafted - accepted) <= 1, (d, priors[str(d)], accepted / drafted)
    assert joined > 0


def test_calibrate_chooses_a_confirmed_setting_and_merges_defaults(tmp_path, tiny_checkpoint):
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_checkpoint, model_dir)
    (model_dir / "adaptive_defaults.json").write_text(json.dumps({"speculative": {"drafter": "self"}, "other": {"x": 1}}))
    rt = Runtime.from_pretrained(model_dir)
    cal = C.calibrate(rt, target=0.9, num_prompts=2, min_context=20, max_context=30, new_tokens=10,
                      vocab_sizes=(0,), draft_vocab_size=0, families=2, progress=False)
    ok = [m for m in cal.finalists if m.agreement >= cal.target]
    if ok:
        assert cal.meets_target and cal.compute_fraction == min(m.compute_fraction for m in ok)
    assert cal.chosen["threshold"] in cal.neighbour_thresholds
    # whatever found it (replay or decoding), the chosen setting was decoded for real
    assert any(m.method == "decoded" and m.knobs == cal.chosen for m in cal.finalists)
    C.write_defaults(model_dir, cal)
    defaults = json.loads((model_dir / "adaptive_defaults.json").read_text())
    assert defaults["other"] == {"x": 1} and defaults["speculative"]["drafter"] == "self"
    assert defaults["early_exit"] == cal.chosen
    assert set(defaults["speculative"]["acceptance_priors"]) == {"1", "2", "3"}  # the 4-layer model's draft depths
    # the priors alone, refreshed from what the report records: the same prompts, so the same numbers
    assert C.refresh_acceptance_priors(rt, cal.to_dict(), progress=False) == cal.acceptance_priors
    assert defaults["speculative"]["acceptance_priors_vocab_size"] == cal.draft_vocab_size
    C.write_acceptance_priors(model_dir, {"1": 0.25}, 300)
    rewritten = json.loads((model_dir / "adaptive_defaults.json").read_text())
    assert rewritten["speculative"]["acceptance_priors"] == {"1": 0.25}
    assert rewritten["speculative"]["acceptance_priors_vocab_size"] == 300  # the shortlist they were read over
    others = {k: v for k, v in defaults.items() if k != "speculative"}
    assert {k: v for k, v in rewritten.items() if k != "speculative"} == others
    # The runtime accepts what was written.
    rt = Runtime.from_pretrained(model_dir)
    assert rt.generate([1, 2, 3], 4, mode="early_exit").stats["measure"] == cal.chosen["measure"]
    # The margin was measured (two prompts: one standard error each way is wide) unless nothing reached
    # even the provisional goal, when the fixed one stands.
    rule = cal.margin_rule
    if rule:
        assert cal.margin == pytest.approx(C.MARGIN_Z * rule["standard_error"]) and rule["prompts"] == 2
    else:
        assert cal.margin == C.FIXED_MARGIN


def test_prompt_agreements_pool_to_the_replayed_agreement_and_set_the_margin(tiny_rt):
    """The margin is z prompt-level standard errors of agreement at the cheapest threshold whose replayed
    (real) agreement reaches the provisional goal: per-prompt agreements (equal prompt lengths) average to
    the pooled one, and their spread sets the margin."""
    rt = tiny_rt
    rt.draft_ranking = list(range(rt.spec.vocab_size))
    cases = C.sample_prompts(rt, "validation", 4, 20, 30, seed=1)
    C.add_references(rt, cases, 12, progress=False)
    tables, costs, _ = C.build_tables(rt, cases, (0, 64), progress=False)
    by_key = C.tables_by_key(tables)
    fam = C.Family("max_prob", (1, 2), 64, "propagate")
    sim = C.simulate(C.table_of(by_key, fam), costs, fam, C.threshold_grid(by_key[fam.table_key].conf["max_prob"][[1, 2]].ravel()))
    found = [(float(sim.compute[0]), sim, 0)]
    real = [C.replay_outcome(rt, cases, costs, fam, float(t))[0] for t in sim.thresholds]
    goal = float(np.median(real))  # some thresholds reach it in replay, some do not
    margin, rule = C.sampling_margin(rt, cases, found, lambda f, t: C.replay_outcome(rt, cases, costs, f, t), provisional_goal=goal)
    thr = rule["knobs"]["threshold"]
    assert C.replay_outcome(rt, cases, costs, fam, thr)[0] >= goal and rule["method"] == "replayed"
    cheaper = [t for t, a in zip(sim.thresholds, real) if a >= goal and C.replay_outcome(rt, cases, costs, fam, float(t))[1]
               < C.replay_outcome(rt, cases, costs, fam, thr)[1]]
    assert not cheaper  # the cheapest replayed pass (agreement rises with the threshold on this grid)
    per = C.prompt_agreements(C.replay_propagate(rt, cases, fam, thr), fam, thr)
    assert per.shape == (4,) and per.mean() == pytest.approx(rule["agreement"])
    assert margin == pytest.approx(C.MARGIN_Z * per.std(ddof=1) / 2) and rule["knobs"] == fam.knobs(thr)
    assert C.sampling_margin(rt, cases, found, lambda f, t: C.replay_outcome(rt, cases, costs, f, t), provisional_goal=1.01) is None  # nothing reaches it


def test_families_re_read_at_a_stricter_goal_match_a_search_at_that_goal():
    table, costs = _synthetic()
    kw = dict(measures=("max_prob",), kv_policies=("propagate",), progress=False)
    loose, _ = C.search([table], costs, 0.75, **kw)
    strict, _ = C.search([table], costs, 0.99, **kw)
    assert [(c, r.family, i) for c, r, i in C.at_goal(loose, 0.99)] == [(c, r.family, i) for c, r, i in strict]


# ---- model card -------------------------------------------------------------------------------------
def test_function_body_stops_where_the_function_ends():
    text = "\n    x = 1\n\n    return x\n\ndef other():\n    pass\n"
    assert model_card.function_body(text, 0) == "\n    x = 1\n\n    return x"


def test_function_headers_have_docstrings():
    headers = list(itertools.islice(model_card.function_headers("test", seed=0), 2))
    assert len(headers) == 2 and len({h[0] for h in headers}) == 2
    for _, text, indent in headers:
        assert text.lstrip().startswith("def ") and text.rstrip().endswith(('"""', "'''"))
        assert not text.endswith("\n")  # the newline + indentation is one token: left to the model


def _report():
    rows = [E.LayerRow(k, 3.0 - 0.1 * k, 1.5 - 0.05 * k, 0.5 + 0.1 * k, 2.9 - 0.1 * k, 1.4, 0.6 + 0.1 * k) for k in (1, 2, 3, 4)]
    ev = E.Evaluation("test", 2, 8, 16, 40, "adapters (exit_adapters.safetensors)", 1.0, rows)
    knobs = {"threshold": 0.9, "measure": "max_prob", "exit_layers": [2], "exit_vocab_size": 0, "kv_policy": "propagate", "min_layer": 1}
    cal = {"chosen": knobs, "target": 0.99, "agreement": 0.995, "compute_fraction": 0.6, "layers_run_mean": 2.5,
           "meets_target": True, "num_prompts": 2, "context": [20, 30], "new_tokens": 10, "settings_simulated": 100,
           "finalists": [{"knobs": knobs, "sim_agreement": 0.996, "sim_compute": 0.6, "agreement": 0.995,
                          "compute_fraction": 0.6, "layers_run_mean": 2.5, "seconds": 1.0}]}
    row = {"name": "full", "mode": "full", "options": {}, "tokens_per_s": 100.0, "layers_run_mean": 4.0,
           "compute_fraction": 1.0, "agreement": 1.0, "exact_prompts": 1.0}
    dec = {"prompts": 2, "max_new_tokens": 8, "torch_threads": 1, "repeats": 3,
           "rows": [row, {**row, "name": "early_exit@0.9", "mode": "early_exit", "options": {"threshold": 0.9},
                          "tokens_per_s": 120.0, "compute_fraction": 0.6}]}
    comps = [{"source": "test/test_x.py", "prompt": 'def f(x):\n    """Double."""', "completion": "\n    return 2 * x",
              "raw": "\n    return 2 * x\n", "early_exit_same": True}]
    return {"evaluation": ev.to_dict(), "calibration": cal, "decoding": dec, "completions": comps}


def test_model_card_renders_every_section(tmp_path, tiny_checkpoint):
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_checkpoint, model_dir)
    (model_dir / "training_info.json").write_text(json.dumps({"params": 12345, "tokens": 1000, "step": 10}))
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"kind": "start", "args": {"threads": 1}}) + "\n" +
                   json.dumps({"kind": "final", "seconds": 600.0, "tokens": 1000}) + "\n")
    card = model_card.write_card(model_dir, _report(), log).read_text()
    for section in ("## Model", "## Training", "## Corpus and split", "## Exit heads per layer (test split)",
                    "## Early-exit defaults (calibrated)", "## Early-exit decoding on test prompts",
                    "## Greedy completions of test-split function headers", "## Files", "## Reproduce"):
        assert section in card, section
    assert "| 12,345 |" in card and "10.0 min" in card and "```python\ndef f(x):" in card
    assert "| early_exit@0.9 | 0.9 | 4.00 | 0.600 | 1.0000 | 1.00 | 120.0 | 1.20 |" in card
    assert "had not finished" not in card
    cert = {"measure": "max_prob", "exit_layers": [2], "exit_vocab_size": 64, "kv_policy": "propagate", "threshold": 0.875,
            "vocab_exit": 0.25, "epsilon": 0.01, "delta": 0.1, "n": 300, "tokens_per_prompt": 8, "observed_risk": 0.004,
            "p_value": 0.05, "test_tokens": 80, "test_agreement": 1.0}
    card = model_card.write_card(model_dir, {**_report(), "certificate": cert}, log).read_text()
    assert "`propagate`, vocabulary exit at 0.25: threshold **0.875** keeps the expected" in card
    assert "{cert" not in card
    assert "propagate in the loop" not in card and "Training phases" not in card
    # a resume that switched on propagate-in-the-loop training starts a phase at the token it resumed from
    log.write_text(json.dumps({"kind": "start", "tokens": 0, "args": {"threads": 1}}) + "\n" +
                   json.dumps({"kind": "start", "tokens": 500, "args": {"threads": 2, "propagate_exits": [4, 6],
                                                                         "propagate_threshold": [0.5, 0.9]}}) + "\n" +
                   json.dumps({"kind": "final", "seconds": 600.0, "tokens": 1000}) + "\n")
    card = model_card.write_card(model_dir, _report(), log).read_text()
    assert "| 0 – 500 | – | – | off |" in card
    assert "| 500 – 1,000 | – | – | exits after layers [4, 6], thresholds drawn from [0.5, 0.9] |" in card
    assert "resumed 1 times" in card
    # a run started after the export's final record belongs to the next model, not this card
    with log.open("a") as f:
        f.write(json.dumps({"kind": "start", "tokens": 1000, "args": {"threads": 2, "propagate_exits": [3]}}) + "\n")
    card = model_card.write_card(model_dir, _report(), log).read_text()
    assert "resumed 1 times" in card and "exits after layers [4, 6]" in card and "[3]" not in card
    assert "**Held-out check** on" not in card and "*K/V fill* (`propagate`)" not in card
    # a clone has no runs/ folder: the summary finalize keeps in the report renders the same training section
    kept = {**_report(), "training_log": model_card.training_summary(log)}
    json.loads(json.dumps(kept["training_log"]))  # the report is JSON
    section = card.split("## Training")[1].split("## Corpus")[0]
    log.unlink()
    assert model_card.write_card(model_dir, kept, log).read_text().split("## Training")[1].split("## Corpus")[0] == section
    card = model_card.write_card(model_dir, _report(), log).read_text()
    assert "No training log was at hand" in card and "had not finished" not in card and "Training finished" not in card


def test_the_card_names_the_held_out_check_and_the_kv_fill(tmp_path, tiny_checkpoint):
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_checkpoint, model_dir)
    report = _report()
    cal = report["calibration"]
    miss = {**cal["finalists"][0], "knobs": {**cal["chosen"], "threshold": 0.85}, "method": "held-out",
            "sim_agreement": 0.994, "sim_compute": 0.55, "agreement": 0.987, "compute_fraction": 0.56}
    keep = {**cal["finalists"][0], "method": "held-out", "sim_agreement": 0.995, "sim_compute": 0.6,
            "agreement": 0.992, "compute_fraction": 0.61}
    cal.update(holdout_prompts=24, holdout=[miss, keep], holdout_passed=True)
    report["kv_fill"] = {"fitted_on": "1000 positions in 4 windows", "relative_error": {"1": 0.61, "2": 0.7},
                         "refine": {"steps": 20, "batch": 4, "held_out_flips_before": 30, "held_out_deep_tokens_before": 4000,
                                    "held_out_flips_after": 21, "held_out_deep_tokens_after": 3990}}
    cal["misses"] = {"exit after 2": [3, 700], "full depth": [12, 500]}
    cal["finalists"].append({**cal["finalists"][0], "knobs": {**cal["chosen"], "vocab_exit": 0.68, "vocab_exit_size": 2048}})
    card = model_card.write_card(model_dir, report, tmp_path / "log.jsonl").read_text()
    assert ("max_prob [2] at 0.85 (selection 0.9940 at 0.550): 0.9870 at 0.560; max_prob [2] at 0.9 (selection "
            "0.9950 at 0.600): 0.9920 at 0.610. Kept: the last one") in card
    assert "fitted on 1000 positions in 4 windows" in card and "1: 0.61, 2: 0.70" in card
    assert "(20 steps of 4 windows" in card and "went from 30 of 4,000 to 21 of 3,990" in card
    assert "| exit after 2 | 700 | 3 |\n| full depth | 500 | 12 |" in card
    assert "| 0.68 (2048 rows) |" in card  # a vocabulary exit over a shortlist of its own
    cal["holdout_passed"] = False
    assert "None of the 2 checked reached 0.99 held out" in model_card.write_card(model_dir, report, tmp_path / "log.jsonl").read_text()


def test_finalize_runs_its_stages_on_a_tiny_checkpoint(tmp_path, tiny_checkpoint):
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_checkpoint, model_dir)
    parser = argparse.ArgumentParser()
    finalize.add_arguments(parser)
    # the trainer stages (exits, classifier, certify) have their own tests; here: the pipeline around them
    args = parser.parse_args(["--model", str(model_dir), "--skip-draft-vocab", "--skip-datastore", "--skip-exits", "--skip-classifier",
                              "--skip-certify", "--with-kv-fill", "--kv-fill-windows", "6", "--kv-fill-refine-steps", "2",
                              "--kv-fill-run-dir", str(tmp_path / "kv-fill"), "--eval-windows", "2",
                              "--eval-window", "16", "--cal-prompts", "2", "--cal-new-tokens", "8",
                              "--confirm-minutes", "0.1", "--card-prompts", "1", "--card-new-tokens", "4",
                              "--card-repeats", "1", "--log", str(tmp_path / "none.jsonl"),
                              "--gate-prompts", "8", "--gate-tokens", "6", "--gate-run-dir", str(tmp_path / "gate"),
                              "--with-speculative-priors"])
    assert finalize.main(args) == 0
    report = json.loads((model_dir / model_card.REPORT_FILE).read_text())
    # the refresh after calibrate re-reads the same prompts: the same priors, in the defaults and the report
    priors = json.loads((model_dir / "adaptive_defaults.json").read_text())["speculative"]["acceptance_priors"]
    assert set(priors) == {"1", "2", "3"} and priors == report["calibration"]["acceptance_priors"]
    assert "speculative-priors" in report["seconds"]
    assert set(report) >= {"evaluation", "calibration", "decoding", "completions", "seconds", "gate", "kv_fill"}
    assert (model_dir / "kv_fill.safetensors").is_file() and report["kv_fill"]["refine"]["steps"] == 2
    assert (tmp_path / "kv-fill" / "refine_state.json").is_file()
    assert report["gate"]["prompts"] == 8 and (model_dir / "prompt_gate.safetensors").is_file()
    assert json.loads((model_dir / "adaptive_defaults.json").read_text())["early_exit"] == report["calibration"]["chosen"]
    assert "## Early-exit decoding on test prompts" in (model_dir / "README.md").read_text()


def test_refreshing_the_priors_needs_a_calibration(tmp_path, tiny_checkpoint):
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_checkpoint, model_dir)
    parser = argparse.ArgumentParser()
    finalize.add_arguments(parser)
    stages = [f"--skip-{s}" for s in finalize.STAGES if s not in finalize.OPT_IN_STAGES]
    args = parser.parse_args(["--model", str(model_dir), *stages, "--with-speculative-priors",
                              "--log", str(tmp_path / "none.jsonl")])
    with pytest.raises(SystemExit, match="run the calibrate stage first"):
        finalize.main(args)


def test_a_failed_certification_removes_the_old_certificate_and_says_so(tmp_path, tiny_checkpoint):
    """A certificate left by an earlier run belongs to other weights; when this run certifies nothing
    the file goes, the report says None and the card says that nothing was certified."""
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_checkpoint, model_dir)
    stale = model_dir / "calibration_certificate.json"
    stale.write_text("{}")
    report = {k: v for k, v in _report().items() if k != "certificate"}
    report["calibration"]["chosen"] = {"measure": "max_prob", "exit_layers": [1], "exit_vocab_size": 0,
                                       "kv_policy": "propagate"}
    (model_dir / model_card.REPORT_FILE).write_text(json.dumps(report))
    parser = argparse.ArgumentParser()
    finalize.add_arguments(parser)
    stages = [f"--skip-{s}" for s in finalize.STAGES if s != "certify" and s not in finalize.OPT_IN_STAGES]
    # epsilon 1e-6 on 4 prompts: nothing can be certified
    args = parser.parse_args(["--model", str(model_dir), *stages, "--epsilon", "1e-6", "--ltt-prompts", "4",
                              "--ltt-tokens", "4", "--ltt-test-prompts", "1", "--log", str(tmp_path / "none.jsonl")])
    assert finalize.main(args) == 0
    assert not stale.exists()
    assert json.loads((model_dir / model_card.REPORT_FILE).read_text())["certificate"] is None
    assert "None: no threshold of the calibrated setting could be certified" in (model_dir / "README.md").read_text()


def test_simulated_vocabulary_exit_skips_the_full_head_and_emits_the_shortlist_token():
    table, costs = _synthetic()
    L = 4
    table.conf["max_prob"][L] = 0.7
    table.vocab_top1 = np.arange(5)[None].copy()
    table.vocab_top1[0, 3] = 77  # the shortlist misses the reference token on step 3
    never_exit = np.array([0.99])  # no shallow exit: only the vocabulary exit decides
    fam = C.Family("max_prob", (2,), 64, "propagate")
    taken = C.simulate(table, costs, replace(fam, vocab_exit=0.5), never_exit)
    # steps 1..4 run all 40 layer MACs + the layer-2 check (2) + the shortlist at full depth (2), no full head
    assert taken.compute[0] == pytest.approx((60 + 4 * 44) / 300) and taken.agreement[0] == pytest.approx(0.8)
    refused = C.simulate(table, costs, replace(fam, vocab_exit=0.75), never_exit)
    # the check fails, the head's other rows run: 40 + 2 + 2 + (20 - 2), one full head in all
    assert refused.compute[0] == pytest.approx((60 + 4 * 62) / 300) and refused.agreement[0] == 1.0
    assert taken.layers_mean[0] == refused.layers_mean[0] == L
    # a shallow exit takes precedence: at 0.85 layer 3 exits every step, the vocabulary exit never runs
    shallow = C.simulate(table, costs, replace(fam, exit_layers=(3,), vocab_exit=0.5), np.array([0.85]))
    assert shallow.compute[0] == pytest.approx((60 + 4 * (30 + 2 + 1)) / 300)


def test_simulation_matches_real_decoding_with_a_vocabulary_exit(tiny_rt):
    rt = tiny_rt
    rt.draft_ranking = list(range(rt.spec.vocab_size))
    L = rt.spec.num_layers
    cases = C.sample_prompts(rt, "validation", 2, 20, 30, seed=0)
    C.add_references(rt, cases, 12, progress=False)
    tables, costs, _ = C.build_tables(rt, cases, (64,), progress=False)
    for measure in ("max_prob", "margin"):
        conf = tables[0].conf[measure]
        # about half the tokens reach full depth, and about half of those take the vocabulary exit
        fam = C.Family(measure, (1,), 64, "defer", vocab_exit=float(np.median(conf[L])))
        thr = float(np.median(conf[1]))
        sim = C.simulate(tables[0], costs, fam, np.array([thr]))
        agree, compute, layers = C.decode_forced(rt, cases, fam.knobs(thr))
        assert agree == pytest.approx(sim.agreement[0]) and layers == pytest.approx(sim.layers_mean[0])
        assert compute == pytest.approx(sim.compute[0], rel=1e-9)
        without = C.simulate(tables[0], costs, replace(fam, vocab_exit=None), np.array([thr]))
        assert sim.compute[0] < without.compute[0]  # the skipped full heads show in the compute


def test_search_tries_vocabulary_exits_on_shortlist_families():
    table, costs = _synthetic()
    L = 4
    table.conf = {m: c.copy() for m, c in table.conf.items()}
    table.conf["max_prob"][L] = 0.7
    table.vocab_top1 = np.arange(5)[None].copy()
    found, _ = C.search([table], costs, target=0.99, measures=("max_prob",), kv_policies=("propagate",),
                        progress=False)
    best = found[0][1]
    # exits at 2 (24 MACs per step) stay cheapest; the vocabulary exit appears among the candidates
    assert best.family.exit_layers == (2,)
    assert any(res.family.vocab_exit is not None for _, res, _ in found)


def test_a_family_without_vocabulary_exit_does_not_inherit_the_models_default(tiny_rt):
    rt = tiny_rt
    rt.draft_ranking = list(range(rt.spec.vocab_size))
    rt.defaults = {"early_exit": {"measure": "max_prob", "exit_vocab_size": 64, "vocab_exit": 0.0}}
    knobs = C.Family("max_prob", (2,), 64, "propagate").knobs(0.5)
    assert rt.early_exit_config(**knobs).vocab_exit is None
    assert rt.early_exit_config(**C.Family("max_prob", (2,), 64, "propagate", vocab_exit=0.3).knobs(0.5)).vocab_exit == 0.3


def test_a_missed_finalist_is_retried_at_a_stricter_sibling_setting():
    """A vocabulary-exit finalist that falls short in real decoding is retried at the cheapest setting of
    the same family (other threshold, other or no vocabulary exit) the simulation expects to make up for it."""
    fam = C.Family("margin", (4, 6), 512, "propagate")
    thr = np.array([0.2, 0.4, 0.6])

    def result(vocab_exit, agreement, compute):
        return C.SimResult(replace(fam, vocab_exit=vocab_exit), thr, np.array(agreement), np.array(compute),
                           np.full(3, 7.0))

    loose = result(0.1, [0.991, 0.992, 0.993], [0.60, 0.62, 0.64])
    strict = result(0.5, [0.994, 0.996, 0.998], [0.65, 0.68, 0.70])
    plain = result(None, [0.993, 0.997, 0.999], [0.70, 0.74, 0.78])
    found = sorted([(0.60, loose, 0), (0.65, strict, 0), (0.70, plain, 0)], key=lambda x: x[0])
    tried = []

    def decode(knobs):  # the real decoder loses 0.004 on the loose vocabulary exit, nothing elsewhere
        tried.append((knobs["vocab_exit"], knobs["threshold"]))
        sim = {0.1: loose, 0.5: strict, None: plain}[knobs["vocab_exit"]]
        a = float(sim.agreement[list(thr).index(knobs["threshold"])]) - (0.004 if knobs["vocab_exit"] == 0.1 else 0)
        return a, 0.0, 7.0

    measured = C.confirm_finalists(found, decode, goal=0.993, families=1, progress=False)
    # 0.991 - 0.004 = 0.987 real: 0.006 short, so the simulation must promise >= 0.997: the loose exit never
    # does; strict at 0.6 (compute 0.70) does and is cheaper than no vocabulary exit at 0.4 (0.74)
    # then bisects strict's thresholds between the miss (0.2) and the pass (0.6): 0.4 passes too (0.996)
    assert tried == [(0.1, 0.2), (0.5, 0.6), (0.5, 0.4)]
    assert all(m.agreement >= 0.993 for m in measured[1:])


def test_a_retry_that_overshoots_is_bisected_down_to_the_cheapest_passing_threshold():
    """Under propagate the simulation can promise far more than real decoding gives, so the retry jumps
    to a strict threshold; bisection by real decoding then finds the cheapest threshold that passes."""
    fam = C.Family("max_prob", (3, 6), 0, "propagate")
    thr = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    sim = C.SimResult(fam, np.array(thr), np.array([0.994, 0.995, 0.996, 0.997, 0.998, 0.999, 0.9995, 1.0, 1.0]),
                      np.linspace(0.60, 0.92, 9), np.full(9, 6.0))
    real = [0.980, 0.984, 0.987, 0.991, 0.9935, 0.995, 0.996, 0.997, 0.997]
    tried = []

    def decode(knobs):
        j = min(range(9), key=lambda k: abs(thr[k] - knobs["threshold"]))
        tried.append(thr[j])
        return real[j], float(sim.compute[j]), 6.0

    measured = C.confirm_finalists([(0.60, sim, 0)], decode, goal=0.993, families=1, progress=False)
    # 0.1 misses by 0.013, so the retry wants a simulated 1.0: 0.8 (passes, compute 0.84). Bisecting
    # 0.2..0.7 by real decoding: 0.5 passes, 0.3 and then 0.4 miss.
    assert tried == [0.1, 0.8, 0.5, 0.3, 0.4]
    passing = [m for m in measured if m.agreement >= 0.993]
    assert min(m.compute_fraction for m in passing) == float(sim.compute[4])


def test_replay_search_bisects_each_family_to_its_cheapest_passing_threshold():
    """Replays are cheap, so each propagate family's grid is bisected from the simulation's cheapest pass
    up; families that cannot beat a replayed pass on simulated compute are skipped; other policies and
    hidden-state measures are left to real decoding."""
    thr = np.linspace(0.1, 0.9, 9)
    compute = np.linspace(0.60, 0.92, 9)

    def result(fam, sim_agreement):
        return C.SimResult(fam, thr, np.array(sim_agreement), compute, np.full(9, 6.0))

    a = result(C.Family("max_prob", (3, 6), 0, "propagate"), [0.994] + [1.0] * 8)
    b = result(C.Family("margin", (4,), 0, "propagate"), [0.99] * 6 + [1.0] * 3)
    defer = result(C.Family("max_prob", (3, 6), 0, "defer"), [0.994] + [1.0] * 8)
    cosine = result(C.Family("cosine", (3,), 0, "propagate"), [0.994] + [1.0] * 8)
    found = [(0.60, a, 0), (0.60, defer, 0), (0.60, cosine, 0), (0.84, b, 6)]
    real = {"max_prob": [0.980, 0.984, 0.987, 0.991, 0.9935, 0.995, 0.996, 0.997, 0.997]}
    tried = []

    def replay(fam, t):
        j = int(np.argmin(abs(thr - t)))
        tried.append((fam.measure, round(float(thr[j]), 1)))
        return real[fam.measure][j], float(compute[j]), 6.0

    measured, runs = C.replay_search(found, replay, goal=0.993, progress=False)
    # family a: 0.1 misses, 0.9 passes; bisect [0.1, 0.9]: 0.5 passes, 0.3 misses, 0.4 misses
    assert tried == [("max_prob", 0.1), ("max_prob", 0.9), ("max_prob", 0.5), ("max_prob", 0.3),
                     ("max_prob", 0.4)] and runs == 5
    # b's cheapest simulated pass (compute 0.84) is dearer than a's replayed pass (0.76) + 0.01: skipped
    assert [m.knobs["threshold"] for m in measured] == [pytest.approx(0.5)]
    assert measured[0].method == "replayed" and measured[0].compute_fraction == pytest.approx(compute[4])


def test_per_layer_thresholds_lower_the_deepest_exit_first_while_the_replay_passes():
    """refine_offsets: from a family's replayed pass at a shared threshold, each exit point's threshold
    (deepest first) drops to the lowest grid value that still reaches the goal; the result is the
    shallowest point's threshold plus offsets, simulated and replayed with the same offsets."""
    thr = np.round(np.linspace(0.1, 0.9, 9), 2)
    fam = C.Family("max_prob", (3, 6), 0, "propagate")
    res = C.SimResult(fam, thr, np.ones(9), np.linspace(0.6, 0.92, 9), np.full(9, 6.0))
    start = C.Measured(fam.knobs(0.8), 1.0, 0.88, 0.995, 0.88, 6.0, method="replayed")
    seen = []

    def replay(f, t):  # passes iff layer 3 stays >= 0.7 and layer 6 >= 0.4; compute falls with both
        at = {3: t, 6: t + dict(f.offsets).get(6, 0.0)}
        seen.append((round(at[3], 2), round(at[6], 2)))
        ok = at[3] >= 0.7 - 1e-9 and at[6] >= 0.4 - 1e-9
        return (0.995 if ok else 0.98), 0.2 + 0.5 * at[3] + 0.2 * at[6], 6.0

    out, runs = C.refine_offsets([(0.88, res, 7)], [start], replay, lambda f, t: (1.0, 0.5, 6.0), goal=0.993,
                                 progress=False)
    assert runs == len(seen) and seen[0][0] == 0.8  # layer 6 first, layer 3 at the shared 0.8
    best = out[0]
    assert best.knobs["threshold"] == pytest.approx(0.7)
    assert best.knobs["threshold_offsets"] == {"6": pytest.approx(0.4 - 0.7)}
    assert best.compute_fraction == pytest.approx(0.2 + 0.35 + 0.08)


def test_the_card_shows_every_decoded_finalist_and_the_cheapest_replayed_ones():
    decoded = [{"method": "decoded", "compute_fraction": 0.9 - 0.01 * i} for i in range(3)]
    replayed = [{"method": "replayed", "compute_fraction": 0.5 + 0.01 * i} for i in range(20)]
    rows = replayed[10:] + decoded + replayed[:10]
    shown, hidden = model_card._finalist_rows(rows, replayed_shown=4)
    assert hidden == 16 and len(shown) == 7
    assert shown == decoded + replayed[:4]  # original order kept: the decoded rows came first here


def test_the_held_out_check_keeps_the_cheapest_setting_that_also_passes_on_other_prompts():
    def m(thr, agreement, compute):
        return C.Measured({"threshold": thr}, 0.0, 0.0, agreement, compute, 0.0)

    measured = [m(0.7, 0.995, 0.60), m(0.8, 0.996, 0.70), m(0.8, 0.996, 0.70), m(0.9, 0.998, 0.80), m(0.5, 0.97, 0.4)]
    held_out = {0.7: 0.985, 0.8: 0.991, 0.9: 0.999}
    calls = []

    def decode(knobs):
        calls.append(knobs["threshold"])
        return held_out[knobs["threshold"]], 0.5, 4.0

    best, checked, passed = C.holdout_check(measured, measured[0], decode, goal=0.993, target=0.99, progress=False)
    assert passed and best.knobs == {"threshold": 0.8} and calls == [0.7, 0.8]  # cheapest first, each knob once
    assert [c.method for c in checked] == ["held-out"] * 2 and checked[0].sim_agreement == 0.995
    calls.clear()
    best, checked, passed = C.holdout_check(measured, measured[0], decode, goal=0.993, target=0.999, max_checks=2,
                                            progress=False)
    assert not passed and best is measured[0] and calls == [0.7, 0.8]  # none passed: the selection's pick stays


def test_calibrate_with_held_out_prompts_checks_the_choice_on_other_files(tiny_checkpoint):
    rt = Runtime.from_pretrained(tiny_checkpoint)
    cal = C.calibrate(rt, target=0.5, num_prompts=2, min_context=20, max_context=30, new_tokens=8,
                      vocab_sizes=(0,), draft_vocab_size=0, families=2, holdout_prompts=2, progress=False)
    assert cal.holdout_prompts == 2 and cal.holdout and cal.holdout_passed is not None
    assert all(h.method == "held-out" for h in cal.holdout)
    if cal.holdout_passed:
        assert cal.holdout[-1].knobs == cal.chosen and cal.holdout[-1].agreement >= cal.target
    assert any(m.method == "decoded" and m.knobs == cal.chosen for m in cal.finalists)


def test_the_miss_breakdown_splits_disagreements_by_where_the_token_came_from():
    L, P, N = 3, 1, 5
    top1 = np.array([[[0] * N], [[1, 1, 9, 1, 1]], [[2, 2, 2, 9, 2]], [[7, 7, 7, 7, 7]]])  # (L+1, P, N); row L = ref
    conf = {"max_prob": np.zeros((L + 1, P, N))}
    conf["max_prob"][1, 0] = [0, 0.9, 0.9, 0, 0]  # steps 1, 2 exit after 1 layer (step 0 is the prefill's)
    conf["max_prob"][2, 0] = [0, 0, 0, 0.9, 0]  # step 3 after 2
    conf["max_prob"][L, 0] = [0, 0, 0, 0, 0.9]  # step 4 takes the vocabulary exit
    table = C.SimTable(4, conf, top1, np.zeros((L + 1, P)), vocab_top1=np.array([[7, 7, 7, 7, 5]]),
                       reference=np.array([[7, 1, 1, 2, 7]]))
    fam = C.Family("max_prob", (1, 2), 4, "propagate", vocab_exit=0.5)
    rows = C.miss_breakdown(table, fam, 0.5)
    assert rows == {"exit after 1": [1, 2], "exit after 2": [1, 1], "vocabulary exit": [1, 1], "full depth": [0, 1]}
    assert C.Family.of(fam.knobs(0.5)) == fam


def _with_random_adapters(rt, seed: int = 4):
    """Give a tiny runtime exit adapters (as train-exits would), big enough to change exit decisions."""
    from adaptive.exits import ExitHeads

    g = torch.Generator().manual_seed(seed)
    d, L = rt.spec.hidden_size, rt.spec.num_layers
    rt.heads = ExitHeads(rt.model, {k: (0.5 * torch.randn(d, d, generator=g), 0.1 * torch.randn(d, generator=g))
                                    for k in range(1, L)})
    rt.heads.source = "adapters (test)"
    return rt


def test_calibration_tables_and_replay_cover_exits_with_and_without_adapters(tiny_checkpoint):
    """With adapters the search sees each shortlist twice (exit_adapters on / off); both variants replay
    exactly as the decoder runs them, and the lens variant is charged no adapter MACs."""
    rt = _with_random_adapters(Runtime.from_pretrained(tiny_checkpoint))
    rt.draft_ranking = list(range(rt.spec.vocab_size))
    cases = C.sample_prompts(rt, "validation", 2, 20, 30, seed=0)
    C.add_references(rt, cases, 12, progress=False)
    tables, costs, _ = C.build_tables(rt, cases, (0, 64), progress=False)
    by_key = C.tables_by_key(tables)
    assert set(by_key) == {(0, True), (0, False), (64, True), (64, False)}
    check_on, check_off = by_key[(64, True)].check_macs[2, 0], by_key[(64, False)].check_macs[2, 0]
    assert check_on - check_off == rt.costs.adapter_macs
    assert (by_key[(64, True)].conf["max_prob"][1:-1] != by_key[(64, False)].conf["max_prob"][1:-1]).any()
    outcomes = {}
    for adapters in (True, False):
        fam = C.Family("max_prob", (1, 2), 64, "propagate", exit_adapters=adapters)
        thr = float(np.median(by_key[fam.table_key].conf["max_prob"][[1, 2]]))
        assert fam.knobs(thr)["exit_adapters"] is adapters and C.Family.of(fam.knobs(thr)) == fam
        outcomes[adapters] = C.replay_outcome(rt, cases, costs, fam, thr)
        assert outcomes[adapters] == pytest.approx(C.decode_forced(rt, cases, fam.knobs(thr)), rel=1e-9)
        dfam = replace(fam, kv_policy="defer")  # exact K/V: the plain simulation equals decoding too
        sim = C.simulate(C.table_of(by_key, dfam), costs, dfam, np.array([thr]))
        assert C.decode_forced(rt, cases, dfam.knobs(thr)) == pytest.approx(
            (sim.agreement[0], sim.compute[0], sim.layers_mean[0]), rel=1e-9)
    assert outcomes[True] != outcomes[False]
    found, _ = C.search(tables, costs, 0.5, measures=("max_prob",), kv_policies=("propagate",), progress=False)
    assert {res.family.exit_adapters for _, res, _ in found} == {True, False}


def test_training_phases_merge_resumes_with_the_same_recipe():
    def start(tokens, **args):
        return {"kind": "start", "tokens": tokens, "args": {"threads": 2, **args}}

    starts = [start(0), start(100), start(200, exit_total=0.8, beta_kl=0.6),
              start(300, exit_total=0.8, beta_kl=0.6, propagate_exits=[3, 6], propagate_threshold=[0.5, 0.95]),
              start(400, exit_total=0.8, beta_kl=0.6, propagate_exits=[3, 6], propagate_threshold=[0.5, 0.95]),
              start(500, exit_total=0.6, beta_kl=0.5, propagate_exits=[3, 6], propagate_threshold=[0.5, 0.95])]
    phases = model_card.training_phases(starts, 650)
    assert [(p.from_tokens, p.to_tokens) for p in phases] == [(0, 200), (200, 300), (300, 500), (500, 650)]
    assert phases[0].exit_total is None and phases[3].exit_total == 0.6 and phases[2].propagate_exits == [3, 6]
    assert model_card.training_phases([], None) == []

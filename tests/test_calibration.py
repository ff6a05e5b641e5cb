"""Learn-then-Test: the statistics, and recovery of a known threshold on a synthetic score distribution."""

import math
import random

import pytest

from adaptive.calibration import (Certificate, binomial_cdf, hoeffding_bentkus_p_value, learn_then_test)


def test_binomial_cdf_matches_direct_sum():
    n, p = 30, 0.1
    direct = sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(4))
    assert binomial_cdf(3, n, p) == pytest.approx(direct, rel=1e-9)
    assert binomial_cdf(-1, n, p) == 0.0 and binomial_cdf(n, n, p) == 1.0


def test_p_value_behaves():
    # far below epsilon with many samples: tiny p; at or above epsilon: no evidence
    assert hoeffding_bentkus_p_value(0.0, 2000, 0.01) < 1e-6
    assert hoeffding_bentkus_p_value(0.01, 2000, 0.01) > 0.5
    assert hoeffding_bentkus_p_value(0.2, 2000, 0.01) == 1.0
    # more data, smaller p for the same observed risk
    assert hoeffding_bentkus_p_value(0.004, 4000, 0.01) < hoeffding_bentkus_p_value(0.004, 400, 0.01)


def _synthetic(n_prompts, tokens, rng):
    """Token confidences c ~ U(0, 1); exiting is wrong exactly when c < 0.3, so the risk at threshold
    lam is P(lam <= c < 0.3) = max(0, 0.3 - lam): the largest lam with risk <= 0.01 is 0.29."""
    return [[rng.random() for _ in range(tokens)] for _ in range(n_prompts)]


def _losses(prompts, thresholds):
    return [[sum(lam <= c < 0.3 for c in cs) / len(cs) for cs in prompts] for lam in thresholds]


def test_ltt_recovers_the_known_threshold():
    rng = random.Random(0)
    thresholds = [round(0.5 - 0.005 * i, 3) for i in range(100)]  # 0.5 down to 0.005
    prompts = _synthetic(3000, 20, rng)
    res = learn_then_test(thresholds, _losses(prompts, thresholds), epsilon=0.01, delta=0.1)
    assert res.certified
    assert 0.29 <= res.threshold <= 0.30  # valid (never below 0.29) and nearly tight with this much data
    assert all(t["rejected"] for t in res.tested[:-1]) and res.tested[-1]["threshold"] < res.threshold


def test_ltt_is_valid_across_repetitions():
    """The certified risk exceeds epsilon in far fewer than delta of repeated calibrations."""
    thresholds = [round(0.5 - 0.01 * i, 3) for i in range(50)]
    failures = 0
    for seed in range(40):
        prompts = _synthetic(300, 10, random.Random(seed))
        res = learn_then_test(thresholds, _losses(prompts, thresholds), epsilon=0.02, delta=0.1)
        if res.certified and max(0.0, 0.3 - res.threshold) > 0.02:
            failures += 1
    assert failures <= 4


def test_too_little_data_certifies_nothing():
    res = learn_then_test([0.9, 0.5], [[0.0] * 5, [0.0] * 5], epsilon=0.01, delta=0.05)
    assert not res.certified and len(res.tested) == 1


def test_certificate_round_trip_and_coverage(tmp_path):
    cert = Certificate(epsilon=0.01, delta=0.1, n=200, measure="classifier", threshold=0.8, exit_layers=[2, 4],
                       exit_vocab_size=1024, kv_policy="propagate", calibration_set_sha256="ab" * 32,
                       observed_risk=0.002, p_value=0.03, tokens_per_prompt=32)
    cert.save(tmp_path / "c.json")
    back = Certificate.load(tmp_path / "c.json")
    assert back == cert
    settings = {"measure": "classifier", "threshold": 0.8, "exit_layers": [2, 4], "exit_vocab_size": 1024,
                "kv_policy": "propagate", "kv_fill": "layer projections"}
    assert back.covers(settings) and not back.covers({**settings, "threshold": 0.7})
    assert not back.covers({**settings, "kv_fill": "learned maps (kv_fill.safetensors, 0123456789ab)"})


def test_calibrate_cli_writes_a_certificate_the_runtime_reports(tmp_path, tiny_checkpoint):
    import json

    from adaptive import Runtime
    from adaptive.calibration import CERTIFICATE_FILE
    from conftest import run_command_on_copy

    model_dir, proc = run_command_on_copy(
        tmp_path, tiny_checkpoint, "calibrate", "--epsilon", "0.3", "--delta", "0.2", "--prompts", "40", "--tokens", "6",
        "--context", "12", "--test-prompts", "5", "--measure", "max_prob", "--exit-layers", "2", "--write-defaults",
        "--threads", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cert = json.loads((model_dir / CERTIFICATE_FILE).read_text())
    assert cert["n"] == 40 and cert["observed_risk"] <= 0.3 and 0 <= cert["test_agreement"] <= 1
    rt = Runtime.from_pretrained(model_dir)
    res = rt.generate("def main():", max_new_tokens=4, mode="early_exit")  # defaults = the certified setting
    assert res.stats["certificate"]["threshold"] == cert["threshold"]
    other = rt.generate("def main():", max_new_tokens=4, mode="early_exit", threshold=min(1.0, cert["threshold"] + 0.01))
    assert other.stats["certificate"] is None


def test_ltt_counts_the_vocabulary_exit_as_an_exit_point_with_its_own_threshold(tiny_checkpoint):
    """The LTT loss table gets one more row for the vocabulary exit: it passes exactly where the
    shortlist's confidence at full depth reaches vocab_exit, whatever threshold is being tested, and it
    is wrong exactly where the shortlist's argmax is not full depth's token."""
    import numpy as np

    from adaptive import Runtime
    from adaptive.training.ltt_calibrate import exit_table, prompt_losses

    rt = Runtime.from_pretrained(tiny_checkpoint)
    rt.draft_ranking = list(range(rt.spec.vocab_size))
    prompt = rt.encode("def main():\n    return 0\n")
    reference = rt.generate(prompt, max_new_tokens=10, stop_at_eos=False).token_ids
    exit_ids = rt._shortlist(16, prompt)
    base = dict(measure="max_prob", exit_layers=(2,), exit_vocab_size=16)
    confs, agree = exit_table(rt, prompt, reference, rt.early_exit_config(**base), exit_ids)
    assert confs.shape == (1, 10)
    on_confs, on_agree = exit_table(rt, prompt, reference, rt.early_exit_config(**base, vocab_exit=0.0), exit_ids)
    assert on_confs.shape == (2, 10) and (on_confs[1] == 2.0).all()  # vocab_exit 0: always taken
    assert (on_confs[0] == confs[0]).all()
    # nobody exits at layer 2 (threshold above every confidence): the loss is the shortlist's misses
    [loss] = prompt_losses(on_confs, on_agree, [1.0 + 1e-9])
    assert loss == pytest.approx(1.0 - on_agree[1].mean())
    assert on_agree[1].mean() < 1.0 or bool(np.isin(reference, exit_ids.numpy()).all())
    [off] = prompt_losses(confs, agree, [1.0 + 1e-9])
    assert off == 0.0
    # its own, bigger shortlist: the exit row is unchanged, the vocabulary-exit row reads the bigger list
    vocab_ids = rt._shortlist(64, prompt)
    big_confs, big_agree = exit_table(rt, prompt, reference, rt.early_exit_config(**base, vocab_exit=0.0, vocab_exit_size=64),
                                      exit_ids, vocab_ids)
    assert (big_confs[0] == confs[0]).all() and (big_agree[0] == agree[0]).all()
    assert big_agree[1].mean() >= on_agree[1].mean()  # a superset list misses no more tokens
    expect = np.isin(np.array(reference), vocab_ids.numpy())  # argmax of a superset is right iff listed
    assert (big_agree[1] == expect).all()


def test_a_certificate_does_not_cover_another_vocabulary_exit_shortlist():
    cert = Certificate(epsilon=0.01, delta=0.1, n=200, measure="max_prob", threshold=0.8, exit_layers=[2],
                       exit_vocab_size=512, kv_policy="defer", calibration_set_sha256="ab" * 32,
                       observed_risk=0.002, p_value=0.03, tokens_per_prompt=8, vocab_exit=0.9)
    settings = {"measure": "max_prob", "threshold": 0.8, "exit_layers": [2], "exit_vocab_size": 512,
                "kv_policy": "defer", "vocab_exit": 0.9, "vocab_exit_size": 0}
    assert cert.covers(settings) and not cert.covers({**settings, "vocab_exit_size": 2048})


def test_a_certificate_does_not_cover_exits_through_other_heads():
    """exit_adapters changes every exit decision: a certificate made with the adapters is not one for the lens."""
    cert = Certificate(epsilon=0.01, delta=0.1, n=200, measure="max_prob", threshold=0.8, exit_layers=[2],
                       exit_vocab_size=512, kv_policy="defer", calibration_set_sha256="ab" * 32,
                       observed_risk=0.002, p_value=0.03, tokens_per_prompt=8)
    settings = {"measure": "max_prob", "threshold": 0.8, "exit_layers": [2], "exit_vocab_size": 512,
                "kv_policy": "defer", "vocab_exit": None, "vocab_exit_size": 0}
    assert cert.covers(settings) and cert.covers({**settings, "exit_adapters": True})
    assert not cert.covers({**settings, "exit_adapters": False})
    assert cert.knobs()["exit_adapters"] is True

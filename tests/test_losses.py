"""The early-exit training objective: weights, curriculum ramp and the loss it adds to the final CE."""

import pytest
import torch
import torch.nn.functional as F

from adaptive.training.losses import ExitLossConfig, early_exit_loss


def test_exit_weights_sum_to_the_total_and_favour_shallow_exits():
    cfg = ExitLossConfig(num_layers=8, exit_total=0.8)
    w = cfg.final_weights()
    assert sorted(w) == list(range(1, 8)) and sum(w.values()) == pytest.approx(0.8)
    assert all(w[k] > w[k + 1] for k in range(1, 7))
    assert cfg.ramp(0.0) == 0.0 and cfg.ramp(cfg.ramp_frac / 2) == pytest.approx(0.5) and cfg.ramp(0.9) == 1.0


@pytest.mark.parametrize("bad", [dict(exit_total=-0.1), dict(beta_kl=1.5), dict(exits_per_step=8), dict(position_frac=0.0)])
def test_bad_objective_settings_are_refused(bad):
    with pytest.raises(ValueError):
        ExitLossConfig(num_layers=8, **bad)


def test_an_exit_that_equals_the_final_layer_adds_only_its_cross_entropy():
    """With the exit's logits equal to the final layer's, KL is 0 and the exit term is (1 - beta) * CE."""
    torch.manual_seed(0)
    B, T, D, V = 2, 5, 4, 7
    head = torch.nn.Linear(D, V, bias=False)
    h = torch.randn(B, T, D)
    targets = torch.randint(0, V, (B, T))
    cfg = ExitLossConfig(num_layers=4, exits_per_step=1, position_frac=1.0, exit_total=0.6, beta_kl=0.25)
    parts = early_exit_loss(cfg, head, head(h), targets, {2: h}, progress=1.0, gen=torch.Generator().manual_seed(0))
    ce = F.cross_entropy(head(h).reshape(-1, V), targets.reshape(-1))
    assert parts.exit_kl[2] == pytest.approx(0.0, abs=1e-6) and parts.exit_ce[2] == pytest.approx(ce.item(), rel=1e-5)
    scale = len(cfg.exit_layers) / 1  # one sampled exit stands for all three
    expected = ce + cfg.final_weights()[2] * scale * (1 - cfg.beta_kl) * ce
    assert parts.total.item() == pytest.approx(expected.item(), rel=1e-5)
    # before the ramp starts the exits add nothing
    early = early_exit_loss(cfg, head, head(h), targets, {2: h}, progress=0.0, gen=torch.Generator().manual_seed(0))
    assert early.total.item() == pytest.approx(ce.item(), rel=1e-6)

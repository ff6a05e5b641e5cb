"""Early-exit training objective (LayerSkip / CALM-like) over a shared exit head.

loss = CE(final) + ramp(p) * sum_{l in S} w_l * (|E| / |S|) * [(1 - beta) * CE(exit_l) + beta * KL(final || exit_l)]

* Every exit uses the SAME head as the final layer (final RMSNorm + tied lm_head), so the runtime's
  logit-lens exits work without extra weights.
* ``w_l`` are the final exit weights over the exit set E (layers 1..L-1), normalised to sum to
  ``exit_total``. Shallow exits get more weight (linearly, ``shallow_bias``), because the runtime's
  light/standard paths (L/4, L/2) and self-speculative drafts live there, and because a shallow exit
  can only become useful if the lower layers are pushed to produce readable states.
* ``ramp(p)`` rises linearly from 0 to 1 over the first ``ramp_frac`` of training progress, so the
  model first learns a good final layer and exits are phased in (the curriculum).
* Per step only a random subset S of exits (``exits_per_step``) and a random subset of positions
  (``position_frac``) is scored: an 8192 x width head costs about three decoder layers per token, so
  scoring all exits everywhere would halve throughput. ``|E|/|S|`` keeps the expected weight unbiased.
* The KL target is the final layer's distribution, detached (distillation, not a pull on the top).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ExitLossConfig:
    num_layers: int = 8
    exit_total: float = 0.6      # sum of final exit weights relative to the final CE weight 1.0
    shallow_bias: float = 1.0    # weight of exit l ∝ 1 + shallow_bias * (L - l) / L
    beta_kl: float = 0.5         # mix of CE and KL-to-final inside each exit term
    ramp_frac: float = 0.4       # fraction of training over which exit weights ramp 0 -> 1
    exits_per_step: int = 2
    position_frac: float = 0.25
    layer_drop_max: float = 0.1  # layer-drop rate of the last layer; 0 at layer 0, linear in depth

    def __post_init__(self):
        if not 0 < self.exits_per_step <= self.num_layers - 1:
            raise ValueError("exits_per_step must be in 1..num_layers-1")
        if not 0 < self.position_frac <= 1:
            raise ValueError("position_frac must be in (0, 1]")
        if self.exit_total < 0:
            raise ValueError("exit_total must be >= 0")
        if not 0 <= self.beta_kl <= 1:
            raise ValueError("beta_kl must be in [0, 1]")

    @property
    def exit_layers(self) -> list[int]:
        """Exit l reads the residual stream after l layers (1..L-1; L is the final layer)."""
        return list(range(1, self.num_layers))

    def final_weights(self) -> dict[int, float]:
        raw = {l: 1.0 + self.shallow_bias * (self.num_layers - l) / self.num_layers for l in self.exit_layers}
        s = sum(raw.values())
        return {l: self.exit_total * v / s for l, v in raw.items()}

    def ramp(self, progress: float) -> float:
        return 1.0 if self.ramp_frac <= 0 else min(1.0, max(0.0, progress / self.ramp_frac))

    def layer_drop_rate(self, layer_idx: int) -> float:
        return self.layer_drop_max * layer_idx / max(1, self.num_layers - 1)


@dataclass
class LossParts:
    total: torch.Tensor
    final_ce: float
    exit_ce: dict[int, float]
    exit_kl: dict[int, float]


def early_exit_loss(cfg: ExitLossConfig, head, final_logits: torch.Tensor, targets: torch.Tensor,
                    exit_hidden: dict[int, torch.Tensor], progress: float,
                    gen: torch.Generator) -> LossParts:
    """final_logits [B, T, V]; targets [B, T]; exit_hidden {l: [B, T, D]} for the sampled exits."""
    V = final_logits.shape[-1]
    flat_logits = final_logits.reshape(-1, V)            # [B*T, V]
    flat_targets = targets.reshape(-1)                   # [B*T]
    final_ce = F.cross_entropy(flat_logits, flat_targets)
    total = final_ce
    exit_ce, exit_kl = {}, {}
    ramp = cfg.ramp(progress)
    if exit_hidden and ramp > 0:
        n = flat_targets.numel()
        k = max(1, int(n * cfg.position_frac))
        idx = torch.randperm(n, generator=gen)[:k]       # same positions for all exits this step
        with torch.no_grad():
            teacher_logp = F.log_softmax(flat_logits[idx].detach(), dim=-1)  # [k, V]
            teacher_p = teacher_logp.exp()
        weights = cfg.final_weights()
        scale = len(cfg.exit_layers) / len(exit_hidden)
        for l, h in exit_hidden.items():
            hs = h.reshape(-1, h.shape[-1])[idx]         # [k, D]
            logp = F.log_softmax(head(hs), dim=-1)       # [k, V]
            ce = F.nll_loss(logp, flat_targets[idx])
            kl = (teacher_p * (teacher_logp - logp)).sum(-1).mean()
            total = total + ramp * weights[l] * scale * ((1 - cfg.beta_kl) * ce + cfg.beta_kl * kl)
            exit_ce[l], exit_kl[l] = ce.item(), kl.item()
    return LossParts(total, final_ce.item(), exit_ce, exit_kl)

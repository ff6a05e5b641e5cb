"""Early-exit decoding and the two policies that keep skipped layers' K/V consistent.

A token that stops after k layers has no K/V in layers k..L-1 at its position, yet later tokens that go
deeper attend there. Two policies fill those slots before anything reads them:

``propagate`` (CALM's state propagation)
    Right after the exit, compute only the K/V projections of the skipped layers from the exit hidden
    state. Cost per exited token: (L - k) * 2 * d * kv_dim MACs, done in one stacked matmul
    (``LeanModel.propagate_kv``). The filled K/V are an approximation: they are not what the real
    deeper layers would have produced.

``defer`` (FREE / EE-LLM's deferred computation)
    Hold the exited token's hidden state and run it through the deeper layers later, together with the
    next token that goes deeper, as extra positions in the same pass. The K/V are then exact, and each
    deferred position costs a full layer per layer it catches up on, but the catch-up rides along a pass
    that reads the weights anyway, which is what costs time at batch 1.

Invariant that makes ``defer`` simple: a token that runs layer l brings every earlier position up to
layer l too, so "depth" (layers run per position) never increases along the sequence. Hence the
positions still owed to layer l are exactly [fill[l], pos), contiguous, and ``pending[p]`` only needs
the hidden state of p at the input of its first missing layer.
"""

from __future__ import annotations

import torch

from .config import EarlyExitConfig
from .costs import CostModel
from .decoding import Decoder, StepOutcome
from .exits import ExitHeads, ShortlistHead, make_measure
from .model import LeanModel


class EarlyExitDecoder(Decoder):
    def __init__(self, model: LeanModel, costs: CostModel, max_len: int, heads: ExitHeads,
                 config: EarlyExitConfig, exit_ids: torch.Tensor | None = None, classifier=None,
                 vocab_ids: torch.Tensor | None = None):
        super().__init__(model, costs, max_len)
        self.heads = heads
        self.exit_head = ShortlistHead(heads, exit_ids)  # what exit checks and early exits read
        # what the vocabulary exit reads: its own shortlist (vocab_exit_size), else the exit shortlist
        self.vocab_head = ShortlistHead(heads, vocab_ids) if vocab_ids is not None else self.exit_head
        self.config = config
        self.exit_points = config.exit_points(model.spec.num_layers)
        self.thresholds = {k: config.threshold_at(k) for k in self.exit_points}  # per exit point
        self.measure = make_measure(config.measure, config.patience, classifier)
        if hasattr(self.measure, "bind"):  # the attention gate reads this decoder's cache
            self.measure.bind(model, self.cache)
        # Hidden state of each pending position at the input of its first missing layer (defer only).
        self.pending = (torch.zeros(1, max_len, model.spec.hidden_size, dtype=model.dtype, device=model.device)
                        if config.kv_policy == "defer" else None)
        self._frame = None  # RoPE rows of the current position, shared by the step's layers (propagate)

    def _run_layer(self, layer: int, x: torch.Tensor, x_start: int) -> tuple[torch.Tensor, int, int, int]:
        """Layer ``layer`` on x (1, T, d) of positions [x_start, x_start+T), first joining any positions
        the layer still owes (defer). Returns (output, its start, MACs spent, positions caught up)."""
        if self.pending is None:  # propagate: always this token alone, one frame for the whole step
            if self._frame is None or self._frame.pos != x_start:
                self._frame = self.model.frame(x_start, 1)
            return self.model.layer(layer, x, x_start, self.cache, self._frame), x_start, \
                self.costs.layer_macs(layer, x_start), 0
        owed_from = self.cache.fill[layer]
        caught_up = 0
        if owed_from < x_start:
            x = torch.cat((self.pending[:, owed_from:x_start], x), dim=1)  # (1, T + caught_up, d)
            caught_up = x_start - owed_from
            x_start = owed_from
        out = self.model.layer(layer, x, x_start, self.cache)
        macs = self.costs.positions_macs(layer, layer + 1, x_start, x.shape[1])
        return out, x_start, macs, caught_up

    def _check(self, h: torch.Tensor, prev: torch.Tensor, k: int, outcome: StepOutcome,
               head: ShortlistHead | None = None) -> tuple[torch.Tensor | None, float, int]:
        """The measure on h (1, 1, d) after k layers through ``head`` (default: the exit head): (its logits
        or None, confidence, MACs spent). Records the confidence (and the head's top-1, when read) in ``outcome``."""
        head = head or self.exit_head
        logits, macs = None, self.measure.check_macs
        if self.measure.needs_logits:
            logits = head.logits(h, k)
            macs += head.macs(k, self.costs.hidden_size, self.costs.adapter_macs)
            outcome.layer_top1[k] = head.token(int(torch.argmax(logits)))
        conf = float(self.measure.score(logits, h, prev, layer=k).reshape(()))
        outcome.layer_confidence[k] = conf
        return logits, conf, macs

    def step(self, token_id: int) -> StepOutcome:
        model, costs, cfg = self.model, self.costs, self.config
        L, pos = model.spec.num_layers, self.pos
        ids = torch.tensor([[token_id]], device=model.device)
        x, x_start = model.embed(ids, pos), pos  # x: (1, T, d) for positions [x_start, pos]
        self.measure.reset()
        outcome = StepOutcome(logits=None, exit_layer=L, full_macs=costs.full_token_macs(pos))
        layer_macs = catch_up_macs = head_macs = 0
        logits = None
        for layer in range(L):
            prev = x[:, -1:]
            x, x_start, macs, caught_up = self._run_layer(layer, x, x_start)
            layer_macs += macs
            if caught_up:
                # The caught-up positions' share of this pass is bookkeeping for earlier tokens.
                catch_up_macs += costs.positions_macs(layer, layer + 1, x_start, caught_up)
                outcome.deferred_positions = max(outcome.deferred_positions, x.shape[1] - 1)
            k = layer + 1
            if k not in self.exit_points:
                continue
            h = x[:, -1:]  # (1, 1, d): the current token
            logits, conf, macs = self._check(h, prev, k, outcome)
            head_macs += macs
            if conf >= self.thresholds[k]:
                outcome.exit_layer, outcome.confidence = k, conf
                break
        h = x[:, -1:]
        k = outcome.exit_layer
        vocab_checked = k == L and cfg.vocab_exit is not None and self.vocab_head.ids is not None
        if vocab_checked:
            # Vocabulary exit: read the shortlist first; the rest of the head runs only if it is not confident.
            logits, conf, macs = self._check(h, prev, L, outcome, self.vocab_head)
            head_macs += macs
            if conf >= cfg.vocab_exit:
                outcome.full_head_skipped, outcome.confidence = True, conf
        if k < L or outcome.full_head_skipped:
            if logits is None:  # hidden-state measures decide without the head: evaluate it once now
                logits = self.exit_head.logits(h, k)
                head_macs += self.exit_head.macs(k, costs.hidden_size, costs.adapter_macs)
            logits = (self.vocab_head if outcome.full_head_skipped else self.exit_head).full_logits(logits)
            if k < L and self.pending is None:  # (a vocabulary exit ran every layer: nothing to fill)
                model.propagate_kv(h, k, pos, self.cache)
                outcome.kv_fill_layers = L - k
                catch_up_macs += (L - k) * costs.kv_fill_macs
                layer_macs += (L - k) * costs.kv_fill_macs
            elif k < L:
                self.pending[:, x_start:pos + 1] = x  # hidden states at the input of layer k
        elif vocab_checked and logits is not None:  # the shortlist's rows are paid for: compute only the others
            logits = self.vocab_head.complete(h, logits)
            head_macs += self.vocab_head.rest_macs(costs.hidden_size)
        else:
            logits = model.head(h)[0, 0]
            head_macs += costs.head_macs
        outcome.logits = logits
        outcome.macs = layer_macs + head_macs
        self.pos = pos + 1
        t = self.totals
        t.layer_macs += layer_macs - catch_up_macs
        t.kv_fill_macs += catch_up_macs
        t.head_macs += head_macs
        t.add(outcome)
        return outcome

    def flush(self) -> int:
        """Run every deferred position through its missing layers so the cache is complete up to pos.

        Not needed for the output (nothing attends to those slots yet); used to continue a sequence and
        by tests. Returns the MACs spent, which are also added to the totals.
        """
        if self.pending is None:
            return 0
        spent = 0
        x, x_start = None, self.pos
        for layer in range(self.model.spec.num_layers):
            owed_from = self.cache.fill[layer]
            if x is None:
                if owed_from >= self.pos:
                    continue
                x, x_start = self.pending[:, owed_from:self.pos], owed_from
                out = self.model.layer(layer, x, x_start, self.cache)
                macs = self.costs.positions_macs(layer, layer + 1, x_start, self.pos - x_start)
            else:
                out, x_start, macs, _ = self._run_layer(layer, x, x_start)
            x = out
            spent += macs
        self.totals.kv_fill_macs += spent
        return spent

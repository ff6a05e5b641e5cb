"""The runtime scheduler behind ``mode="auto"``: the user states a goal, the scheduler picks the plan.

Candidates are concrete settings of the other modes, each with three predictions:

* **agreement** with full depth (share of tokens): 1 for the lossless ones (full, speculative); the
  certified 1 - ε for the Learn-then-Test setting; for the shallow paths the prompt gate's verdict
  (``tau`` when the gate is confident the path agrees, the path's mean agreement otherwise); a prior
  for uncertified early exit. Once a candidate has been audited (below), the audited agreement
  replaces the prediction when it is lower.
* **ms per token**: the host's measured per-layer and head costs at start-up give the prior; every
  finished request updates a running mean of the measured ms/token of the candidate it used.
* **compute fraction**: the same, from the requests' honest compute fractions.

Policies: ``quality`` (the fastest candidate predicted to keep agreement >= 1 - epsilon), ``latency``
(the most faithful candidate predicted under ``latency_ms`` per token, else the fastest), ``budget``
(the most faithful candidate under ``budget`` compute fraction, else the cheapest) and ``load`` (the
quality choice when nobody waits; one rung cheaper on the ladder quality -> certified early exit ->
standard -> light for every ``load_step`` requests waiting in the queue).

Online audits: after a request served by a lossy candidate, with probability ``audit_rate`` the whole
generated sequence is re-run at full depth in one teacher-forced pass (every position sees the same
prefix it was decoded with) and the share of tokens where full depth picks the same token is added to
that candidate's audit record. When the audited agreement of a candidate falls below the quality
target it stops being eligible (the scheduler falls back to deeper candidates) until audits recover.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .errors import InvalidRequestError

POLICIES = ("quality", "latency", "budget", "load")
AUTO_KNOBS = ("policy", "epsilon", "latency_ms", "budget", "queue_depth", "audit_rate", "load_step", "gate_confidence")
UNCERTIFIED_EARLY_EXIT_PRIOR = 0.98  # agreement assumed for an early-exit setting without a certificate
MIN_AUDITED_TOKENS = 64  # audits start to count once this many tokens have been checked


@dataclass
class Candidate:
    name: str
    mode: str
    options: dict[str, Any]
    agreement: float
    ms_per_token: float
    compute: float
    basis: str  # where the agreement prediction comes from

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Plan:
    """The scheduler's decision for one request and why; lands in the result's stats under "auto"."""

    policy: str
    chosen: str
    mode: str
    options: dict[str, Any]
    reason: str
    target: dict[str, float]
    queue_depth: int
    candidates: list[dict] = field(default_factory=list)
    gate: dict | None = None
    audited: bool = False
    audit: dict | None = None
    plan_ms: float = 0.0
    state: dict = field(default_factory=dict)  # the scheduler's running record when it decided

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Running:
    """Running means of what finished requests measured for one candidate."""

    requests: int = 0
    ms_per_token: float = 0.0
    compute: float = 0.0
    audited_tokens: int = 0
    audited_agree: int = 0

    def add(self, ms_per_token: float, compute: float) -> None:
        self.requests += 1
        self.ms_per_token += (ms_per_token - self.ms_per_token) / self.requests
        self.compute += (compute - self.compute) / self.requests

    @property
    def audited_agreement(self) -> float | None:
        return self.audited_agree / self.audited_tokens if self.audited_tokens >= MIN_AUDITED_TOKENS else None


def _typical_position(prompt_len: int) -> int:
    """Where a request's per-token costs are priced before it runs: a little past the prompt."""
    return prompt_len + 32


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_knobs(knobs: dict[str, Any]) -> dict[str, Any]:
    policy = knobs.get("policy", "quality")
    if policy not in POLICIES:
        raise InvalidRequestError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    out = {"policy": policy, "epsilon": knobs.get("epsilon", 0.01), "latency_ms": knobs.get("latency_ms"),
           "budget": knobs.get("budget"), "queue_depth": knobs.get("queue_depth", 0),
           "audit_rate": knobs.get("audit_rate", 0.1), "load_step": knobs.get("load_step", 2),
           "gate_confidence": knobs.get("gate_confidence", 0.9)}
    for name, lo, hi in (("epsilon", 0.0, 1.0), ("audit_rate", 0.0, 1.0), ("gate_confidence", 0.0, 1.0)):
        v = out[name]
        if not _is_number(v) or not lo <= v <= hi:
            raise InvalidRequestError(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
    for name in ("queue_depth", "load_step"):
        v = out[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "queue_depth" else 1):
            raise InvalidRequestError(f"{name} must be an integer >= {0 if name == 'queue_depth' else 1}, got {v!r}")
    if policy == "latency" and (not _is_number(out["latency_ms"]) or out["latency_ms"] <= 0):
        raise InvalidRequestError(f"policy='latency' needs latency_ms > 0 (ms per token), got {out['latency_ms']!r}")
    if policy == "budget" and (not _is_number(out["budget"]) or not 0 < out["budget"] <= 1):
        raise InvalidRequestError(f"policy='budget' needs budget in (0, 1] (compute fraction), got {out['budget']!r}")
    return out


class Scheduler:
    def __init__(self, runtime, seed: int = 0):
        self.rt = runtime
        self.lock = threading.Lock()
        self.running: dict[str, Running] = {}
        self.rng = random.Random(seed)  # audit sampling

    # ---- candidates ------------------------------------------------------------------------------
    def candidates(self, prompt_ids: list[int], gate_decision) -> list[Candidate]:
        rt = self.rt
        host = rt.host_costs()
        full_ms = host.full_step()
        out = [Candidate("full", "full", {}, 1.0, full_ms, 1.0, "exact"),
               # prompt lookup drafts cost nothing and fall back to self drafting: lossless either way
               Candidate("speculative", "speculative", {"drafter": "lookup"}, 1.0, full_ms / 1.3, 1.05, "lossless")]
        cert = rt.certificate
        if cert is not None:
            out.append(Candidate("early_exit_certified", "early_exit", cert.knobs(), 1.0 - cert.epsilon, full_ms * 0.8, 0.8,
                                 f"Learn-then-Test certificate (eps {cert.epsilon}, delta {cert.delta})"))
        if rt.defaults.get("early_exit"):
            out.append(Candidate("early_exit", "early_exit", {}, UNCERTIFIED_EARLY_EXIT_PRIOR, full_ms * 0.75, 0.7,
                                 "calibrated default, no certificate: prior"))
        for name, depth in sorted(rt.paths.items(), key=lambda kv: kv[1]):
            if name == "full":
                continue
            cost = self._path_compute(depth, len(prompt_ids))
            if gate_decision is not None and name in gate_decision.probabilities:
                p = gate_decision.probabilities[name]
                report = rt.gate.report.get("paths", {}).get(name, {})
                agree = rt.gate.tau if p >= gate_decision.confidence else report.get("mean_agreement", 0.5)
                basis = f"prompt gate: P(agreement >= {rt.gate.tau}) = {p:.2f}"
            else:
                agree, basis = 0.5, "no gate: prior"
            out.append(Candidate(f"path_{name}", "full", {"path": name}, agree, full_ms * cost, cost, basis))
        # measured running means and audits replace the priors
        for c in out:
            run = self.running.get(c.name)
            if run and run.requests:
                c.ms_per_token, c.compute = run.ms_per_token, run.compute
            audited = run.audited_agreement if run else None
            if audited is not None and audited < c.agreement:
                c.agreement, c.basis = audited, f"audited: {run.audited_agree}/{run.audited_tokens} tokens agree"
        return out

    def _path_compute(self, depth: int, prompt_len: int) -> float:
        """Compute fraction of a fixed path from the MAC ledger, at a typical position of the request:
        the layers run, the exit head (with its adapter) and the skipped layers' K/V filling."""
        costs, L = self.rt.costs, self.rt.spec.num_layers
        pos = _typical_position(prompt_len)
        macs = costs.layers_macs(0, depth, pos) + costs.head_macs + (L - depth) * costs.kv_fill_macs
        if self.rt.heads.has_adapter(depth):
            macs += costs.adapter_macs
        return macs / costs.full_token_macs(pos)

    # ---- decisions -------------------------------------------------------------------------------
    def plan(self, prompt_ids: list[int], knobs: dict[str, Any], max_new_tokens: int = 64) -> Plan:
        start = time.perf_counter()
        knobs = validate_knobs(knobs)
        gate = None
        if self.rt.gate is not None:
            gate = self.rt.gate.decide(self.rt, prompt_ids, knobs["gate_confidence"])
        cands = self.candidates(prompt_ids, gate)
        if gate is not None:  # the gate's own pass is paid whatever is chosen: spread over the request
            share = gate.feature_macs / (max_new_tokens * self.rt.costs.full_token_macs(_typical_position(len(prompt_ids))))
            for c in cands:
                c.compute += share
        policy, target = knobs["policy"], 1.0 - knobs["epsilon"]
        by_speed = sorted(cands, key=lambda c: c.ms_per_token)
        faithful = sorted(cands, key=lambda c: (-c.agreement, c.ms_per_token))
        quality_ok = [c for c in by_speed if c.agreement >= target]
        if policy == "quality" or (policy == "load" and knobs["queue_depth"] < knobs["load_step"]):
            pick = quality_ok[0]
            reason = (f"fastest candidate predicted to keep agreement >= {target:.3f} "
                      f"({pick.agreement:.3f}, {pick.basis}; {pick.ms_per_token:.2f} ms/token predicted)")
            if policy == "load":
                reason = f"queue {knobs['queue_depth']} < {knobs['load_step']}: " + reason
        elif policy == "latency":
            ok = [c for c in faithful if c.ms_per_token <= knobs["latency_ms"]]
            pick = ok[0] if ok else by_speed[0]
            reason = (f"most faithful candidate predicted under {knobs['latency_ms']} ms/token" if ok else
                      f"no candidate is predicted under {knobs['latency_ms']} ms/token: the fastest") + \
                f" ({pick.ms_per_token:.2f} ms/token, agreement {pick.agreement:.3f})"
        elif policy == "budget":
            ok = [c for c in faithful if c.compute <= knobs["budget"]]
            pick = ok[0] if ok else min(cands, key=lambda c: c.compute)
            reason = (f"most faithful candidate within compute fraction {knobs['budget']}" if ok else
                      f"no candidate fits compute fraction {knobs['budget']}: the cheapest") + \
                f" ({pick.compute:.2f} compute, agreement {pick.agreement:.3f})"
        else:  # load, with a queue: step down the ladder of cheaper candidates
            ladder = [quality_ok[0]] + [c for c in cands if c.name in
                                        ("early_exit_certified", "path_standard", "path_light")]
            ladder = sorted({c.name: c for c in ladder}.values(), key=lambda c: -c.compute)
            rung = min(len(ladder) - 1, knobs["queue_depth"] // knobs["load_step"])
            pick = ladder[rung]
            reason = (f"queue {knobs['queue_depth']}: rung {rung} of {len(ladder) - 1} on the load ladder "
                      f"({' > '.join(c.name for c in ladder)})")
        return Plan(policy=policy, chosen=pick.name, mode=pick.mode, options=dict(pick.options), reason=reason,
                    target={"agreement": target, "latency_ms": knobs["latency_ms"], "budget": knobs["budget"]},
                    queue_depth=knobs["queue_depth"], candidates=[c.to_dict() for c in cands],
                    gate=gate.to_dict() if gate else None, plan_ms=(time.perf_counter() - start) * 1000,
                    state=self.state(),
                    audited=self.rng.random() < knobs["audit_rate"] and pick.agreement < 1.0)

    def state(self) -> dict:
        """Running record per candidate: requests served, measured ms/token and compute, audits."""
        with self.lock:
            return {name: {**asdict(run), "audited_agreement": run.audited_agreement}
                    for name, run in self.running.items()}

    # ---- feedback --------------------------------------------------------------------------------
    def observe(self, plan: Plan, result) -> None:
        """Record a finished request's measured cost, and run its audit if it was drawn for one."""
        with self.lock:
            run = self.running.setdefault(plan.chosen, Running())
            run.add(result.stats["ms_per_token"], result.stats["compute_fraction"])
        if plan.audited and result.token_ids:
            agree, total, ms, macs = self.audit(result)
            with self.lock:
                run.audited_agree += agree
                run.audited_tokens += total
            plan.audit = {"tokens": total, "agree": agree, "agreement": agree / total, "ms": ms, "macs": macs,
                          "running_agreement": run.audited_agree / run.audited_tokens,
                          "running_tokens": run.audited_tokens}

    @torch.inference_mode()
    def audit(self, result) -> tuple[int, int, float, int]:
        """(agreeing tokens, tokens, ms, MACs) of one teacher-forced full-depth pass over the request."""
        start = time.perf_counter()
        model, L = self.rt.model, self.rt.spec.num_layers
        seq = list(result.prompt_ids) + list(result.token_ids[:-1])  # each position predicts the next token
        ids = torch.tensor([seq], device=model.device)
        cache = model.new_cache(1, len(seq))
        h = model.run_layers(model.embed(ids, 0), 0, L, 0, cache)[0, len(result.prompt_ids) - 1:]  # (n, d)
        full_pick = model.head(h).argmax(-1).tolist()
        agree = sum(a == b for a, b in zip(full_pick, result.token_ids))
        # every layer at every position, the LM head only where a generated token is predicted
        macs = self.rt.costs.prefill_macs(len(seq)) + (len(result.token_ids) - 1) * self.rt.costs.head_macs
        return agree, len(result.token_ids), (time.perf_counter() - start) * 1000, macs

"""How fast self-speculation could be on this host, from the step costs a run measured.

A round at draft depth d that drafts k tokens costs k draft steps plus one verification of k positions;
at best (every draft accepted) it emits k tokens, where plain decoding would have taken k full steps.
So even a perfect drafter is bounded by

    ceiling(d) = max_k  k * full_ms / (k * draft_ms(d) + verify_ms(d, k))

and with the acceptance alpha the run measured, E[tokens per round] = sum_{j<k} alpha^j replaces k
(the rule ``SpeculationController`` plans by). Every input is a wall time the run recorded (each
round's own ``draft_ms`` / ``verify_ms`` and the full row's ms per token), nothing is estimated from
FLOPs: at batch 1 on a CPU a shallow draft step costs more than its share of layers (per-operation
overhead), and this bound shows how much that leaves to gain before any acceptance is lost.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from .speculative import expected_tokens

MIN_ROUNDS = 3  # rounds of one (depth, length) before their median verify time is trusted


@dataclass
class DepthCeiling:
    depth: int
    rounds: int  # drafted rounds at this depth
    draft_ms_per_token: float  # all of the depth's draft time / all its drafted tokens
    passes_per_token: float  # draft passes / drafted tokens (below 1 where passes checked context guesses)
    length: int  # the draft length k that gives the best ceiling
    verify_ms: float  # median verify time of the depth's rounds that drafted k tokens
    acceptance: float  # judged drafts accepted (drafts after a round's first rejection are never judged)
    ceiling: float  # x full's tokens/s if every draft were accepted
    at_measured_acceptance: float  # x full's tokens/s at the measured acceptance (its own best k), same costs


def depth_ceilings(rounds, full_ms_per_token: float) -> list[DepthCeiling]:
    """Per draft depth of the model's own shallow path ("self" rounds), from measured ``SpecRound``s."""
    by_depth: dict[int, list] = {}
    for r in rounds:
        if r.drafter == "self" and r.drafted:
            by_depth.setdefault(r.depth, []).append(r)
    out = []
    for depth, rs in sorted(by_depth.items()):
        drafted = sum(len(r.drafted) for r in rs)
        draft_ms = sum(r.draft_ms for r in rs) / drafted
        judged = sum(r.judged for r in rs)
        alpha = sum(r.accepted for r in rs) / judged
        verify_by_length: dict[int, list[float]] = {}
        for r in rs:
            verify_by_length.setdefault(len(r.drafted), []).append(r.verify_ms)
        candidates = [(k, statistics.median(v)) for k, v in verify_by_length.items() if len(v) >= MIN_ROUNDS]
        if not candidates:
            continue  # too few rounds of any one length to say what a verification costs
        def speedup(tokens: float, k: int, verify: float) -> float:
            return tokens * full_ms_per_token / (k * draft_ms + verify)

        k, verify = max(candidates, key=lambda kv: speedup(kv[0], *kv))
        out.append(DepthCeiling(depth=depth, rounds=len(rs), draft_ms_per_token=draft_ms,
                                passes_per_token=sum(r.draft_passes for r in rs) / drafted, length=k,
                                verify_ms=verify, acceptance=alpha, ceiling=speedup(k, k, verify),
                                at_measured_acceptance=max(speedup(expected_tokens(alpha, c), c, v)
                                                           for c, v in candidates)))
    return out

"""Speculative decoding: draft cheaply, verify at full depth in one pass, keep the agreeing prefix.

One round, with t0 the last emitted token (not yet fed) at position ``pos``:

1. **Draft** k tokens t1..tk. The *self* drafter runs layers [0, d) and the exit head after d layers;
   its K/V for layers < d are the real ones (same weights, same inputs), so they stay in the cache.
2. **Verify**: run the remaining layers [d, L) over positions pos..pos+k-1 (t0..t_{k-1}) in one pass,
   starting from the draft's cached hidden states, so no layer runs twice for the same position. A
   drafter without a shallow path (prompt lookup, a separate draft model) is verified by all L layers.
3. **Accept**: greedy keeps t_{i+1} while it equals the verifier's argmax; sampling keeps it with
   probability min(1, p/q) and on rejection draws from norm(max(0, p - q)) (the exact rule, so the
   output follows the target distribution). After the first rejection the verifier's token is emitted
   as a correction and the cache is cropped back by position.

Emitted tokens per round: the accepted prefix plus the correction, or all k drafts when none was
rejected (t_k then becomes the next round's t0, so nothing is computed twice; there is no "bonus"
token because t_k's hidden state is never computed). Hence E[tokens] = sum_{j<k} alpha^j.

The ``SpeculationController`` picks the draft depth among the multi-scale paths from running
acceptance (the request's own latest verdicts, with the runtime-wide rate as a prior) and per-layer
costs measured on this host (corrected by what rounds and plain steps really took), stops drafting
when the predicted probability that the whole draft survives no longer pays for another draft step
(SpecDec++'s rule, derived from the measured costs), and switches speculation off (k = 0, a plain
step) when its predicted gain is < 1.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .draft_guesses import ContextNgrams, GuessLength, latest_continuation
from .costs import CostModel
from .datastore import MIN_SHARE
from .decoding import Decoder
from .errors import InvalidRequestError
from .exits import ExitHeads, ShortlistHead
from .host_costs import HostCosts
from .model import LeanModel
from . import native_layers
from .native_layers import NativeLayers
from .sampling import Sampler
from .trace import SpecRound

DRAFTERS = ("self", "lookup", "draft_model")
DRAFT_MODEL_KEY, LOOKUP_KEY, DATASTORE_KEY = 0, -1, -2  # "depth" keys of the non-self drafters in the controller
_CONFIDENCE_BINS = 10
# Measured rounds of a kind before their median corrects the start-up costs; a fresh runtime also takes
# this many plain steps before its first speculative round, so the full step it compares against is measured
MIN_TIMINGS = 3
MEASURE_EVERY = 16  # and then one plain step in this many rounds, to follow changes in machine load
# Speculate only when the predicted gain clears this. It was 1.1 while plain steps were judged by a
# more optimistic statistic than rounds (see RoundTimings); with one statistic for both, 1.0 ran faster
# in the same process on 12 test prompts (1.26x full's tokens/s vs 1.11x at 1.1; slowest prompt 1.06x
# vs 1.26x full's time: single runs on a noisy host, so only the direction is trusted).
MIN_PREDICTED_GAIN = 1.0
FIRST_PAUSE, MAX_PAUSE = 8, 64  # plain steps between exploratory rounds while speculation is off
# A model drafter's length cap in a request's first drafted round and in the first round after each pause:
# it doubles after every round that had a draft accepted. The runtime-wide acceptance says little
# about this prompt, and on a hard one a first depth-4 round of 8 drafts, all rejected, cost 5.8 ms for
# one token (4.5 full steps' worth, 3.5% of the request); at 2 drafts a failure costs under one step.
FIRST_LENGTH_CAP = 2
# What a runtime-wide acceptance prior is worth, in observed verdicts. A guess (0.5) gives way at once. A
# model's calibrated priors (``adaptive_defaults.json``: agreement of each path over thousands of
# validation tokens) must not: with 8, one hard first prompt (1 of 4 drafts accepted) dragged depth 4's
# 0.89 to 0.68, speculation switched off, and since a switched-off runtime gathers almost no verdicts it
# stayed off for the next requests that would have accepted 85-99% of their drafts.
GUESS_PRIOR_WEIGHT, CALIBRATED_PRIOR_WEIGHT = 8, 64
DRAFT_SHORTLIST_SPARE = 256  # room for tokens the sequence adds to the draft shortlist before a copy
REQUEST_WINDOW, REQUEST_PRIOR = 32, 8  # a request's own latest verdicts, and the runtime-wide rate's weight


# ---- overlapped verification ----------------------------------------------------------------------------
# Batch-1 decoding on a CPU leaves cores idle: one layer's small products gain little from a second thread
# (the bundled model's full step: ~2.2-2.5 ms on 1 or 2 threads of a 2-core host). So while a worker thread
# verifies a draft (layers [d, L) over its k positions, one thread), the decoding thread drafts the next
# block on the other core, as if every draft of this one will be accepted (the next block starts from t_k
# at position pos + k). The two touch different layers' K/V (the draft writes layers < d beyond the
# block, the verifier layers >= d inside it), so they never race. If the verifier keeps all k drafts the
# next round verifies that block at once, without drafting first; otherwise the block is dropped (its
# positions are cropped from the cache and its compute is still counted). Ad-hoc, on that host: 8 depth-3
# draft passes then a verification of 8 positions took 10.7-11.8 ms in sequence at 2 threads, 5.4-6.8 ms
# overlapped (1 thread each); 8 full-depth steps took 17.5-22.7 ms. Inside the decode loop the two sides
# slow each other down (a verification of 8 positions: 5.4 ms on the worker against 3.8 ms alone, drafts
# 1.00 against 0.86 ms each, from sharing memory bandwidth), and a block drafted ahead is dropped whenever
# a draft before it is rejected: whole generations came out even with sequential rounds (1.42-1.63x
# against 1.54-1.62x full's speed), so it is opt-in (``overlap=True``) until it pays.
def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_verifier_lock = threading.Lock()
_verifier: ThreadPoolExecutor | None = None


def verifier_pool() -> ThreadPoolExecutor:
    """The one worker thread that runs overlapped verifications (shared: concurrent requests queue there)."""
    global _verifier
    with _verifier_lock:
        if _verifier is None:
            # one intra-op thread on the verifier's side (the drafter has the other core), set once for its thread
            _verifier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adaptive-verify",
                                           initializer=torch.set_num_threads, initargs=(1,))
        return _verifier


class single_threaded_ops:
    """torch intra-op threads set to 1 for the block (restored after): the overlapped draft and
    verification each take one core instead of both asking for all of them.

    Held for a whole request (``Runtime._speculative_records``), not toggled per round: an intra-op pool
    woken by a 2-thread step keeps a thread spinning on the core the other side needs. Ad-hoc: an
    overlapped round took 4.1-7.6 ms with 1 thread throughout (or after one switch), 12-15.5 ms when a
    2-thread step ran between rounds. One thread costs little elsewhere: 8 full steps took 18.7-20.1 ms on
    1 thread against 17.5-22.7 ms on 2."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        if self.threads != 1:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.threads != 1:
            torch.set_num_threads(self.threads)


@dataclass
class Draft:
    tokens: list[int]  # t1..tk
    q: list[torch.Tensor | None]  # per token: the fp32 distribution it was drawn from; None = a point mass
    q_probs: list[float]  # q(t_i)
    depth: int  # layers the draft ran on the main model (0: the verifier runs every layer)
    hidden: torch.Tensor | None  # (1, k, d) hidden states after `depth` layers for t0..t_{k-1}
    stop_reason: str
    predicted_accept: list[float] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)  # what the acceptance predictor was given
    macs: int = 0
    drafter: str = "self"
    passes: int = 0  # model passes the draft took
    guessed: int = 0  # drafts that came from a context guess checked in the same pass (SelfDrafter)
    # Time after the first pass, and the drafts made in it (None: the drafter does not time passes apart).
    # A round's first pass costs more than the ones after it (it follows a verification or a plain step,
    # which evicted the draft layers' weights from cache), so the controller predicts the two apart.
    rest_ms: float | None = None
    rest_drafts: int = 0
    first_rows: int = 1  # positions the first pass fed (1 + the guess it checked)
    # Drafting time of a block drafted while the previous round verified (its time lies inside that round's);
    # None for a draft made in its own round
    ahead_ms: float | None = None

    @property
    def ahead(self) -> bool:
        return self.ahead_ms is not None

    @property
    def stats_key(self) -> int:
        """Acceptance statistics are kept per path: self depth d >= 1, draft model 0, lookup -1, datastore -2."""
        return {"self": self.depth, "draft_model": DRAFT_MODEL_KEY, "lookup": LOOKUP_KEY,
                "datastore": DATASTORE_KEY}[self.drafter]


@dataclass
class Emitted:
    token: int
    source: str  # "draft", "correction" or "verified"


@dataclass(frozen=True)
class DraftCosts:
    """The controller's costs (ms) that a drafted round reads after every drafted token (the stop rule)
    and before every guessed pass (the guess length), fixed when the round starts drafting.

    Asked of the controller live (a handful of memoised lookups and median ratios each), the stop rule
    cost 1.9 us a drafted token and the guess length 5.2 us a pass in a tight loop, and several times that
    inside the decode loop; read from here, 0.2 and 0.9 us, plus 5.5 us a round for the snapshot. Nothing
    the stop rule reads changes during a round (the timings it reads are recorded after the round); the
    pass costs a round measures reach the guess length from the next round on."""
    full_step: float
    draft_step: float
    marginal_verify: tuple[float, ...]  # [n]: one more verified position after n drafts, n < max_draft
    pass_ms: tuple[float, ...]  # [r - 1]: a draft pass of r rows, r = 1..max_draft + 1 (self drafts only)


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a round of k drafts emits on average when each is accepted with probability alpha."""
    return sum(alpha ** j for j in range(k))


# ---- acceptance statistics shared across requests -----------------------------------------------------

class AcceptanceStats:
    """Running acceptance per draft depth, and per depth per draft-confidence bin (the predictor).

    Kept on the runtime so each request starts from what earlier requests measured; guarded by a lock
    because the app serves several sessions from one runtime.
    """

    def __init__(self, priors: dict[int, float], prior_weight: int = GUESS_PRIOR_WEIGHT):
        self.lock = threading.Lock()
        self.priors = dict(priors)
        self.prior_weight = prior_weight  # observations a prior is worth (see CALIBRATED_PRIOR_WEIGHT)
        self.counts: dict[int, list[int]] = {}  # depth -> [accepted, evaluated]
        self.bins: dict[int, list[list[int]]] = {}  # depth -> bin -> [accepted, evaluated]

    def alpha(self, depth: int) -> float:
        """Acceptance rate at ``depth``: the running count, with the prior worth ``prior_weight``
        observations (a depth without a prior: 0.5, worth ``GUESS_PRIOR_WEIGHT``)."""
        accepted, total = self.counts.get(depth, [0, 0])
        weight = self.prior_weight if depth in self.priors else GUESS_PRIOR_WEIGHT
        return (accepted + weight * self.priors.get(depth, 0.5)) / (total + weight)

    def predict(self, depth: int, confidence: float) -> float:
        """P(the verifier accepts a draft token whose draft confidence is ``confidence``)."""
        b = min(int(confidence * _CONFIDENCE_BINS), _CONFIDENCE_BINS - 1)
        bins = self.bins.get(depth)
        accepted, total = bins[b] if bins is not None else (0, 0)
        prior = 0.5 * (confidence + self.alpha(depth))  # before data: the draft's own belief, tempered
        return (accepted + 4 * prior) / (total + 4)

    def record(self, depth: int, confidences: list[float], accepted_flags: list[bool]) -> None:
        with self.lock:
            counts = self.counts.setdefault(depth, [0, 0])
            bins = self.bins.setdefault(depth, [[0, 0] for _ in range(_CONFIDENCE_BINS)])
            for conf, ok in zip(confidences, accepted_flags):
                counts[0] += ok
                counts[1] += 1
                b = bins[min(int(conf * _CONFIDENCE_BINS), _CONFIDENCE_BINS - 1)]
                b[0] += ok
                b[1] += 1


class RoundTimings:
    """Measured / predicted time of drafts, verifications and plain steps: the median of recent ratios.

    The start-up host costs time bare layer and head calls; a real round also pays for embedding,
    drawing, acceptance and bookkeeping, which is several layers' worth at batch 1 on a CPU. These
    ratios correct the controller's predictions with what rounds actually took on this host, so its
    choice of depth and its "switch speculation off" rule use real costs. Shared across requests.

    Every side (draft, verify, plain step) is judged by the same statistic, the median of its last
    ``window`` ratios: robust to the scheduler's spikes, and unbiased between the two sides of the
    comparison. (An earlier version judged plain steps by their lower quartile and rounds by a mean,
    which on this noisy host kept speculation off on 98% of rounds where a fixed depth-4 draft ran
    1.1-1.3x faster than plain decoding.)
    """

    def __init__(self, window: int = 32):
        self.lock = threading.Lock()
        self.window = window
        self.count: dict[tuple, int] = {}
        self.recent: dict[tuple, deque[float]] = {}  # the last ``window`` ratios per key
        # Their median, computed on the first ``get`` after a change and then kept: it is asked for per
        # drafted token, while a plain step with speculation switched off only records (its median
        # used to be recomputed on every one of those steps, 1% of a step on a small model).
        self.median: dict[tuple, float] = {}

    def get(self, key: tuple) -> float:
        """The typical measured / predicted ratio for ``key``: 1.0 (the start-up costs stand) until
        ``MIN_TIMINGS`` rounds were measured, so one first-call spike (a fresh runtime's first depth-2
        draft took 32x its prediction) cannot switch speculation off on its own."""
        if self.count.get(key, 0) < MIN_TIMINGS:
            return 1.0
        median = self.median.get(key)
        if median is None:
            with self.lock:
                median = self.median[key] = statistics.median(self.recent[key])
        return median

    def record(self, key: tuple, measured_ms: float, predicted_ms: float) -> None:
        if predicted_ms <= 0:
            return
        with self.lock:
            self.count[key] = self.count.get(key, 0) + 1
            self.recent.setdefault(key, deque(maxlen=self.window)).append(measured_ms / predicted_ms)
            self.median.pop(key, None)


class SpeculationController:
    """Chooses draft depth and length from measured costs and running acceptance."""

    def __init__(self, host: HostCosts, num_layers: int, stats: AcceptanceStats, depths: tuple[int, ...],
                 max_draft: int = 8, fixed_depth: int | None = None, fixed_length: int | None = None,
                 draft_model_step_ms: float | None = None, draft_head_ms: float | None = None,
                 timings: RoundTimings | None = None, draft_variant: str = ""):
        self.host, self.L, self.stats = host, num_layers, stats
        # Drafts that check context guesses ("guess") cost less per token than one-token passes (""): the
        # shared timings keep the two apart, so requests of either kind correct only their own kind.
        self.draft_variant = draft_variant
        self.timings = timings or RoundTimings()
        self.draft_head_ms = draft_head_ms  # measured cost of the shortlist draft head (None: the full head)
        self.depths = (fixed_depth,) if fixed_depth is not None else depths
        self.max_draft = fixed_length or max_draft
        self.fixed_length = fixed_length
        self.draft_model_step_ms = draft_model_step_ms
        self.off_for = 0  # plain steps left before speculation is tried again
        # how many tokens a model drafter may draft this round (see FIRST_LENGTH_CAP); a fixed length is kept
        self.length_cap = FIRST_LENGTH_CAP if fixed_length is None else self.max_draft
        self.pause = FIRST_PAUSE  # the next pause's length (doubles while probes keep failing)
        self.probe_due = False  # after a pause, one exploratory round refreshes the acceptance estimate
        self._memo: dict[tuple, float] = {}
        self._verify_by_length: dict[int, tuple[float, ...]] = {}  # see raw_verify_by_length
        self._round_costs: dict[int, tuple[tuple[float, ...], tuple[float, ...]]] = {}  # see draft_costs
        self._gains: dict[int, tuple[tuple, tuple[float, int]]] = {}  # see predicted_speedup
        self.rounds_planned = 0
        self.plain_reason = "off"  # why the latest plan was a plain step: "off" or "measure"
        self.last_gain: float | None = None  # the latest plan's predicted speedup (None: not evaluated)
        # This request's latest verdicts per path: acceptance varies by prompt far more than the
        # runtime-wide rate (which after a few requests barely moves) can follow.
        self.recent: dict[int, list[bool]] = {}

    # measured costs (ms); "depth" is a stats key: d >= 1 self, 0 draft model, -1 lookup, -2 datastore.
    # They are fixed for the controller's lifetime and asked for several times per drafted token, so
    # each (depth, k) is interpolated once.
    def _once(self, key: tuple, compute, *args) -> float:
        """``compute(*args)``, worked out on the first call per ``key`` and kept (the costs do not change).
        The arguments are passed rather than closed over: a closure built per call cost as much as the
        lookup, on paths asked several times a round."""
        ms = self._memo.get(key)
        if ms is None:
            ms = self._memo[key] = compute(*args)
        return ms

    def raw_draft_step_ms(self, depth: int) -> float:
        return self._once(("draft", depth), self._draft_step_ms, depth)

    def raw_verify_ms(self, depth: int, k: int) -> float:
        return self._once(("verify", depth, k), self._verify_ms, depth, k)

    def raw_full_step(self) -> float:
        return self._once(("full",), self.host.full_step)

    # predictions corrected by what rounds measured on this host
    def draft_step_ms(self, depth: int) -> float:
        """A drafted token after a round's first pass."""
        return self.raw_draft_step_ms(depth) * self.timings.get(("draft", depth, self.draft_variant))

    def draft_first_ms(self, depth: int) -> float:
        """A round's first draft pass, with the round's planning and bookkeeping."""
        return self.raw_draft_step_ms(depth) * self.timings.get(("draft_first", depth, self.draft_variant))

    def draft_round_ms(self, depth: int, k: int) -> float:
        return self._round_ms(self.draft_first_ms(depth), self.draft_step_ms(depth), k)

    @staticmethod
    def _round_ms(first_ms: float, step_ms: float, k: int) -> float:
        """A round of k drafts: its first pass, then k - 1 more steps (0 for no drafts)."""
        return first_ms + (k - 1) * step_ms if k > 0 else 0.0

    def verify_ms(self, depth: int, k: int) -> float:
        return self.raw_verify_ms(depth, k) * self.timings.get(("verify", depth))

    def full_step(self) -> float:
        return self.raw_full_step() * self.timings.get(("full",))

    def record_round(self, depth: int | None, drafted: int, draft_ms: float, verify_ms: float,
                     rest_ms: float | None = None, rest_drafts: int = 0, first_rows: int = 1) -> None:
        """Feed one round's measured times back (depth None: a plain step). ``rest_ms``: the part of
        ``draft_ms`` after the first pass, which fed ``first_rows`` positions and drafted
        ``drafted - rest_drafts`` tokens. The first pass is judged against a pass of that many rows (a
        guess it checked is paid for by the drafts it adds), so its ratio is that of a one-row pass."""
        if depth is None:
            self.timings.record(("full",), verify_ms, self.raw_full_step())
            return
        raw, variant = self.raw_draft_step_ms(depth), self.draft_variant
        if drafted and raw > 0:
            if rest_ms is None:  # a drafter that does not time its passes apart: every token alike
                self.timings.record(("draft_first", depth, variant), draft_ms, drafted * raw)
                self.timings.record(("draft", depth, variant), draft_ms, drafted * raw)
            else:
                first_raw = self.draft_pass_ms(depth, first_rows) if depth >= 1 else raw
                self.timings.record(("draft_first", depth, variant), draft_ms - rest_ms, first_raw)
                if rest_drafts:
                    self.timings.record(("draft", depth, variant), rest_ms, rest_drafts * raw)
        self.timings.record(("verify", depth), verify_ms, self.raw_verify_ms(depth, drafted))

    def _draft_step_ms(self, depth: int) -> float:
        if depth in (LOOKUP_KEY, DATASTORE_KEY):
            return 0.0  # an n-gram search: no model call
        if depth == DRAFT_MODEL_KEY:
            return self.draft_model_step_ms or 0.0
        return self.draft_pass_ms(depth, 1)

    def draft_pass_ms(self, depth: int, rows: int) -> float:
        """Predicted ms of one self-draft pass over ``rows`` positions: layers [0, depth) and the draft head
        (the shortlist head's measured single-row cost, scaled with rows as the full head scales).
        Asked for every row count up to the draft's room before each guessed pass (GuessLength.choose):
        interpolated once per (depth, rows), since recomputing it cost ~0.45 ms a pass, as much as the pass."""
        return self._once(("pass", depth, rows), self._draft_pass_ms, depth, rows)

    def _draft_pass_ms(self, depth: int, rows: int) -> float:
        if self.draft_head_ms is None:
            head = self.host.head(rows)
        else:
            head = self.draft_head_ms if rows == 1 else self.draft_head_ms * self.host.head(rows) / self.host.head()
        return self.host.layers(depth, rows) + head

    def measured_pass_ms(self, depth: int, rows: int) -> float:
        """``draft_pass_ms`` corrected by what passes of that many rows took in rounds (after their first
        pass): on some hosts extra rows cost far more inside the decode loop than at start-up."""
        return self.draft_pass_ms(depth, rows) * self.timings.get(("pass", depth, rows))

    def record_pass(self, depth: int, rows: int, measured_ms: float) -> None:
        self.timings.record(("pass", depth, rows), measured_ms, self.draft_pass_ms(depth, rows))

    def _verify_ms(self, depth: int, k: int) -> float:
        start = depth if depth > 0 else 0  # without a shallow path the verifier runs every layer
        return self.host.layers(self.L - start, max(k, 1)) + self.host.head(max(k, 1))

    def observe(self, depth: int, accepted_flags: list[bool]) -> None:
        """Record this request's verdicts on a round's drafts (the runtime-wide stats are fed separately)."""
        self.recent[depth] = (self.recent.get(depth, []) + accepted_flags)[-REQUEST_WINDOW:]
        if any(accepted_flags):  # the prompt is not hopeless: let the acceptance rule decide the length
            self.length_cap = min(self.max_draft, 2 * self.length_cap)

    def alpha(self, depth: int) -> float:
        """Acceptance expected from the next round at ``depth``: this request's latest verdicts, with the
        runtime-wide rate as a prior worth ``REQUEST_PRIOR`` verdicts."""
        flags = self.recent.get(depth, [])
        return (sum(flags) + REQUEST_PRIOR * self.stats.alpha(depth)) / (len(flags) + REQUEST_PRIOR)

    def predicted_speedup(self, depth: int) -> tuple[float, int]:
        """(tokens per full-step time, best draft length) at ``depth`` under the running acceptance:
        the gain expected_tokens(alpha, k) * full / (draft_round_ms + verify_ms) maximised over k.

        Asked for every depth before each round, so the loop does the same arithmetic from values fetched
        once: the expected tokens summed as it goes, the start-up verify costs of every k interpolated once
        per depth (plan() in a tight loop: 23 us when the loop asked for each k's costs by method calls,
        11-16 us now; inside the decode loop, where the interpreter's data has left the caches, 45-70 us
        either way). Each depth's answer is kept with the five numbers it came from: a round changes
        those of the depth it drafted at, so plan() runs the loop for that depth only (the other depths'
        loops were ~75% of its time in the decode loop)."""
        alpha, full = self.alpha(depth), self.full_step()
        first, step = self.draft_first_ms(depth), self.draft_step_ms(depth)
        verify_ratio = self.timings.get(("verify", depth))
        inputs = (alpha, full, first, step, verify_ratio)
        kept = self._gains.get(depth)
        if kept is not None and kept[0] == inputs:
            return kept[1]
        best_gain, best_k, tokens = 0.0, 0, 0.0
        for k, raw_verify in enumerate(self.raw_verify_by_length(depth), start=1):
            tokens += alpha ** (k - 1)
            gain = tokens * full / (self._round_ms(first, step, k) + raw_verify * verify_ratio)
            if gain >= best_gain:  # the longer draft on a tie
                best_gain, best_k = gain, k
        self._gains[depth] = (inputs, (best_gain, best_k))
        return best_gain, best_k

    def raw_verify_by_length(self, depth: int) -> tuple[float, ...]:
        """``raw_verify_ms(depth, k)`` for k = 1..max_draft."""
        if depth not in self._verify_by_length:
            self._verify_by_length[depth] = tuple(self.raw_verify_ms(depth, k) for k in range(1, self.max_draft + 1))
        return self._verify_by_length[depth]

    def plan(self) -> int | None:
        """The draft depth for the next round, or None for a plain step (speculation off).

        Plain steps also measure what speculation is compared against: the full step as it runs in this
        loop on this host now. So the first rounds on a runtime and every ``MEASURE_EVERY``-th round are
        plain steps (they emit a token like any full-depth step; only the chance to speculate is lost).
        """
        self.rounds_planned += 1
        self.plain_reason, self.last_gain = "off", None
        if self.fixed_length is None and (self.timings.count.get(("full",), 0) < MIN_TIMINGS
                                          or self.rounds_planned % MEASURE_EVERY == 0):
            self.plain_reason = "measure"
            return None
        if self.off_for > 0:
            self.off_for -= 1
            return None
        gain, depth = max((self.predicted_speedup(d)[0], d) for d in self.depths)
        self.last_gain = gain
        if gain < MIN_PREDICTED_GAIN and self.fixed_length is None:
            if self.probe_due:  # explore once: without new rounds the estimate could never recover
                self.probe_due = False
                return depth
            # Each probe that still finds no gain doubles the pause before the next one: on a prompt
            # where drafts keep failing, probes would otherwise cost a few percent of the run.
            self.off_for, self.probe_due = self.pause, True
            self.pause = min(2 * self.pause, MAX_PAUSE)
            self.length_cap = FIRST_LENGTH_CAP  # the probe after the pause starts short again
            return None
        self.pause = FIRST_PAUSE
        return depth

    def draft_costs(self, depth: int) -> DraftCosts:
        """The costs a round drafting at ``depth`` (a stats key) reads, as they stand now."""
        # The start-up costs this reads, worked out once per depth: verify_ms(depth, n) for n = 0..max_draft
        # and (self drafts) draft_pass_ms(depth, rows) for rows = 1..max_draft + 1.
        raw = self._round_costs.get(depth)
        if raw is None:
            raw = self._round_costs[depth] = (
                (self.raw_verify_ms(depth, 0), *self.raw_verify_by_length(depth)),
                tuple(self.draft_pass_ms(depth, rows) for rows in range(1, self.max_draft + 2)) if depth >= 1 else ())
        raw_verify, raw_passes = raw
        verify_ratio, get = self.timings.get(("verify", depth)), self.timings.get
        verify = [ms * verify_ratio for ms in raw_verify]
        # measured_pass_ms(depth, rows), from the kept start-up costs
        passes = tuple(ms * get(("pass", depth, rows)) for rows, ms in enumerate(raw_passes, start=1))
        return DraftCosts(full_step=self.full_step(), draft_step=self.draft_step_ms(depth),
                          marginal_verify=tuple(verify[n + 1] - verify[n] for n in range(self.max_draft)),
                          pass_ms=passes)

    def keep_drafting(self, depth: int, drafted: int, survive: float, costs: DraftCosts | None = None) -> bool:
        return self.draft_stop(depth, drafted, survive, costs) is None

    def draft_stop(self, depth: int, drafted: int, survive: float, costs: DraftCosts | None = None) -> str | None:
        """Why drafting stops after ``drafted`` tokens, or None to draft one more. One more is drafted
        while P(all drafted so far are accepted) x (a full step saved) pays for one draft step plus one
        more verified position (the rule SpecDec++ learns, here from costs). ``costs``: the round's
        ``draft_costs(depth)`` (None: as they stand now)."""
        if drafted >= self.max_draft:
            return "max_len"
        if self.fixed_length is not None:
            return None
        if depth >= DRAFT_MODEL_KEY and drafted >= self.length_cap:  # model drafts cost time; lookups do not
            return "length_cap"
        costs = costs or self.draft_costs(depth)
        if survive * costs.full_step > costs.draft_step + costs.marginal_verify[drafted]:
            return None
        return "predicted_reject"


# ---- drafters ------------------------------------------------------------------------------------------

class DraftLog:
    """What a model drafter accumulates token by token, and the running P(all drafts survive)."""

    def __init__(self, stats_key: int, costs: DraftCosts):
        self.stats_key, self.costs = stats_key, costs  # costs: the controller's draft_costs(stats_key)
        self.tokens: list[int] = []
        self.q: list[torch.Tensor | None] = []
        self.q_probs: list[float] = []
        self.confidences: list[float] = []
        self.predicted: list[float] = []
        self.survive = 1.0
        self.passes = self.guessed = 0
        self._rest_start: float | None = None  # perf_counter() when the first pass was done
        self._first_drafts, self._first_rows = 0, 1

    def pass_done(self, rows: int = 1) -> None:
        """Count a model pass of ``rows`` positions; the first one ends the draft's first-pass time."""
        self.passes += 1
        if self.passes == 1:
            self._rest_start, self._first_drafts, self._first_rows = time.perf_counter(), len(self.tokens), rows

    def add(self, dec: "SpeculativeDecoder", token: int, q: torch.Tensor | None, q_tok: float, conf: float) -> None:
        self.tokens.append(token)
        self.q.append(q)
        self.q_probs.append(q_tok)
        self.confidences.append(conf)
        accept = dec.controller.stats.predict(self.stats_key, conf)
        self.predicted.append(accept)
        self.survive *= accept

    def stop_reason(self, dec: "SpeculativeDecoder", limit: int) -> str | None:
        """Why drafting stops after the latest token, or None to go on."""
        n = len(self.tokens)
        if self.tokens[-1] in dec.eos:
            return "eos"
        if n >= limit:
            return "max_len"
        return dec.controller.draft_stop(self.stats_key, n, self.survive, self.costs)

    def draft(self, depth: int, hidden: torch.Tensor | None, stop: str, macs: int, drafter: str) -> Draft:
        return Draft(tokens=self.tokens, q=self.q, q_probs=self.q_probs, depth=depth, hidden=hidden,
                     stop_reason=stop, predicted_accept=self.predicted, confidences=self.confidences, macs=macs,
                     drafter=drafter, passes=self.passes, guessed=self.guessed,
                     rest_ms=None if self._rest_start is None else (time.perf_counter() - self._rest_start) * 1000,
                     rest_drafts=len(self.tokens) - self._first_drafts, first_rows=self._first_rows)


class SelfDrafter:
    """Draft with the model's own first d layers and the exit head after them.

    Greedy drafting feeds each pass the token to draft after plus a guess of the tokens after it (the
    sequence's own n-grams, ``ContextNgrams``). The pass drafts a token after every row; each guessed
    token the shallow path would itself have drafted makes the next row's draft valid too, so one pass
    drafts 1 + (the agreeing prefix of the guess) tokens: the same tokens, with the same K/V and hidden
    states, as that many one-token passes. Rows after the first disagreement are cropped from the cache
    and their compute is still counted. Sampling draws one token per pass (a guess cannot be checked
    against a draw before it is made).
    """

    name = "self"

    def draft(self, dec: "SpeculativeDecoder", t0: int, depth: int, limit: int) -> Draft:
        if dec.sampler.config.greedy:
            return self._draft_greedy(dec, t0, depth, limit)
        model, pos, head = dec.model, dec.pos, dec.draft_head
        log, hiddens, token, macs, stop = DraftLog(depth, dec.controller.draft_costs(depth)), [], t0, 0, "max_len"
        for j in range(limit):
            ids = torch.tensor([[token]], device=model.device)
            h = model.run_layers(model.embed(ids, pos + j), 0, depth, pos + j, dec.cache)  # (1, 1, d)
            token, q, q_tok, conf = dec.draw(head.logits(h, depth), head.ids)
            hiddens.append(h)
            macs += dec.draft_pass_macs(depth, pos + j, 1)
            log.add(dec, token, q, q_tok, conf)
            log.pass_done()
            reason = log.stop_reason(dec, limit)
            if reason:
                stop = reason
                break
        return log.draft(depth, torch.cat(hiddens, dim=1), stop, macs, self.name)

    def _draft_greedy(self, dec: "SpeculativeDecoder", t0: int, depth: int, limit: int,
                      ahead_of: tuple[int, list[int]] | None = None, done=None) -> Draft:
        """Greedy drafting from t0 at ``dec.pos``. ``ahead_of`` = (pos, tokens before t0 not yet in the
        context): a block drafted ahead from that position while a verification runs (see
        ``verifier_pool``); ``done()`` True ends it ("verified": the verification it overlapped finished)."""
        native = dec.native_draft()
        if native is not None and ahead_of is None:  # the same round in one C++ call
            return self._native_round(dec, native, t0, depth, limit)
        drafting_started = time.perf_counter()
        head = dec.draft_head
        pos, before = ahead_of if ahead_of is not None else (dec.pos, [])
        recent = (dec.context + before)[-dec.ngrams.max_ngram:] + [t0]  # the sequence's last tokens, drafts included
        log, hiddens, token, macs, stop = DraftLog(depth, dec.controller.draft_costs(depth)), [], t0, 0, None
        while stop is None:
            j = len(log.tokens)  # drafted so far: this pass's first row is position pos + j
            # room: drafts this round may still add after this pass's first (the request's limit and the
            # controller's length cap; a room of the whole request had GuessLength price ~100 row counts)
            room = min(limit, dec.controller.max_draft) - j - 1
            guess = dec.guess(recent, dec.guess_length(depth, room, log.costs.pass_ms))
            fed = [token] + guess
            started = time.perf_counter()
            if native is not None:  # one C++ call: bit-identical to the Python below, without its ~10 ops
                h, confs, drafted = native.draft_greedy(fed, pos + j, depth, dec.cache, head.heads.adapter(depth),
                                                        head.weight_t, head.ids, head.panels)
            else:
                h, confs, drafted = self._python_pass(dec, fed, pos + j, depth)
            macs += dec.draft_pass_macs(depth, pos + j, len(fed))
            used, missed = 0, False
            for i, (drafted_token, conf) in enumerate(zip(drafted, confs)):
                used += 1
                log.add(dec, drafted_token, None, conf, conf)
                log.guessed += i > 0
                stop = log.stop_reason(dec, limit)
                if stop or i == len(guess):
                    break
                if drafted_token != guess[i]:  # the next row was fed a token the draft did not choose
                    missed = True
                    break
            if guess:  # rows 1..used-1 were fed agreeing guesses; a miss was compared too
                dec.guesses.record(depth, used - 1, used - 1 + missed)
            hiddens.append(h[:, :used])
            if used < len(fed):
                dec.cache.crop(pos + j + used)  # only layers < depth hold these rows
            recent.extend(drafted[:used])
            token = drafted[used - 1]
            if log.passes and ahead_of is None:  # a round's first pass costs more (Draft.rest_ms); an
                # overlapped pass shares the machine with a verification: time neither
                dec.controller.record_pass(depth, len(fed), (time.perf_counter() - started) * 1000)
            log.pass_done(len(fed))
            if stop is None and done is not None and done():
                stop = "verified"
        draft = log.draft(depth, torch.cat(hiddens, dim=1), stop, macs, self.name)
        if ahead_of is not None:
            draft.ahead_ms = (time.perf_counter() - drafting_started) * 1000
        return draft

    def _native_round(self, dec: "SpeculativeDecoder", native: NativeLayers, t0: int, depth: int, limit: int) -> Draft:
        """``_draft_greedy``'s round in one C++ call (``NativeModel::draft_round``: the same passes with the
        same rules between them, draft_round.h), then the bookkeeping its loop does per pass. The rules
        read what the loop reads: this round's ``DraftCosts``, the acceptance predictor's bins and the
        guesses' running agreement (both only change after the round, or inside it as the C++ tracks)."""
        controller, stats, guesses, head = dec.controller, dec.controller.stats, dec.guesses, dec.draft_head
        costs = controller.draft_costs(depth)
        rules = self._rules_for(dec, native)
        rules.limit, rules.length_cap = limit, controller.length_cap
        rules.full_step, rules.draft_step, rules.marginal_verify = costs.full_step, costs.draft_step, costs.marginal_verify
        bins = stats.bins.get(depth) or [(0, 0)] * _CONFIDENCE_BINS
        rules.bin_accepted, rules.bin_total, rules.alpha = [b[0] for b in bins], [b[1] for b in bins], stats.alpha(depth)
        rules.pass_ms = costs.pass_ms
        rules.agreed, rules.compared = guesses.agreed.get(depth, 0), guesses.compared.get(depth, 0)
        pos = dec.pos
        out = native.draft_round(t0, pos, depth, dec.cache, head.heads.adapter(depth), head.weight_t, head.ids,
                                 head.panels, dec.context, rules)
        tokens, confidences, pass_rows, pass_used = out.tokens, out.confidences, out.pass_rows, out.pass_used
        macs, drafted = 0, 0
        for index, (rows, used, ms) in enumerate(zip(pass_rows, pass_used, out.pass_ms)):
            macs += dec.draft_pass_macs(depth, pos + drafted, rows)
            drafted += used
            if index:  # a round's first pass costs more (Draft.rest_ms)
                controller.record_pass(depth, rows, ms)
        if out.compared:
            guesses.record(depth, out.agreed, out.compared)
        return Draft(tokens=tokens, q=[None] * len(tokens), q_probs=list(confidences), depth=depth, hidden=out.hidden,
                     stop_reason=out.stop, predicted_accept=out.predicted, confidences=confidences, macs=macs,
                     drafter=self.name, passes=len(pass_rows), guessed=out.guessed, rest_ms=out.rest_ms,
                     rest_drafts=len(tokens) - pass_used[0], first_rows=pass_rows[0])

    @staticmethod
    def _rules_for(dec: "SpeculativeDecoder", native: NativeLayers):
        """The request's ``DraftRules`` with the fields that stay put for a request set (``_native_round``
        sets the round's own). Made once per request: the C++ round takes a copy, and setting every field
        anew cost ~10 us a round in a tight loop, several times that in the decode loop."""
        if dec.native_rules is None:
            controller, guesses = dec.controller, dec.guesses
            rules = native.draft_rules()
            rules.eos, rules.max_draft = list(dec.eos), controller.max_draft
            rules.fixed_length = controller.fixed_length is not None
            rules.guesses, rules.prior_weight, rules.prior = dec.guess_drafts, guesses.PRIOR_WEIGHT, guesses.PRIOR
            rules.max_ngram, rules.min_ngram = dec.ngrams.max_ngram, dec.ngrams.min_ngram
            if dec.guess_drafts and dec.datastore is not None:
                rules.set_store(*dec.datastore.tensors(), dec.datastore.vocab_size, MIN_SHARE)
            dec.native_rules = rules
        return dec.native_rules

    @staticmethod
    def _python_pass(dec: "SpeculativeDecoder", fed: list[int], pos: int, depth: int):
        """``fed`` at positions [pos, pos + T) through layers [0, depth) and the draft head: (hidden
        (1, T, d), max draft probability per row, greedy draft per row), as ``NativeLayers.draft_greedy``."""
        model, head = dec.model, dec.draft_head
        h = model.run_layers(model.embed(torch.tensor([fed], device=model.device), pos), 0, depth, pos, dec.cache)
        logits = head.rows_logits(h, depth)  # (T, n)
        ext = native_layers.extension()
        # the row kernel the C++ pass uses for a shortlist of int64 ids (None where it does not serve)
        drafts = (ext.greedy_rows(logits) if ext is not None and head.ids is not None and head.ids.dtype == torch.long
                  else None)
        if drafts is not None:
            best, conf = drafts
            return h, conf, head.ids[best].tolist()
        conf_t, best_t = torch.softmax(logits.float(), dim=-1).max(dim=-1)  # (T,) each
        ids = best_t if head.ids is None else head.ids[best_t]
        return h, conf_t.tolist(), ids.tolist()


class LookupDrafter:
    """Prompt lookup: propose the continuation of the latest earlier occurrence of the last n tokens."""

    name = "lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2, length: int = 8, datastore=None):
        self.max_ngram, self.min_ngram, self.length = max_ngram, min_ngram, length
        self.datastore = datastore  # an NgramStore consulted when the context has no match (or None)

    def propose(self, context: list[int], limit: int) -> list[int]:
        """The continuation after the latest earlier match of the last n tokens (longest n first).

        The latest match often overlaps the tail itself (runs of one token), leaving a short continuation;
        so take the latest match that leaves a full-length continuation, else the longest one found.
        """
        want = min(limit, self.length)
        n_ctx = len(context)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if n_ctx <= n:
                continue
            tail = context[-n:]
            starts = (start + n for start in range(n_ctx - n - 1, -1, -1)  # most recent match first
                      if context[start:start + n] == tail)
            found = latest_continuation(context, starts, want)
            if found:
                return found
        return []

    def draft(self, dec: "SpeculativeDecoder", t0: int, limit: int) -> Draft | None:
        context = dec.context + [t0]
        proposal = self.propose(context, limit)
        name, key = self.name, LOOKUP_KEY
        if proposal:
            alpha = dec.controller.alpha(LOOKUP_KEY)
            predicted = [alpha] * len(proposal)
            confidences = predicted
        elif self.datastore is not None:
            proposal, confidences = self.datastore.propose(context, min(limit, self.length))
            name, key = "datastore", DATASTORE_KEY
            # the share of the corpus behind each token is its confidence; acceptance is predicted per bin
            predicted = [dec.controller.stats.predict(DATASTORE_KEY, c) for c in confidences]
        if not proposal:
            return None
        # Keep as many proposed tokens as the predicted acceptance pays for (drafting is free, but every
        # extra verified position is not).
        tokens, stop, survive, costs = [], "max_len", 1.0, dec.controller.draft_costs(key)
        for token, accept in zip(proposal, predicted):
            tokens.append(token)
            survive *= accept
            if token in dec.eos:
                stop = "eos"
                break
            if not dec.controller.keep_drafting(key, len(tokens), survive, costs):
                stop = "predicted_reject"
                break
        n = len(tokens)
        return Draft(tokens=tokens, q=[None] * n, q_probs=[1.0] * n, depth=0, hidden=None, stop_reason=stop,
                     predicted_accept=list(predicted[:n]), confidences=list(confidences[:n]), drafter=name)


class DraftModelDrafter:
    """A separate small model with the same vocabulary drafts at its full depth, with its own cache."""

    name = "draft_model"

    def __init__(self, model: LeanModel, costs: CostModel, max_len: int):
        self.model, self.costs = model, costs
        self.cache = model.new_cache(1, max_len)
        self.synced = 0  # positions of the sequence already in the draft cache

    def draft(self, dec: "SpeculativeDecoder", t0: int, depth: int, limit: int) -> Draft:
        model, pos = self.model, dec.pos
        L = model.spec.num_layers
        pending = (dec.context + [t0])[self.synced:pos + 1]  # tokens the draft model has not seen yet
        h = model.run_layers(model.embed(torch.tensor([pending], device=model.device), self.synced), 0, L,
                             self.synced, self.cache)[:, -1:]
        macs = self.costs.positions_macs(0, L, self.synced, pos + 1 - self.synced)
        self.synced = pos + 1
        log, stop = DraftLog(DRAFT_MODEL_KEY, dec.controller.draft_costs(DRAFT_MODEL_KEY)), "max_len"
        for j in range(limit):
            token, q, q_tok, conf = dec.draw(model.head(h)[0, 0])
            macs += self.costs.head_macs
            log.add(dec, token, q, q_tok, conf)
            log.pass_done()
            reason = log.stop_reason(dec, limit)
            if reason:
                stop = reason
                break
            ids = torch.tensor([[token]], device=model.device)
            h = model.run_layers(model.embed(ids, pos + 1 + j), 0, L, pos + 1 + j, self.cache)
            macs += self.costs.layers_macs(0, L, pos + 1 + j)
            self.synced = pos + 2 + j
        return log.draft(0, None, stop, macs, self.name)

    def rollback(self, length: int) -> None:
        self.synced = min(self.synced, length)
        self.cache.crop(self.synced)


# ---- the decoder ---------------------------------------------------------------------------------------

class SpeculativeDecoder(Decoder):
    def __init__(self, model: LeanModel, costs: CostModel, max_len: int, heads: ExitHeads,
                 controller: SpeculationController, sampler: Sampler, drafter: str, eos: set[int],
                 draft_model: DraftModelDrafter | None = None, draft_ids: torch.Tensor | None = None,
                 datastore=None, guess_drafts: bool = False, overlap: bool = False):
        super().__init__(model, costs, max_len)
        if drafter not in DRAFTERS:
            raise InvalidRequestError(f"unknown drafter {drafter!r}; choose one of {', '.join(DRAFTERS)}")
        self.heads, self.controller, self.sampler, self.eos = heads, controller, sampler, eos
        self.drafter_name = drafter
        self.self_drafter = SelfDrafter()
        # A drafter that needs no model call (prompt lookup, or a stub in tests) is tried first each round;
        # when it proposes nothing, the round drafts with the model (self or draft model) instead.
        self.free_drafter = LookupDrafter(datastore=datastore) if drafter == "lookup" else None
        self.datastore = datastore  # corpus n-grams: guesses where the context has no match (see ``guess``)
        self.native_rules = None  # the C++ round's fixed rules, made on its first call (SelfDrafter._rules_for)
        self.draft_model = draft_model
        # The draft shortlist grows with the sequence: every emitted token joins it (ShortlistHead.add).
        self.draft_head = ShortlistHead(heads, draft_ids, spare=DRAFT_SHORTLIST_SPARE)
        self.context: list[int] = []  # every token fed so far (prompt + emitted, excluding the pending t0)
        self.ngrams = ContextNgrams(self.context)  # their n-grams, for the self drafter's guesses
        self.guess_drafts = guess_drafts  # True: greedy self-drafting checks context guesses in its passes
        self.guesses = GuessLength(controller.measured_pass_ms)
        self.rounds: list[SpecRound] = []
        self.max_len = max_len
        # Draft the next block while a worker verifies this one (see verifier_pool): greedy self-drafting
        # with the C++ layer loop, on a machine with a core to spare.
        self.overlap = (overlap and drafter == "self" and sampler.config.greedy and usable_cores() >= 2
                        and self.draft_head.weight_t is not None)
        self.pending: Draft | None = None  # the block drafted ahead, kept when every draft before it was

    def prefill(self, prompt_ids: torch.Tensor):
        self.context = prompt_ids[0].tolist()
        self.ngrams = ContextNgrams(self.context)
        return super().prefill(prompt_ids)

    def draw(self, logits: torch.Tensor, ids: torch.Tensor | None = None) -> tuple[int, torch.Tensor | None, float, float]:
        """Draft one token from logits over ``ids`` (None: the full vocabulary).

        Returns (token, q over the full vocabulary or None for greedy, q(token), draft confidence = max q).
        """
        if self.sampler.config.greedy:
            # max_prob and argmax from one softmax (this runs once per drafted token)
            conf_t, best_t = torch.softmax(logits.float(), dim=-1).max(dim=-1)
            conf, best = conf_t.item(), best_t.item()
            return (best if ids is None else int(ids[best])), None, conf, conf
        q = self.sampler.distribution(logits)  # same temperature / top-k / top-p as the verifier's p
        pick = int(torch.multinomial(q, 1, generator=self.sampler.generator))
        q_tok, conf = float(q[pick]), float(q.max())
        if ids is not None:  # zero outside the shortlist: the exact distribution the token was drawn from
            q = torch.zeros(self.model.spec.vocab_size, dtype=q.dtype, device=q.device).index_copy_(0, ids, q)
            pick = int(ids[pick])
        return pick, q, q_tok, conf

    def guess(self, recent: list[int], length: int) -> list[int]:
        """Up to ``length`` tokens guessed to follow ``recent`` (the sequence's last tokens, drafts
        included): the continuation of an earlier occurrence in the context (``ContextNgrams``), else the
        corpus's most frequent continuation of the last three tokens (the datastore, where there is one:
        a fresh line of code has no earlier occurrence, see README, "Guessed drafts"). The C++ round
        (``NativeModel::draft_round``) guesses alike."""
        found = self.ngrams.guess(recent[-self.ngrams.max_ngram:], length)
        if not found and self.datastore is not None:
            found = self.datastore.propose(recent, length)[0]
        return found

    def guess_length(self, depth: int, room: int, pass_ms: tuple[float, ...] | None = None) -> int:
        """How many guessed tokens the self drafter's next pass checks (room: drafts the round has left;
        pass_ms: the round's ``DraftCosts.pass_ms``, None to ask the controller)."""
        return self.guesses.choose(depth, room, pass_ms) if self.guess_drafts else 0

    def draft_pass_macs(self, depth: int, first_position: int, rows: int) -> int:
        """A self-draft pass: layers [0, depth) over ``rows`` positions from ``first_position``, and the
        draft head (a d x shortlist product per row)."""
        return (self.costs.positions_macs(0, depth, first_position, rows)
                + rows * self.costs.hidden_size * self.draft_head.size)

    def native_draft(self) -> NativeLayers | None:
        """The C++ greedy draft step (``NativeLayers.draft_greedy``) where it computes what ``draw`` would:
        greedy decoding, a shortlist draft head, and the C++ layer loop available."""
        if not self.sampler.config.greedy or self.draft_head.weight_t is None:
            return None
        return self.model.native_for(self.cache, None)

    def _accept(self, draft: Draft, logits: torch.Tensor) -> tuple[int, int, list[float]]:
        """(accepted prefix length, the verifier's token after it or -1, p(t_i) per draft).

        logits: (k, V) verifier logits at positions pos..pos+k-1 (predicting t1..tk).
        """
        p_probs: list[float] = []
        if self.sampler.config.greedy:
            k = len(draft.tokens)
            ext = native_layers.extension()
            # one C++ pass per row for both (row_kernels.h greedy_verdict); None where it does not serve
            verdict = ext.greedy_verdict(logits[:k], draft.tokens) if ext is not None else None
            if verdict is not None:
                targets, p_all = verdict
            else:  # one softmax and one argmax over all k positions instead of k of each
                drafted = torch.tensor(draft.tokens, device=logits.device)[:, None]  # (k, 1)
                p_all = torch.softmax(logits[:k].float(), dim=-1).gather(1, drafted)[:, 0].tolist()
                targets = logits[:k].max(dim=-1).indices.tolist()  # = argmax (first of ties), 18 vs 45 us at k = 8
            for i, token in enumerate(draft.tokens):
                p_probs.append(p_all[i])
                if token != targets[i]:
                    return i, targets[i], p_probs
            return k, -1, p_probs
        for i, token in enumerate(draft.tokens):
            p = self.sampler.distribution(logits[i])
            q = draft.q[i]
            p_tok = float(p[token])
            p_probs.append(p_tok)
            q_tok = float(q[token]) if q is not None else 1.0
            u = float(torch.rand((), generator=self.sampler.generator))
            if u < min(1.0, p_tok / q_tok):  # q(t) > 0 always: t was drawn from q
                continue
            # rejection: draw from the residual max(0, p - q), renormalised
            residual = p - q if q is not None else p.clone().index_fill_(0, torch.tensor([token]), 0.0)
            residual = residual.clamp(min=0.0)
            total = float(residual.sum())
            residual = residual / total if total > 0 else p
            return i, int(torch.multinomial(residual, 1, generator=self.sampler.generator)), p_probs
        return len(draft.tokens), -1, p_probs

    def round(self, t0: int, remaining: int) -> tuple[list[Emitted], int]:
        """One draft-verify round from t0; returns the emitted tokens and the MACs spent."""
        model, L, pos = self.model, self.model.spec.num_layers, self.pos
        limit = min(remaining, self.max_len - pos)  # positions pos..pos+k-1 must fit in the cache
        # Every token of the sequence joins the draft shortlist before the next round drafts (t0 is new
        # only in the first round: the prefill's token; emitted tokens join at the end of each round).
        self.draft_head.add([t0])
        start = time.perf_counter()
        draft: Draft | None = None
        self.controller.plain_reason, self.controller.last_gain = "off", None
        if self.pending is not None:  # drafted from this t0 at this position during the last verification
            draft, self.pending = self.pending, None
        elif limit >= 2:  # a one-token draft can never emit more than a plain step
            if self.free_drafter is not None:  # free to try; falls back to model drafting when nothing matches
                draft = self.free_drafter.draft(self, t0, limit)
            if draft is None:
                depth = self.controller.plan()
                if depth is not None:
                    drafter = self.draft_model or self.self_drafter
                    draft = drafter.draft(self, t0, depth, limit)
        draft_ms = draft.ahead_ms if draft is not None and draft.ahead else (time.perf_counter() - start) * 1000

        start = time.perf_counter()
        k = len(draft.tokens) if draft else 0
        if draft is not None and draft.depth > 0:
            x, first_layer = draft.hidden, draft.depth  # resume from the draft's hidden states
        else:
            fed = [t0] + (draft.tokens[:-1] if draft else [])
            x, first_layer = model.embed(torch.tensor([fed], device=model.device), pos), 0
        ahead_limit = min(remaining - k, self.max_len - (pos + k))  # the next round's limit if all k are kept
        ahead: Draft | None = None
        if (self.overlap and draft is not None and draft.drafter == "self" and ahead_limit >= 2
                and draft.tokens[-1] not in self.eos and self.native_draft() is not None):
            verification = verifier_pool().submit(self._verify_pass, x, first_layer, pos)
            try:
                ahead = self.self_drafter._draft_greedy(self, draft.tokens[-1], draft.depth, ahead_limit,
                                                        ahead_of=(pos + k, [t0] + draft.tokens[:-1]),
                                                        done=verification.done)
            finally:  # never leave the worker writing this cache after an error here
                logits = verification.result()
        else:
            logits = self._verify_pass(x, first_layer, pos)
        n_pos = max(k, 1)
        macs = (draft.macs if draft and not draft.ahead else 0)  # an ahead draft was counted in its round
        macs += self.costs.head_macs * n_pos + self.costs.positions_macs(first_layer, L, pos, n_pos)
        if ahead is not None:  # counted whether it is kept or dropped
            macs += ahead.macs
        if draft is None:
            emitted = [Emitted(self.sampler.sample(logits[0]), "verified")]
            accepted, p_probs = 0, []
        else:
            accepted, correction, p_probs = self._accept(draft, logits)
            emitted = [Emitted(t, "draft") for t in draft.tokens[:accepted]]
            if correction >= 0:
                emitted.append(Emitted(correction, "correction"))
            evaluated = min(accepted + 1, k)  # drafts after the first rejection were never judged
            verdicts = [True] * accepted + [False] * (evaluated - accepted)
            self.controller.stats.record(draft.stats_key, draft.confidences[:evaluated], verdicts)
            self.controller.observe(draft.stats_key, verdicts)
        verify_ms = (time.perf_counter() - start) * 1000
        if ahead is None and not (draft is not None and draft.ahead):
            # the controller's costs are those of rounds in sequence: overlapped ones would skew them
            self.controller.record_round(draft.stats_key if draft else None, k, draft_ms, verify_ms,
                                         draft.rest_ms if draft else None, draft.rest_drafts if draft else 0,
                                         draft.first_rows if draft else 1)

        # Keep positions pos..pos+len(emitted)-1 (t0 and all emitted but the last, which is the next t0).
        new_pos = pos + len(emitted)
        if ahead is not None and accepted == k:  # the block drafted ahead starts at new_pos, from t_k
            self.pending = ahead
        else:  # (with a block ahead kept, every layer already holds exactly what it should)
            self.cache.crop(new_pos)
        if self.draft_model is not None:
            self.draft_model.rollback(new_pos)
        self.context.extend([t0] + [e.token for e in emitted[:-1]])
        self.draft_head.add([e.token for e in emitted])  # after the round: each draft's q stays as drawn
        self.pos = new_pos
        self.rounds.append(SpecRound(
            index=len(self.rounds), position=pos, drafter=draft.drafter if draft else "none",
            depth=draft.depth if draft else 0, drafted=list(draft.tokens) if draft else [], accepted=accepted,
            stop_reason=draft.stop_reason if draft else self.controller.plain_reason, draft_ms=draft_ms, verify_ms=verify_ms,
            q_probs=list(draft.q_probs) if draft else [], p_probs=p_probs,
            predicted_accept=list(draft.predicted_accept) if draft else [], predicted_gain=self.controller.last_gain,
            draft_passes=draft.passes if draft else 0, guessed=draft.guessed if draft else 0,
            drafted_ahead=draft is not None and draft.ahead, next_drafted=len(ahead.tokens) if ahead else 0))
        return emitted, macs

    def _verify_pass(self, x: torch.Tensor, first_layer: int, pos: int) -> torch.Tensor:
        """Layers [first_layer, L) over x (1, n, d) at positions [pos, pos + n), then the LM head: (n, V)."""
        h = self.model.run_layers(x, first_layer, self.model.spec.num_layers, pos, self.cache)
        return self.model.head(h)[0]

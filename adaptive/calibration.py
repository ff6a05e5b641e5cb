"""Learn-then-Test calibration of the early-exit threshold, with a certificate.

Goal: pick a threshold λ such that, with probability at least 1 − δ over the draw of the calibration
prompts, the expected disagreement with full depth at λ is at most ε.

Procedure (Angelopoulos et al., "Learn then Test", 2021):
1. The loss of one calibration prompt at λ is the share of its tokens whose early-exit choice differs
   from full depth's (teacher-forced, so each token is judged on the same prefix). Losses lie in
   [0, 1]; prompts are the i.i.d. units — tokens of one prompt are not independent, so they are
   never counted as separate samples.
2. For each λ, test H_λ: R(λ) > ε with the Hoeffding–Bentkus p-value of the mean loss.
3. Fixed-sequence testing from the most conservative λ (highest) downwards: reject while p ≤ δ, stop at
   the first failure. This controls the family-wise error at δ without a multiplicity correction, so
   every rejected λ — in particular the lowest, cheapest one — satisfies R(λ) ≤ ε with prob ≥ 1 − δ.

If not even the most conservative λ can be certified (too few prompts for the requested ε and δ),
the result says so and no threshold is certified.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import CheckpointError

CERTIFICATE_FILE = "calibration_certificate.json"
CERTIFICATE_FORMAT = "adaptive-ltt-certificate"


def _kl_bernoulli(a: float, b: float) -> float:
    """KL(Bern(a) || Bern(b)), with 0 log 0 = 0."""
    out = 0.0
    if a > 0:
        out += a * math.log(a / b)
    if a < 1:
        out += (1 - a) * math.log((1 - a) / (1 - b))
    return out


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binom(n, p) <= k), summed in log space (exact for the n used here)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
             for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def hoeffding_bentkus_p_value(mean_loss: float, n: int, epsilon: float) -> float:
    """p-value of H0: E[loss] > epsilon, for n i.i.d. losses in [0, 1] with empirical mean ``mean_loss``."""
    hoeffding = math.exp(-n * _kl_bernoulli(min(mean_loss, epsilon), epsilon))
    bentkus = math.e * binomial_cdf(math.ceil(n * mean_loss), n, epsilon)
    return min(1.0, hoeffding, bentkus)


PROJECTION_FILL = "layer projections"  # Runtime.kv_fill_source() of a model without learned K/V fill maps


@dataclass
class LTTResult:
    epsilon: float
    delta: float
    n: int  # calibration prompts
    threshold: float | None  # the certified threshold (lowest rejected), or None
    tested: list[dict] = field(default_factory=list)  # per λ in test order: threshold, risk, p_value, rejected

    @property
    def certified(self) -> bool:
        return self.threshold is not None


def learn_then_test(thresholds: list[float], losses: list[list[float]], epsilon: float, delta: float) -> LTTResult:
    """``losses[j][i]``: loss of prompt i at ``thresholds[j]``. Thresholds are tested from high to low."""
    if not 0 < epsilon < 1 or not 0 < delta < 1:
        raise ValueError("epsilon and delta must lie in (0, 1)")
    order = sorted(range(len(thresholds)), key=lambda j: -thresholds[j])
    n = len(losses[0]) if losses else 0
    result = LTTResult(epsilon=epsilon, delta=delta, n=n, threshold=None)
    for j in order:
        risk = sum(losses[j]) / n
        p = hoeffding_bentkus_p_value(risk, n, epsilon)
        rejected = p <= delta
        result.tested.append({"threshold": thresholds[j], "risk": risk, "p_value": p, "rejected": rejected})
        if not rejected:
            break  # fixed-sequence testing stops at the first failure
        result.threshold = thresholds[j]
    return result


@dataclass
class Certificate:
    """What was certified, on what data, by which procedure; stored next to the model."""

    epsilon: float
    delta: float
    n: int
    measure: str
    threshold: float
    exit_layers: list[int]
    exit_vocab_size: int
    kv_policy: str
    calibration_set_sha256: str
    observed_risk: float
    p_value: float
    tokens_per_prompt: int
    test_agreement: float | None = None  # teacher-forced agreement measured by real decoding on held-out text
    test_tokens: int = 0
    vocab_exit: float | None = None  # the vocabulary exit's own threshold (fixed while the main one is tested)
    vocab_exit_size: int = 0  # the vocabulary exit's own shortlist size (0: the exit shortlist)
    threshold_offsets: dict[str, float] = field(default_factory=dict)  # per exit layer, fixed relative to λ
    # How propagate filled skipped layers' K/V when this was certified (``Runtime.kv_fill_source()``): other
    # maps decode differently. Certificates from before learned fills existed used the projections.
    kv_fill: str = PROJECTION_FILL
    exit_adapters: bool = True  # exits read the model's adapters (certificates before the knob did)
    method: str = ("Learn-then-Test, fixed-sequence testing over thresholds from high to low, Hoeffding-Bentkus "
                   "p-values of the per-prompt teacher-forced disagreement with full depth")
    format: str = CERTIFICATE_FORMAT

    def knobs(self) -> dict:
        """The certified setting as early_exit knobs (the scheduler's certified candidate)."""
        return {"threshold": self.threshold, "measure": self.measure, "exit_layers": list(self.exit_layers),
                "exit_vocab_size": self.exit_vocab_size, "kv_policy": self.kv_policy, "vocab_exit": self.vocab_exit,
                "vocab_exit_size": self.vocab_exit_size, "threshold_offsets": self.threshold_offsets,
                "exit_adapters": self.exit_adapters}

    def covers(self, settings: dict) -> bool:
        """True when a request's early-exit settings are exactly the certified ones (``knobs``; a knob the
        settings leave out counts as its default), with the same K/V fill under ``propagate``."""
        defaults = {"exit_vocab_size": 0, "vocab_exit_size": 0, "exit_adapters": True}
        given = {k: settings.get(k, defaults.get(k)) for k in self.knobs()}
        given["exit_layers"] = list(given["exit_layers"] or [])
        given["threshold_offsets"] = given["threshold_offsets"] or {}
        return given == self.knobs() and (self.kv_policy != "propagate" or settings.get("kv_fill") == self.kv_fill)

    def summary(self) -> dict:
        return {"epsilon": self.epsilon, "delta": self.delta, "n": self.n, "threshold": self.threshold,
                "measure": self.measure, "calibration_set_sha256": self.calibration_set_sha256[:16],
                "test_agreement": self.test_agreement}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Certificate":
        try:
            payload = json.loads(Path(path).read_text())
            if payload.get("format") != CERTIFICATE_FORMAT:
                raise ValueError(f"format is {payload.get('format')!r}")
            return cls(**payload)
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path} is not a valid calibration certificate: {e}") from e


def calibration_set_hash(prompts: list[list[int]]) -> str:
    h = hashlib.sha256()
    for ids in prompts:
        h.update(json.dumps(ids).encode())
    return h.hexdigest()

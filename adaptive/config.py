"""One dataclass per concern; derived fields and range checks live in ``__post_init__``.

``ModelSpec`` describes the architecture the lean forward needs (filled by ``loading.py``, the only
module that reads Hugging Face configs). ``SamplingConfig`` and ``EarlyExitConfig`` hold the knobs of
``Runtime.generate``; their checks turn out-of-range input into ``InvalidRequestError`` up front.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import InvalidRequestError

MODES = ("full", "early_exit", "speculative", "auto")
KV_POLICIES = ("propagate", "defer")
MEASURES = ("max_prob", "margin", "entropy", "cosine", "attention", "patience", "classifier")
LOGIT_MEASURES = ("max_prob", "margin", "entropy")  # read from the exit head's logits alone


def parse_vocab_exit(text: str) -> float | None:
    """A command line's vocabulary-exit value: 'off' -> None, else a number (EarlyExitConfig checks its
    range). Anything else is a ValueError."""
    return None if text == "off" else float(text)


def parse_exit_layers(text: str | None) -> tuple[int, ...] | None:
    """Exit layers as a person types them: '4,6', '4 6' or '4, 6' -> (4, 6); blank -> None (the model's
    default). Anything but whole numbers is a ValueError whose message can be shown as is; the range is
    EarlyExitConfig's to check, as only it knows the model's depth."""
    parts = (text or "").replace(",", " ").split()
    if not parts:
        return None
    try:
        return tuple(int(part) for part in parts)
    except ValueError:
        raise ValueError(f"exit layers must be whole layer numbers like 4,6; got {text!r}") from None


def exit_knobs_from_flags(exit_layers: str | None, vocab_exit: str | None) -> dict:
    """The ``--exit-layers`` and ``--vocab-exit`` flags of a command as early-exit knobs (absent flags
    give no knob). A malformed flag is a ValueError that names it."""
    knobs = {}
    try:
        if (layers := parse_exit_layers(exit_layers)) is not None:
            knobs["exit_layers"] = layers
    except ValueError as e:
        raise ValueError(f"--exit-layers: {e}") from None
    if vocab_exit is not None:
        try:
            knobs["vocab_exit"] = parse_vocab_exit(vocab_exit)
        except ValueError:
            raise ValueError(f"--vocab-exit must be a number in [0, 1] or 'off', got {vocab_exit!r}") from None
    return knobs


def vocab_exit_fits(measure: str, exit_vocab_size: int, vocab_exit_size: int = 0) -> bool:
    """A vocabulary exit reads a shortlist (its own, else the exit shortlist) through a logit measure
    (see EarlyExitConfig)."""
    return bool(vocab_exit_size or exit_vocab_size) and measure in LOGIT_MEASURES
# Upper bound on max_new_tokens independent of the model: beyond it a request is a typo, not a plan.
ABSURD_MAX_NEW_TOKENS = 1_000_000


@dataclass(frozen=True)
class ModelSpec:
    """Architecture facts of a decoder-only LM, independent of where the weights came from."""

    family: str  # "llama" (Llama, Qwen2, Mistral, SmolLM) or "gpt2"
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    norm_eps: float
    norm_kind: str  # "rms" or "layer"
    mlp_kind: str  # "gated" (act(gate) * up) or "plain" (act(fc))
    activation: str  # "silu", "gelu_tanh", "gelu"
    positional: str  # "rope" or "learned"
    # Per layer: attend only to the last `w` positions (Mistral, Qwen2 sliding layers), or None.
    sliding_windows: tuple[int | None, ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = ""  # the HF class name, for messages and traces

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_layers)
        if len(self.sliding_windows) != self.num_layers:
            raise ValueError("sliding_windows needs one entry per layer")

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim


@dataclass(frozen=True)
class SamplingConfig:
    """How a token is picked from logits. temperature 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    seed: int | None = None

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)) or not (
            0.0 <= self.temperature <= 100.0
        ):
            raise InvalidRequestError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise InvalidRequestError(f"seed must be a non-negative integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class EarlyExitConfig:
    """Knobs of mode="early_exit".

    A token stops after layer k (1-based count of layers run) when k is an exit point, k >= min_layer
    and the confidence measure at k reaches ``threshold``. ``exit_layers`` restricts the exit points:
    every check through a logit-based measure costs one LM-head evaluation, which on small models
    weighs as much as several layers, so sparse exit points are often cheaper overall.

    ``vocab_exit`` (a *vocabulary exit*, needs an exit shortlist and a logit measure): a token that runs
    every layer reads the exit shortlist first and the rest of the LM head (the rows outside the
    shortlist) runs only when the measure is below ``vocab_exit``. On a small model that head is the largest matmul of a step (8192 x
    192 MACs, about 3.5 layers' worth). It has its own threshold because at full depth the shortlist can
    only be wrong when full depth's token lies outside it, far rarer than a shallow layer being wrong.
    ``vocab_exit_size`` gives the vocabulary exit a shortlist of its own (0: the exit shortlist): on test
    files a 512-token list is confidently wrong far more often than a 2048-token one, while the shallow
    checks, read at every exit point, are best kept small.

    ``exit_adapters`` (default True): exit checks and exits read the model's trained exit adapters, when it
    has them; False reads the plain logit lens. An adapter is a d x d matmul on every check (a quarter of
    a 512-row shortlist check at width 192): calibration keeps it only where its better exits pay for it.

    ``threshold_offsets`` ({exit layer: offset}): exit point k uses ``threshold + offset``. Under
    ``propagate`` an exit after k layers approximates the K/V of L - k layers, so a shallow exit needs
    more confidence than a deep one for the same damage; offsets let calibration loosen the deeper exits.
    Being relative, they keep ``threshold`` the one dial (a request that moves it moves every exit point,
    and Learn-then-Test certifies along that dial). Offsets of layers that are not exit points are ignored.
    """

    threshold: float = 0.9
    measure: str = "max_prob"
    min_layer: int = 1
    kv_policy: str = "propagate"
    exit_layers: tuple[int, ...] | None = None  # None: every layer from min_layer to L-1
    patience: int = 2  # for measure="patience": this many consecutive exits must agree
    exit_vocab_size: int = 0  # > 0: exit heads over the N most frequent tokens + the prompt's (needs a ranking)
    vocab_exit: float | None = None  # None: off; else the shortlist's threshold at full depth (see above)
    vocab_exit_size: int = 0  # rows of the vocabulary exit's own shortlist (0: exit_vocab_size's; see above)
    threshold_offsets: dict[int, float] | tuple = ()  # {exit layer: offset added to threshold} (see above)
    exit_adapters: bool = True  # read the model's exit adapters, when it has them (see above)
    num_layers: int = field(default=0, repr=False)  # set by the runtime for range checks

    def __post_init__(self):
        if self.measure not in MEASURES:
            raise InvalidRequestError(f"unknown measure {self.measure!r}; choose one of {', '.join(MEASURES)}")
        if self.kv_policy not in KV_POLICIES:
            raise InvalidRequestError(
                f"unknown kv_policy {self.kv_policy!r}; choose one of {', '.join(KV_POLICIES)}"
            )
        if not isinstance(self.threshold, (int, float)) or not (0.0 <= self.threshold <= 1.0):
            raise InvalidRequestError(f"threshold must be in [0, 1], got {self.threshold!r}")
        if not isinstance(self.exit_vocab_size, int) or self.exit_vocab_size < 0:
            raise InvalidRequestError(f"exit_vocab_size must be an integer >= 0 (0 = full vocabulary), got {self.exit_vocab_size!r}")
        if self.vocab_exit is not None and (not isinstance(self.vocab_exit, (int, float))
                                            or not 0.0 <= self.vocab_exit <= 1.0):
            raise InvalidRequestError(f"vocab_exit must be None (off) or a threshold in [0, 1], got {self.vocab_exit!r}")
        if isinstance(self.vocab_exit_size, bool) or not isinstance(self.vocab_exit_size, int) or self.vocab_exit_size < 0:
            raise InvalidRequestError(f"vocab_exit_size must be an integer >= 0 (0 = the exit shortlist), "
                                      f"got {self.vocab_exit_size!r}")
        if self.vocab_exit is not None and not vocab_exit_fits(self.measure, self.exit_vocab_size, self.vocab_exit_size):
            raise InvalidRequestError(
                "vocab_exit (the vocabulary exit at full depth) needs a shortlist (exit_vocab_size or vocab_exit_size "
                f"> 0) and a logit measure ({', '.join(LOGIT_MEASURES)}); got exit_vocab_size={self.exit_vocab_size}, "
                f"vocab_exit_size={self.vocab_exit_size}, measure={self.measure!r}")
        if not isinstance(self.exit_adapters, bool):
            raise InvalidRequestError(f"exit_adapters must be true or false, got {self.exit_adapters!r}")
        if not isinstance(self.patience, int) or self.patience < 1:
            raise InvalidRequestError(f"patience must be an integer >= 1, got {self.patience!r}")
        L = self.num_layers
        if not isinstance(self.min_layer, int) or self.min_layer < 1 or (L and self.min_layer > L):
            raise InvalidRequestError(f"min_layer must be an integer in [1, {L or 'num_layers'}], got {self.min_layer!r}")
        object.__setattr__(self, "threshold_offsets", self._checked_offsets(L))
        if self.exit_layers is not None:
            layers = tuple(sorted(set(int(k) for k in self.exit_layers)))
            if not layers or layers[0] < 1 or (L and layers[-1] > L):
                raise InvalidRequestError(f"exit_layers must be layer counts in [1, {L or 'num_layers'}], got {self.exit_layers!r}")
            object.__setattr__(self, "exit_layers", layers)

    def _checked_offsets(self, L: int) -> tuple[tuple[int, float], ...]:
        """``threshold_offsets`` as sorted (layer, offset) pairs; a dict from JSON has string keys."""
        raw = self.threshold_offsets
        pairs = raw.items() if isinstance(raw, dict) else raw
        try:
            out = tuple(sorted((int(k), float(v)) for k, v in pairs))
        except (TypeError, ValueError):
            raise InvalidRequestError(f"threshold_offsets must map exit layers to numbers, got {raw!r}") from None
        for k, v in out:
            if k < 1 or (L and k >= L) or not (math.isfinite(v) and -1.0 <= v <= 1.0):
                raise InvalidRequestError(
                    f"threshold_offsets must map exit layers in [1, {L - 1 if L else 'num_layers - 1'}] to offsets "
                    f"in [-1, 1], got {raw!r}")
        return out

    def threshold_at(self, layer: int) -> float:
        """The threshold exit point ``layer`` uses: ``threshold`` plus that layer's offset, if any."""
        return self.threshold + dict(self.threshold_offsets).get(layer, 0.0)

    def offsets_dict(self) -> dict[str, float]:
        """The offsets as JSON keeps them (string keys), for stats, defaults and certificates."""
        return {str(k): v for k, v in self.threshold_offsets}

    def exit_points(self, num_layers: int) -> frozenset[int]:
        """Layer counts k < L after which a token may stop (exiting at L is just full depth)."""
        candidates = self.exit_layers if self.exit_layers is not None else range(1, num_layers)
        return frozenset(k for k in candidates if self.min_layer <= k < num_layers)

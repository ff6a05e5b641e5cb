"""What a generation leaves behind: one ``TokenTrace`` per new token and a ``GenerationResult``.

Traces are plain data. They serialise to JSON and back (``to_json`` / ``from_json``) with validation,
so a trace written by the CLI can be uploaded to the app and redrawn without the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import TraceFormatError

TRACE_FORMAT = "adaptive-trace"
TRACE_VERSION = 1


@dataclass
class TokenTrace:
    """The record of one generated token and every decision that produced it."""

    token_id: int
    position: int  # absolute position in the sequence (prompt tokens come first)
    exit_layer: int  # 1..num_layers: how many layers produced this token's prediction
    confidence: float | None = None  # the measure's value at the exit layer (None when none was computed)
    drafted: bool = False
    accepted: bool | None = None
    gate: dict[str, float] | None = None  # path -> P(agrees with full depth) from the prompt gate (mode auto)
    text: str = ""  # the token's own decoded text (may be a partial UTF-8 sequence shown as U+FFFD)
    # Confidence at every layer that was checked, as {layer count: value}; keys are strings in JSON.
    layer_confidence: dict[int, float] = field(default_factory=dict)
    layer_top1: dict[int, int] = field(default_factory=dict)  # the exit head's argmax at each checked layer
    kv_fill_layers: int = 0  # skipped layers whose K/V was filled for this token (propagate)
    deferred_positions: int = 0  # earlier positions run through deeper layers alongside this token (defer)
    # Vocabulary exit: every layer ran, but the exit shortlist was confident, so the full LM head was skipped.
    full_head_skipped: bool = False
    macs: int = 0  # multiply-accumulates actually spent on this token, overheads included
    full_macs: int = 0  # what full depth would have spent on it
    elapsed_ms: float = 0.0  # wall time from the previous token (or the start of decoding)
    # Speculative decoding: "draft" (an accepted drafted token), "correction" (the verifier's token after a
    # rejection), "verified" (the verifier's own next token after a draft-free pass), "" otherwise.
    source: str = ""
    round: int | None = None  # index into GenerationResult.rounds

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_confidence"] = {str(k): v for k, v in self.layer_confidence.items()}
        d["layer_top1"] = {str(k): v for k, v in self.layer_top1.items()}
        return d

    @classmethod
    def from_dict(cls, d: Any, index: int = 0) -> "TokenTrace":
        where = f"trace {index}"
        if not isinstance(d, dict):
            raise TraceFormatError(f"{where}: expected an object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise TraceFormatError(f"{where}: unknown fields {sorted(unknown)}")
        for name in ("token_id", "position", "exit_layer"):
            if not isinstance(d.get(name), int) or isinstance(d.get(name), bool) or d[name] < 0:
                raise TraceFormatError(f"{where}: {name!r} must be a non-negative integer")
        kwargs = dict(d)
        try:
            kwargs["layer_confidence"] = {int(k): _number(v) for k, v in d.get("layer_confidence", {}).items()}
            kwargs["layer_top1"] = {int(k): int(v) for k, v in d.get("layer_top1", {}).items()}
            if kwargs.get("confidence") is not None:
                kwargs["confidence"] = _number(kwargs["confidence"])
            if kwargs.get("gate") is not None:
                kwargs["gate"] = {str(k): _number(v) for k, v in kwargs["gate"].items()}
        except (TypeError, ValueError, AttributeError) as e:
            raise TraceFormatError(f"{where}: {e}") from e
        return cls(**kwargs)


def _number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"expected a finite number, got {v!r}")
    return float(v)


@dataclass
class SpecRound:
    """One draft-then-verify round of speculative decoding."""

    index: int
    position: int  # position of the round's first fed token (t0)
    drafter: str  # "self", "draft_model", "lookup", "datastore" or "none" (no draft: a plain step)
    depth: int  # layers the draft ran (0: no shallow path, the verifier ran every layer)
    drafted: list[int]  # proposed tokens t1..tk
    accepted: int  # length of the accepted prefix
    stop_reason: str  # why drafting stopped: "max_len", "predicted_reject", "length_cap" (the request's ramp,
    # see FIRST_LENGTH_CAP), "eos", "context", "no_match", "off", or "measure" (a plain step taken to time the
    # full step it is compared against)
    draft_ms: float
    verify_ms: float
    q_probs: list[float]  # the draft's probability of each drafted token
    p_probs: list[float]  # the verifier's probability of each drafted token
    predicted_accept: list[float] = field(default_factory=list)  # the controller's P(accept) per draft
    # The controller's predicted speedup over plain steps when it planned this round (speculation runs
    # at >= 1); None where it was not evaluated: a timing step, a pause, a prompt-lookup round.
    predicted_gain: float | None = None
    # Model passes the draft took, and how many drafts came from a guess the shallow path checked in the
    # same pass (SelfDrafter: a pass drafts one token plus each agreeing guessed token); 0 without a model
    draft_passes: int = 0
    guessed: int = 0
    # Overlapped verification (speculative.verifier_pool): this round's draft was made while the previous
    # round verified (its draft_ms is inside that round's verify_ms), and the drafts made for the next block
    # while this round verified (kept only when every draft here was accepted)
    drafted_ahead: bool = False
    next_drafted: int = 0

    @property
    def judged(self) -> int:
        """Drafts the verifier judged: the accepted prefix and the first rejection (later ones never were)."""
        return min(self.accepted + 1, len(self.drafted))

    @classmethod
    def from_dict(cls, d: Any, index: int = 0) -> "SpecRound":
        if not isinstance(d, dict):
            raise TraceFormatError(f"round {index}: expected an object")
        known = {f.name for f in dataclasses.fields(cls)}
        if set(d) - known or not {"index", "drafter", "drafted", "accepted"} <= set(d):
            raise TraceFormatError(f"round {index}: unexpected or missing fields")
        if not isinstance(d["drafted"], list) or not isinstance(d["accepted"], int) or not 0 <= d["accepted"] <= len(d["drafted"]):
            raise TraceFormatError(f"round {index}: 'accepted' must count a prefix of 'drafted'")
        gain = d.get("predicted_gain")
        if gain is not None and (isinstance(gain, bool) or not isinstance(gain, (int, float)) or not gain >= 0):
            raise TraceFormatError(f"round {index}: 'predicted_gain' must be a number >= 0 or null")
        if not isinstance(d.get("drafted_ahead", False), bool):
            raise TraceFormatError(f"round {index}: 'drafted_ahead' must be true or false")
        for name in ("draft_passes", "guessed", "next_drafted"):
            value = d.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TraceFormatError(f"round {index}: {name!r} must be an integer >= 0")
        try:
            return cls(**d)
        except TypeError as e:
            raise TraceFormatError(f"round {index}: {e}") from e


@dataclass
class GenerationResult:
    token_ids: list[int]  # the new tokens only
    text: str
    traces: list[TokenTrace]
    stats: dict[str, Any]
    prompt_ids: list[int] = field(default_factory=list)
    prompt_text: str = ""
    stop_reason: str = ""  # "max_new_tokens", "eos" or "context"
    rounds: list[SpecRound] = field(default_factory=list)  # speculative decoding only

    def to_json(self) -> str:
        payload = {"format": TRACE_FORMAT, "version": TRACE_VERSION, "token_ids": self.token_ids,
                   "text": self.text, "prompt_ids": self.prompt_ids, "prompt_text": self.prompt_text,
                   "stop_reason": self.stop_reason, "stats": self.stats,
                   "traces": [t.to_dict() for t in self.traces],
                   "rounds": [dataclasses.asdict(r) for r in self.rounds]}
        return json.dumps(payload, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> "GenerationResult":
        try:
            payload = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TraceFormatError(f"not a JSON file: {e}") from e
        if not isinstance(payload, dict) or payload.get("format") != TRACE_FORMAT:
            raise TraceFormatError(f"not an adaptive trace: expected \"format\": \"{TRACE_FORMAT}\"")
        if payload.get("version") != TRACE_VERSION:
            raise TraceFormatError(f"unsupported trace version {payload.get('version')!r} (this runtime reads {TRACE_VERSION})")
        traces_raw = payload.get("traces")
        if not isinstance(traces_raw, list):
            raise TraceFormatError("'traces' must be a list")
        traces = [TokenTrace.from_dict(t, i) for i, t in enumerate(traces_raw)]
        token_ids = payload.get("token_ids")
        if not isinstance(token_ids, list) or [t.token_id for t in traces] != token_ids:
            raise TraceFormatError("'token_ids' must list the traces' token ids in order")
        stats = payload.get("stats", {})
        if not isinstance(stats, dict):
            raise TraceFormatError("'stats' must be an object")
        rounds_raw = payload.get("rounds", [])
        if not isinstance(rounds_raw, list):
            raise TraceFormatError("'rounds' must be a list")
        rounds = [SpecRound.from_dict(r, i) for i, r in enumerate(rounds_raw)]
        return cls(token_ids=token_ids, text=str(payload.get("text", "")), traces=traces, stats=stats,
                   prompt_ids=list(payload.get("prompt_ids", [])), prompt_text=str(payload.get("prompt_text", "")),
                   stop_reason=str(payload.get("stop_reason", "")), rounds=rounds)

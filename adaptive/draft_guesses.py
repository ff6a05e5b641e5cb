"""Guessed drafts: an index of the sequence's own n-grams to guess how it goes on (``ContextNgrams``),
and the rule for how much of a guess a draft pass should check (``GuessLength``).

The self drafter (``speculative.SelfDrafter``, with ``guess_drafts=True``) checks such a guess with its
shallow path in the same pass that drafts the next token: where the shallow path's own greedy choices
agree with the guess, the pass has drafted several tokens for the price of one pass of a few rows (which
is little more than one row where small matrix products are as fast as a single row's). Small models'
greedy output, and code in general, repeat themselves: on the bundled model's benchmark prompts the
latest earlier continuation of the last 1-3 tokens names the depth-3 draft's next token at 77% of
positions.

The index reads the decoder's own list of committed tokens and indexes what was appended since its last
guess, so a guess costs a dict lookup instead of a scan of the context (the prompt-lookup drafter's
``propose`` scans; it runs once per round, a guess once per pass), and a request that never guesses
indexes nothing.
"""

from __future__ import annotations


class ContextNgrams:
    """Where each 1..max_ngram-gram of the committed tokens occurred, by the position right after it."""

    def __init__(self, tokens: list[int] | None = None, max_ngram: int = 3, min_ngram: int = 1):
        """``tokens``: the committed tokens, a list its owner appends to (shared, not copied)."""
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.tokens: list[int] = [] if tokens is None else tokens
        self.follows: dict[tuple[int, ...], list[int]] = {}  # n-gram -> start of what followed each occurrence
        self._indexed = 0  # tokens[:_indexed] are in ``follows``

    def extend(self, tokens: list[int]) -> None:
        """Commit ``tokens`` after the ones there (for an index that owns its list)."""
        self.tokens.extend(tokens)

    def _catch_up(self) -> None:
        """Index the n-grams ending in tokens appended since the last call."""
        for end in range(self._indexed + 1, len(self.tokens) + 1):
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self.follows.setdefault(tuple(self.tokens[end - n:end]), []).append(end)
        self._indexed = len(self.tokens)

    def guess(self, tail: list[int], length: int) -> list[int]:
        """Up to ``length`` tokens that followed the latest earlier occurrence of the end of ``tail``
        (the longest n-gram with an occurrence first). ``tail`` may end in tokens not committed yet
        (drafts); the continuation always comes from committed tokens.

        Prefer the latest occurrence with a full ``length`` of continuation: the very latest is often
        inside a run of one token, near the end of the sequence, with little after it."""
        if length <= 0:
            return []
        self._catch_up()
        for n in range(min(self.max_ngram, len(tail)), self.min_ngram - 1, -1):
            found = latest_continuation(self.tokens, reversed(self.follows.get(tuple(tail[-n:]), ())), length)
            if found:
                return found
        return []


def latest_continuation(tokens: list[int], starts, length: int) -> list[int]:
    """``length`` tokens from the first of ``starts`` (most recent first) that has that many after it,
    else the longest continuation any of them has (the prompt-lookup drafter's rule too)."""
    best: list[int] = []
    for start in starts:
        follow = tokens[start:start + length]
        if len(follow) == length:
            return follow
        if len(follow) > len(best):
            best = follow
    return best


class GuessLength:
    """How many guessed tokens a draft pass should check: as many as maximise drafts per millisecond.

    A pass of r rows costs ``pass_ms(r)`` (measured: on some hosts a second row costs almost nothing, on
    others, where small matrix products take a slower kernel than a single row's, nearly as much as the
    first; a row count whose passes turn out dear in the decode loop stops being chosen). A guess of g
    tokens, each agreeing with probability beta given that the ones before it did, drafts 1 + beta + ... +
    beta^g tokens on average; g = 0 (one row, no guess) is always a candidate, so guessing switches itself
    off where it does not pay. beta is this request's running agreement, with a prior worth
    ``PRIOR_WEIGHT`` guessed tokens.
    """

    PRIOR, PRIOR_WEIGHT = 0.6, 8

    def __init__(self, pass_ms):
        # (depth, rows) -> predicted ms of one draft pass (SpeculationController.measured_pass_ms: the
        # start-up costs corrected by passes measured in rounds, so it follows them as they come in)
        self.pass_ms = pass_ms
        self.agreed: dict[int, int] = {}  # per draft depth: guessed tokens the draft agreed with ...
        self.compared: dict[int, int] = {}  # ... of those it was compared with

    def beta(self, depth: int) -> float:
        return ((self.agreed.get(depth, 0) + self.PRIOR_WEIGHT * self.PRIOR)
                / (self.compared.get(depth, 0) + self.PRIOR_WEIGHT))

    def record(self, depth: int, agreed: int, compared: int) -> None:
        self.agreed[depth] = self.agreed.get(depth, 0) + agreed
        self.compared[depth] = self.compared.get(depth, 0) + compared

    def choose(self, depth: int, room: int, pass_ms: tuple[float, ...] | None = None) -> int:
        """The guess length (0..room) with the most expected drafts per predicted ms. ``pass_ms``: the
        predicted ms of passes of 1, 2, ... rows, at least room + 1 of them (None: ask ``self.pass_ms``)."""
        if room <= 0:
            return 0
        costs = pass_ms or [self.pass_ms(depth, rows) for rows in range(1, room + 2)]
        beta = self.beta(depth)
        best_rate, best = 1.0 / costs[0], 0
        expected, p = 1.0, 1.0
        for g in range(1, room + 1):
            p *= beta
            expected += p
            rate = expected / costs[g]
            if rate > best_rate:
                best_rate, best = rate, g
        return best

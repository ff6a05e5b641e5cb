"""Choose a checkpoint's default early-exit setting on validation prompts, and the speculative priors.

Target: the setting with the lowest honest ``compute_fraction`` whose teacher-forced agreement with
full depth is at least ``target`` (0.99) plus a small ``margin`` (picking the cheapest of thousands of
settings that pass on a few thousand tokens is optimistic; the margin pays for that on unseen text). By
default the margin is measured: 1.645 prompt-level standard errors of agreement at a setting near the
target (``sampling_margin``), so it shrinks with more calibration prompts and grows on a noisier model.
Candidates: measure x exit-layer set x threshold x exit vocabulary size x exit adapters on / off x KV
policy (x vocabulary exit).

1. Prompts: ``num_prompts`` contexts of ``min_context``..``max_context`` tokens, each starting at a line
   start of a different file of the split (seeded), and the full-depth greedy continuation of
   ``new_tokens`` tokens as the reference.
2. Simulation (prunes thousands of settings in seconds): one full-depth pass over prompt + reference
   gives every layer's hidden state at every predicting position. From those, each setting's exit
   layer per token, the token it would emit and the MACs it would spend are computed exactly as the
   decoder charges them (layers, K/V fill, every exit-head check, adapters). This is exact for
   ``defer`` (its K/V are exact) and an approximation for ``propagate`` (its K/V of skipped layers are
   not the real ones, which shifts later hidden states a little).
3. Confirmation: the cheapest settings of the best few families (measure, exits, vocabulary, policy)
   are decoded for real with ``rt.generate(..., follow=reference)``; a family that misses the target
   is retried at a stricter threshold, and when that passes, the thresholds between the miss and the pass
   are bisected by real decoding. Before that, the cheapest ``propagate`` families (logit measures) are
   searched by exact replay (``replay_propagate``: one layer-by-layer pass per prompt gives what
   token-by-token decoding gives, so each family's cheapest passing threshold is found by bisection);
   a replayed winner is decoded for real as well. The cheapest confirmed setting at target + margin wins (else the
   cheapest at target). If none reaches the target, the confirmed setting with the highest agreement is
   kept and ``meets_target`` is false.

Speculative priors: the agreement of the exit head after the light and standard draft depths (over
the ``draft_vocab_size`` shortlist) with the final layer, on the same teacher-forced positions.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..config import LOGIT_MEASURES
from ..draft_vocab import shortlist
from ..exits import make_measure
DEFAULT_VOCAB_SIZES = (0, 512, 1024, 2048)


# ---- prompts ----------------------------------------------------------------------------------------
@dataclass
class PromptCase:
    source: str  # file of the split the context comes from
    prompt_ids: list[int]
    reference: list[int] = field(default_factory=list)  # full-depth greedy continuation


def sample_prompts(rt, split: str = "validation", num_prompts: int = 24, min_context: int = 64,
                   max_context: int = 128, seed: int = 0, min_tail: int = 0) -> list[PromptCase]:
    """Contexts from distinct files of ``split``, each starting at a (non-blank) line start.

    ``min_tail``: tokens the file must still hold after the context (0: none needed)."""
    from .corpus import iter_documents

    rng = random.Random(seed)
    docs = [d for d in iter_documents(split) if len(d.text) > 8 * (max_context + min_tail)]
    rng.shuffle(docs)
    cases = []
    for doc in docs:
        if len(cases) == num_prompts:
            break
        starts = [0] + [i + 1 for i, c in enumerate(doc.text) if c == "\n" and doc.text[i + 1:i + 2] not in ("\n", "")]
        context = rng.randint(min_context, max_context)
        for _ in range(8):  # a few tries: a start near the end of a file leaves too little text
            chunk = doc.text[(off := rng.choice(starts)):off + 16 * (context + min_tail)]
            ids = rt.encode(chunk) if chunk.strip() else []
            if len(ids) >= context + min_tail:
                cases.append(PromptCase(doc.relpath, ids[:context]))
                break
    if len(cases) < num_prompts:
        raise SystemExit(f"error: the {split} split gave only {len(cases)} of {num_prompts} prompts")
    return cases


def add_references(rt, cases: list[PromptCase], new_tokens: int, progress: bool = True) -> None:
    from tqdm import tqdm

    for case in tqdm(cases, desc="full-depth references", disable=not progress):
        case.reference = rt.generate(case.prompt_ids, new_tokens, mode="full", stop_at_eos=False).token_ids


# ---- simulation tables ----------------------------------------------------------------------------
@torch.inference_mode()
def readout(rt, case: PromptCase) -> torch.Tensor:
    """(L+1, N, d): embedding and each layer's hidden state at the N positions predicting the reference."""
    model = rt.model
    seq = case.prompt_ids + case.reference
    first, n = len(case.prompt_ids) - 1, len(case.reference)
    cache = model.new_cache(1, len(seq))
    h = model.embed(torch.tensor([seq], device=model.device), 0)
    states = [h[0, first:first + n]]
    for layer in range(model.spec.num_layers):
        h = model.layer(layer, h, 0, cache)
        states.append(h[0, first:first + n])
    return torch.stack(states).float()


@dataclass
class SimTable:
    """Everything a setting's outcome depends on, for one exit-vocabulary size; P prompts x N steps."""

    exit_vocab_size: int  # 0: the full vocabulary
    # measure -> (L+1, P, N) confidence after k layers (rows 1..L-1; row L too for logit measures over a
    # shortlist: the vocabulary exit's check at full depth)
    conf: dict[str, np.ndarray]
    top1: np.ndarray  # (L+1, P, N) token emitted when exiting after k layers; row L = the reference
    check_macs: np.ndarray  # (L+1, P) one exit-head check after k layers (shortlist rows x d + adapter)
    classifier_macs: int = 0  # one learned-classifier check (measure "classifier"; no head until the exit)
    vocab_top1: np.ndarray | None = None  # (P, N) the shortlist's argmax at full depth (vocabulary exit)
    # (P, N) what agreement is counted against; None: top1[L]. A replayed propagate table sets it, since
    # its full-depth tokens may differ from the reference (they read approximate K/V).
    reference: np.ndarray | None = None
    adapters: bool = True  # exits read the model's exit adapters (``EarlyExitConfig.exit_adapters``)

    @property
    def key(self) -> tuple[int, bool]:
        """What a family reads this table by: (exit vocabulary size, adapters)."""
        return self.exit_vocab_size, self.adapters


@dataclass
class SimCosts:
    layer_cum: np.ndarray  # (L+1, P, N) MACs of layers [0, k) at each step's position
    layer_macs: np.ndarray  # (L, P, N) MACs of layer l at each step's position
    full: np.ndarray  # (P, N) full depth + head, the reference cost of each token
    kv_fill: int  # K/V projections of one skipped layer
    head_full: int  # the full LM head


def _exit_rows(rt, size: int, prompt_ids: list[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(shortlist ids or None for the whole vocabulary, the LM-head rows (rows, d) in fp32) of an exit
    head of ``size`` tokens for this prompt."""
    ids = shortlist(rt.draft_ranking, size, prompt_ids) if size else None
    head = rt.model.w.lm_head
    return ids, (head.float() if ids is None else head.index_select(0, ids).float())


def _read_exit(rt, h: torch.Tensor, k: int, ids: torch.Tensor | None,
               w: torch.Tensor, heads=None) -> tuple[torch.Tensor, np.ndarray, int]:
    """The exit head after k layers on states h (N, d), as the decoder reads it (``heads``' adapter below
    full depth, default the runtime's; final norm; the rows ``w``): (logits (N, rows), emitted token ids
    (N,), MACs of one check)."""
    heads = heads or rt.heads
    logits = torch.nn.functional.linear(rt.model.final_norm(heads.adapt(h, k)), w)  # (N, rows)
    arg = logits.argmax(-1)
    macs = rt.spec.hidden_size * w.shape[0] + (rt.costs.adapter_macs if heads.has_adapter(k) else 0)
    return logits, (arg if ids is None else ids[arg]).numpy(), macs


def build_tables(rt, cases: list[PromptCase], vocab_sizes=DEFAULT_VOCAB_SIZES,
                 progress: bool = True) -> tuple[list[SimTable], SimCosts, float]:
    """Simulation tables per exit-vocabulary size and (when the model has exit adapters) with and without
    them, the cost arrays, and how often the readout's final top-1 equals the reference (a sanity check:
    should be 1.0 up to float ties)."""
    from tqdm import tqdm

    model, costs = rt.model, rt.costs
    L, V = model.spec.num_layers, model.spec.vocab_size
    P, N = len(cases), len(cases[0].reference)
    states = [readout(rt, c) for c in tqdm(cases, desc="readout", disable=not progress)]
    ref = np.array([c.reference for c in cases])  # (P, N)
    layer_macs = np.zeros((L, P, N), dtype=np.float64)
    for p, c in enumerate(cases):
        for i in range(N):
            q = len(c.prompt_ids) - 1 + i  # the step that predicts token i reads position q
            for layer in range(L):
                layer_macs[layer, p, i] = costs.layer_macs(layer, q)
    layer_cum = np.concatenate([np.zeros((1, P, N)), np.cumsum(layer_macs, axis=0)])
    full = layer_cum[L] + costs.head_macs
    sim_costs = SimCosts(layer_cum, layer_macs, full, costs.kv_fill_macs, costs.head_macs)
    sizes = [s for s in vocab_sizes if s == 0 or (rt.draft_ranking and 0 < s < V)]
    variants = [(size, adapters) for adapters in ((True, False) if rt.heads.adapters else (True,)) for size in sizes]
    tables, final_match = [], 0.0
    with torch.inference_mode():
        for size, adapters in variants:
            heads = rt.heads.for_request(adapters)
            hidden_measures = ("cosine", "classifier") if rt.exit_classifier is not None else ("cosine",)
            conf = {m: np.zeros((L + 1, P, N)) for m in (*LOGIT_MEASURES, *hidden_measures)}
            top1 = np.zeros((L + 1, P, N), dtype=np.int64)
            top1[L] = ref
            check = np.zeros((L + 1, P))
            vocab_top1 = np.zeros((P, N), dtype=np.int64) if size else None
            for p, (c, hs) in enumerate(zip(cases, states)):
                ids, w = _exit_rows(rt, size, c.prompt_ids)
                for k in range(1, L):
                    logits, top1[k, p], check[k, p] = _read_exit(rt, hs[k], k, ids, w, heads)
                    for m in LOGIT_MEASURES:
                        conf[m][k, p] = make_measure(m).score(logits, hs[k], hs[k - 1]).numpy()
                    conf["cosine"][k, p] = make_measure("cosine").score(None, hs[k], hs[k - 1]).numpy()
                    if rt.exit_classifier is not None:
                        conf["classifier"][k, p] = rt.exit_classifier.probability(k, hs[k], hs[k - 1]).numpy()
                if size:  # the vocabulary exit: the shortlist read at full depth, before the full head
                    logits, vocab_top1[p], check[L, p] = _read_exit(rt, hs[L], L, ids, w)
                    for m in LOGIT_MEASURES:
                        conf[m][L, p] = make_measure(m).score(logits, hs[L], hs[L - 1]).numpy()
                if size == 0 and adapters:
                    final_match += float((model.head(hs[L]).argmax(-1).numpy() == ref[p]).mean()) / P
            tables.append(SimTable(size, conf, top1, check,
                                   rt.exit_classifier.macs if rt.exit_classifier is not None else 0, vocab_top1,
                                   adapters=adapters))
    return tables, sim_costs, final_match


@dataclass
class ReplayPass:
    """Hidden states of one replayed ``propagate`` pass over a sequence (1, S)."""

    final: torch.Tensor  # (1, S, d) after all L layers
    before_final: torch.Tensor  # (1, S, d) after L-1 layers (the last layer's input)
    exit_layer: torch.Tensor  # (S,) layers each position ran before it exited (L: none)


def replay_pass(model, ids: torch.Tensor, cache, may_exit: torch.Tensor, wants_exit) -> ReplayPass:
    """``propagate`` decoding of ids (1, S) replayed in one layer-by-layer pass.

    After each k < L layers, ``wants_exit(k, h, prev)`` (states after k and k-1 layers, (1, S, d)) returns
    the positions whose exit confidence reaches the threshold ((S,) bool), or None where k is no exit
    point; those in ``may_exit`` that have not exited yet exit after k layers. The decision is sound in
    one pass because a position's states after k layers only depend on earlier positions' K/V below k,
    which are final by then. From the next layer on, an exited position's K/V are computed from its exit
    state (``LeanModel.layer(kv_source=..., kv_exit=...)``), as ``propagate_kv`` fills them (with the
    model's learned fill maps when it has them). Calibration replays real decoding this way, and
    ``fit_kv_fill`` trains the fill maps through it (the exit states are detached: only the maps learn).
    """
    L = model.spec.num_layers
    exit_layer = torch.full((ids.shape[1],), L)
    h = prev = model.embed(ids, 0)  # (1, S, d)
    source = h  # (1, S, d): the K/V source of each exited position (its exit state)
    for layer in range(L):
        prev = h
        exited = bool((exit_layer < layer).any())
        h = model.layer(layer, h, 0, cache, kv_source=source if exited else None, kv_exit=exit_layer)
        k = layer + 1
        if k == L:
            break
        wants = wants_exit(k, h, prev)
        if wants is not None:
            now = wants & may_exit & (exit_layer == L)
            source = torch.where(now[None, :, None], h.detach(), source)
            exit_layer[now] = k
    return ReplayPass(h, prev, exit_layer)


@torch.inference_mode()
def replay_propagate(rt, cases: list[PromptCase], family: "Family", threshold: float) -> SimTable:
    """The SimTable of one ``propagate`` setting (logit measures), built from hidden states that read
    exactly the K/V real decoding would have: each case is replayed in one pass over prompt + reference
    (``replay_pass``). So ``simulate`` on this table at ``threshold`` gives the agreement, exits and
    compute of teacher-forced decoding (``decode_forced``) without the token-by-token loop.
    Rows of other thresholds are meaningless: every threshold needs its own replay."""
    if family.measure not in LOGIT_MEASURES or family.kv_policy != "propagate":
        raise ValueError("replay covers propagate settings with a logit measure")
    model, L = rt.model, rt.spec.num_layers
    P, N = len(cases), len(cases[0].reference)
    measure, size, exits = make_measure(family.measure), family.exit_vocab_size, set(family.exit_layers)
    heads = rt.heads.for_request(family.exit_adapters)
    offsets = dict(family.offsets)
    conf = np.zeros((L + 1, P, N))
    top1 = np.zeros((L + 1, P, N), dtype=np.int64)
    check = np.zeros((L + 1, P))
    vocab_size = family.vocab_exit_size or size  # the vocabulary exit's shortlist
    vocab_top1 = np.zeros((P, N), dtype=np.int64) if vocab_size else None
    for p, c in enumerate(cases):
        ids, w = _exit_rows(rt, size, c.prompt_ids)
        vids, vw = (ids, w) if vocab_size == size else _exit_rows(rt, vocab_size, c.prompt_ids)
        seq = c.prompt_ids + c.reference
        first = len(c.prompt_ids) - 1  # the position whose prediction is reference[0] (the prefill's token)
        steps = slice(first, first + N)
        may_exit = torch.zeros(len(seq), dtype=torch.bool)
        may_exit[first + 1:first + N] = True  # decode steps; the prefill's token takes full depth

        def read_exit(k: int, h: torch.Tensor, prev: torch.Tensor) -> torch.Tensor | None:
            """Records every depth's exit readout; decides at the family's exit points."""
            hs = h[0, steps].float()  # (N, d)
            logits, top1[k, p], check[k, p] = _read_exit(rt, hs, k, ids, w, heads)
            conf[k, p] = measure.score(logits, hs, prev[0, steps].float()).numpy()
            if k not in exits:
                return None
            wants = torch.zeros(len(seq), dtype=torch.bool)
            wants[steps] = torch.as_tensor(conf[k, p] >= threshold + offsets.get(k, 0.0))
            return wants

        replayed = replay_pass(model, torch.tensor([seq], device=model.device), model.new_cache(1, len(seq)),
                               may_exit, read_exit)
        hs = replayed.final[0, steps].float()
        top1[L, p] = model.head(hs).argmax(-1).numpy()
        if vocab_size:  # the vocabulary exit's check at full depth
            logits, vocab_top1[p], check[L, p] = _read_exit(rt, hs, L, vids, vw)
            conf[L, p] = measure.score(logits, hs, replayed.before_final[0, steps].float()).numpy()
    return SimTable(size, {family.measure: conf}, top1, check, 0, vocab_top1,
                    reference=np.array([c.reference for c in cases]), adapters=family.exit_adapters)


def replay_outcome(rt, cases: list[PromptCase], costs: SimCosts, family: "Family",
                   threshold: float) -> tuple[float, float, float]:
    """(agreement, compute fraction, mean layers run) of a propagate setting, replayed (see above)."""
    res = simulate(replay_propagate(rt, cases, family, threshold), costs, family, np.array([threshold]))
    return float(res.agreement[0]), float(res.compute[0]), float(res.layers_mean[0])


# ---- settings and their simulated outcome -----------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """Everything of a setting but the threshold."""

    measure: str
    exit_layers: tuple[int, ...]
    exit_vocab_size: int
    kv_policy: str
    patience: int = 2
    vocab_exit: float | None = None  # the vocabulary exit's threshold (None: off)
    offsets: tuple[tuple[int, float], ...] = ()  # (exit layer, offset added to the threshold there)
    vocab_exit_size: int = 0  # the vocabulary exit's own shortlist (0: exit_vocab_size's)
    exit_adapters: bool = True  # exits read the model's exit adapters

    @property
    def table_key(self) -> tuple[int, bool]:
        """The simulation table this family's exits read (``SimTable.key``)."""
        return self.exit_vocab_size, self.exit_adapters

    def knobs(self, threshold: float) -> dict:
        k = {"threshold": float(threshold), "measure": self.measure, "exit_layers": list(self.exit_layers),
             "exit_vocab_size": self.exit_vocab_size, "kv_policy": self.kv_policy, "min_layer": 1,
             # stated even when off: a request must not inherit the model's default vocabulary exit
             "vocab_exit": None if self.vocab_exit is None else float(self.vocab_exit),
             # likewise its own shortlist (0: the exit shortlist)
             "vocab_exit_size": int(self.vocab_exit_size),
             # likewise the offsets (none: {})
             "threshold_offsets": {str(layer): float(off) for layer, off in self.offsets},
             "exit_adapters": self.exit_adapters}
        if self.measure == "patience":
            k["patience"] = self.patience
        return k

    @classmethod
    def of(cls, knobs: dict) -> "Family":
        """The family of a setting's knobs (the inverse of ``knobs``)."""
        return cls(knobs["measure"], tuple(knobs["exit_layers"]), knobs.get("exit_vocab_size", 0), knobs["kv_policy"],
                   knobs.get("patience", 2), knobs.get("vocab_exit"),
                   tuple(sorted((int(k), float(v)) for k, v in (knobs.get("threshold_offsets") or {}).items())),
                   knobs.get("vocab_exit_size", 0), knobs.get("exit_adapters", True))


@dataclass
class SimResult:
    family: Family
    thresholds: np.ndarray  # (M,) ascending
    agreement: np.ndarray  # (M,)
    compute: np.ndarray  # (M,)
    layers_mean: np.ndarray  # (M,)

    def cheapest(self, target: float) -> int | None:
        """Index of the cheapest threshold whose simulated agreement reaches ``target``."""
        ok = np.nonzero(self.agreement >= target)[0]
        return None if not len(ok) else int(ok[np.argmin(self.compute[ok])])


def threshold_grid(conf: np.ndarray, levels: int = 48) -> np.ndarray:
    """Quantiles of the pooled confidences, dense near the top where 99% agreement lives."""
    q = 1.0 - np.geomspace(0.9, 2e-4, levels)
    # The top value means "never exit"; thresholds stay within [0, 1], which the runtime accepts.
    return np.unique(np.clip(np.concatenate([np.quantile(conf, q), [conf.max() + 1e-6]]), 0.0, 1.0))


def with_vocab_exit_rows(exit_table: SimTable, vocab_table: SimTable) -> SimTable:
    """``exit_table`` whose vocabulary-exit rows (confidence and argmax at full depth, the check's MACs)
    come from ``vocab_table``: exit checks over one shortlist, the vocabulary exit over another."""
    L = exit_table.top1.shape[0] - 1
    conf = {}
    for m, c in exit_table.conf.items():
        conf[m] = c.copy()
        if m in LOGIT_MEASURES:
            conf[m][L] = vocab_table.conf[m][L]
    check = exit_table.check_macs.copy()
    check[L] = vocab_table.check_macs[L]
    return replace(exit_table, conf=conf, check_macs=check, vocab_top1=vocab_table.vocab_top1)


def tables_by_key(tables: list[SimTable]) -> dict[tuple[int, bool], SimTable]:
    return {t.key: t for t in tables}


def table_of(by_key: dict[tuple[int, bool], SimTable], family: Family) -> SimTable:
    """The simulation table a family reads: its exit shortlist's (with or without adapters), with the
    vocabulary exit's own rows."""
    table = by_key[family.table_key]
    if family.vocab_exit is not None and family.vocab_exit_size:
        return with_vocab_exit_rows(table, by_key[(family.vocab_exit_size, family.exit_adapters)])
    return table


def simulate(table: SimTable, costs: SimCosts, family: Family, thresholds: np.ndarray) -> SimResult:
    """Agreement, compute fraction and mean layers of ``family`` at each threshold (all prompts pooled).

    Mirrors EarlyExitDecoder.step: a token exits after the first exit point k (in order) whose
    confidence reaches the threshold; each check through a logit measure costs one (shortlisted) head;
    an exit fills the skipped layers' K/V (propagate) or leaves them for the next deep token (defer);
    a token that never exits runs the full head, unless the family has a vocabulary exit whose own
    threshold the shortlist's confidence at full depth reaches (then the shortlist's argmax is emitted
    and the full head skipped; otherwise only the rows outside the shortlist are added, so such a token
    pays one full head in all). The first new token comes from the prefill, at full depth.
    """
    L = costs.layer_cum.shape[0] - 1
    P, N = costs.full.shape
    E, first, exit_k, vocab, emitted = _decide(table, family, thresholds, L)
    pi = np.arange(P)[None, :, None]
    ni = np.arange(N)[None, None, :]
    truth = table.top1[L] if table.reference is None else table.reference
    agree = (emitted == truth[None]).mean(axis=(1, 2))
    # Exit-head checks: cumulative over the exit points passed through, per prompt (shortlists differ).
    check = table.check_macs[E]  # (|E|, P)
    if family.measure in ("cosine", "classifier"):  # hidden-state measures: one head, at the exit
        heads = np.where(exit_k < L, table.check_macs[np.minimum(exit_k, L - 1), pi], costs.head_full)
        if family.measure == "classifier":  # plus the classifier's own matmuls at every check made
            heads = heads + np.where(first < len(E), first + 1, len(E)) * table.classifier_macs
    else:
        cum = np.concatenate([np.cumsum(check, axis=0), check.sum(0, keepdims=True)])  # (|E|+1, P)
        at_full = np.full(vocab.shape, costs.head_full)  # the full head...
        if family.vocab_exit is not None:
            # ...unless a vocabulary exit skipped it after the shortlist's check; a miss computes only the
            # rows outside the shortlist (``ShortlistHead.complete``), so check + rest = one full head
            at_full = np.where(vocab, table.check_macs[L][pi], at_full)
        heads = cum[first, pi] + np.where(exit_k < L, 0, at_full)
    if family.kv_policy == "propagate":
        layers = costs.layer_cum[exit_k, pi, ni] + (L - exit_k) * costs.kv_fill
    else:  # defer: layer l runs for every position up to the last step that itself ran layer l
        ran = exit_k[None] > np.arange(L)[:, None, None, None]  # (L, M, P, N)
        covered = np.flip(np.maximum.accumulate(np.flip(ran, -1), axis=-1), -1)
        layers = (covered * costs.layer_macs[:, None]).sum(0)
    macs = np.where(np.arange(N)[None, None] == 0, costs.full[None], layers + heads)
    compute = macs.sum(axis=(1, 2)) / costs.full.sum()
    layers_mean = exit_k.mean(axis=(1, 2))
    return SimResult(family, np.asarray(thresholds, dtype=np.float64), agree, compute, layers_mean)


def _decide(table: SimTable, family: Family, thresholds, L: int):
    """What the decoder decides per token at each threshold: (exit points E, first passing index into E
    (len(E): none) (M, P, N), exit layer (M, P, N), took the vocabulary exit (M, P, N), emitted token (M, P, N))."""
    E = np.array(family.exit_layers)
    if family.vocab_exit is not None and (table.vocab_top1 is None or family.measure not in LOGIT_MEASURES):
        raise ValueError("a vocabulary exit needs a shortlist table and a logit measure")
    P, N = table.top1.shape[1:]
    if family.measure == "patience":  # run of consecutive exit points whose top-1 agrees
        tops = table.top1[E]
        run = np.ones_like(tops, dtype=np.float64)
        for j in range(1, len(E)):
            run[j] = np.where(tops[j] == tops[j - 1], run[j - 1] + 1, 1)
        conf = np.minimum(run / family.patience, 1.0)
    else:
        conf = table.conf[family.measure][E]  # (|E|, P, N)
    if family.offsets:  # exit point k passes at threshold + offset_k: shift its confidence down instead
        shift = dict(family.offsets)
        conf = conf - np.array([shift.get(int(k), 0.0) for k in E])[:, None, None]
    thr = np.asarray(thresholds, dtype=np.float64)
    passed = conf[:, None] >= thr[None, :, None, None]  # (|E|, M, P, N)
    any_pass = passed.any(0)
    first = np.where(any_pass, passed.argmax(0), len(E))  # (M, P, N) index into E, len(E): none
    first[..., 0] = len(E)  # the prefill's token: full depth, full head
    exit_k = np.append(E, L)[first]
    emitted = table.top1[exit_k, np.arange(P)[None, :, None], np.arange(N)[None, None, :]]
    vocab = np.zeros(first.shape, dtype=bool)  # (M, P, N): tokens that took the vocabulary exit
    if family.vocab_exit is not None:
        vocab = (first == len(E)) & (table.conf[family.measure][L] >= family.vocab_exit)[None]
        vocab[..., 0] = False  # the prefill's token
        emitted = np.where(vocab, table.vocab_top1[None], emitted)
    return E, first, exit_k, vocab, emitted


def prompt_agreements(table: SimTable, family: Family, threshold: float) -> np.ndarray:
    """(P,) each prompt's agreement with its reference at ``threshold`` (``simulate`` pools them)."""
    L = table.top1.shape[0] - 1
    emitted = _decide(table, family, np.array([threshold]), L)[-1][0]  # (P, N)
    truth = table.top1[L] if table.reference is None else table.reference
    return (emitted == truth).mean(axis=1)


# One-sided 95%: the margin keeps a setting whose true agreement is at the target from being selected more
# than about one time in twenty on the strength of a lucky draw of selection prompts.
MARGIN_Z = 1.645


def sampling_margin(rt, cases: list[PromptCase], found: list[tuple[float, SimResult, int]], replay,
                    provisional_goal: float, z: float = MARGIN_Z, families: int = 5) -> tuple[float, dict] | None:
    """The selection margin as z standard errors of a setting's agreement over the selection prompts.

    Agreement varies between prompts (whole files are easier or harder), so its sampling error is the
    prompt-level standard error, sd(per-prompt agreement) / sqrt(P), not the binomial one of P x N tokens.
    It is measured where the selection happens: on the cheapest ``propagate`` family (logit measure) at
    the cheapest threshold whose *replayed* agreement reaches ``provisional_goal`` (found by bisection as
    ``replay_search`` does; the exact-K/V simulation's own pass can be far below the target in reality, and
    the spread grows with the misses). More prompts give a smaller margin; a noisier model a larger one.
    ``replay(family, threshold)`` -> (agreement, compute, layers) on ``cases``. None when none of the first
    ``families`` such families reaches the provisional goal."""
    replayable = [(c, res, i) for c, res, i in found
                  if res.family.kv_policy == "propagate" and res.family.measure in LOGIT_MEASURES]
    for entry in replayable[:families]:
        fam, pos = entry[1].family, entry[1].cheapest(provisional_goal)
        if pos is None:
            continue
        (pick,), _ = replay_search([(entry[0], entry[1], pos)], replay, provisional_goal, families=1, progress=False)
        if pick.agreement < provisional_goal:
            continue
        thr = pick.knobs["threshold"]
        per = prompt_agreements(replay_propagate(rt, cases, fam, thr), fam, thr)
        se = float(per.std(ddof=1) / np.sqrt(len(per)))
        return z * se, {"z": z, "standard_error": se, "prompts": len(per), "agreement": float(per.mean()),
                        "knobs": fam.knobs(thr), "method": "replayed"}
    return None


def at_goal(found: list[tuple[float, SimResult, int]], goal: float) -> list[tuple[float, SimResult, int]]:
    """``search``'s families re-read at another goal: each one's cheapest threshold reaching it, cheapest first."""
    out = [(float(res.compute[i]), res, i) for _, res, _ in found if (i := res.cheapest(goal)) is not None]
    return sorted(out, key=lambda x: x[0])


def miss_breakdown(table: SimTable, family: Family, threshold: float) -> dict[str, list[int]]:
    """{where the token came from: [tokens that disagree with full depth, tokens]} of one setting:
    "exit after k" per exit point, "vocabulary exit", and "full depth" (every layer and the full head).
    On a replayed ``propagate`` table a full-depth token can only disagree because it read filled K/V of
    earlier exits, so that row measures what the K/V approximation costs (on an exact table it is 0)."""
    L = table.top1.shape[0] - 1
    _, _, exit_k, vocab, emitted = _decide(table, family, [threshold], L)
    exit_k, vocab, emitted = exit_k[0], vocab[0], emitted[0]
    truth = table.top1[L] if table.reference is None else table.reference
    wrong = emitted != truth
    rows = {f"exit after {k}": exit_k == k for k in family.exit_layers}
    if family.vocab_exit is not None:
        rows["vocabulary exit"] = vocab
    rows["full depth"] = (exit_k == L) & ~vocab
    return {name: [int((mask & wrong).sum()), int(mask.sum())] for name, mask in rows.items()}


def exit_layer_sets(num_layers: int, max_size: int = 7) -> list[tuple[int, ...]]:
    """Every non-empty subset of 1..L-1 (up to ``max_size`` points): 127 sets for 8 layers."""
    layers = range(1, num_layers)
    return [s for r in range(1, min(max_size, num_layers - 1) + 1) for s in itertools.combinations(layers, r)]


def search(tables: list[SimTable], costs: SimCosts, target: float,
           measures=(*LOGIT_MEASURES, "cosine", "classifier", "patience"),
           patiences=(2, 3), kv_policies=("propagate", "defer"), vocab_families: int = 40, vocab_levels: int = 12,
           progress: bool = True) -> tuple[list[tuple[float, SimResult, int]], int]:
    """Every family's cheapest threshold that reaches ``target`` in simulation: (compute, result, index),
    cheapest first; and the number of settings simulated. Vocabulary exits (``vocab_levels`` thresholds
    of their own) are tried on the ``vocab_families`` best shortlist families. ``defer`` is simulated only
    for the families that are best under ``propagate`` (its catch-up costs whole layers, so it can only
    tie on compute, never win)."""
    from tqdm import tqdm

    L = costs.layer_cum.shape[0] - 1
    sets = exit_layer_sets(L)
    jobs = []
    for table in tables:
        for m in (m for m in measures if m == "patience" or m in table.conf):
            for pat in (patiences if m == "patience" else (2,)):
                jobs.extend((table, Family(m, s, table.exit_vocab_size, "propagate", pat, exit_adapters=table.adapters))
                            for s in sets)
    grids = {}
    found = []
    simulated = 0
    for table, fam in tqdm(jobs, desc="simulate settings", disable=not progress, mininterval=2):
        if fam.measure == "patience":
            grid = np.arange(1, fam.patience + 1) / fam.patience
        else:
            key = (table.key, fam.measure)
            if key not in grids:
                grids[key] = threshold_grid(table.conf[fam.measure][1:L].ravel())
            grid = grids[key]
        res = simulate(table, costs, fam, grid)
        simulated += len(grid)
        i = res.cheapest(target)
        if i is not None:
            found.append((float(res.compute[i]), res, i))
    found.sort(key=lambda x: x[0])
    by_key = tables_by_key(tables)
    sizes = sorted({t.exit_vocab_size for t in tables})
    # Vocabulary exits, with their own threshold, for the best shortlist families: a token that goes the
    # whole depth may then skip the full head. Its grid: quantiles of the full-depth shortlist confidence.
    vocab_jobs = [res for _, res, _ in found
                  if by_key[res.family.table_key].vocab_top1 is not None
                  and res.family.measure in LOGIT_MEASURES][:vocab_families]
    for res in vocab_jobs:
        f = res.family
        # the vocabulary exit over the exit shortlist, or over a bigger one of its own (0: the same)
        for own in [0, *(s for s in sizes if s > f.exit_vocab_size)]:
            base = replace(f, vocab_exit=0.0, vocab_exit_size=own)
            table = table_of(by_key, base)
            levels = np.quantile(table.conf[f.measure][L], np.linspace(0.05, 0.95, vocab_levels))
            for v in np.unique(np.clip(levels, 0.0, 1.0)):
                r = simulate(table, costs, replace(base, vocab_exit=float(v)), res.thresholds)
                simulated += len(res.thresholds)
                i = r.cheapest(target)
                if i is not None:
                    found.append((float(r.compute[i]), r, i))
    found.sort(key=lambda x: x[0])
    if "defer" in kv_policies:
        for _, res, _ in found[:5]:
            fam = replace(res.family, kv_policy="defer")
            r = simulate(table_of(by_key, fam), costs, fam, res.thresholds)
            simulated += len(res.thresholds)
            i = r.cheapest(target)
            if i is not None:
                found.append((float(r.compute[i]), r, i))
        found.sort(key=lambda x: x[0])
    return found, simulated


# ---- confirmation by real decoding ------------------------------------------------------------------
@dataclass
class Measured:
    knobs: dict
    sim_agreement: float
    sim_compute: float
    agreement: float = 0.0  # teacher-forced, real decoding (or its exact replay)
    compute_fraction: float = 0.0
    layers_run_mean: float = 0.0
    seconds: float = 0.0
    # "decoded": decode_forced; "replayed": replay_outcome (same numbers, one pass); "held-out": decoded on
    # the held-out prompts, and then sim_agreement / sim_compute hold the selection prompts' real figures
    method: str = "decoded"

    @classmethod
    def timed(cls, knobs: dict, sim_agreement: float, sim_compute: float, outcome, method: str) -> "Measured":
        """Run ``outcome()`` -> (agreement, compute, layers) and keep it with how long it took."""
        start = time.time()
        agree, compute, layers = outcome()
        return cls(knobs, float(sim_agreement), float(sim_compute), agree, compute, layers, time.time() - start,
                   method)


def decode_forced(rt, cases: list[PromptCase], knobs: dict) -> tuple[float, float, float]:
    """(agreement, compute fraction, mean layers run) of real teacher-forced early-exit decoding."""
    match = total = macs = full = layers = 0.0
    for c in cases:
        res = rt.generate(c.prompt_ids, len(c.reference), mode="early_exit", stop_at_eos=False,
                          follow=c.reference, **knobs)
        match += sum(a == b for a, b in zip(res.token_ids, c.reference))
        total += len(c.reference)
        macs += res.stats["macs"]
        full += res.stats["full_macs"]
        layers += res.stats["layers_run_mean"] * len(c.reference)
    return match / total, macs / full, layers / total


@dataclass
class Calibration:
    target: float
    margin: float  # settings were selected at target + margin
    # how the margin was measured (sampling_margin: z, standard_error, prompts, the setting); {}: fixed
    margin_rule: dict
    chosen: dict  # the early_exit knobs written to adaptive_defaults.json
    agreement: float
    compute_fraction: float
    layers_run_mean: float
    meets_target: bool
    split: str
    num_prompts: int
    context: list[int]  # [min, max] prompt tokens
    new_tokens: int
    seed: int
    settings_simulated: int
    readout_reference_match: float
    acceptance_priors: dict[str, float]
    draft_vocab_size: int
    neighbour_thresholds: list[float]  # thresholds around the chosen one, for the model card's table
    finalists: list[Measured] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    settings_replayed: int = 0  # propagate settings replayed exactly (replay_search)
    # Held-out check: each candidate that passed on the selection prompts, cheapest first, decoded on
    # ``holdout_prompts`` other validation prompts until one reaches the target there.
    holdout_prompts: int = 0
    holdout: list[Measured] = field(default_factory=list)
    holdout_passed: bool | None = None  # None: no held-out check was made
    # Where the chosen setting's disagreements come from on the selection prompts (``miss_breakdown`` of its
    # exact replay); None when it cannot be replayed (defer or a hidden-state measure)
    misses: dict[str, list[int]] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


FIXED_MARGIN = 0.003  # the margin before it was measured (about 1.645 standard errors at 48 prompts here)


def calibrate(rt, target: float = 0.99, margin: float | None = None, split: str = "validation", num_prompts: int = 24,
              min_context: int = 64, max_context: int = 128, new_tokens: int = 128, seed: int = 0, vocab_sizes=DEFAULT_VOCAB_SIZES,
              draft_vocab_size: int = 2048, families: int = 8, per_measure: int = 2, max_tries: int = 3,
              confirm_minutes: float = 8.0, prune_slack: float = 0.01, refine_steps: int = 3,
              replay_families: int = 40, replay_minutes: float = 6.0, offset_families: int = 3,
              holdout_prompts: int = 0, holdout_checks: int = 6, progress: bool = True) -> Calibration:
    times = {}
    t0 = time.time()
    max_context = min(max_context, rt.spec.max_positions - new_tokens)  # prompt + continuation fit the context
    min_context = min(min_context, max_context)
    # One draw, then split: the held-out prompts come from files the selection never saw.
    cases = sample_prompts(rt, split, num_prompts + holdout_prompts, min_context, max_context, seed)
    add_references(rt, cases, new_tokens, progress)
    cases, held_out = cases[:num_prompts], cases[num_prompts:]
    times["references"] = time.time() - t0
    t0 = time.time()
    sizes = sorted(set(vocab_sizes) | {draft_vocab_size})
    tables, costs, final_match = build_tables(rt, cases, sizes, progress=progress)
    # Selection aims above the target: the cheapest of many passing settings on a few thousand tokens is an
    # optimistic pick, and the test split is where the target must hold. margin None: measured (sampling_margin).
    searched = [t for t in tables if t.exit_vocab_size in vocab_sizes]

    def replay(fam: Family, thr: float) -> tuple[float, float, float]:
        return replay_outcome(rt, cases, costs, fam, thr)

    margin_rule = {}
    if margin is None:
        found, simulated = search(searched, costs, target, progress=progress)
        measured_margin = sampling_margin(rt, cases, found, replay, target + FIXED_MARGIN)
        margin, margin_rule = measured_margin if measured_margin else (FIXED_MARGIN, {})
        goal = min(1.0, target + margin)
        found = at_goal(found, goal)
    else:
        goal = min(1.0, target + margin)
        found, simulated = search(searched, costs, goal, progress=progress)
    times["simulation"] = time.time() - t0
    priors = _acceptance_priors(rt, cases, draft_vocab_size)

    t0 = time.time()
    replayed, replays = replay_search(found, replay, goal,
                                      families=replay_families, minutes=replay_minutes, prune_slack=prune_slack,
                                      progress=progress) if replay_families else ([], 0)
    by_key = tables_by_key(tables)

    def simulate_one(fam: Family, thr: float) -> tuple[float, float, float]:
        r = simulate(table_of(by_key, fam), costs, fam, np.array([thr]))
        return float(r.agreement[0]), float(r.compute[0]), float(r.layers_mean[0])

    refined, refine_runs = refine_offsets(found, replayed, replay, simulate_one, goal, families=offset_families,
                                          progress=progress)
    replayed += refined
    replays += refine_runs
    times["replay"] = time.time() - t0
    t0 = time.time()
    measured = confirm_finalists(found, lambda knobs: decode_forced(rt, cases, knobs), goal, families=families,
                                 per_measure=per_measure, max_tries=max_tries, confirm_minutes=confirm_minutes,
                                 prune_slack=prune_slack, refine_steps=refine_steps, progress=progress)
    measured += replayed
    if not measured:
        raise SystemExit("error: no early-exit setting reached the target even in simulation")

    def decoded(m: Measured) -> Measured:
        """A replayed pick decoded for real on the selection prompts too: the replay's promise, checked."""
        measured.append(Measured.timed(m.knobs, m.sim_agreement, m.sim_compute,
                                       lambda: decode_forced(rt, cases, m.knobs), "decoded"))
        return measured[-1]

    best = _best(measured, goal, target)
    while best.method == "replayed":
        decoded(best)
        done = {_knob_key(m.knobs) for m in measured if m.method == "decoded"}
        best = _best([m for m in measured if m.method == "decoded" or _knob_key(m.knobs) not in done], goal, target)
    times["confirmation"] = time.time() - t0
    checked, passed = [], None
    if held_out:
        t0 = time.time()
        best, checked, passed = holdout_check(measured, best, lambda knobs: decode_forced(rt, held_out, knobs), goal,
                                              target, holdout_checks, progress)
        if best.method == "replayed":
            best = decoded(best)
        times["holdout"] = time.time() - t0
    chosen_family = Family.of(best.knobs)
    misses = None
    if chosen_family.kv_policy == "propagate" and chosen_family.measure in LOGIT_MEASURES:
        misses = miss_breakdown(replay_propagate(rt, cases, chosen_family, best.knobs["threshold"]), chosen_family,
                                best.knobs["threshold"])
    return Calibration(target=target, margin=margin, margin_rule=margin_rule, chosen=best.knobs, agreement=best.agreement,
                       compute_fraction=best.compute_fraction, layers_run_mean=best.layers_run_mean,
                       meets_target=best.agreement >= target, split=split,
                       num_prompts=num_prompts, context=[min_context, max_context], new_tokens=new_tokens, seed=seed,
                       settings_simulated=simulated, readout_reference_match=final_match,
                       acceptance_priors=priors, draft_vocab_size=draft_vocab_size,
                       neighbour_thresholds=_neighbours(found, best), finalists=measured, seconds=times,
                       settings_replayed=replays, holdout_prompts=len(held_out), holdout=checked,
                       holdout_passed=passed, misses=misses)


def holdout_check(measured: list[Measured], best: Measured, decode_holdout, goal: float, target: float,
                  max_checks: int = 6, progress: bool = True) -> tuple[Measured, list[Measured], bool]:
    """Re-measure the selection's passing settings on held-out prompts, cheapest first, and keep the first
    that reaches ``target`` there. Why: the cheapest of many settings that pass on the same prompts is an
    optimistic pick (the margin only partly pays for it); a setting's agreement on prompts that played
    no part in choosing it is an unbiased estimate. Returns (the setting to keep, the held-out runs, whether
    one passed); when none of ``max_checks`` passes, the selection's own choice ``best`` is kept."""
    from tqdm import tqdm

    seen, ranked = set(), []
    for m in sorted((m for m in measured if m.agreement >= goal), key=lambda m: m.compute_fraction):
        key = _knob_key(m.knobs)
        if key not in seen:
            seen.add(key)
            ranked.append(m)
    if not ranked:  # nothing passed even on the selection prompts: nothing to check
        ranked = [best]
    checked = []
    for m in tqdm(ranked[:max_checks], desc="held-out check", disable=not progress):
        checked.append(Measured.timed(m.knobs, m.agreement, m.compute_fraction, lambda: decode_holdout(m.knobs),
                                      "held-out"))
        if checked[-1].agreement >= target:
            return m, checked, True
    return best, checked, False


def _knob_key(knobs: dict) -> str:
    """One string per setting, to tell measurements of the same setting apart from others."""
    return json.dumps(knobs, sort_keys=True)


def _best(measured: list[Measured], goal: float, target: float) -> Measured:
    """The cheapest setting at ``goal``, else the cheapest at ``target``, else the most faithful one."""
    ok = [m for m in measured if m.agreement >= goal] or [m for m in measured if m.agreement >= target]
    if ok:
        return min(ok, key=lambda m: m.compute_fraction)
    return max(measured, key=lambda m: (m.agreement, -m.compute_fraction))


def confirm_finalists(found: list[tuple[float, SimResult, int]], decode, goal: float, families: int = 8,
                      per_measure: int = 2, max_tries: int = 3, confirm_minutes: float = 8.0,
                      prune_slack: float = 0.01, refine_steps: int = 3, progress: bool = True) -> list[Measured]:
    """Real decoding of the cheapest simulated settings; ``decode(knobs)`` -> (agreement, compute, layers).

    A finalist that misses ``goal`` is retried (up to ``max_tries`` runs) at the cheapest stricter setting
    of its family that the simulation expects to make up the shortfall; when that passes, up to
    ``refine_steps`` more runs bisect the thresholds between the miss and the pass."""
    from tqdm import tqdm

    # Finalists: the cheapest families, at most ``per_measure`` per (measure, with / without a vocabulary
    # exit), so the vocabulary-exit variants of a family cannot crowd out the plain ones.
    picked, per = [], {}
    for entry in found:
        f = entry[1].family
        kind = (f.measure, f.vocab_exit is not None)
        if per.get(kind, 0) < per_measure:
            picked.append(entry)
            per[kind] = per.get(kind, 0) + 1
        if len(picked) == families:
            break
    # Each family's simulated variants that differ only in the vocabulary exit (off included).
    def without_vocab_exit(f: Family) -> Family:
        return replace(f, vocab_exit=None, vocab_exit_size=0)

    siblings: dict[Family, list[SimResult]] = {}
    for _, res, _ in found:
        siblings.setdefault(without_vocab_exit(res.family), []).append(res)
    t0 = time.time()
    measured: list[Measured] = []
    bar = tqdm(total=len(picked), desc="confirm finalists", disable=not progress)
    best_ok = float("inf")  # compute of the cheapest confirmed setting so far

    def out_of_time() -> bool:
        return bool(measured) and (time.time() - t0) / 60 > confirm_minutes

    def run(res: SimResult, i: int) -> Measured:
        knobs = res.family.knobs(res.thresholds[i])
        measured.append(Measured.timed(knobs, res.agreement[i], res.compute[i], lambda: decode(knobs), "decoded"))
        return measured[-1]

    for _, res, i in picked:
        missed_at = None  # the highest threshold of this family that fell short in real decoding
        for _ in range(max_tries):
            if out_of_time():
                break
            # Real compute tracks the simulated one closely (exits differ only through propagate's
            # approximate K/V), so a setting simulated as dearer than a confirmed one cannot win.
            if res.compute[i] > best_ok + prune_slack:
                break
            m = run(res, i)
            if m.agreement >= goal:
                best_ok = min(best_ok, m.compute_fraction)
                if missed_at is not None:  # the jump may have overshot: look between the miss and the pass
                    best_ok = min(best_ok, _bisect(res, i, missed_at, run, goal, refine_steps, out_of_time))
                break
            missed_at = float(res.thresholds[i])
            # Missed: ask the simulation for the shortfall on top of what it promised, from a stricter
            # setting of the same family: a higher threshold, a stricter vocabulary exit or none at all.
            want = min(1.0, res.agreement[i] + (goal - m.agreement))
            stricter = [(r, j) for r in siblings.get(without_vocab_exit(res.family), [res])
                        for j in range(len(r.thresholds)) if r.compute[j] > res.compute[i] and r.agreement[j] >= want]
            if not stricter:
                stricter = [(res, j) for j in range(len(res.thresholds)) if res.thresholds[j] > res.thresholds[i]]
            if not stricter:
                break
            res, i = min(stricter, key=lambda o: o[0].compute[o[1]])
        bar.update(1)
    bar.close()
    return measured


def _bisect(res: SimResult, passed: int, missed_at: float, run, goal: float, steps: int, out_of_time) -> float:
    """Bisect ``res``'s thresholds strictly between ``missed_at`` (fell short) and index ``passed``
    (reached ``goal``) with ``run(res, index)`` (real decoding or its replay), at most ``steps`` runs.
    Agreement rises with the threshold, so halving the gap finds the cheapest passing threshold: after a
    retry that jumped by the simulated shortfall (which under ``propagate`` lands far stricter and
    dearer than needed), or over a whole replayed family. Returns the compute of the cheapest passing
    run it made (inf if none passed)."""
    thr = res.thresholds
    best = float("inf")

    def passes(j: int) -> bool:
        nonlocal best
        m = run(res, j)
        if m.agreement >= goal:
            best = min(best, m.compute_fraction)
        return m.agreement >= goal

    _bisect_down([j for j in range(len(thr)) if missed_at < thr[j] < thr[passed]], passes, steps, out_of_time)
    return best


def _bisect_down(candidates: list, passes, steps: int | None = None, out_of_time=lambda: False) -> None:
    """Halve ``candidates`` (in ascending threshold order; passing is monotone: every candidate above a
    passing one passes too) towards the lowest that passes, with at most ``steps`` calls of
    ``passes(candidate)``. Callers keep what they need from their own calls."""
    calls = 0
    while candidates and (steps is None or calls < steps) and not out_of_time():
        mid = len(candidates) // 2
        calls += 1
        candidates = candidates[:mid] if passes(candidates[mid]) else candidates[mid + 1:]


def replay_search(found: list[tuple[float, SimResult, int]], replay, goal: float, families: int = 40,
                  minutes: float = 6.0, prune_slack: float = 0.01, progress: bool = True) -> tuple[list[Measured], int]:
    """Each of the ``families`` cheapest simulated propagate families (logit measures): the cheapest
    threshold of its grid whose replayed agreement reaches ``goal``, by bisection from the simulation's
    cheapest passing threshold upwards (agreement rises with the threshold). ``replay(family, threshold)``
    -> (agreement, compute, layers). Returns one Measured per family (its cheapest pass, or its strictest
    miss) and the number of replays run. Replays are what real decoding gives, so this finds the frontier
    that ``propagate`` really has, which the exact-K/V simulation overestimates."""
    from tqdm import tqdm

    t0 = time.time()
    picked, seen = [], set()
    for entry in found:
        f = entry[1].family
        if f.kv_policy == "propagate" and f.measure in LOGIT_MEASURES and f not in seen:
            seen.add(f)
            picked.append(entry)
        if len(picked) == families:
            break
    out, runs, best_ok = [], 0, float("inf")
    for _, res, i in tqdm(picked, desc="replay families", disable=not progress):
        if (time.time() - t0) / 60 > minutes:
            break
        # Replayed compute tracks the simulated one closely (the exits differ only through the K/V), so
        # a family whose cheapest simulated pass is dearer than a replayed pass cannot win.
        if res.compute[i] > best_ok + prune_slack:
            continue
        tried: dict[int, Measured] = {}

        def run(j: int) -> Measured:
            tried[j] = Measured.timed(res.family.knobs(res.thresholds[j]), res.agreement[j], res.compute[j],
                                      lambda: replay(res.family, float(res.thresholds[j])), "replayed")
            return tried[j]

        strictest = len(res.thresholds) - 1
        if run(i).agreement < goal and run(strictest).agreement >= goal:
            _bisect(res, strictest, float(res.thresholds[i]), lambda _, j: run(j), goal,
                    steps=len(res.thresholds), out_of_time=lambda: False)
        runs += len(tried)
        passing = [m for m in tried.values() if m.agreement >= goal]
        pick = min(passing, key=lambda m: m.compute_fraction) if passing else max(
            tried.values(), key=lambda m: (m.agreement, -m.compute_fraction))
        if passing:
            best_ok = min(best_ok, pick.compute_fraction)
        out.append(pick)
    return out, runs


def refine_offsets(found: list[tuple[float, SimResult, int]], passes: list[Measured], replay, simulated,
                   goal: float, families: int = 3, minutes: float = 3.0,
                   progress: bool = True) -> tuple[list[Measured], int]:
    """Per-exit-layer thresholds for the ``families`` cheapest replayed passes with several exit points.

    Coordinate descent by replay, deepest exit point first: lower that point's threshold to the lowest
    value of the family's grid that still reaches ``goal`` (bisection; agreement rises with each
    threshold), keep it, go on to the next point. A deep exit approximates the K/V of few layers, so it
    usually tolerates a looser threshold than a shallow one. The result is stated as the shallowest
    point's threshold plus ``offsets`` for the others. ``replay(family, threshold)`` and
    ``simulated(family, threshold)`` -> (agreement, compute, layers). Returns the cheapest pass per family
    (when it beats the shared threshold) and the number of replays run."""
    from tqdm import tqdm

    grids = {res.family: res.thresholds for _, res, _ in found}
    starts = sorted((m for m in passes if m.method == "replayed" and m.agreement >= goal
                     and len(m.knobs["exit_layers"]) > 1), key=lambda m: m.compute_fraction)[:families]
    t0, out, runs = time.time(), [], 0
    for start in tqdm(starts, desc="per-layer thresholds", disable=not progress):
        k = start.knobs
        base = replace(Family.of(k), offsets=())
        grid = grids.get(base)
        if grid is None:
            continue
        layers = sorted(base.exit_layers)
        thr = {layer: k["threshold"] for layer in layers}
        best = start

        def run(at: dict[int, float]) -> Measured:
            nonlocal runs
            runs += 1
            fam = replace(base, offsets=tuple((layer, at[layer] - at[layers[0]]) for layer in layers[1:]
                                              if at[layer] != at[layers[0]]))
            sim_agree, sim_compute, _ = simulated(fam, at[layers[0]])
            return Measured.timed(fam.knobs(at[layers[0]]), sim_agree, sim_compute,
                                  lambda: replay(fam, at[layers[0]]), "replayed")

        for layer in reversed(layers):
            if (time.time() - t0) / 60 > minutes:
                break

            def passes(t: float) -> bool:  # thr[layer] passes; a lower value that passes too replaces it
                nonlocal best
                m = run({**thr, layer: t})
                if m.agreement >= goal:
                    thr[layer] = t
                    best = min(best, m, key=lambda x: x.compute_fraction)
                return m.agreement >= goal

            _bisect_down([float(t) for t in grid if t < thr[layer]], passes)
        if best is not start:
            out.append(best)
    return out, runs


@torch.inference_mode()
def _acceptance_priors(rt, cases: list[PromptCase], draft_vocab_size: int) -> dict[str, float]:
    """Teacher-forced agreement with full depth of the self drafter's head after d layers, for every draft
    depth d, read as the drafter reads it: over the draft shortlist of ``draft_vocab_size`` frequent tokens
    plus the prompt's (the full vocabulary without a draft vocabulary), which every token of the sequence
    joins once produced (``ShortlistHead.add``), so the step predicting reference[i] may also draft
    reference[:i]. Counted over the steps that can be drafted: all but the prefill's token."""
    L, V = rt.spec.num_layers, rt.spec.vocab_size
    agree = {d: 0 for d in rt.draft_depths}
    steps = 0
    for c in cases:
        states = readout(rt, c)[:, 1:]  # (L+1, N-1, d): the steps predicting reference[1:]
        target = rt.model.head(states[L]).argmax(-1)  # full depth's own pick (the reference, but for ties)
        ids = rt._shortlist(draft_vocab_size, c.prompt_ids)  # as the runtime builds the draft head's
        allowed = None
        if ids is not None:
            allowed = torch.zeros(len(c.reference), V, dtype=torch.bool)  # row i: step predicting reference[i]
            allowed[:, ids] = True
            for i, token in enumerate(c.reference):
                allowed[i + 1:, token] = True  # produced at step i, draftable from step i + 1 on
            allowed = allowed[1:]
        for d in agree:
            logits = rt.heads.logits(states[d], d)  # (N-1, V)
            if allowed is not None:
                logits = logits.masked_fill(~allowed, float("-inf"))
            agree[d] += int((logits.argmax(-1) == target).sum())
        steps += states.shape[1]
    return {str(d): round(a / steps, 4) for d, a in agree.items()}


def _neighbours(found, best: Measured, count: int = 2) -> list[float]:
    """Thresholds of the chosen family's grid around the chosen one: ``count`` below and above."""
    k = best.knobs
    for _, res, _ in found:
        f = res.family
        if replace(f, offsets=()) == replace(Family.of(k), offsets=()):
            grid = [float(t) for t in res.thresholds if t <= 1.0]
            i = min(range(len(grid)), key=lambda j: abs(grid[j] - k["threshold"]))
            return sorted(set(grid[max(0, i - count):i + count + 1]) | {k["threshold"]})
    return [k["threshold"]]


def refresh_acceptance_priors(rt, calibration: dict, progress: bool = True) -> dict[str, float]:
    """The speculative acceptance priors alone, for every draft depth the runtime has now.

    Same prompts and references as ``calibrate`` (the split, prompt count, context range, new tokens,
    seed and draft shortlist its report recorded), so the depths it covered come out unchanged; for when
    the set of draft depths changes and the early-exit search (a quarter of an hour) need not run again.
    """
    low, high = calibration["context"]
    cases = sample_prompts(rt, calibration["split"], calibration["num_prompts"], low, high, calibration["seed"])
    add_references(rt, cases, calibration["new_tokens"], progress)
    return _acceptance_priors(rt, cases, calibration["draft_vocab_size"])


def _update_defaults(model_dir: str | Path, update) -> Path:
    """Apply ``update`` to adaptive_defaults.json (created if missing), keeping every other section."""
    from ..runtime import DEFAULTS_FILE

    path = Path(model_dir) / DEFAULTS_FILE
    defaults = json.loads(path.read_text()) if path.is_file() else {}
    update(defaults)
    path.write_text(json.dumps(defaults, indent=2) + "\n")
    return path


def write_defaults(model_dir: str | Path, cal: Calibration) -> Path:
    """Merge the early_exit section and the speculative priors into adaptive_defaults.json."""
    def update(defaults: dict) -> None:
        defaults["early_exit"] = cal.chosen
        spec = defaults.setdefault("speculative", {})
        spec["draft_vocab_size"] = cal.draft_vocab_size
        spec["acceptance_priors"] = cal.acceptance_priors
        spec["acceptance_priors_vocab_size"] = cal.draft_vocab_size  # the shortlist the priors were read over

    return _update_defaults(model_dir, update)


def write_acceptance_priors(model_dir: str | Path, priors: dict[str, float], vocab_size: int) -> Path:
    """Replace only the speculative acceptance priors (read over a ``vocab_size`` draft shortlist) in
    adaptive_defaults.json."""
    return _update_defaults(model_dir, lambda defaults: defaults.setdefault("speculative", {}).update(
        acceptance_priors=priors, acceptance_priors_vocab_size=vocab_size))

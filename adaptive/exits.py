"""Exit heads at every layer and the confidence measures that decide whether to stop.

Exit head after k layers (k = 1..L): the model's own final norm + LM head (the *logit lens*), optionally
preceded by a trained per-layer adapter (the *tuned lens*): ``h' = h + W_k h + b_k``. At k = L the head
is the model's own output, never adapted.

Adapter file format (``exit_adapters.safetensors`` next to the checkpoint's weights):
  tensors   ``exit.{k}.weight`` (d, d) and ``exit.{k}.bias`` (d,) for any subset of k in 1..L-1
  metadata  ``format="adaptive-exit-adapters"``, ``version="1"``, ``kind="residual_affine"``,
            ``hidden_size``, ``num_layers`` (strings, as safetensors metadata must be)
Layers without an adapter fall back to the logit lens. A zero adapter equals the logit lens.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import CheckpointError, InvalidRequestError
from .model import LeanModel, matvec_layout, project

ADAPTER_FILE = "exit_adapters.safetensors"
ADAPTER_FORMAT = "adaptive-exit-adapters"


class ExitHeads:
    def __init__(self, model: LeanModel, adapters: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.model = model
        # Adapters run at batch 1 on every exit check: store them in the fast mat-vec layout.
        self.adapters = {k: (matvec_layout(w), b) for k, (w, b) in (adapters or {}).items()}
        self.source: str = "logit lens"
        self._plain: ExitHeads | None = None  # built on first use by ``plain``

    def adapter(self, layers_run: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(weight in the mat-vec layout, bias) of the adapter after ``layers_run`` layers, or None."""
        return self.adapters.get(layers_run) if layers_run < self.model.spec.num_layers else None

    def adapt(self, h: torch.Tensor, layers_run: int) -> torch.Tensor:
        adapter = self.adapter(layers_run)
        if adapter is None:
            return h
        w, b = adapter
        return h + F.linear(h, w, b)

    def logits(self, h: torch.Tensor, layers_run: int) -> torch.Tensor:
        """Hidden state after ``layers_run`` layers (..., d) -> next-token logits (..., V)."""
        return self.model.head(self.adapt(h, layers_run))

    def has_adapter(self, layers_run: int) -> bool:
        return layers_run in self.adapters and layers_run < self.model.spec.num_layers

    def plain(self) -> "ExitHeads":
        """The same model's heads without adapters (the logit lens), for ``exit_adapters=False``."""
        if not self.adapters:
            return self
        if self._plain is None:
            self._plain = ExitHeads(self.model)
        return self._plain

    def for_request(self, exit_adapters: bool) -> "ExitHeads":
        return self if exit_adapters else self.plain()


class ShortlistHead:
    """An exit head restricted to a shortlist of token ids (None: the full vocabulary).

    On a small model the LM head is the largest matmul of a shallow step (8192 x 192 weights, several
    layers' worth), so exit checks and drafts over the most frequent tokens plus the prompt's own tokens
    cost a fraction of a full head. A token outside the shortlist can then never be chosen at an exit.

    ``spare`` > 0 lets the shortlist grow (``add``): a drafter adds every token the sequence produces, since
    text repeats its own tokens. A bundled-model generation that draws a comment rule (``# -----``) of two
    tokens outside the frequent 2048 and the prompt repeats them on 64 of 128 tokens, and a draft head
    that cannot name them is rejected at every other token.
    """

    def __init__(self, heads: ExitHeads, ids: torch.Tensor | None, spare: int = 0):
        self.heads = heads
        self.ids = self.weight_t = None
        self.panels = None  # the column buffer packed for few-row matmuls (LeanModel.pack), or None
        self._rest_ids = self._rest_t = None  # the rows outside the shortlist, for ``complete``
        if ids is not None:
            self._members = set(ids.tolist())
            self._allocate(ids, spare)

    def _allocate(self, ids: torch.Tensor, spare: int) -> None:
        """Copy the shortlisted rows into a (d, n + spare) buffer; the head is the view of its first n
        columns. With spare = 0 that is a contiguous (d, n) matrix (a batch-1 mat-vec streams it at full
        memory speed); a (d, n) view of a wider buffer multiplies as fast (measured, n = 2060 of 2560:
        10 us against 12 us), so a token joins by writing one column instead of copying the matrix."""
        n, rows = ids.numel(), self.heads.model.w.lm_head
        self._columns = torch.empty(rows.shape[1], n + spare, dtype=rows.dtype, device=rows.device)
        self._columns[:, :n] = rows.index_select(0, ids).T
        self._ids = torch.empty(n + spare, dtype=ids.dtype, device=ids.device)
        self._ids[:n] = ids
        self.panels = self.heads.model.pack(self._columns)  # spare columns too: ``add`` repacks what it writes
        self._use(n)

    def _use(self, n: int) -> None:
        self.ids, self.weight_t = self._ids[:n], self._columns[:, :n]  # (n,), (d, n)

    def add(self, tokens: list[int]) -> None:
        """Make ``tokens`` choosable from now on (those not in the shortlist yet; a full-vocabulary head
        has them all). The rows outside, which ``complete`` caches, are rebuilt on its next call."""
        if self.ids is None:
            return
        new = [t for t in dict.fromkeys(tokens) if t not in self._members]
        if not new:
            return
        n, m = self.ids.numel(), len(new)
        if n + m > self._ids.numel():  # out of spare columns: a new buffer with as much room again
            self._allocate(self.ids.clone(), max(n, m))
        index = torch.tensor(new, dtype=self._ids.dtype, device=self._ids.device)
        self._columns[:, n:n + m] = self.heads.model.w.lm_head.index_select(0, index).T
        if self.panels is not None:
            self.panels.repack(n, n + m)
        self._ids[n:n + m] = index
        self._use(n + m)
        self._members.update(new)
        self._rest_ids = self._rest_t = None

    @property
    def size(self) -> int:
        return self.heads.model.spec.vocab_size if self.ids is None else int(self.ids.numel())

    def logits(self, h: torch.Tensor, layers_run: int) -> torch.Tensor:
        """Hidden (1, 1, d) -> logits (n,) over the shortlist, or (V,) over the full vocabulary."""
        return self.rows_logits(h, layers_run)[0]

    def rows_logits(self, h: torch.Tensor, layers_run: int) -> torch.Tensor:
        """Hidden (1, T, d) -> logits (T, n) over the shortlist, or (T, V) over the full vocabulary."""
        if self.weight_t is None:
            return self.heads.logits(h, layers_run)[0]
        x = self.heads.model.final_norm(self.heads.adapt(h, layers_run)).view(-1, h.shape[-1])  # (T, d)
        # (T, d) @ (d, n), through the panels as the C++ draft step does (NativeLayers.draft_greedy)
        return project(x, self.weight_t, None, panels=self.panels)

    def token(self, index: int) -> int:
        """Vocabulary id of position ``index`` in this head's logits."""
        return index if self.ids is None else int(self.ids[index])

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Shortlist logits (n,) -> (V,) with -inf outside the shortlist, for sampling."""
        if self.ids is None:
            return logits
        full = torch.full((self.heads.model.spec.vocab_size,), float("-inf"), dtype=logits.dtype, device=logits.device)
        return full.index_copy_(0, self.ids, logits)

    def macs(self, layers_run: int, hidden_size: int, adapter_macs: int) -> int:
        return hidden_size * self.size + (adapter_macs if self.heads.has_adapter(layers_run) else 0)

    def complete(self, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Final-layer shortlist logits (n,) of h (1, 1, d) -> the full head's logits (V,), computing only
        the rows outside the shortlist: a vocabulary exit that was not confident has already paid for n of
        the V rows, and the full head would recompute them. At full depth there is no adapter, so the
        shortlist rows are the full head's own rows on the same normed state. MACs: ``rest_macs``."""
        if self.ids is None:
            return logits
        if self._rest_t is None:  # built once per sequence, on the first miss: (d, V - n) contiguous
            vocab = self.heads.model.spec.vocab_size
            outside = torch.ones(vocab, dtype=torch.bool, device=self.ids.device)
            outside[self.ids] = False
            self._rest_ids = outside.nonzero()[:, 0]
            self._rest_t = matvec_layout(self.heads.model.w.lm_head.index_select(0, self._rest_ids)).T
        x = self.heads.model.final_norm(h)
        rest = torch.mm(x.view(1, -1), self._rest_t)[0]  # (V - n,)
        return self.full_logits(logits).index_copy_(0, self._rest_ids, rest)

    def rest_macs(self, hidden_size: int) -> int:
        """MACs of ``complete``: the full head's rows outside the shortlist."""
        return hidden_size * (self.heads.model.spec.vocab_size - self.size)


def read_sidecar(path: str | Path, expected_format: str | None = None,
                 what: str = "sidecar") -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of one of our safetensors sidecar files; a broken file, or one whose metadata
    ``format`` is not ``expected_format``, is a CheckpointError naming ``what`` it should have been."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata() or {}, {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    if expected_format is not None and meta.get("format") != expected_format:
        raise CheckpointError(f"{path}: not {what} (metadata format={meta.get('format')!r})")
    return meta, tensors


def load_adapters(path: str | Path, hidden_size: int, num_layers: int,
                  dtype: torch.dtype = torch.float32) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Read an adapter file, checking its format, shapes and layer range."""
    path = Path(path)
    meta, tensors = read_sidecar(path, ADAPTER_FORMAT, "an exit-adapter file")
    if meta.get("kind") != "residual_affine":
        raise CheckpointError(f"{path}: not an exit-adapter file (metadata format={meta.get('format')!r})")
    if meta.get("hidden_size") != str(hidden_size) or meta.get("num_layers") != str(num_layers):
        raise CheckpointError(f"{path}: adapters are for hidden_size={meta.get('hidden_size')}, "
                              f"num_layers={meta.get('num_layers')}, not {hidden_size}, {num_layers}")
    adapters = {}
    for name, w in tensors.items():
        parts = name.split(".")
        if len(parts) != 3 or parts[0] != "exit" or parts[2] not in ("weight", "bias") or not parts[1].isdigit():
            raise CheckpointError(f"{path}: unexpected tensor {name!r}")
        k = int(parts[1])
        if not 1 <= k < num_layers:
            raise CheckpointError(f"{path}: adapter for layer {k} is outside 1..{num_layers - 1}")
        if parts[2] == "weight":
            b = tensors.get(f"exit.{k}.bias")
            if w.shape != (hidden_size, hidden_size) or b is None or b.shape != (hidden_size,):
                raise CheckpointError(f"{path}: adapter {k} must have weight ({hidden_size}, {hidden_size}) and bias ({hidden_size},)")
            if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
                raise CheckpointError(f"{path}: adapter {k} holds non-finite values")
            adapters[k] = (w.to(dtype), b.to(dtype))
    return adapters


def save_adapters(path: str | Path, adapters: dict[int, tuple[torch.Tensor, torch.Tensor]],
                  hidden_size: int, num_layers: int) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for k, (w, b) in sorted(adapters.items()):
        tensors[f"exit.{k}.weight"] = w.detach().float().contiguous()
        tensors[f"exit.{k}.bias"] = b.detach().float().contiguous()
    save_file(tensors, str(path), metadata={"format": ADAPTER_FORMAT, "version": "1", "kind": "residual_affine",
                                            "hidden_size": str(hidden_size), "num_layers": str(num_layers)})


# ---- confidence measures ----------------------------------------------------------------------------
# Each maps exit logits (..., V) and hidden states (..., d) to a confidence (...) in [0, 1] (cosine in
# [-1, 1]); a token exits when the value reaches the threshold. They work on any leading shape, so the
# decoder scores one token and the lens scores a whole sequence with the same code. Per token, the
# decoder calls reset() once, then score() at each exit point in order of depth.

class ConfidenceMeasure:
    name = ""
    needs_logits = True  # False: decided from hidden states alone, no LM-head evaluation needed
    check_macs = 0  # MACs one check costs besides the head (a learned classifier's matmuls)

    def reset(self) -> None:
        pass

    def score(self, logits: torch.Tensor | None, hidden: torch.Tensor, prev_hidden: torch.Tensor,
              layer: int | None = None) -> torch.Tensor:
        raise NotImplementedError


class MaxProb(ConfidenceMeasure):
    """Softmax probability of the top token."""
    name = "max_prob"

    def score(self, logits, hidden, prev_hidden, layer=None):
        # log p_max = max logit - logsumexp: two reductions instead of a full softmax.
        logits = logits.float()
        return torch.exp(logits.amax(dim=-1) - torch.logsumexp(logits, dim=-1))


class Margin(ConfidenceMeasure):
    """Probability of the top token minus that of the runner-up."""
    name = "margin"

    def score(self, logits, hidden, prev_hidden, layer=None):
        top2 = torch.topk(torch.softmax(logits.float(), dim=-1), 2, dim=-1).values
        return top2[..., 0] - top2[..., 1]


class Entropy(ConfidenceMeasure):
    """1 - H(p) / log V: 1 for a one-hot distribution, 0 for a uniform one."""
    name = "entropy"

    def score(self, logits, hidden, prev_hidden, layer=None):
        logp = torch.log_softmax(logits.float(), dim=-1)
        entropy = -(logp.exp() * logp).sum(dim=-1)
        return 1.0 - entropy / math.log(logits.shape[-1])


class HiddenCosine(ConfidenceMeasure):
    """Cosine similarity of the hidden state with the previous layer's: the last layer changed little."""
    name = "cosine"
    needs_logits = False

    def score(self, logits, hidden, prev_hidden, layer=None):
        return F.cosine_similarity(hidden.float(), prev_hidden.float(), dim=-1)


class Patience(ConfidenceMeasure):
    """Agreement run: the fraction of the last ``patience`` exits whose top-1 matches the current one."""
    name = "patience"

    def __init__(self, patience: int):
        self.patience = patience
        self.reset()

    def reset(self):
        self._last: torch.Tensor | None = None
        self._run: torch.Tensor | None = None

    def score(self, logits, hidden, prev_hidden, layer=None):
        top = torch.argmax(logits, dim=-1)
        if self._last is None:
            self._run = torch.ones_like(top)
        else:
            self._run = torch.where(top == self._last, self._run + 1, torch.ones_like(top))
        self._last = top
        return torch.clamp(self._run.float() / self.patience, max=1.0)


class LearnedExit(ConfidenceMeasure):
    """A trained classifier's P(exit head agrees with the final layer), from hidden states alone."""
    name = "classifier"
    needs_logits = False

    def __init__(self, classifier):
        self.classifier = classifier
        self.check_macs = classifier.macs

    def score(self, logits, hidden, prev_hidden, layer=None):
        if layer is None:
            raise ValueError("the learned exit classifier needs the layer count")
        return self.classifier.probability(layer, hidden, prev_hidden)


class AttentionFocus(ConfidenceMeasure):
    """Attention-based gate: how focused the current token's attention is in the layer just run.

    1 - mean over heads of H(attention) / log(keys): 1 when every head attends to a single position,
    0 when all spread uniformly. The query is recomputed from the layer's input hidden state (``prev``)
    with that layer's own norm, q projection and RoPE; the keys are the cache's. Costs the q projection
    and the scores (d * H * hd + H * hd * keys MACs), no LM head.
    """
    name = "attention"
    needs_logits = False

    def __init__(self):
        self.model, self.cache = None, None

    def bind(self, model, cache) -> None:
        self.model, self.cache = model, cache

    def score(self, logits, hidden, prev_hidden, layer=None):
        model, spec = self.model, self.model.spec
        index = layer - 1  # the layer just run
        lw = model.w.layers[index]
        pos = self.cache.fill[index] - 1  # the current token is the last position written there
        H, Hkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        x = model.norm(prev_hidden[:, -1], lw.attn_norm_w, lw.attn_norm_b)  # (B, d)
        q = F.linear(x, lw.q_w, lw.q_b).view(-1, 1, H, hd)  # (B, 1, H, hd)
        if spec.positional == "rope":
            q = model._rope(q, pos)
        window = spec.sliding_windows[index]
        start = 0 if window is None else max(0, pos - window + 1)
        keys, _ = self.cache.keys_values(index, start, pos + 1)  # (B, Hkv, S, hd)
        keys = keys.repeat_interleave(H // Hkv, dim=1)  # (B, H, S, hd)
        scale = lw.attn_scale or 1.0 / math.sqrt(hd)
        attn = torch.softmax(torch.matmul(q.transpose(1, 2), keys.transpose(-1, -2)).float() * scale, -1)  # (B, H, 1, S)
        S = attn.shape[-1]
        self.check_macs = spec.hidden_size * H * hd + H * hd * S
        if S < 2:
            return torch.ones(attn.shape[0])
        entropy = -(attn * attn.clamp_min(1e-12).log()).sum(-1)  # (B, H, 1)
        return 1.0 - entropy.mean(dim=(1, 2)) / math.log(S)


def make_measure(name: str, patience: int = 2, classifier=None) -> ConfidenceMeasure:
    measures = {"max_prob": MaxProb, "margin": Margin, "entropy": Entropy, "cosine": HiddenCosine,
                "attention": AttentionFocus}
    if name == "patience":
        return Patience(patience)
    if name == "classifier":
        if classifier is None:
            raise InvalidRequestError("measure='classifier' needs a trained exit classifier "
                                      "(exit_classifier.safetensors next to the model; see train-exit-classifier)")
        return LearnedExit(classifier)
    if name not in measures:
        raise InvalidRequestError(f"unknown measure {name!r}; choose one of {', '.join([*measures, 'patience', 'classifier'])}")
    return measures[name]()

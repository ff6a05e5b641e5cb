"""A lean forward over loaded decoder weights: ``embed()``, ``run_layers()``, ``head()``.

Batch-1 decoding on a CPU is bound by memory traffic and per-operation overhead, so each layer is a
short, fixed sequence of torch calls on plain tensors: no modules, no hooks, no per-step allocation of
caches or masks. The weights are the checkpoint's own tensors (shared, never copied), so wrapping an
in-memory transformers model costs no memory.

At inference (nothing recording autograd, no padded rows) ``layer`` and ``run_layers`` hand the pass to
the same calls written in C++ (``native_layers.py``), which return bit-identical results faster; the
Python below is the reference it is tested against, and the fallback.

Positions are contiguous: ``run_layers(h, start, end, pos)`` runs layers [start, end) on hidden states
of positions [pos, pos + T). Layer indices are 0-based; "exit after k layers" means layers [0, k) ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import ModelSpec
from . import native_layers
from .kv_cache import KVCache
from .kv_fill import KVFill


@dataclass
class LayerWeights:
    """One decoder layer. Linear weights are (out, in) as F.linear expects; biases may be None."""

    attn_norm_w: torch.Tensor  # (d,)
    attn_norm_b: torch.Tensor | None
    q_w: torch.Tensor  # (H*hd, d)
    q_b: torch.Tensor | None
    k_w: torch.Tensor  # (Hkv*hd, d)
    k_b: torch.Tensor | None
    v_w: torch.Tensor  # (Hkv*hd, d)
    v_b: torch.Tensor | None
    o_w: torch.Tensor  # (d, H*hd)
    o_b: torch.Tensor | None
    mlp_norm_w: torch.Tensor  # (d,)
    mlp_norm_b: torch.Tensor | None
    up_w: torch.Tensor  # (ff, d)
    up_b: torch.Tensor | None
    gate_w: torch.Tensor | None  # (ff, d) for gated MLPs, None for GPT-2's plain MLP
    gate_b: torch.Tensor | None
    down_w: torch.Tensor  # (d, ff)
    down_b: torch.Tensor | None
    attn_scale: float = 0.0  # softmax scale; 0 means 1/sqrt(head_dim)
    # Fused copies (set by LeanModel when it may own the weights): one matmul instead of three / two.
    qkv_w: torch.Tensor | None = None  # (H*hd + 2*Hkv*hd, d); q_w, k_w, v_w then become views into it
    qkv_b: torch.Tensor | None = None
    gate_up_w: torch.Tensor | None = None  # (2*ff, d); gate_w, up_w then become views into it
    gate_up_b: torch.Tensor | None = None


@dataclass
class ModelWeights:
    embed: torch.Tensor  # (V, d)
    layers: list[LayerWeights]
    final_norm_w: torch.Tensor  # (d,)
    final_norm_b: torch.Tensor | None
    lm_head: torch.Tensor  # (V, d); the embedding itself when tied
    pos_embed: torch.Tensor | None = None  # (max_positions, d) for learned positions (GPT-2)
    rope_inv_freq: torch.Tensor | None = None  # (hd/2,)
    rope_scale: float = 1.0  # attention scaling some RoPE variants apply to cos/sin


def _cat_or_none(parts: list[tuple[torch.Tensor | None, torch.Tensor]]) -> torch.Tensor | None:
    """Concatenate (bias, weight) pairs' biases, zeros standing in for missing ones; None if all are missing."""
    if all(b is None for b, _ in parts):
        return None
    return torch.cat([b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
                      for b, w in parts])


def matvec_layout(w: torch.Tensor) -> torch.Tensor:
    """The same (out, in) matrix, stored transposed: a view of an (in, out) contiguous copy.

    ``F.linear(x, w)`` computes x @ w.T; with this layout w.T is contiguous, and a batch-1 mat-vec
    streams the weights row after row. Measured on this project's CPU (one thread, 1376x256 fp32
    matrices, weights streamed from cache): 14-16 GB/s against 8-11 GB/s for the row-major (out, in)
    layout checkpoints use, i.e. ~1.5x faster decoding matmuls, and also faster at T=4 (verification).
    The values are bit-identical; only the summation order inside the BLAS kernel may differ.
    """
    return w.T.contiguous().T


def fuse_layer(lw: LayerWeights) -> None:
    """Give one layer its decode layout (a copy, so only for weights we own): q/k/v and gate/up fused
    into one matrix each (fewer, larger matmuls at batch 1), every matrix in ``matvec_layout``.
    The per-projection fields become views into the fused matrices, so nothing else changes."""
    qkv = matvec_layout(torch.cat((lw.q_w, lw.k_w, lw.v_w)))
    nq, nk = lw.q_w.shape[0], lw.k_w.shape[0]
    lw.qkv_w = qkv
    lw.qkv_b = _cat_or_none([(lw.q_b, lw.q_w), (lw.k_b, lw.k_w), (lw.v_b, lw.v_w)])
    lw.q_w, lw.k_w, lw.v_w = qkv[:nq], qkv[nq:nq + nk], qkv[nq + nk:]
    if lw.qkv_b is not None:
        lw.q_b, lw.k_b, lw.v_b = lw.qkv_b[:nq], lw.qkv_b[nq:nq + nk], lw.qkv_b[nq + nk:]
    lw.o_w = matvec_layout(lw.o_w)
    lw.down_w = matvec_layout(lw.down_w)
    if lw.gate_w is not None:
        ff = lw.gate_w.shape[0]
        lw.gate_up_w = matvec_layout(torch.cat((lw.gate_w, lw.up_w)))
        lw.gate_up_b = _cat_or_none([(lw.gate_b, lw.gate_w), (lw.up_b, lw.up_w)])
        lw.gate_w, lw.up_w = lw.gate_up_w[:ff], lw.gate_up_w[ff:]
        if lw.gate_up_b is not None:
            lw.gate_b, lw.up_b = lw.gate_up_b[:ff], lw.gate_up_b[ff:]
    else:
        lw.up_w = matvec_layout(lw.up_w)


def project(x: torch.Tensor, wt: torch.Tensor, b: torch.Tensor | None,
              residual: torch.Tensor | None = None, panels=None) -> torch.Tensor:
    """x (N, in) @ wt (+ b) (+ residual) for a weight given as its (in, out) transpose.

    ``panels``: the same weight packed for a few rows (``LeanModel.packed_projections``); it computes
    what the C++ layer loop computes, bit for bit, when it serves x (else None, and BLAS runs).
    torch.mm/addmm skip F.linear's reshape/transpose wrapper; with ``matvec_layout`` weights wt is the
    contiguous stored matrix. The residual rides in addmm's accumulator.
    """
    if panels is not None:
        out = panels.mm(x, b, residual, wt.shape[1])  # wt may be the first columns of what was packed
        if out is not None:
            return out
    if residual is None:
        return torch.mm(x, wt) if b is None else torch.addmm(b, x, wt)
    out = torch.addmm(residual, x, wt)
    return out if b is None else out.add_(b)


def _transposed_projections(lw: LayerWeights) -> dict[str, torch.Tensor]:
    names = ("qkv_w", "q_w", "k_w", "v_w", "o_w", "gate_up_w", "gate_w", "up_w", "down_w")
    return {n: getattr(lw, n).T for n in names if getattr(lw, n) is not None}


@dataclass
class Frame:
    """One pass over positions [pos, pos+T): RoPE rows (T, hd) and attention masks, built once per
    pass instead of once per layer."""

    pos: int
    T: int
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    masks: dict = field(default_factory=dict)
    # Batched rows, left-padded: row r's real tokens start at slot pads[r]. Positions (RoPE) are
    # slot - pad per row, and no real query may see a pad slot (cos/sin are then (B, 1, T, hd)).
    pads: torch.Tensor | None = None  # (B,) long

    def mask(self, model: "LeanModel", key_start: int, window: int | None) -> torch.Tensor:
        key = (key_start, window)
        if key not in self.masks:
            allowed = model._attention_mask(self.pos, self.T, key_start, window)  # (T, S)
            if self.pads is not None:
                k_slot = torch.arange(key_start, self.pos + self.T, device=allowed.device)  # (S,)
                q_slot = torch.arange(self.pos, self.pos + self.T, device=allowed.device)  # (T,)
                real_key = k_slot[None, :] >= self.pads[:, None]  # (B, S)
                allowed = allowed[None] & real_key[:, None, :]  # (B, T, S)
                # A pad query sees only itself: finite garbage that no real query ever reads (a query
                # with every key masked would give NaN, and NaN * 0 is still NaN in the next layer).
                allowed |= (q_slot[:, None] == k_slot[None, :])[None] & ~real_key[:, None, :]
                allowed = allowed[:, None]  # (B, 1, T, S): broadcast over heads
            self.masks[key] = allowed
        return self.masks[key]


class LeanModel:
    def __init__(self, spec: ModelSpec, weights: ModelWeights, fuse: bool = True):
        """``fuse=False`` keeps the given tensors as they are (weights shared with another model);
        ``fuse=True`` concatenates q/k/v and gate/up once, which costs a copy unless we own the weights."""
        self.spec = spec
        self.w = weights
        # The LM head as (V, d) rows, where that costs no copy: the embedding of a tied model, or a shared
        # head already in that layout. For several positions at once some BLAS builds compute W @ x.T much
        # faster than x @ W.T (on one AMD EPYC host, 4 rows of the bundled 8192 x 192 head: 0.53 against
        # 1.52 ms), others the reverse; ``host_costs.choose_head_layout`` times both on this host and sets
        # ``head_rows_from``, the fewest positions from which the rows layout is used (None: never).
        tied = (weights.lm_head.shape == weights.embed.shape and weights.lm_head.stride() == weights.embed.stride()
                and weights.lm_head.data_ptr() == weights.embed.data_ptr())  # the same memory, maybe another object
        # (An untied head that ``fuse`` is about to copy into the decode layout is not kept: that would hold
        # a second copy of the largest matrix.)
        shared_rows = not fuse and weights.lm_head.is_contiguous()
        self._head_rows = weights.embed if tied else (weights.lm_head if shared_rows else None)
        self.head_rows_from: int | None = None
        if fuse:
            for lw in weights.layers:
                fuse_layer(lw)
            # A separate copy even when tied: the embedding lookup wants rows, the head wants columns.
            weights.lm_head = matvec_layout(weights.lm_head)
        self.dtype = weights.embed.dtype
        self.device = weights.embed.device
        if spec.positional == "rope":
            if weights.rope_inv_freq is None:
                raise ValueError("a RoPE model needs rope_inv_freq")
            # The same expression as transformers' rotary embedding, tabulated once for every position.
            positions = torch.arange(spec.max_positions, dtype=torch.float32)
            freqs = positions[:, None] * weights.rope_inv_freq.float()[None, :]  # (T, hd/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
            self.cos = (emb.cos() * weights.rope_scale).to(self.dtype)  # (T, hd)
            self.sin = (emb.sin() * weights.rope_scale).to(self.dtype)  # (T, hd)
            # rotate_half as a signed permutation matrix: x @ P == cat(-x2, x1). One mm on the whole
            # (heads x hd) block instead of two slices, a negation and a cat (per-op overhead dominates
            # at batch 1); exact (one nonzero per column).
            hd = emb.shape[-1]
            half = hd // 2
            self._rotate = torch.zeros(hd, hd, dtype=self.dtype, device=self.device)
            idx = torch.arange(half, device=self.device)
            self._rotate[idx + half, idx] = -1.0
            self._rotate[idx, idx + half] = 1.0
        self._act = {"silu": F.silu, "gelu": F.gelu,
                     "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}[spec.activation]
        self._kv_stack: tuple[torch.Tensor, torch.Tensor] | None = None
        # Learned K/V fill maps (adaptive/kv_fill.py) for the propagate policy; None: the projections.
        self.kv_fill: KVFill | None = None
        self._fill_stacks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._inv_width = torch.tensor(1.0 / spec.hidden_size, dtype=torch.float32, device=self.device)
        self._norm_eps = torch.tensor(spec.norm_eps, dtype=torch.float32, device=self.device)
        # (in, out) views of every projection, made once: ``w.T`` per call is two dispatches.
        self._mm = [_transposed_projections(lw) for lw in weights.layers]
        # The C++ layer loop (native_layers.py), bound on first use; False: not tried yet, None: unavailable.
        self.use_native = True  # False keeps this model's layers in Python (A/B checks, debugging)
        self._native: native_layers.NativeLayers | None | bool = False
        # Panels of every projection and of the LM head for 1-16 rows (panel_matmul.h), packed on first
        # use; used by the C++ loop and the Python layer alike. None: not packed yet.
        self._panels: list[dict[str, object]] | None = None
        self._head_panels = None

    # ---- few-row matmuls -------------------------------------------------------------------------
    def packed_projections(self) -> list[dict[str, object]]:
        """Per layer, projection name -> its ``PackedWeight`` (empty where the extension is unavailable
        or the weights are not fp32 on the CPU). Packing copies each weight once (the model's size again):
        decoding and verification at 1-16 rows then sweep the weights in order instead of through BLAS's
        per-call re-packing (measured in panel_matmul.h)."""
        if self._panels is None:
            ext = native_layers.extension()
            if ext is None or self.dtype != torch.float32 or self.device.type != "cpu":
                self._panels = [{} for _ in self._mm]
                return self._panels
            with torch.no_grad():
                layers = [{name: ext.PackedWeight(wt) for name, wt in mm.items()} for mm in self._mm]
                self._head_panels = ext.PackedWeight(self.w.lm_head.T)  # (d, V)
            self._panels = layers  # last: another thread that sees the layers' panels sees the head's too
        return self._panels

    def pack(self, wt: torch.Tensor):
        """A ``PackedWeight`` of an (in, out) fp32 matrix, or None where panels are unavailable."""
        if not any(self.packed_projections()):
            return None
        with torch.no_grad():
            return native_layers.extension().PackedWeight(wt)

    # ---- which code runs the layers -------------------------------------------------------------
    def _native_layers(self) -> "native_layers.NativeLayers | None":
        if self._native is False:
            ext = native_layers.extension()
            self._native = native_layers.NativeLayers(self, ext) if ext is not None else None
        return self._native

    def native_for(self, cache, pads: torch.Tensor | None) -> "native_layers.NativeLayers | None":
        """The C++ loop, when it can run this pass: a KVCache (attribution passes a stand-in), no padded
        rows, and nothing recording autograd."""
        if not self.use_native or pads is not None or torch.is_grad_enabled() or type(cache) is not KVCache:
            return None
        return self._native_layers()

    def layer_backend(self) -> str:
        """What runs this model's decoder layers at inference: "native" or "python (why)"."""
        if not self.use_native:
            return "python (switched off for this model)"
        return "native" if self._native_layers() is not None else native_layers.status()

    # ---- pieces ---------------------------------------------------------------------------------
    def norm(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        d = (self.spec.hidden_size,)
        if self.spec.norm_kind == "rms":
            ext = native_layers.extension()
            rows = ext.rms_norm(x, w, self.spec.norm_eps) if ext is not None else None  # as the C++ loop does
            if rows is not None:
                return rows
            if x.dtype == torch.float32:
                # F.rms_norm on CPU is a composite with dtype round trips, and so is any op with a Python
                # float operand (it wraps the scalar in a tensor and converts it): 0-dim constants built
                # once make these six calls ~1.5x faster than F.rms_norm at batch 1 (measured), and a
                # model calls it 2L+1 times per token. Same arithmetic as transformers' LlamaRMSNorm in
                # fp32: x * rsqrt(mean(x^2) + eps) * w.
                mean_square = (x * x).sum(-1, keepdim=True).mul_(self._inv_width)
                return x * torch.rsqrt(mean_square.add_(self._norm_eps)) * w
            return F.rms_norm(x, d, w, self.spec.norm_eps)
        return F.layer_norm(x, d, w, b, self.spec.norm_eps)

    def embed(self, token_ids: torch.Tensor, pos: int) -> torch.Tensor:
        """(B, T) token ids at positions [pos, pos+T) -> hidden states (B, T, d)."""
        h = F.embedding(token_ids, self.w.embed)
        if self.w.pos_embed is not None:
            h = h + self.w.pos_embed[pos:pos + token_ids.shape[1]]
        return h

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h, self.w.final_norm_w, self.w.final_norm_b)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: hidden (..., d) -> logits (..., V)."""
        x = self.final_norm(h)
        rows = x.numel() // x.shape[-1]
        if any(self.packed_projections()):  # None beyond panel_matmul.h's SMALL_ROWS rows
            logits = self._head_panels.mm(x.reshape(rows, x.shape[-1]))
            if logits is not None:
                return logits.view(*x.shape[:-1], -1)
        if self.head_rows_from is not None and rows >= self.head_rows_from:
            return self.head_by_rows(x)
        return F.linear(x, self.w.lm_head)

    def head_by_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head on normed x (..., d) as W (V, d) @ x.T: the same logits, another BLAS kernel."""
        flat = x.reshape(-1, x.shape[-1])  # (T, d)
        # (V, T) -> (T, V), contiguous: the softmax and argmax that follow run along V
        return torch.mm(self._head_rows, flat.T).T.contiguous().view(*x.shape[:-1], -1)

    def _rope(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """RoPE on x (..., T, heads, hd) for positions [pos, pos+T)."""
        T = x.shape[-3]
        cos, sin = self.cos[pos:pos + T, None], self.sin[pos:pos + T, None]  # (T, 1, hd): broadcast over heads
        return torch.addcmul(x * cos, torch.matmul(x, self._rotate), sin)

    def frame(self, pos: int, T: int, pads: torch.Tensor | None = None) -> "Frame":
        """What every layer of one pass over slots [pos, pos+T) shares: RoPE rows and masks. With
        ``pads`` (left-padded rows), row r's positions are the slots minus pads[r]."""
        cos = sin = None
        if pads is None:
            if self.spec.positional == "rope":
                cos, sin = self.cos[pos:pos + T], self.sin[pos:pos + T]  # (T, hd)
            return Frame(pos, T, cos, sin)
        if self.spec.positional == "rope":
            positions = self.row_positions(pos, T, pads)  # (B, T)
            cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (B, 1, T, hd)
        return Frame(pos, T, cos, sin, pads=pads)

    def row_positions(self, pos: int, T: int, pads: torch.Tensor) -> torch.Tensor:
        """(B, T) positions of slots [pos, pos+T) in left-padded rows (0 on pad slots)."""
        slots = torch.arange(pos, pos + T, device=self.device)
        return (slots[None, :] - pads[:, None]).clamp_min(0)

    def embed_rows(self, token_ids: torch.Tensor, pos: int, pads: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids at slots [pos, pos+T) of left-padded rows -> hidden states (B, T, d)."""
        h = F.embedding(token_ids, self.w.embed)
        if self.w.pos_embed is not None:
            h = h + F.embedding(self.row_positions(pos, token_ids.shape[1], pads), self.w.pos_embed)
        return h

    def _qkv(self, lw: LayerWeights, mm: dict[str, torch.Tensor], x: torch.Tensor, frame: "Frame", B: int,
             panels: dict[str, object] | None = None):
        """Normed hidden (B*T, d) -> q (B, H, T, hd), k and v (B, Hkv, T, hd), RoPE applied."""
        spec, T = self.spec, frame.T
        H, Hkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        panels = panels or {}
        if lw.qkv_w is not None:
            qkv = project(x, mm["qkv_w"], lw.qkv_b, panels=panels.get("qkv_w"))  # (B*T, (H+2Hkv)*hd)
        else:
            qkv = torch.cat((project(x, mm["q_w"], lw.q_b, panels=panels.get("q_w")),
                             project(x, mm["k_w"], lw.k_b, panels=panels.get("k_w")),
                             project(x, mm["v_w"], lw.v_b, panels=panels.get("v_w"))), -1)
        qkv = qkv.view(B, T, H + 2 * Hkv, hd).transpose(1, 2)  # (B, H+2Hkv, T, hd)
        qk, v = qkv[:, :H + Hkv], qkv[:, H + Hkv:]
        if frame.cos is not None:
            # q and k rotated together: one set of ops instead of two (rotate_half(x) == x @ _rotate).
            ext = native_layers.extension()
            rotated = ext.rope(qk, frame.cos, frame.sin) if ext is not None else None  # as the C++ loop does
            qk = rotated if rotated is not None else torch.addcmul(qk * frame.cos, torch.matmul(qk, self._rotate),
                                                                   frame.sin)
        return qk[:, :H], qk[:, H:], v

    def attention_scale(self, index: int) -> float:
        """Softmax scale of layer ``index``: the checkpoint's, else 1/sqrt(head_dim)."""
        return self.w.layers[index].attn_scale or 1.0 / math.sqrt(self.spec.head_dim)

    def _attention_mask(self, pos: int, T: int, key_start: int, window: int | None) -> torch.Tensor:
        """Boolean (T, S) mask: query pos+i may see key key_start+j iff causal and inside the window."""
        q_pos = torch.arange(pos, pos + T, device=self.device)[:, None]
        k_pos = torch.arange(key_start, pos + T, device=self.device)[None, :]
        allowed = k_pos <= q_pos
        if window is not None:
            allowed &= k_pos > q_pos - window
        return allowed

    def layer(self, index: int, h: torch.Tensor, pos: int, cache: KVCache, frame: "Frame | None" = None,
              kv_source: torch.Tensor | None = None, kv_exit: torch.Tensor | None = None) -> torch.Tensor:
        """One decoder layer on hidden states (B, T, d) of positions [pos, pos+T); writes its K/V.

        ``kv_source`` (B, T, d) with ``kv_exit`` (T,): a position whose ``kv_exit`` e is below ``index``
        exited after e layers with state ``kv_source``, and gets the K/V ``propagate_kv`` filled for it
        (``fill_stack(e)``) instead of those computed from h. Calibration uses it to replay propagate
        decoding of a whole sequence in one pass.

        Written for batch-1 decoding, where each torch call costs microseconds of dispatch: 2-D
        activations, matmuls straight into the stored (in, out) weight layout, residual adds fused into
        the output projections (addmm), RoPE rows and masks shared across layers through ``frame``.
        """
        native = None if kv_source is not None else self.native_for(cache, frame.pads if frame is not None else None)
        if native is not None:
            return native.run_layers(h, index, index + 1, pos, cache)
        spec, lw, mm, panels = self.spec, self.w.layers[index], self._mm[index], self.packed_projections()[index]
        B, T, d = h.shape
        frame = frame or self.frame(pos, T)
        h = h.view(B * T, d)  # (B*T, d)

        q, k, v = self._qkv(lw, mm, self.norm(h, lw.attn_norm_w, lw.attn_norm_b), frame, B, panels)
        if kv_source is not None:
            k, v = self._filled_kv(index, kv_source, kv_exit, frame, k, v)
        cache.write(index, pos, k, v)

        window = spec.sliding_windows[index]
        key_start = 0 if window is None else max(0, pos - window + 1)
        keys, values = cache.keys_values(index, key_start, pos + T)  # (B, Hkv, S, hd)
        ext = native_layers.extension()
        attn = None
        if ext is not None and frame.pads is None:  # the row kernel, as the C++ loop does: (T, H*hd) or None
            attn = ext.attention(q, keys, values, pos, key_start, -1 if window is None else window,
                                 self.attention_scale(index))
        if attn is None:
            attn = self._sdpa(q, keys, values, frame, index, pos, key_start, window)  # (B*T, H*hd)
        h = project(attn, mm["o_w"], lw.o_b, residual=h, panels=panels.get("o_w"))

        x = self.norm(h, lw.mlp_norm_w, lw.mlp_norm_b)
        if lw.gate_up_w is not None:
            gate_up = project(x, mm["gate_up_w"], lw.gate_up_b, panels=panels.get("gate_up_w"))  # (B*T, 2*ff)
            ff = gate_up.shape[-1] // 2
            inner = ext.silu_mul(gate_up) if ext is not None and spec.activation == "silu" else None
            if inner is None:  # not the row kernel's case (as in the C++ loop)
                inner = self._act(gate_up[:, :ff]) * gate_up[:, ff:]
        elif lw.gate_w is not None:
            inner = (self._act(project(x, mm["gate_w"], lw.gate_b, panels=panels.get("gate_w")))
                     * project(x, mm["up_w"], lw.up_b, panels=panels.get("up_w")))
        else:
            inner = self._act(project(x, mm["up_w"], lw.up_b, panels=panels.get("up_w")))
        return project(inner, mm["down_w"], lw.down_b, residual=h, panels=panels.get("down_w")).view(B, T, d)

    def _sdpa(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, frame: "Frame", index: int,
              pos: int, key_start: int, window: int | None) -> torch.Tensor:
        """torch's SDPA where the row kernel does not serve (left-padded batch rows, a prefill's many rows):
        q (B, H, T, hd) over keys / values (B, Hkv, S, hd) of positions [key_start, pos + T) -> (B*T, H*hd).
        The C++ loop's ``sdpa`` makes the same calls."""
        B, H, T, hd = q.shape
        mask, causal = None, False
        if frame.pads is not None:  # batched rows: pads are masked even for a single new token
            mask = frame.mask(self, key_start, window)
        elif T > 1:
            if key_start == 0 and pos == 0 and (window is None or window >= T):
                causal = True
            else:
                mask = frame.mask(self, key_start, window)
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal,
                                              scale=self.attention_scale(index),
                                              enable_gqa=keys.shape[1] != H)  # (B, H, T, hd)
        return attn.transpose(1, 2).reshape(B * T, H * hd)  # (B*T, H*hd)

    def run_layers(self, h: torch.Tensor, start: int, end: int, pos: int, cache: KVCache,
                   pads: torch.Tensor | None = None) -> torch.Tensor:
        """Layers [start, end) on hidden states (B, T, d) of positions [pos, pos+T) (slots, with ``pads``)."""
        native = self.native_for(cache, pads)
        if native is not None:
            return native.run_layers(h, start, end, pos, cache)
        frame = self.frame(pos, h.shape[1], pads)
        for index in range(start, end):
            h = self.layer(index, h, pos, cache, frame)
        return h

    def new_cache(self, batch_size: int = 1, max_len: int | None = None, for_autograd: bool = False) -> KVCache:
        spec = self.spec
        return KVCache(spec.num_layers, batch_size, spec.num_kv_heads, max_len or spec.max_positions,
                       spec.head_dim, dtype=self.dtype, device=self.device, for_autograd=for_autograd)

    # ---- propagate KV policy ----------------------------------------------------------------------
    def kv_projection_stack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V projections of every layer with that layer's norm weight folded in.

        For RMSNorm, K_l(h) = W_l (g_l * n(h)) + b_l = (W_l * g_l) n(h) + b_l, where n(h) is the weightless
        normalisation shared by all layers; LayerNorm's shift folds into the bias as W_l beta_l. Stacking
        the folded matrices lets one matmul produce K/V for all skipped layers at once (CALM's
        state propagation) instead of 2 * (L - k) small matmuls. Built on first use: a copy of the K/V
        weights, about 2 * kv_dim / (4 * d + 3 * ff) of the layer weights.
        """
        if self._kv_stack is None:
            mats, biases = [], []
            for lw in self.w.layers:
                w = torch.cat((lw.k_w, lw.v_w), dim=0)  # (2*kv, d)
                b = torch.cat((lw.k_b if lw.k_b is not None else torch.zeros_like(lw.k_w[:, 0]),
                               lw.v_b if lw.v_b is not None else torch.zeros_like(lw.v_w[:, 0])))
                if lw.attn_norm_b is not None:
                    b = b + w @ lw.attn_norm_b
                mats.append(w * lw.attn_norm_w[None, :])
                biases.append(b)
            self._kv_stack = (torch.stack(mats), torch.stack(biases))  # (L, 2*kv, d), (L, 2*kv)
        return self._kv_stack

    def set_kv_fill(self, fill: KVFill | None) -> None:
        """Fill skipped layers' K/V with learned maps (None: with each layer's own projection)."""
        self.kv_fill = None if fill is None else fill.to(self.dtype, self.device)
        self._fill_stacks = {}

    def fill_stack(self, first_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mats (L', 2*kv, d), biases (L', 2*kv)) that fill layers [first_layer, L) from the
        weightless-normalised state after ``first_layer`` layers: the layer's own (exact) projection for
        layer first_layer, then the learned maps when the model has them, else the projections."""
        if first_layer not in self._fill_stacks:
            mats, biases = self.kv_projection_stack()
            mats, biases = mats[first_layer:], biases[first_layer:]
            if self.kv_fill is not None:
                deeper = range(first_layer + 1, self.spec.num_layers)
                mats = torch.stack([mats[0], *(self.kv_fill.map(first_layer, j)[0] for j in deeper)])
                biases = torch.stack([biases[0], *(self.kv_fill.map(first_layer, j)[1] for j in deeper)])
            self._fill_stacks[first_layer] = (mats, biases)
        return self._fill_stacks[first_layer]

    def weightless_norm(self, h: torch.Tensor) -> torch.Tensor:
        d = (self.spec.hidden_size,)
        if self.spec.norm_kind == "rms":
            return F.rms_norm(h, d, None, self.spec.norm_eps)
        return F.layer_norm(h, d, None, None, self.spec.norm_eps)

    def _filled_kv(self, index: int, source: torch.Tensor, exit_layer: torch.Tensor, frame: "Frame",
                   k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, Hkv, T, hd) of layer ``index`` with the rows of positions that exited below it
        replaced by what ``propagate_kv`` filled from their exit state ``source`` (B, T, d)."""
        spec = self.spec
        B, T, d = source.shape
        n = self.weightless_norm(source.reshape(B * T, d))  # (B*T, d)
        for e in exit_layer[exit_layer < index].unique().tolist():
            mats, biases = self.fill_stack(e)
            kv = F.linear(n, mats[index - e], biases[index - e])  # (B*T, 2*kv)
            kv = kv.view(B, T, 2, spec.num_kv_heads, spec.head_dim).permute(2, 0, 3, 1, 4)  # (2, B, Hkv, T, hd)
            fk, fv = kv[0], kv[1]
            if frame.cos is not None:
                fk = torch.addcmul(fk * frame.cos, torch.matmul(fk, self._rotate), frame.sin)
            rows = (exit_layer == e).view(1, 1, T, 1)
            k, v = torch.where(rows, fk, k), torch.where(rows, fv, v)
        return k, v

    def propagate_kv(self, h: torch.Tensor, first_layer: int, pos: int, cache: KVCache) -> None:
        """Fill K/V of layers [first_layer, L) at position ``pos`` from the exit hidden state h (B, 1, d)."""
        spec = self.spec
        if first_layer >= spec.num_layers:
            return
        mats, biases = self.fill_stack(first_layer)
        B = h.shape[0]
        n = self.weightless_norm(h).reshape(B, spec.hidden_size).T  # (d, B)
        kv = torch.matmul(mats, n) + biases[:, :, None]  # (L', 2*kv, B)
        Lp = kv.shape[0]
        kv = kv.permute(0, 2, 1).reshape(Lp, B, 2, spec.num_kv_heads, 1, spec.head_dim)  # (L', B, 2, Hkv, 1, hd)
        k, v = kv[:, :, 0], kv[:, :, 1]  # (L', B, Hkv, 1, hd)
        if spec.positional == "rope":
            k = self._rope(k.transpose(2, 3), pos).transpose(2, 3)  # RoPE wants (..., T, heads, hd)
        cache.write_layers(first_layer, pos, k, v)

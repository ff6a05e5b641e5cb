"""Preallocated positional KV cache with a fill level per layer.

Position is the cache key (gpt-fast / litgpt habit): buffers are allocated once for the whole context,
writes go to ``[start, start + T)``, and rollback is a crop of the fill levels, never a copy.

Early exit makes layers disagree on how far they are filled: a token that stops after k layers has no
K/V in layers k..L-1 until a KV policy fills them. ``fill[l]`` is the number of leading positions whose
K/V is valid in layer l; ``write`` refuses to leave a hole, and ``keys_values`` refuses to hand out
slots that were never written, so nothing can attend to garbage.
"""

from __future__ import annotations

import torch


class CacheHoleError(RuntimeError):
    """An internal invariant broke: something tried to read or write past a layer's fill level."""


class KVCache:
    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", for_autograd: bool = False):
        """``for_autograd``: one tensor per layer instead of views into one, for training through the cache
        (autograd versions a whole tensor, so a write to layer l+1 of a shared tensor would invalidate the
        K/V layer l saved for its backward pass). ``write_layers`` then writes layer by layer."""
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)  # (L, B, Hkv, T, hd)
        self.max_len = max_len
        self.fill = [0] * num_layers
        self.native = None  # these buffers as the C++ layer loop holds them (native_layers.py), made on first use
        if for_autograd:
            self.k = self.v = None
            self.k_layers = [torch.zeros(shape[1:], dtype=dtype, device=device) for _ in range(num_layers)]
            self.v_layers = [torch.zeros(shape[1:], dtype=dtype, device=device) for _ in range(num_layers)]
            return
        # One tensor for all layers: the propagate policy fills several layers with a single write.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # Per-layer views (B, Hkv, T, hd): one narrow per access instead of a multi-axis index.
        self.k_layers, self.v_layers = self.k.unbind(0), self.v.unbind(0)

    @property
    def num_layers(self) -> int:
        return len(self.fill)

    def check_write(self, first_layer: int, last_layer: int, start: int, end: int) -> None:
        """Refuse (CacheHoleError) a write of positions [start, end) to layers [first_layer, last_layer) that
        would leave a hole after a layer's fill level or run past the cache."""
        for layer in range(first_layer, last_layer):
            if start > self.fill[layer]:
                raise CacheHoleError(f"layer {layer}: write at {start} would leave a hole after fill level {self.fill[layer]}")
        if end > self.max_len:
            raise CacheHoleError(f"layer {first_layer}: write up to {end} exceeds the cache length {self.max_len}")

    def mark_filled(self, first_layer: int, last_layer: int, end: int) -> None:
        """Layers [first_layer, last_layer) now hold valid K/V up to position ``end``."""
        for layer in range(first_layer, last_layer):
            self.fill[layer] = max(self.fill[layer], end)

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V (B, Hkv, T, hd) of positions [start, start+T) in one layer."""
        end = start + k.shape[2]
        self.check_write(layer, layer + 1, start, end)
        self.k_layers[layer].narrow(2, start, end - start).copy_(k)
        self.v_layers[layer].narrow(2, start, end - start).copy_(v)
        self.mark_filled(layer, layer + 1, end)

    def write_layers(self, first_layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V (L', B, Hkv, T, hd) of positions [start, start+T) in layers first_layer..first_layer+L'-1."""
        end = start + k.shape[3]
        last = first_layer + k.shape[0]
        self.check_write(first_layer, last, start, end)
        if self.k is None:  # one tensor per layer (for_autograd)
            for i, layer in enumerate(range(first_layer, last)):
                self.k_layers[layer][:, :, start:end] = k[i]
                self.v_layers[layer][:, :, start:end] = v[i]
        else:
            self.k[first_layer:last, :, :, start:end] = k
            self.v[first_layer:last, :, :, start:end] = v
        self.mark_filled(first_layer, last, end)

    def keys_values(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (B, Hkv, end-start, hd) of the valid K/V of positions [start, end) in one layer."""
        if end > self.fill[layer]:
            raise CacheHoleError(f"layer {layer}: reading up to {end} but only {self.fill[layer]} positions are filled")
        return self.k_layers[layer].narrow(2, start, end - start), self.v_layers[layer].narrow(2, start, end - start)

    def crop(self, length: int) -> None:
        """Roll back to the first ``length`` positions in every layer (stale slots are simply overwritten later)."""
        self.fill = [min(f, length) for f in self.fill]

    def is_complete(self, length: int) -> bool:
        """True when every layer holds valid K/V for positions [0, length)."""
        return all(f >= length for f in self.fill)

"""The decoder-layer loop in C++ (``native_layers.cpp``): LeanModel.layer's ATen calls without the
interpreter between them.

At batch 1 a layer of the bundled model is ~35 small torch calls, and from Python each pays argument
parsing and a tensor object on top of its kernel. The C++ loop makes the same calls in the same order,
so its outputs are bit-identical to the Python layer (tests/test_native_layers.py), only faster.

It is built on first use with torch's extension builder (gcc and ninja; about 25 s on two cores, then
cached in torch's extensions directory, ``TORCH_EXTENSIONS_DIR``). Where it cannot be built, or with
``ADAPTIVE_NATIVE=0``, the Python layer runs; ``status()`` says which and why, and the runtime's
stats and the benchmark report it, so a figure always names the code that produced it.

Left in Python: left-padded batch rows, replayed propagate K/V (calibration), anything recording
autograd (training), and the cache's fill-level bookkeeping (``KVCache.check_write`` before the C++ call,
``KVCache.mark_filled`` after it).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .kv_cache import KVCache

if TYPE_CHECKING:
    from .model import LeanModel

ENV_SWITCH = "ADAPTIVE_NATIVE"  # "0" (or false / no / off) keeps every layer in Python
STALE_LOCK_S = 600  # a build takes ~30 s; a lock this old belongs to a build that was killed
_SOURCE = Path(__file__).with_name("native_layers.cpp")
_HEADERS = [Path(__file__).with_name(name) for name in ("draft_round.h", "panel_matmul.h", "row_kernels.h")]  # included by the source


def _compile_flags() -> list[str]:
    """-O3, OpenMP, and on x86-64 Linux the build machine's own vector instructions (AVX2 / AVX-512 for
    panel_matmul.h). The extension is compiled on the machine that runs it, on first use.

    -fopenmp: at::parallel_for is an inline header whose threaded branch exists only under _OPENMP; built
    without it, panel_matmul.h ran every matrix on one thread whatever torch.set_num_threads said. The
    OpenMP runtime it links (libgomp.so.1) is the one torch already loaded under that name. Linux only:
    Apple's clang has no -fopenmp (there the panels stay on one thread, as before)."""
    flags = ["-O3"] + _openmp_flags()
    if platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")
    return flags


def _openmp_flags() -> list[str]:
    return ["-fopenmp"] if platform.system() == "Linux" else []


def _cpu_tag() -> str:
    """What a -march=native build depends on: the CPU's feature flags (Linux), else its name."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor()


def _build_name() -> str:
    """The extension's name, tagged with a hash of its sources, flags and this CPU: torch reuses a cached
    build by name, so a build for another machine (a shared extensions directory, an image built
    elsewhere) or of an edited header is never loaded by mistake."""
    digest = hashlib.sha256()
    for path in [_SOURCE, *_HEADERS]:
        digest.update(path.read_bytes())
    digest.update(" ".join(_compile_flags()).encode())
    digest.update(_cpu_tag().encode())
    return f"adaptive_native_layers_{digest.hexdigest()[:12]}"


_NAME = _build_name()

_lock = threading.Lock()
_extension = None
_status: str | None = None  # None: not tried yet


def clear_stale_lock(build_dir: Path, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove torch's build lock when it is older than ``max_age_s``; True if removed.

    torch waits, without a time limit, for the ``lock`` file of a build in progress; a build killed
    before it released the lock (a closed terminal during the first start) would otherwise hang every
    later start on the machine."""
    lock = build_dir / "lock"
    try:
        if time.time() - lock.stat().st_mtime < max_age_s:
            return False
        lock.unlink()
    except FileNotFoundError:
        return False
    print(f"adaptive: removed {lock}, left by a build that did not finish", file=sys.stderr)
    return True


def _build():
    from torch.utils import cpp_extension

    try:  # say why the first start on a machine pauses (a private helper: a guess, never an error)
        build_dir = Path(cpp_extension._get_build_directory(_NAME, False))
        built = (build_dir / f"{_NAME}.so").exists()
        clear_stale_lock(build_dir)
    except Exception:
        built = True
    # torch runs `ninja` from PATH; a virtual environment that was not activated has it beside python.
    beside = Path(sys.executable).parent
    if shutil.which("ninja") is None and (beside / "ninja").exists():
        os.environ["PATH"] = f"{beside}{os.pathsep}{os.environ.get('PATH', '')}"
    if not built:
        print("adaptive: compiling the C++ layer loop (once per machine, about 30 s)", file=sys.stderr)
    return cpp_extension.load(name=_NAME, sources=[str(_SOURCE)], extra_cflags=_compile_flags(),
                              extra_ldflags=_openmp_flags(), verbose=False)


def extension():
    """The compiled module, building it on the first call; None where it is switched off or cannot be built."""
    global _extension, _status
    if _status is not None:  # settled (set after _extension): the hot path (norms, heads) takes no lock
        return _extension
    with _lock:
        if _status is None:
            switch = os.environ.get(ENV_SWITCH, "1")
            if switch.strip().lower() in ("0", "false", "no", "off"):
                _status = f"python ({ENV_SWITCH}={switch})"
            else:
                try:
                    _extension = _build()
                    _status = "native"
                except Exception as e:  # no compiler, no ninja, a failed build: the Python layer still works
                    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    _status = f"python (the C++ layer loop did not build: {first_line[:200]})"
                    print(f"adaptive: decoder layers run in {_status}", file=sys.stderr)
        return _extension


def status() -> str:
    """"native", or "python (why)": which code runs the decoder layers in this process."""
    extension()
    return _status


class NativeLayers:
    """A LeanModel's layers bound to the C++ loop once (the tensors are shared, not copied)."""

    def __init__(self, model: "LeanModel", ext):
        spec, w = model.spec, model.w
        self._ext = ext
        layers = []
        packed = model.packed_projections()
        for index, (lw, mm) in enumerate(zip(w.layers, model._mm)):
            window = spec.sliding_windows[index]
            layers.append(ext.NativeLayer(
                attn_norm_w=lw.attn_norm_w, attn_norm_b=lw.attn_norm_b, mlp_norm_w=lw.mlp_norm_w,
                mlp_norm_b=lw.mlp_norm_b, o_t=mm["o_w"], o_b=lw.o_b, down_t=mm["down_w"], down_b=lw.down_b,
                qkv_t=mm.get("qkv_w"), qkv_b=lw.qkv_b, q_t=mm.get("q_w"), q_b=lw.q_b, k_t=mm.get("k_w"),
                k_b=lw.k_b, v_t=mm.get("v_w"), v_b=lw.v_b, gate_up_t=mm.get("gate_up_w"), gate_up_b=lw.gate_up_b,
                gate_t=mm.get("gate_w"), gate_b=lw.gate_b, up_t=mm.get("up_w"), up_b=lw.up_b,
                scale=model.attention_scale(index), window=-1 if window is None else int(window),
                packed=packed[index]))
        rope = spec.positional == "rope"
        self._model = ext.NativeModel(
            layers, w.embed, w.pos_embed, w.final_norm_w, w.final_norm_b,
            model.cos if rope else None, model.sin if rope else None, model._rotate if rope else None,
            model._inv_width, model._norm_eps, float(spec.norm_eps), spec.norm_kind, spec.activation,
            spec.num_heads, spec.num_kv_heads, spec.head_dim)

    def _bind(self, cache: KVCache):
        """The cache's buffers as the C++ side holds them, made once per cache."""
        if cache.native is None:
            cache.native = self._ext.NativeKV(list(cache.k_layers), list(cache.v_layers))
        return cache.native

    def run_layers(self, h: torch.Tensor, start: int, end: int, pos: int, cache: KVCache) -> torch.Tensor:
        """Layers [start, end) on h (B, T, d) of positions [pos, pos+T): LeanModel.run_layers without pads."""
        cache.check_write(start, end, pos, pos + h.shape[1])
        out = self._model.run_layers(h, start, end, pos, self._bind(cache))
        cache.mark_filled(start, end, pos + h.shape[1])
        return out

    def draft_greedy(self, tokens: list[int], pos: int, depth: int, cache: KVCache,
                     adapter: tuple[torch.Tensor, torch.Tensor | None] | None, head_t: torch.Tensor,
                     head_ids: torch.Tensor, head_panels=None) -> tuple[torch.Tensor, list[float], list[int]]:
        """Greedy self-draft steps in one call: ``tokens`` at positions [pos, pos + T) through layers
        [0, depth), the exit adapter, final norm and the shortlist head (d, n) over ``head_ids``. Returns
        (hidden (1, T, d), per position the confidence = the max draft probability, per position the
        drafted token id), as the Python drafter computes them. ``head_panels``: the head's
        ``PackedWeight`` (``ShortlistHead.panels``), or None."""
        end = pos + len(tokens)
        cache.check_write(0, depth, pos, end)
        w, b = adapter if adapter is not None else (None, None)
        out = self._model.draft_greedy(tokens, pos, depth, self._bind(cache), w, b, head_t, head_ids, head_panels)
        cache.mark_filled(0, depth, end)
        return out

    def draft_rules(self):
        """A fresh ``DraftRules`` (draft_round.h's Rules) for ``draft_round`` to fill."""
        return self._ext.DraftRules()

    def draft_round(self, t0: int, pos: int, depth: int, cache: KVCache,
                    adapter: tuple[torch.Tensor, torch.Tensor | None] | None, head_t: torch.Tensor,
                    head_ids: torch.Tensor, head_panels, context: list[int], rules):
        """A whole greedy self-drafted round from t0 at ``pos`` (draft_greedy passes with the drafter's
        rules between them, ``rules``: an ``ext.DraftRules``): the extension's ``DraftRound``. Layers
        [0, depth) end up filled up to pos + its drafts; it writes at most up to pos + min(limit, max_draft)."""
        cache.check_write(0, depth, pos, pos + min(rules.limit, rules.max_draft))
        w, b = adapter if adapter is not None else (None, None)
        out = self._model.draft_round(t0, pos, depth, self._bind(cache), w, b, head_t, head_ids, head_panels,
                                      context, rules)
        cache.mark_filled(0, depth, pos + len(out.tokens))
        return out

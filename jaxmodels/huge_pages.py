"""Decoding weights in memory backed by 2 MiB pages (Linux, CPU).

Decoding a token on CPU streams every weight from memory once. XLA:CPU allocates arrays with
4 KiB pages, and where transparent huge pages are in "madvise" mode (a common default) they stay
4 KiB pages: streaming SmolLM2's 540 MB of float32 weights then walks 130 000 page-table entries
per token. `place` copies a parameter tree's large arrays into one anonymous mapping advised
MADV_HUGEPAGE and hands them to JAX without another copy (`jax.device_put(..., may_alias=True)`
aliases aligned host memory on CPU; the JAX array keeps the mapping alive). Measured on a 2-core
EPYC, SmolLM2 greedy decode rate against the same weights in XLA's memory, alternating call by
call: float32 +10% at batch 1 and +7% at batch 8, bf16 +3%, int8 +14% at batch 1 (-2% at 8, noise).
Placing SmolLM2's float32 weights takes about 0.15 s (the process's first touch of fresh memory:
about 1 s). Elsewhere (another OS or backend, huge pages off, a runtime that copies) it returns
the tree unchanged.
"""

from __future__ import annotations

import mmap
import sys
import weakref
from typing import Any

import jax
import numpy as np

HUGE_PAGE = 1 << 21
MIN_BYTES = 64 << 10  # smaller arrays (norm weights, scales) stay where they are
ALIGN = 64  # each array's offset in the arena: XLA:CPU aliases host memory aligned this far
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"

_ARENAS: list[tuple[int, int, weakref.ref]] = []  # (first byte, end, the arena's base array)


def supported() -> bool:
    """Whether huge pages can back decoding weights here: Linux, the CPU backend, transparent
    huge pages not switched off ("never")."""
    if not sys.platform.startswith("linux") or jax.default_backend() != "cpu" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open(THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def _arena(nbytes: int) -> np.ndarray:
    """nbytes of zeroed memory starting at a 2 MiB boundary, advised MADV_HUGEPAGE before first touch."""
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = np.frombuffer(mapping, np.uint8)
    start = (-base.ctypes.data) % HUGE_PAGE  # a multiple of the 4 KiB page: the mapping is page aligned
    mapping.madvise(mmap.MADV_HUGEPAGE, start, nbytes)
    arena = base[start: start + nbytes]
    _ARENAS[:] = [a for a in _ARENAS if a[2]() is not None]
    _ARENAS.append((arena.ctypes.data, arena.ctypes.data + nbytes, weakref.ref(base)))
    return arena


def _pointer(x: Any) -> int | None:
    """The host address of a JAX array on one CPU device, else None."""
    if not isinstance(x, jax.Array) or len(x.devices()) != 1 or next(iter(x.devices())).platform != "cpu":
        return None
    try:
        return x.unsafe_buffer_pointer()
    except Exception:  # deleted, or a runtime without it
        return None


def _in_arena(pointer: int) -> bool:
    return any(lo <= pointer < hi and base() is not None for lo, hi, base in _ARENAS)


def placed(x: Any) -> bool:
    """Whether x lies in memory `place` made."""
    p = _pointer(x)
    return p is not None and _in_arena(p)


def _wanted(x: Any) -> bool:
    p = _pointer(x)  # once per leaf: `decode_layout` checks every leaf on every `generate` call
    return p is not None and x.nbytes >= MIN_BYTES and not _in_arena(p)


def place(tree: Any) -> Any:
    """The tree with its arrays of at least MIN_BYTES (on one CPU device, not placed yet) copied
    into one huge-page arena; the same values. Unchanged where `supported()` is False or JAX would
    copy the arena's memory instead of aliasing it. Idempotent."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    chosen = [i for i, x in enumerate(leaves) if _wanted(x)]
    if not chosen or not supported():
        return tree
    offsets, end = {}, 0
    for i in chosen:
        offsets[i] = end
        end += -(-leaves[i].nbytes // ALIGN) * ALIGN
    arena = _arena(end)
    out = list(leaves)
    for i in chosen:
        x = leaves[i]
        view = arena[offsets[i]: offsets[i] + x.nbytes].view(x.dtype).reshape(x.shape)
        np.copyto(view, np.asarray(x))
        view.flags.writeable = False
        out[i] = jax.device_put(view, x.sharding if x.committed else None, may_alias=True)
        if out[i].unsafe_buffer_pointer() != view.ctypes.data:  # this runtime copied: no gain, keep the original
            return tree
    return jax.tree_util.tree_unflatten(treedef, out)

"""A few rows times an output-major weight on CPU, reading the weight's stored bytes.

Decoding a few rows reads every weight once per token, so it is bound by the weight bytes. XLA:CPU
multiplies a bf16 or int8 weight in float32 and hoists that conversion out of the decode loop, so
the loop reads float32 copies (`benchmarks/matvec_dtypes.py`). `cpu_matvec.cc` reads float32, bf16
or int8 weights as stored, widens them in registers and accumulates in float32, on XLA's intra-op
threads (a weight under 128 KiB on the calling thread alone: on a loaded CI run a tiny model's layer
over one token, on the kernel, measured 3x the time of one over five, on XLA; waking a helper
thread costs more than such a product). It is an XLA FFI custom call, compiled on first use with
the machine's C++ compiler (`-O3 -march=native`) into a cache folder and reused while source,
compiler, jaxlib and CPU stay the same. The same library holds `take_rows`, the embedding lookup of
a bf16 table when decoding on CPU (`model.decode_embedding`: XLA:CPU would widen the whole table),
and cached attention for a few new tokens (`jaxmodels.cpu_attention`).

`layers.output_major_matmuls` uses it on CPU for up to `MAX_ROWS` rows when `available()`, several
weights on one input in one call (`matvecs`: a layer's q/k/v, gate/up, via `layers.dense_many`); anything
else (GPU, TPU, prefill, training) keeps the XLA product. With no compiler, or with
`JAXMODELS_CPU_MATVEC=0`, decoding falls back to XLA with one warning that says why. Each output
row's sum runs in the same order whatever the batch, so a row's result does not depend on the
other rows beside it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp

from jaxmodels.config import ConfigError
from jaxmodels.quantize import cpu_flags

SOURCES = tuple(Path(__file__).with_name(f) for f in ("cpu_matvec.cc", "cpu_attention.cc"))
HEADERS = (Path(__file__).with_name("cpu_kernels.h"),)  # what both share: vector loads, exp, threads
# Up to this many rows the kernel runs; more: XLA's product. SmolLM2 decode on a 2-core AVX-512 EPYC,
# kernel vs XLA tokens/s: float32 1.5x at batch 1, 1.0-1.1x at 2 and 4, 0.75x at 8 (XLA's GEMM wins
# once rows share each weight load); bf16 2.3x at 1, 1.65x at 4, 1.2x at 8; int8 3.6x at 1, 1.5x at 8.
# Prefill (rows = batch x prompt bucket), where XLA first converts a bf16 / int8 weight to float32:
# 32 rows 250 -> 120 ms (bf16) and 255 -> 145 ms (int8); 128 rows 410-445 -> 300-335 ms; 256 rows
# about even (660-715 ms against 660-900, noisy). So bf16 / int8 take the kernel up to 128 rows.
MAX_ROWS = {jnp.dtype(jnp.float32): 4, jnp.dtype(jnp.bfloat16): 128, jnp.dtype(jnp.int8): 128}
ENV_SWITCH = "JAXMODELS_CPU_MATVEC"  # "0" turns the kernel off
TARGETS = {jnp.dtype(jnp.float32): "jaxmodels_matvec_f32", jnp.dtype(jnp.bfloat16): "jaxmodels_matvec_bf16",
           jnp.dtype(jnp.int8): "jaxmodels_matvec_s8"}
TAKE_ROWS = "jaxmodels_take_rows"
ATTENTION = "jaxmodels_decode_attention"  # `jaxmodels.cpu_attention`
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


def cache_dir() -> Path:
    """Where compiled kernels live: $JAXMODELS_CACHE, else $XDG_CACHE_HOME/jaxmodels, else ~/.cache/jaxmodels."""
    root = os.environ.get("JAXMODELS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxmodels")
    return Path(root) / "cpu_matvec"


def compiler() -> str:
    """The C++ compiler: $CXX, else c++ or g++ or clang++ on the PATH."""
    found = os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if not found:
        raise ConfigError("no C++ compiler found for the CPU decode kernel: install g++ or set CXX "
                          f"(or set {ENV_SWITCH}=0 to decode with XLA's matmuls)")
    return found


def build() -> Path:
    """Compile the CPU kernels' sources into one library (once per source, compiler, jaxlib and CPU)
    and return it."""
    cxx = compiler()
    parts = [*(f.read_bytes() for f in SOURCES + HEADERS), cxx.encode(), " ".join(FLAGS).encode(),
             jax.__version__.encode(), platform.machine().encode(), " ".join(sorted(cpu_flags())).encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    lib = cache_dir() / f"cpu_matvec-{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:  # then renamed: parallel builds are safe
        out = Path(tmp) / lib.name
        cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", str(out)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            raise ConfigError(f"cannot run the C++ compiler {cxx!r} for the CPU decode kernel: {e}; install "
                              f"g++ or set CXX (or set {ENV_SWITCH}=0 to decode with XLA's matmuls)") from e
        if done.returncode != 0:
            raise ConfigError(f"compiling the CPU decode kernel failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}"
                              f"\nset {ENV_SWITCH}=0 to decode with XLA's matmuls")
        os.replace(out, lib)
    return lib


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered with XLA (once per process). False, with one
    warning naming the cause, where it cannot be; False without a warning when switched off."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
    except (ConfigError, OSError) as e:
        warnings.warn(f"CPU decode kernel unavailable, decoding uses XLA's matmuls: {e}", stacklevel=2)
        return False
    for name in (*TARGETS.values(), TAKE_ROWS, ATTENTION):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    return True


WIDEST_VECTOR = 16  # float32 lanes of the kernels' widest register (AVX-512); sizes they split are multiples
GROUP_MULTIPLE = WIDEST_VECTOR  # inputs per int8 scale group


def applies(wt: jax.Array, x: jax.Array, scale: jax.Array | None = None) -> bool:
    """Whether `matvec(x, wt, scale)` runs the kernel: on CPU, a supported weight dtype, few rows,
    scale groups of a multiple of GROUP_MULTIPLE inputs, and built."""
    rows = x.size // max(x.shape[-1], 1)
    groups = 1 if scale is None or scale.ndim < 2 else scale.shape[0]
    grouped_ok = groups == 1 or (wt.shape[-1] % groups == 0 and (wt.shape[-1] // groups) % GROUP_MULTIPLE == 0)
    return (jax.default_backend() == "cpu" and wt.ndim == 2 and grouped_ok
            and 0 < rows <= MAX_ROWS.get(jnp.dtype(wt.dtype), 0) and available())


def matvec(x: jax.Array, wt: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """x [..., m] times a weight stored output-major wt [n, m] (float32, bf16 or int8), each output
    column times scale [n] if given, or each group of m / G inputs times its row of scale [G, n]:
    [..., n] in x's dtype, computed in float32. CPU only; see `applies` for when to call it."""
    return matvecs(x, [wt], [scale])[0]


def matvecs(x: jax.Array, wts: Sequence[jax.Array], scales: Sequence[jax.Array | None]) -> list[jax.Array]:
    """`matvec(x, wt, scale)` for several weights of one dtype in one call, which shares the
    threads' work among them: a layer's q, k and v in one call took 1.03 ms against 1.94 ms as
    three (SmolLM2, 30 layers, bf16, batch 1). Each result equals its own `matvec`, bit for bit."""
    if not available():
        raise ConfigError(f"the CPU decode kernel is not available (switched off by {ENV_SWITCH}=0, or it "
                          "failed to build: see the warning); check `applies` before calling `matvec`")
    dtypes = {jnp.dtype(wt.dtype) for wt in wts}
    if len(dtypes) != 1 or len(wts) != len(scales) or any(wt.shape[1] != x.shape[-1] for wt in wts):
        raise ConfigError(f"matvecs: weights [n, {x.shape[-1]}] of one dtype and a scale (or None) each; got "
                          f"{[(wt.shape, str(wt.dtype)) for wt in wts]} and {len(scales)} scales")
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)  # [B, m]
    operands = []
    for wt, scale in zip(wts, scales):
        operands += [wt, jnp.zeros((0,), jnp.float32) if scale is None else scale.astype(jnp.float32).reshape(-1)]
    out = [jax.ShapeDtypeStruct((rows.shape[0], wt.shape[0]), jnp.float32) for wt in wts]
    ys = jax.ffi.ffi_call(TARGETS[dtypes.pop()], out, vmap_method="sequential")(rows, *operands)
    return [y.reshape(*x.shape[:-1], y.shape[-1]).astype(x.dtype) for y in ys]


def takes_rows(table: jax.Array) -> bool:
    """Whether `take_rows(table, ids)` runs the kernel: on CPU, a 16-bit float table, and built."""
    return (jax.default_backend() == "cpu" and table.ndim == 2 and jnp.dtype(table.dtype).itemsize == 2
            and jnp.issubdtype(table.dtype, jnp.floating) and available())


@jax.custom_vjp
def take_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """table [V, D] rows at ids [...] (clamped to [0, V)) -> [..., D] in the table's dtype, copied as
    stored. CPU only; see `takes_rows` for when to call it (XLA:CPU widens a bf16 table to gather).
    Differentiable in the table (its gradient is the gather's scatter-add)."""
    out = jax.ShapeDtypeStruct((ids.size, table.shape[1]), table.dtype)
    rows = jax.ffi.ffi_call(TAKE_ROWS, out, vmap_method="sequential")(table, ids.reshape(-1).astype(jnp.int32))
    return rows.reshape(*ids.shape, table.shape[1])


def _take_rows_fwd(table: jax.Array, ids: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return take_rows(table, ids), (table, ids)


def _take_rows_bwd(residuals: tuple[jax.Array, jax.Array], grad: jax.Array) -> tuple[jax.Array, None]:
    """The gather's transpose, as XLA's own: each row's cotangent added into its table row."""
    table, ids = residuals
    rows = jnp.clip(ids.reshape(-1), 0, table.shape[0] - 1)
    return jnp.zeros_like(table).at[rows].add(grad.reshape(-1, table.shape[1]).astype(table.dtype)), None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)

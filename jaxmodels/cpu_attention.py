"""Cached attention for a few new tokens per row on CPU, in one call per layer.

XLA:CPU runs the jnp path (`jaxmodels.attention.gqa_attention`) as several ops per layer over the
whole preallocated buffer: scores, mask, softmax's max / exp / sum / divide, the values' product.
On SmolLM2 at batch 1 (2-core EPYC, `benchmarks/decode_profile.py`) those read the cache at
2.7 GB/s, 8% of the measured bandwidth, and cost about 2 ms of a 22 ms float32 step.
`cpu_attention.cc` does one pass per (row, KV head): it reads the keys and values up to the last
position a query of the row sees, once for the whole GQA group and every new token. SmolLM2's
decode step against the jnp path (`benchmarks/cpu_attention.py`, 2026-12-04, alternating): 1.06-1.15x
at batch 1 and 0.99-1.13x at batch 8 with short prompts, 1.24-1.53x and 1.77-2.17x with 896-token ones.

Same meaning as the jnp path (positions mask keys; stale slots past a row's length are not read),
float32 throughout, to a few float32 ulps of it (softmax's exp is a polynomial in both). Each query's
result does not depend on the other queries or rows of the call, so verifying a token among d
others gives the bits decoding it alone gives. `attend` uses it under "auto" on CPU for dense layers
(no attention plan), float32 caches and up to MAX_QUERIES new tokens; "reference" keeps the jnp path.
Built with the CPU decode kernels (`jaxmodels.cpu_matvec`: same library, same switch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmodels import cpu_matvec
from jaxmodels.config import ConfigError

MAX_QUERIES = 16  # new tokens per row: decoding and verification; a prefill keeps the jnp path
MAX_HEAD_DIM = 256


def applies(q: jax.Array, keys: jax.Array) -> bool:
    """Whether `decode_attention(q, keys, ...)` runs the kernel: on CPU, float32 queries and cache,
    at most MAX_QUERIES new tokens, a head size the kernel takes, and built."""
    hd = q.shape[-1]
    return (jax.default_backend() == "cpu" and q.ndim == 4 and q.shape[1] <= MAX_QUERIES
            and q.dtype == jnp.float32 and keys.dtype == jnp.float32
            and hd % cpu_matvec.WIDEST_VECTOR == 0 and hd <= MAX_HEAD_DIM and cpu_matvec.available())


def decode_attention(q: jax.Array, keys: jax.Array, values: jax.Array, positions: jax.Array) -> jax.Array:
    """Causal GQA attention of q [B, T, H, hd] at positions [B, T] against a layer's cache buffers
    keys, values [B*KV, S, hd] (slot s holds position s): [B, T, H, hd], float32. A query at
    position p reads slots 0..min(p, S - 1). CPU only; see `applies` for when to call it."""
    if not cpu_matvec.available():
        raise ConfigError(f"the CPU decode kernels are not available (switched off by {cpu_matvec.ENV_SWITCH}=0, "
                          "or they failed to build: see the warning); check `applies` first")
    b, t, h, hd = q.shape
    if keys.shape != values.shape or keys.shape[0] % b or keys.shape[2] != hd or h % (keys.shape[0] // b):
        raise ConfigError(f"decode_attention: q [B, T, H, hd] and keys = values [B*KV, S, hd] with H a multiple "
                          f"of KV; got q {q.shape}, keys {keys.shape}, values {values.shape}")
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return jax.ffi.ffi_call(cpu_matvec.ATTENTION, out, vmap_method="sequential")(
        q, keys, values, positions.astype(jnp.int32))

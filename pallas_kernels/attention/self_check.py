"""Whether the attention kernel "auto" would pick works on this device, checked once per shape.

"auto" runs a Pallas kernel on TPU and GPU. A kernel that fails to compile there (a toolchain this
project could not test against), or that computes something else, should cost a warning, not a
user's decoding (`jaxmodels.attention.checked_attention_impl`): `kernel_problem` compiles the
kernel for the shapes at hand, runs it on random data with random tables and ragged lengths, and
compares with the jnp reference. Memoized, so a process pays one small compile and run per shape.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.attention.reference import attention_reference

TOLERANCE = {"float32": 2e-3, "bfloat16": 3e-2, "float16": 1e-2}  # relative to the largest output entry


@functools.cache
def kernel_problem(batch: int, num_q: int, heads: int, k_slots: int, kv_heads: int, cache_len: int,
                   head_dim: int, dtype: str, interpret: bool = False) -> str | None:
    """None if `attention(impl="pallas")` with the default kernel compiles, runs and matches the
    reference for q [batch, num_q, heads, head_dim] against k [batch, k_slots, cache_len, head_dim]
    and v [batch, kv_heads, cache_len, head_dim] of `dtype`; else what went wrong, in one line.
    Call it outside any traced function (it compiles and runs a program of its own)."""
    from pallas_kernels.attention import attention

    keys = jax.random.split(jax.random.key(0), 7)
    normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dtype)  # noqa: E731
    q = normal(keys[0], (batch, num_q, heads, head_dim))
    k, v = normal(keys[1], (batch, k_slots, cache_len, head_dim)), normal(keys[2], (batch, kv_heads, cache_len, head_dim))
    tables = tuple(jax.random.randint(key, (batch, heads), 0, n, jnp.int32)
                   for key, n in zip(keys[3:6], (heads, k_slots, kv_heads)))
    lengths = jax.random.randint(keys[6], (batch,), 0, cache_len - num_q + 2, jnp.int32)
    try:
        got = jax.jit(functools.partial(attention, impl="pallas", interpret=interpret))(q, k, v, lengths, *tables)
        got = jax.block_until_ready(got).astype(jnp.float32)
    except Exception as error:  # whatever the toolchain raises: reported, and "auto" falls back
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        return f"{type(error).__name__}: {first_line}"
    want = attention_reference(q, k, v, lengths, *tables).astype(jnp.float32)
    error = float(jnp.max(jnp.abs(got - want)) / jnp.maximum(jnp.max(jnp.abs(want)), 1e-6))
    if not error <= TOLERANCE.get(dtype, 3e-2):
        return f"its output differs from the reference by {error:.2g} (relative) on random data"
    return None

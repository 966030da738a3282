"""Index-mapped attention as a Pallas Triton kernel (GPUs of compute capability >= 8.0).

GPU Pallas has no scalar prefetch, so each program reads its head's table entries itself and
indexes the whole K / V arrays with them. One program per (row, head): its S_q queries (padded to
16 rows, the smallest Triton dot) against the row's keys in blocks of `block_k`, an online softmax,
and a loop that stops at the row's last visible key (blocks past it are neither read nor computed).
Same meaning as `reference.py`. Pallas Triton is what JAX 0.10 offers below Hopper; a Mosaic GPU
kernel for Hopper is not built yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import KernelError

F32 = jnp.float32
MIN_ROWS = 16  # Triton's dot needs at least 16 rows
NEG = -0.7 * float(jnp.finfo(F32).max)  # masked scores: finite, so no inf - inf


def _kernel(q_head, k_head, v_head, lengths, q_ref, k_ref, v_ref, o_ref, *, block_k: int, num_q: int, scale: float):
    """q [B, Hq, R, hd] (R >= 16 padded rows), k [B, Ck, S, hd], v [B, KV, S, hd] -> o [B, H, R, hd]."""
    b, h = pl.program_id(0), pl.program_id(1)
    length = lengths[b]
    q = q_ref[b, q_head[b, h], :, :].astype(F32)  # [R, hd]
    rows = q.shape[0]
    limit = length + jax.lax.broadcasted_iota(jnp.int32, (rows, block_k), 0)  # query j sees keys < length + j
    k_buf, v_buf = k_head[b, h], v_head[b, h]

    def body(i, carry):
        m, l, acc = carry
        keys = pl.ds(i * block_k, block_k)
        k = k_ref[b, k_buf, keys, :].astype(F32)  # [block_k, hd]
        s = plt.dot(q, k, trans_b=True) * scale  # [R, block_k]
        visible = i * block_k + jax.lax.broadcasted_iota(jnp.int32, (rows, block_k), 1) < limit
        s = jnp.where(visible, s, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        v = v_ref[b, v_buf, keys, :].astype(F32)
        return m_new, alpha * l + jnp.sum(p, axis=1), alpha[:, None] * acc + plt.dot(p, v)

    num_blocks = jnp.minimum(pl.cdiv(length + num_q - 1, block_k), k_ref.shape[2] // block_k)
    init = (jnp.full((rows,), NEG, F32), jnp.zeros((rows,), F32), jnp.zeros(q.shape, F32))
    _, l, acc = jax.lax.fori_loop(0, num_blocks, body, init)
    o_ref[b, h, :, :] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)


def attention_gpu(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, q_head: jax.Array,
                  k_head: jax.Array, v_head: jax.Array, *, block_k: int = 64, interpret: bool = False,
                  num_warps: int = 4) -> jax.Array:
    """`attention_reference`'s arguments and result. S must be a multiple of block_k, a power of
    two of at least 16; hd a power of two of at least 16 (Triton's block rules)."""
    b, num_q, _, hd = q.shape
    h, s = q_head.shape[1], k.shape[2]
    for name, n in (("block_k", block_k), ("head_dim", hd)):
        if n < 16 or n & (n - 1):
            raise KernelError(f"{name}={n}: the Triton kernel needs a power of two of at least 16")
    if s % block_k:
        raise KernelError(f"block_k={block_k} must divide the cache length {s}")
    rows = max(MIN_ROWS, 1 << (num_q - 1).bit_length())
    qt = jnp.pad(q.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, rows - num_q), (0, 0)))  # [B, Hq, R, hd]
    whole = lambda x: pl.BlockSpec(x.shape, lambda bi, hi: (0,) * x.ndim)  # noqa: E731
    args = (q_head.astype(jnp.int32), k_head.astype(jnp.int32), v_head.astype(jnp.int32),
            lengths.astype(jnp.int32), qt, k, v)
    out = pl.pallas_call(
        functools.partial(_kernel, block_k=block_k, num_q=num_q, scale=hd ** -0.5),
        grid=(b, h),
        in_specs=[whole(x) for x in args],
        out_specs=pl.BlockSpec((b, h, rows, hd), lambda bi, hi: (0, 0, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, h, rows, hd), q.dtype),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
    )(*args)
    return out[:, :, :num_q].transpose(0, 2, 1, 3)  # [B, S_q, H, hd]

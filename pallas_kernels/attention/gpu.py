"""Index-mapped attention as a Pallas Triton kernel (GPUs of compute capability >= 8.0).

GPU Pallas has no scalar prefetch, so each program reads its head's table entries itself and
indexes the whole K / V arrays with them. One program per (row, head, key split): its S_q queries
(padded to 16 rows, the smallest Triton dot) against its share of the row's keys in blocks of
`block_k`, an online softmax, and a loop that stops at the row's last visible key (blocks past it
are neither read nor computed). At small batch a row's keys are split over several programs (as
flash-decoding does), so one row still fills the GPU; `combine_splits` merges their partial
softmax states.
Same meaning as `reference.py`. Pallas Triton is what JAX 0.10 offers below Hopper, and what
float32 caches take on Hopper; `hopper.py` is the Mosaic GPU kernel for bf16 / float16 there.
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


def _kernel(q_head, k_head, v_head, lengths, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, block_k: int,
            num_q: int, blocks_per_split: int, scale: float):
    """q [B, Hq, R, hd] (R >= 16 padded rows), k [B, Ck, S, hd], v [B, KV, S, hd] -> this split's
    unnormalized o [B, H, P, R, hd], running max m and sum l [B, H, P, R]."""
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
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

    first = split * blocks_per_split
    needed = pl.cdiv(length + num_q - 1, block_k)  # blocks through the last query's last visible key
    last = jnp.minimum(first + blocks_per_split, needed)
    init = (jnp.full((rows,), NEG, F32), jnp.zeros((rows,), F32), jnp.zeros(q.shape, F32))
    m, l, acc = jax.lax.fori_loop(first, jnp.maximum(last, first), body, init)
    o_ref[b, h, split, :, :] = acc
    m_ref[b, h, split, :] = m
    l_ref[b, h, split, :] = l


def combine_splits(o: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Merge per-split online-softmax states: o [..., P, R, hd], m / l [..., P, R] -> [..., R, hd]."""
    scale = jnp.exp(m - jnp.max(m, axis=-2, keepdims=True))  # a split that saw no key: m = NEG -> 0
    total = jnp.sum(scale * l, axis=-2)
    out = jnp.sum(scale[..., None] * o, axis=-3)
    return out / jnp.where(total > 0, total, 1.0)[..., None]


def default_splits(batch: int, heads: int, num_blocks: int, programs: int = 256) -> int:
    """Key splits per (row, head): enough programs (about `programs`, two per SM of an H100) to fill
    the GPU at small batch; the largest divisor of the block count not above what that needs."""
    want = max(1, -(-programs // (batch * heads)))
    return max(d for d in range(1, num_blocks + 1) if num_blocks % d == 0 and d <= want)


def attention_gpu(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, q_head: jax.Array,
                  k_head: jax.Array, v_head: jax.Array, *, block_k: int = 64, interpret: bool = False,
                  num_warps: int = 4, splits: int | None = None) -> jax.Array:
    """`attention_reference`'s arguments and result. S must be a multiple of block_k, a power of
    two of at least 16; hd a power of two of at least 16 (Triton's block rules). `splits` key
    ranges per (row, head) run as separate programs and are merged after (`default_splits`)."""
    b, num_q, _, hd = q.shape
    h, s = q_head.shape[1], k.shape[2]
    for name, n in (("block_k", block_k), ("head_dim", hd)):
        if n < 16 or n & (n - 1):
            raise KernelError(f"{name}={n}: the Triton kernel needs a power of two of at least 16")
    if s % block_k:
        raise KernelError(f"block_k={block_k} must divide the cache length {s}")
    num_blocks = s // block_k
    splits = splits or default_splits(b, h, num_blocks)
    if num_blocks % splits:
        raise KernelError(f"splits={splits} must divide the {num_blocks} key blocks")
    rows = max(MIN_ROWS, 1 << (num_q - 1).bit_length())
    qt = jnp.pad(q.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, rows - num_q), (0, 0)))  # [B, Hq, R, hd]
    whole = lambda shape: pl.BlockSpec(shape, lambda bi, hi, si: (0,) * len(shape))  # noqa: E731
    args = (q_head.astype(jnp.int32), k_head.astype(jnp.int32), v_head.astype(jnp.int32),
            lengths.astype(jnp.int32), qt, k, v)
    shapes = [(b, h, splits, rows, hd), (b, h, splits, rows), (b, h, splits, rows)]
    o, m, l = pl.pallas_call(
        functools.partial(_kernel, block_k=block_k, num_q=num_q, blocks_per_split=num_blocks // splits,
                          scale=hd ** -0.5),
        grid=(b, h, splits),
        in_specs=[whole(x.shape) for x in args],
        out_specs=[whole(shape) for shape in shapes],
        out_shape=[jax.ShapeDtypeStruct(shape, F32) for shape in shapes],
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
    )(*args)
    out = combine_splits(o, m, l).astype(q.dtype)  # [B, H, R, hd]
    return out[:, :, :num_q].transpose(0, 2, 1, 3)  # [B, S_q, H, hd]

"""Index-mapped attention as a Mosaic TPU kernel: the tables and lengths are scalar-prefetched
into SMEM and steer the BlockSpec index maps, so each grid step's DMA fetches the K / V block its
head's table names, and blocks past a row's length are never fetched (their index is clamped to
the last needed block, which the pipeline does not fetch again) nor computed.

Grid (B, H, S / block_k), the last axis a sequential online softmax (running max, sum and
accumulator in VMEM scratch); the first two are parallel. Same meaning as `reference.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import KernelError

F32 = jnp.float32


def _kernel(q_head, k_head, v_head, lengths, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref, *,
            block_k: int, scale: float):
    """One (row, head, key block) step. q [S_q, hd], k / v [block_k, hd], o [S_q, hd]."""
    del q_head, k_head, v_head  # used by the index maps only
    b, t = pl.program_id(0), pl.program_id(2)
    num_q, length = q_ref.shape[0], lengths[b]

    @pl.when(t == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, F32)
        l_ref[...] = jnp.zeros(l_ref.shape, F32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, F32)

    @pl.when(t * block_k < length + num_q - 1)
    def _step():
        s = jax.lax.dot_general(q_ref[...].astype(F32), k_ref[...].astype(F32), (((1,), (1,)), ((), ())),
                                preferred_element_type=F32) * scale  # [S_q, block_k]
        key = t * block_k + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        visible = key < length + jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
        s = jnp.where(visible, s, -jnp.inf)
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a query that has seen no key yet
        p = jnp.where(visible, jnp.exp(s - shift), 0.0)
        alpha = jnp.exp(m_prev - shift)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        pv = jax.lax.dot_general(p, v_ref[...].astype(F32), (((1,), (0,)), ((), ())), preferred_element_type=F32)
        acc_ref[...] = alpha * acc_ref[...] + pv
        m_ref[...] = m_new

    @pl.when(t == pl.num_programs(2) - 1)
    def _done():
        total = l_ref[...]
        o_ref[...] = (acc_ref[...] / jnp.where(total > 0, total, 1.0)).astype(o_ref.dtype)


def attention_tpu(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, q_head: jax.Array,
                  k_head: jax.Array, v_head: jax.Array, *, block_k: int = 128,
                  interpret: bool | pltpu.InterpretParams = False) -> jax.Array:
    """`attention_reference`'s arguments and result; S must be a multiple of block_k (a multiple
    of 8, or S itself)."""
    b, num_q, _, hd = q.shape
    h, s = q_head.shape[1], k.shape[2]
    if s % block_k or (block_k % 8 and block_k != s):  # Mosaic's tiling rule, checked before lowering
        raise KernelError(f"block_k={block_k} must divide the cache length {s} and be a multiple of 8 "
                          f"(or the whole cache); `default_block_k({s})` picks one")

    def last_block(bi, lengths):  # the last key block row bi needs (at least block 0)
        return jnp.maximum((lengths[bi] + num_q - 2) // block_k, 0)

    def kv_index(table):
        return lambda bi, hi, ti, qh, kh, vh, lengths: (
            bi, (qh, kh, vh)[table][bi, hi], jnp.minimum(ti, last_block(bi, lengths)), 0)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(b, h, s // block_k),
        in_specs=[
            pl.BlockSpec((None, None, num_q, hd), lambda bi, hi, ti, qh, kh, vh, lengths: (bi, qh[bi, hi], 0, 0)),
            pl.BlockSpec((None, None, block_k, hd), kv_index(1)),
            pl.BlockSpec((None, None, block_k, hd), kv_index(2)),
        ],
        out_specs=pl.BlockSpec((None, None, num_q, hd), lambda bi, hi, ti, qh, kh, vh, lengths: (bi, hi, 0, 0)),
        scratch_shapes=[pltpu.VMEM((num_q, 1), F32), pltpu.VMEM((num_q, 1), F32), pltpu.VMEM((num_q, hd), F32)],
    )
    out = pl.pallas_call(
        functools.partial(_kernel, block_k=block_k, scale=hd ** -0.5),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, h, num_q, hd), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(q_head.astype(jnp.int32), k_head.astype(jnp.int32), v_head.astype(jnp.int32), lengths.astype(jnp.int32),
      q.transpose(0, 2, 1, 3), k, v)
    return out.transpose(0, 2, 1, 3)  # [B, S_q, H, hd]

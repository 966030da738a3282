"""Index-mapped attention as a Mosaic TPU kernel: the tables and lengths are scalar-prefetched
into SMEM and steer the BlockSpec index maps, so each grid step's DMA fetches the K / V block its
head's table names.

Grid (B, S / block_k, H): for each row, key block by key block, every head in turn, with the
heads visited in `head_order` (sorted by K buffer, then V buffer). Pallas's pipeline skips a copy
whose block index did not change since the previous step, so heads that share a K buffer (a GQA
group, a CHAI cluster) or a V buffer read each block once: the kernel fetches exactly the bytes
the tables need (`fetched_blocks` counts them; GQA used to read K / V once per query head). Past a
row's last needed block, every step names the block of the row's last fetch, so nothing more is
fetched nor computed. The row's queries and outputs stay in VMEM for all its steps; per head an
online softmax (running max, sum and accumulator in VMEM scratch). Same meaning as `reference.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import KernelError

F32 = jnp.float32


def head_order(k_head: jax.Array, v_head: jax.Array) -> jax.Array:
    """[B, H] int32: each row's heads sorted by (K buffer, V buffer), so heads sharing one are adjacent."""
    key = k_head.astype(jnp.int32) * (jnp.max(v_head) + 1) + v_head.astype(jnp.int32)
    return jnp.argsort(key, axis=1, stable=True).astype(jnp.int32)


def kv_block(xp, table, order, lengths, b, t, i, *, num_q: int, block_k: int, num_heads: int):
    """(buffer, key block) that grid step (b, t, i) reads from K (table = k_head) or V (v_head).
    `xp` is jnp inside the kernel's index maps and numpy in `fetched_blocks`."""
    last = xp.maximum((lengths[b] + num_q - 2) // block_k, 0)  # the last key block row b needs
    live = t <= last
    head = xp.where(live, order[b, i], order[b, num_heads - 1])
    return table[b, head], xp.minimum(t, last)


def fetched_blocks(k_head, v_head, lengths, num_q: int, block_k: int, num_blocks: int) -> tuple[int, int]:
    """(K blocks, V blocks) the kernel's pipeline copies from HBM, replaying its index maps over the
    grid in order (a copy whenever a block index differs from the previous step's)."""
    k_head, v_head, lengths = (np.asarray(x) for x in (k_head, v_head, lengths))
    order = np.asarray(head_order(jnp.asarray(k_head), jnp.asarray(v_head)))
    b_size, heads = k_head.shape
    counts, last_seen = [0, 0], [None, None]
    for b in range(b_size):
        for t in range(num_blocks):
            for i in range(heads):
                for n, table in enumerate((k_head, v_head)):
                    index = (b, *map(int, kv_block(np, table, order, lengths, b, t, i, num_q=num_q,
                                                   block_k=block_k, num_heads=heads)))
                    counts[n] += index != last_seen[n]
                    last_seen[n] = index
    return counts[0], counts[1]


def _kernel(order, q_head, k_head, v_head, lengths, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref, *,
            block_k: int, scale: float):
    """One (row, key block, head) step. q [Hq, S_q, hd] and o [H, S_q, hd] (the row's, resident);
    k / v [block_k, hd] (the block this head's tables name); scratch per head [H, S_q, ...]."""
    del k_head, v_head  # used by the index maps only
    b, t = pl.program_id(0), pl.program_id(1)
    h = order[b, pl.program_id(2)]
    num_q, length = q_ref.shape[1], lengths[b]

    @pl.when(t == 0)
    def _init():
        m_ref[h] = jnp.full(m_ref.shape[1:], -jnp.inf, F32)
        l_ref[h] = jnp.zeros(l_ref.shape[1:], F32)
        acc_ref[h] = jnp.zeros(acc_ref.shape[1:], F32)

    @pl.when(t * block_k < length + num_q - 1)
    def _step():
        q = q_ref[q_head[b, h]].astype(F32)  # [S_q, hd]
        s = jax.lax.dot_general(q, k_ref[...].astype(F32), (((1,), (1,)), ((), ())),
                                preferred_element_type=F32) * scale  # [S_q, block_k]
        key = t * block_k + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        visible = key < length + jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
        s = jnp.where(visible, s, -jnp.inf)
        m_prev = m_ref[h]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a query that has seen no key yet
        p = jnp.where(visible, jnp.exp(s - shift), 0.0)
        alpha = jnp.exp(m_prev - shift)
        l_ref[h] = alpha * l_ref[h] + jnp.sum(p, axis=1, keepdims=True)
        pv = jax.lax.dot_general(p, v_ref[...].astype(F32), (((1,), (0,)), ((), ())), preferred_element_type=F32)
        acc_ref[h] = alpha * acc_ref[h] + pv
        m_ref[h] = m_new

    @pl.when(t == pl.num_programs(1) - 1)
    def _done():
        total = l_ref[h]
        o_ref[h] = (acc_ref[h] / jnp.where(total > 0, total, 1.0)).astype(o_ref.dtype)


def attention_tpu(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, q_head: jax.Array,
                  k_head: jax.Array, v_head: jax.Array, *, block_k: int = 128,
                  interpret: bool | pltpu.InterpretParams = False) -> jax.Array:
    """`attention_reference`'s arguments and result; S must be a multiple of block_k (a multiple
    of 8, or S itself)."""
    b, num_q, hq, hd = q.shape
    h, s = q_head.shape[1], k.shape[2]
    if s % block_k or (block_k % 8 and block_k != s):  # Mosaic's tiling rule, checked before lowering
        raise KernelError(f"block_k={block_k} must divide the cache length {s} and be a multiple of 8 "
                          f"(or the whole cache); `default_block_k({s})` picks one")
    place = functools.partial(kv_block, jnp, num_q=num_q, block_k=block_k, num_heads=h)

    def kv_index(table):
        def index(bi, ti, ii, order, qh, kh, vh, lengths):
            buffer, block = place((kh, vh)[table], order, lengths, bi, ti, ii)
            return bi, buffer, block, 0
        return index

    row = lambda bi, ti, ii, *tables: (bi, 0, 0, 0)  # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(b, s // block_k, h),
        in_specs=[pl.BlockSpec((None, hq, num_q, hd), row),
                  pl.BlockSpec((None, None, block_k, hd), kv_index(0)),
                  pl.BlockSpec((None, None, block_k, hd), kv_index(1))],
        out_specs=pl.BlockSpec((None, h, num_q, hd), row),
        scratch_shapes=[pltpu.VMEM((h, num_q, 1), F32), pltpu.VMEM((h, num_q, 1), F32),
                        pltpu.VMEM((h, num_q, hd), F32)],
    )
    tables = [x.astype(jnp.int32) for x in (q_head, k_head, v_head)]
    out = pl.pallas_call(
        functools.partial(_kernel, block_k=block_k, scale=hd ** -0.5),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, h, num_q, hd), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
    )(head_order(tables[1], tables[2]), *tables, lengths.astype(jnp.int32), q.transpose(0, 2, 1, 3), k, v)
    return out.transpose(0, 2, 1, 3)  # [B, S_q, H, hd]

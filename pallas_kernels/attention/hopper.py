"""Index-mapped attention as a Mosaic GPU kernel for Hopper (sm_90a): TMA copies and wgmma.

One warpgroup per (row, head, key split), as in `gpu.py`: it reads its head's table entries from
global memory, copies its query (the S_q queries padded to the 64 rows a wgmma tile has) into
shared memory, then streams the key blocks its table names through two shared-memory slots with
TMA, the next block's copy in flight while this one is computed. Per block: scores = q @ k^T
(wgmma), an online softmax in registers, p written to shared memory, acc += p @ v (wgmma). The loop
stops at the row's last visible key, so blocks past it are neither read nor computed. Splits are
merged by `gpu.combine_splits`. Same meaning as `reference.py`.

bf16 / float16 only (wgmma's inputs; float32 caches take the Triton kernel). Checked on CPU in
Mosaic GPU's interpret mode (`gpu_interpret.py`) and lowered for sm_90a; not yet run on a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import KernelError
from pallas_kernels.attention.gpu import NEG, combine_splits, default_splits

F32 = jnp.float32
ROWS = 64  # a warpgroup's wgmma tile: the S_q queries padded to 64 rows
DTYPES = (jnp.bfloat16, jnp.float16)
SWIZZLE = 128  # bytes: 64 16-bit elements per swizzled row


def _laid_out(x: jax.Array, layout, compiled: bool) -> jax.Array:
    """x in register layout `layout` (what Mosaic GPU's layout inference needs for loop carries);
    identity in meaning, so skipped in interpret mode, which has no layout casts."""
    return plgpu.layout_cast(x, layout) if compiled else x


def _rows(x: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """Broadcast a [ROWS] row vector along the columns of `shape`."""
    return jax.lax.broadcast_in_dim(x, shape, [0])


def _iota(shape: tuple[int, int], dim: int, compiled: bool) -> jax.Array:
    """int32 positions along `dim`, in the wgmma result's layout when compiled."""
    if compiled:
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)
    return jax.lax.broadcasted_iota(jnp.int32, shape, dim)


def _softmax_step(s, m, l, first_key, limit, compiled: bool):
    """Online softmax over one block of scores s [ROWS, block_k]: visible keys are those below
    limit + row. Returns p (0 where masked), the new running max and sum, and the rescale alpha."""
    visible = first_key + _iota(s.shape, 1, compiled) < limit + _iota(s.shape, 0, compiled)
    s = jnp.where(visible, s, NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.where(visible, jnp.exp(s - _rows(m_new, s.shape)), 0.0)
    alpha = jnp.exp(m - m_new)
    return p, m_new, alpha * l + jnp.sum(p, axis=1), alpha


def _kernel(q_head, k_head, v_head, lengths, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, q_smem, k_smem, v_smem,
            p_smem, o_smem, ml_smem, q_bar, k_bars, v_bars, *, block_k: int, num_q: int, blocks_per_split: int,
            scale: float, compiled: bool):
    """q [B, Hq, ROWS, hd], k [B, Ck, S, hd], v [B, KV, S, hd] -> this split's unnormalized
    o [B, H, P, ROWS, hd] and running max m / sum l [B, H, P, ROWS] (float32)."""
    b, h, split = (jax.lax.axis_index(name) for name in ("b", "h", "split"))
    length, k_buf, v_buf = lengths[b], k_head[b, h], v_head[b, h]
    first = split * blocks_per_split
    needed = (length + num_q - 1 + block_k - 1) // block_k  # blocks through the last query's last key
    count = jnp.maximum(jnp.minimum(first + blocks_per_split, needed) - first, 0)

    def fetch(i, slot):
        keys = pl.ds((first + i) * block_k, block_k)
        plgpu.copy_gmem_to_smem(k_ref.at[b, k_buf, keys], k_smem.at[slot], k_bars.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[b, v_buf, keys], v_smem.at[slot], v_bars.at[slot])

    plgpu.copy_gmem_to_smem(q_ref.at[b, q_head[b, h]], q_smem, q_bar)
    pl.when(count > 0)(lambda: fetch(0, 0))
    plgpu.barrier_wait(q_bar)

    def block(i, carry):
        m, l, acc = carry
        slot = jax.lax.rem(i, 2)
        pl.when(i + 1 < count)(lambda: fetch(i + 1, 1 - slot))  # that slot's last reads are done
        plgpu.barrier_wait(k_bars.at[slot])

        def scores(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
            return acc_ref[...]

        s = pl.run_scoped(scores, plgpu.ACC((ROWS, block_k), F32)) * scale  # [ROWS, block_k]
        p, m, l, alpha = _softmax_step(s, m, l, (first + i) * block_k, length, compiled)
        p_smem[...] = p.astype(p_smem.dtype)
        plgpu.commit_smem()
        plgpu.barrier_wait(v_bars.at[slot])

        def mix(pv_ref):
            plgpu.wgmma(pv_ref, p_smem, v_smem.at[slot])
            return pv_ref[...]

        pv = pl.run_scoped(mix, plgpu.ACC(acc.shape, F32))  # [ROWS, hd]
        return m, l, _rows(alpha, acc.shape) * acc + pv

    row, tile = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA
    init = (_laid_out(jnp.full((ROWS,), NEG, F32), row, compiled), _laid_out(jnp.zeros((ROWS,), F32), row, compiled),
            _laid_out(jnp.zeros((ROWS, q_smem.shape[-1]), F32), tile, compiled))
    m, l, acc = jax.lax.fori_loop(0, count, block, init)
    o_smem[...] = acc
    ml_smem[0] = m
    ml_smem[1] = l
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, h, split])
    plgpu.copy_smem_to_gmem(ml_smem.at[0], m_ref.at[b, h, split])
    plgpu.copy_smem_to_gmem(ml_smem.at[1], l_ref.at[b, h, split])
    plgpu.wait_smem_to_gmem(0)


def check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, block_k: int) -> None:
    """KernelError naming the rule a shape or dtype breaks (wgmma and TMA tiles)."""
    hd, s = q.shape[-1], k.shape[2]
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise KernelError(f"the Hopper kernel takes bf16 or float16 q, k and v of one dtype, got {q.dtype}, "
                          f"{k.dtype}, {v.dtype}; float32 caches take kernel='gpu' (Triton)")
    if hd % 64 or block_k % 64 or s % block_k:
        raise KernelError(f"the Hopper kernel needs head_dim and block_k multiples of 64 and block_k dividing "
                          f"the cache length; got head_dim={hd}, block_k={block_k}, cache length {s}")
    if q.shape[1] > ROWS:
        raise KernelError(f"the Hopper kernel takes at most {ROWS} queries per row, got {q.shape[1]}")


def attention_hopper(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, q_head: jax.Array,
                     k_head: jax.Array, v_head: jax.Array, *, block_k: int = 128, interpret=False,
                     splits: int | None = None) -> jax.Array:
    """`attention_reference`'s arguments and result (`check_shapes` lists the rules). `interpret`:
    True (or Mosaic GPU interpret params) runs it on CPU in Mosaic GPU's interpret mode."""
    check_shapes(q, k, v, block_k)
    b, num_q, _, hd = q.shape
    h, num_blocks = q_head.shape[1], k.shape[2] // block_k
    splits = splits or default_splits(b, h, num_blocks)
    if num_blocks % splits:
        raise KernelError(f"splits={splits} must divide the {num_blocks} key blocks")
    qt = jnp.pad(q.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, ROWS - num_q), (0, 0)))  # [B, Hq, ROWS, hd]
    tiled = (plgpu.TilingTransform((8, SWIZZLE // q.dtype.itemsize)), plgpu.SwizzleTransform(SWIZZLE))
    shapes = [(b, h, splits, ROWS, hd), (b, h, splits, ROWS), (b, h, splits, ROWS)]
    kernel = plgpu.kernel(
        functools.partial(_kernel, block_k=block_k, num_q=num_q, blocks_per_split=num_blocks // splits,
                          scale=hd ** -0.5, compiled=interpret is False),
        out_type=[jax.ShapeDtypeStruct(shape, F32) for shape in shapes],
        grid=(b, h, splits), grid_names=("b", "h", "split"),
        scratch_types=[plgpu.SMEM((ROWS, hd), q.dtype, transforms=tiled),
                        plgpu.SMEM((2, block_k, hd), q.dtype, transforms=tiled),
                        plgpu.SMEM((2, block_k, hd), q.dtype, transforms=tiled),
                        plgpu.SMEM((ROWS, block_k), q.dtype, transforms=tiled),
                        plgpu.SMEM((ROWS, hd), F32), plgpu.SMEM((2, ROWS), F32),
                        plgpu.Barrier(), plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2)],
        interpret=_interpret_params(interpret),
    )
    tables = [x.astype(jnp.int32) for x in (q_head, k_head, v_head, lengths)]
    o, m, l = kernel(*tables, qt, k, v)
    out = combine_splits(o, m, l).astype(q.dtype)  # [B, H, ROWS, hd]
    return out[:, :, :num_q].transpose(0, 2, 1, 3)  # [B, S_q, H, hd]


def _interpret_params(interpret):
    """False -> compile for the GPU; True -> Mosaic GPU's interpret mode on CPU (with wgmma's
    transposed operands taught to it, `gpu_interpret.py`); interpret params pass through."""
    if interpret is False or interpret is None:
        return False
    from pallas_kernels.attention.gpu_interpret import interpret_params
    return interpret_params() if interpret is True else interpret

"""Index-mapped attention: S_q new tokens per row against the KV cache, steered by per-row tables.

    out = attention(q, k, v, lengths, *gqa_tables(B, H, KV))            # dense / GQA
    out = attention(q, k, v, lengths, *plan_tables(plan, H, KV))        # CHAI clustered heads

Shapes and meaning: `reference.py`. `impl`: "auto" (the TPU kernel on TPU; the jnp reference
elsewhere, since no GPU kernel is built yet), "reference", or "pallas" (the TPU kernel: on a TPU,
lowered for TPU chips from a CPU host, or with `interpret=True` on CPU, slowly, for checks).
"""

from __future__ import annotations

import jax

from pallas_kernels import KernelError
from pallas_kernels.attention.reference import attention_reference, visible_keys
from pallas_kernels.attention.tables import gqa_tables, plan_tables
from pallas_kernels.attention.tpu import attention_tpu

__all__ = ["attention", "attention_reference", "attention_tpu", "gqa_tables", "plan_tables", "visible_keys",
           "IMPLS", "default_block_k"]

IMPLS = ("auto", "reference", "pallas")


def default_block_k(cache_len: int) -> int:
    """The largest of 512 / 256 / 128 keys dividing the cache length, else the whole cache."""
    return next((bk for bk in (512, 256, 128) if cache_len % bk == 0), cache_len)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, q_head: jax.Array,
              k_head: jax.Array, v_head: jax.Array, *, impl: str = "auto", interpret=False,
              block_k: int | None = None) -> jax.Array:
    """q [B, S_q, Hq, hd], k [B, Ck, S, hd], v [B, KV, S, hd], lengths [B] (keys visible to the first
    query), tables [B, H] -> [B, S_q, H, hd]. KernelError for an impl that cannot run here."""
    if impl not in IMPLS:
        raise KernelError(f"impl must be one of {IMPLS}, got '{impl}'")
    backend = jax.default_backend()
    if impl == "auto":
        impl = "pallas" if backend == "tpu" else "reference"
    if impl == "reference":
        return attention_reference(q, k, v, lengths, q_head, k_head, v_head)
    # Not refused off TPU: a CPU host lowers it for TPU chips (`training.aot`); run on a CPU
    # without interpret=True, Pallas itself stops it ("only interpret mode is supported").
    return attention_tpu(q, k, v, lengths, q_head, k_head, v_head,
                         block_k=block_k or default_block_k(k.shape[2]), interpret=interpret)

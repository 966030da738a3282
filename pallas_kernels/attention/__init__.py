"""Index-mapped attention: S_q new tokens per row against the KV cache, steered by per-row tables.

    out = attention(q, k, v, lengths, *gqa_tables(B, H, KV))            # dense / GQA
    out = attention(q, k, v, lengths, *plan_tables(plan, H, KV))        # CHAI clustered heads
    out = attention(q, k, v, lengths, *head_sparse_tables(active, H, KV))  # active heads only [B, S_q, K, hd]

Shapes and meaning: `reference.py`. `impl`: "auto" (a Pallas kernel on TPU and GPU, the jnp
reference on CPU), "reference", or "pallas" (a Pallas kernel: on its device, lowered for it from a
CPU host, or with `interpret=True` on CPU, slowly, for checks). `kernel` picks which: "tpu"
(`tpu.py`, Mosaic TPU), "hopper" (`hopper.py`, Mosaic GPU: TMA and wgmma, bf16 / float16) or "gpu"
(`gpu.py`, Pallas Triton, any dtype, GPUs from sm_80); default (`default_kernel`): "tpu" off GPUs,
"hopper" on an sm_90 GPU for what it takes, else "gpu". The GPU kernels are checked in interpret
mode and lowered for cuda on CPU; no GPU has run them yet (`python -m benchmarks.gpu_suite` does).
Decoding runs "auto"'s kernel only once `kernel_problem` has checked it on the device for its shapes.
"""

from __future__ import annotations

import jax

from pallas_kernels import KernelError
from pallas_kernels.attention.reference import attention_reference, visible_keys
from pallas_kernels.attention.self_check import kernel_problem
from pallas_kernels.attention.tables import gqa_tables, head_sparse_tables, plan_tables
from pallas_kernels.attention.gpu import attention_gpu
from pallas_kernels.attention.hopper import attention_hopper, check_shapes as check_hopper_shapes
from pallas_kernels.attention.tpu import attention_tpu

__all__ = ["attention", "attention_reference", "attention_tpu", "attention_gpu", "attention_hopper", "gqa_tables",
           "head_sparse_tables", "plan_tables", "visible_keys", "IMPLS", "KERNELS", "default_block_k",
           "default_kernel", "hopper_takes", "kernel_problem"]

IMPLS = ("auto", "reference", "pallas")


KERNELS = ("tpu", "gpu", "hopper")
_BLOCKS = {"gpu": (128, 64, 32, 16), "hopper": (128, 64)}


def default_block_k(cache_len: int, kernel: str = "tpu") -> int:
    """TPU: the largest of 512 / 256 / 128 keys dividing the cache length, else the whole cache.
    GPU: the largest of 128 / 64 / 32 / 16 dividing it; Hopper: of 128 / 64 (KernelError if none does)."""
    if kernel == "tpu":
        return next((bk for bk in (512, 256, 128) if cache_len % bk == 0), cache_len)
    block = next((bk for bk in _BLOCKS[kernel] if cache_len % bk == 0), None)
    if block is None:
        raise KernelError(f"the {kernel} kernel needs a cache length divisible by {_BLOCKS[kernel][-1]}, "
                          f"got {cache_len}")
    return block


def _is_hopper(device: jax.Device) -> bool:
    return str(getattr(device, "compute_capability", "")).startswith("9")


def hopper_takes(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """Whether the Hopper kernel takes these arrays (`hopper.check_shapes`, 64-key blocks)."""
    try:
        check_hopper_shapes(q, k, v, 64)
    except KernelError:
        return False
    return True


def default_kernel(q: jax.Array, k: jax.Array, v: jax.Array) -> str:
    """"tpu" off GPUs; on a GPU, "hopper" where it is an sm_90 part and `hopper_takes` these
    arrays, else "gpu" (Triton)."""
    if jax.default_backend() != "gpu":
        return "tpu"
    return "hopper" if _is_hopper(jax.devices()[0]) and hopper_takes(q, k, v) else "gpu"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, q_head: jax.Array,
              k_head: jax.Array, v_head: jax.Array, *, impl: str = "auto", interpret=False,
              block_k: int | None = None, kernel: str | None = None) -> jax.Array:
    """q [B, S_q, Hq, hd], k [B, Ck, S, hd], v [B, KV, S, hd], lengths [B] (keys visible to the first
    query), tables [B, H] -> [B, S_q, H, hd]. KernelError for an impl that cannot run here."""
    if impl not in IMPLS:
        raise KernelError(f"impl must be one of {IMPLS}, got '{impl}'")
    backend = jax.default_backend()
    if impl == "auto":
        impl = "pallas" if backend in ("tpu", "gpu") else "reference"
    if impl == "reference":
        return attention_reference(q, k, v, lengths, q_head, k_head, v_head)
    kernel = kernel or default_kernel(q, k, v)
    if kernel not in KERNELS:
        raise KernelError(f"kernel must be one of {KERNELS}, got '{kernel}'")
    # Not refused off its device: a CPU host lowers it for TPU chips (`training.aot`); run on a CPU
    # without interpret=True, Pallas itself stops it ("only interpret mode is supported").
    run = {"tpu": attention_tpu, "gpu": attention_gpu, "hopper": attention_hopper}[kernel]
    return run(q, k, v, lengths, q_head, k_head, v_head, block_k=block_k or default_block_k(k.shape[2], kernel),
               interpret=interpret)

"""Pallas kernels for decoding: each beside its jnp reference, one public function per kernel that
picks the implementation by backend (`impl=` overrides it for tests and checks).

- `attention.attention`: index-mapped attention for S_q new tokens per row against the KV cache
  (decoding: S_q = 1; verifying a draft: d + 1), per-row tables covering dense, GQA and CHAI.
  Built: the jnp reference, the Mosaic TPU kernel, a Mosaic GPU kernel for Hopper (TMA + wgmma,
  bf16 / float16) and a Pallas Triton GPU kernel (any dtype, sm_80 on), wired into the model's
  cached attention (`KVCache.attention_impl`, `generate(attention_impl=, interpret=)`,
  `--attention-impl`; "auto" runs a kernel on TPU and GPU); dense / GQA, CHAI and head-sparse
  tables. Measured on a GPU by `python -m benchmarks.gpu_suite` (not yet run on one). Not built:
  a fused acceptance step (asked for only where a GPU measurement says it pays).
"""


class KernelError(ValueError):
    """A kernel was asked for where it cannot run, or with shapes it does not take; the message
    names the fix."""

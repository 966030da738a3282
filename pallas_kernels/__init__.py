"""Pallas kernels for decoding: each beside its jnp reference, one public function per kernel that
picks the implementation by backend (`impl=` overrides it for tests and checks).

- `attention.attention`: index-mapped attention for S_q new tokens per row against the KV cache
  (decoding: S_q = 1; verifying a draft: d + 1), per-row tables covering dense, GQA and CHAI.
  Built: the jnp reference, the Mosaic TPU kernel and a Pallas Triton GPU kernel, the TPU one
  wired into the model's cached attention (`KVCache.attention_impl`, `generate(attention_impl=,
  interpret=)`, `--attention-impl`); dense / GQA, CHAI and head-sparse tables. Measured on a GPU
  by `python -m benchmarks.gpu_suite`. Not yet built: a Mosaic GPU (Hopper) kernel (its copy and
  barrier primitives have no interpret mode, so it cannot be checked without a GPU).
"""


class KernelError(ValueError):
    """A kernel was asked for where it cannot run, or with shapes it does not take; the message
    names the fix."""

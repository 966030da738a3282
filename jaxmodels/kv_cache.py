"""Preallocated KV cache with per-row lengths.

The cache never grows or shrinks: keys and values live in fixed buffers
`[layers, batch, kv_heads, max_len, head_dim]` written by absolute position, and each row's
`lengths[b]` says how many positions are valid. Rolling back (speculative decoding) is lowering a
length; ragged batches are rows with different lengths. Entries past a row's length may hold stale
values; attention masks them by position.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxmodels.config import LlamaConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [L, B, KV, S, hd]
    v: jax.Array  # [L, B, KV, S, hd]
    lengths: jax.Array  # [B] int32: valid positions per row

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @classmethod
    def create(cls, config: LlamaConfig, batch_size: int, max_len: int,
               dtype: jnp.dtype = jnp.float32) -> "KVCache":
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len,
                 config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   lengths=jnp.zeros((batch_size,), jnp.int32))

    def replace(self, **changes) -> "KVCache":
        return dataclasses.replace(self, **changes)

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


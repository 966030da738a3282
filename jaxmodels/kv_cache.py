"""Preallocated KV cache with per-row lengths.

The cache never grows or shrinks: keys and values live in fixed buffers, one
`[batch * kv_heads, max_len, head_dim]` array per layer (batch and kv-head merged: the layout the
attention matmuls take, see `jaxmodels.attention`), written by absolute position, and each row's
`lengths[b]` says how many positions are valid. Rows b*KV .. b*KV+KV-1 belong to batch row b.
Rolling back (speculative decoding) is lowering a length; ragged batches are rows with different
lengths. Entries past a row's length may hold stale values; attention masks them by position.

Why one array per layer rather than one `[layers, ...]` array: each layer's write is then an
in-place `dynamic_update_slice` on a donated buffer. Measured on CPU (30 layers, batch 1, 1024
positions), a step costs 5.3 ms this way, 7.5 ms scanning layer slices in and out, and 37 ms
updating one stacked buffer inside the layer loop.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxmodels.config import LlamaConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # L x [B*KV, S, hd]
    v: tuple[jax.Array, ...]  # L x [B*KV, S, hd]
    lengths: jax.Array  # [B] int32: valid positions per row

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @classmethod
    def create(cls, config: LlamaConfig, batch_size: int, max_len: int,
               dtype: jnp.dtype = jnp.float32) -> "KVCache":
        shape = (batch_size * config.num_key_value_heads, max_len, config.head_dim)
        zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
        return cls(k=zeros(), v=zeros(), lengths=jnp.zeros((batch_size,), jnp.int32))

    def replace(self, **changes) -> "KVCache":
        return dataclasses.replace(self, **changes)

    def nbytes(self) -> int:
        return sum(x.nbytes for x in self.k + self.v)


"""Grouped-query attention over keys addressed by absolute position.

Masking is by position: a query at position p sees keys at positions <= p. That one rule covers
causality, right-padded ragged batches and stale cache slots.

Keys and values come in the KV cache's layout, [B*KV, S, hd]: batch and kv-head merged into one
axis. Both matmuls then have a single batch dimension, which XLA:CPU runs about 4x faster than
the same einsum with two (measured on decode shapes), and a cache buffer reaches the matmul
without a reshape: with one in between, XLA:CPU duplicated the in-place cache write into the
attention's fusion and copied every layer's K and V buffers 2-3 times per decode step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def merge_kv_heads(x: jax.Array) -> jax.Array:
    """[B, KV, T, hd] -> [B*KV, T, hd], the layout attention and the KV cache use."""
    b, kv, t, hd = x.shape
    return x.reshape(b * kv, t, hd)


def gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
                  k_pos: jax.Array, k_valid: jax.Array | None = None) -> jax.Array:
    """Causal grouped-query attention.

    q: [B, T, H, hd]; k, v: [B*KV, S, hd]; q_pos: [B, T]; k_pos: [B, S] or [S];
    k_valid: optional [B, S] bool. Returns [B, T, H, hd].
    """
    b, t, h, hd = q.shape
    s = k.shape[1]
    kv = k.shape[0] // b
    g = h // kv
    qm = q.reshape(b, t, kv, g, hd).transpose(0, 2, 1, 3, 4).reshape(b * kv, t * g, hd)
    scores = jnp.matmul(qm, k.swapaxes(1, 2), preferred_element_type=jnp.float32)  # [B*KV, T*G, S]
    scores = scores.reshape(b, kv, t, g, s) * (hd ** -0.5)
    k_pos = jnp.broadcast_to(k_pos, (b, s))
    mask = k_pos[:, None, :] <= q_pos[:, :, None]  # [B, T, S]
    if k_valid is not None:
        mask = mask & k_valid[:, None, :]
    scores = jnp.where(mask[:, None, :, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b * kv, t * g, s)
    out = jnp.matmul(probs, v)  # [B*KV, T*G, hd]
    return out.reshape(b, kv, t, g, hd).transpose(0, 2, 1, 3, 4).reshape(b, t, h, hd)

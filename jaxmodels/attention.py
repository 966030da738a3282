"""Grouped-query attention over keys addressed by absolute position.

One function serves training (keys = the sequence itself) and cached decoding (keys = the cache
buffer). Masking is by position: a query at position p sees keys at positions <= p that are also
marked valid. That one rule covers causality, right-padded ragged batches and stale cache slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
                  k_pos: jax.Array, k_valid: jax.Array | None = None) -> jax.Array:
    """Causal grouped-query attention.

    q: [B, T, H, hd]; k, v: [B, KV, S, hd]; q_pos: [B, T]; k_pos: [B, S] or [S];
    k_valid: optional [B, S] bool. Returns [B, T, H, hd].
    """
    b, t, h, hd = q.shape
    kv = k.shape[1]
    q = q.reshape(b, t, kv, h // kv, hd)  # [B, T, KV, G, hd]
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (hd ** -0.5)
    k_pos = jnp.broadcast_to(k_pos, (b, k.shape[2]))
    mask = k_pos[:, None, :] <= q_pos[:, :, None]  # [B, T, S]
    if k_valid is not None:
        mask = mask & k_valid[:, None, :]
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v)
    return out.reshape(b, t, h, hd)

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
    kv, s = k.shape[1], k.shape[2]
    g = h // kv
    # One merged batch axis (b, kv) for both matmuls: XLA:CPU runs a dot with one batch dimension
    # about 4x faster than the same einsum with two (measured on decode shapes).
    qm = q.reshape(b, t, kv, g, hd).transpose(0, 2, 1, 3, 4).reshape(b * kv, t * g, hd)
    scores = jnp.matmul(qm, k.reshape(b * kv, s, hd).swapaxes(1, 2),
                        preferred_element_type=jnp.float32)  # [B*KV, T*G, S]
    scores = scores.reshape(b, kv, t, g, s) * (hd ** -0.5)
    k_pos = jnp.broadcast_to(k_pos, (b, s))
    mask = k_pos[:, None, :] <= q_pos[:, :, None]  # [B, T, S]
    if k_valid is not None:
        mask = mask & k_valid[:, None, :]
    scores = jnp.where(mask[:, None, :, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b * kv, t * g, s)
    out = jnp.matmul(probs, v.reshape(b * kv, s, hd))  # [B*KV, T*G, hd]
    return out.reshape(b, kv, t, g, hd).transpose(0, 2, 1, 3, 4).reshape(b, t, h, hd)

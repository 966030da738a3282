"""Index-mapped attention in plain jnp: the meaning of the kernels and the CPU path.

Every output head h of row b is one lookup in three per-row tables:

    q_head[b, h]  the query head whose scores it uses (a CHAI representative, or h itself)
    k_head[b, h]  the K buffer those scores read (a K slot of the cache, or h's KV head)
    v_head[b, h]  the V buffer its probabilities mix (h's KV head)

Dense, grouped-query, CHAI's clustered heads and head sparsity are all tables (`tables.py`).
Queries are S_q consecutive new tokens per row (1: decoding; d + 1: verifying a draft), already
written to the cache. `lengths[b]` keys are visible to the row's first query, and query j sees
`lengths[b] + j` (causal inside the block). A query that sees no key gives zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def visible_keys(lengths: jax.Array, num_queries: int, num_keys: int) -> jax.Array:
    """[B, S_q, S] bool: key position s is visible to query j of row b (s < lengths[b] + j)."""
    limit = lengths[:, None] + jnp.arange(num_queries)[None, :]  # [B, S_q]
    return jnp.arange(num_keys)[None, None, :] < limit[:, :, None]


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                        q_head: jax.Array, k_head: jax.Array, v_head: jax.Array) -> jax.Array:
    """q [B, S_q, Hq, hd], k [B, Ck, S, hd], v [B, KV, S, hd], lengths [B], tables [B, H]
    -> out [B, S_q, H, hd] in q's dtype. Scores and softmax in float32."""
    qg = jnp.take_along_axis(q, q_head[:, None, :, None], axis=2).astype(jnp.float32)  # [B, S_q, H, hd]
    kg = jnp.take_along_axis(k, k_head[:, :, None, None], axis=1).astype(jnp.float32)  # [B, H, S, hd]
    vg = jnp.take_along_axis(v, v_head[:, :, None, None], axis=1).astype(jnp.float32)  # [B, H, S, hd]
    scores = jnp.einsum("bqhd,bhsd->bhqs", qg, kg) * q.shape[-1] ** -0.5
    visible = visible_keys(lengths, q.shape[1], k.shape[2])[:, None]  # [B, 1, S_q, S]
    scores = jnp.where(visible, scores, -jnp.inf)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.where(visible, jnp.exp(scores - jnp.where(jnp.isfinite(peak), peak, 0.0)), 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(total > 0, total, 1.0)
    return jnp.einsum("bhqs,bhsd->bqhd", probs, vg).astype(q.dtype)

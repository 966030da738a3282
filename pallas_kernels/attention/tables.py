"""The per-row tables (q_head, k_head, v_head), each [B, H] int32, for each attention kind."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmodels.attention_plan import AttentionPlan

Tables = tuple[jax.Array, jax.Array, jax.Array]


def gqa_tables(batch: int, num_heads: int, num_kv_heads: int) -> Tables:
    """Dense / grouped-query attention: head h reads its own query and KV head h // G."""
    heads = jnp.broadcast_to(jnp.arange(num_heads, dtype=jnp.int32), (batch, num_heads))
    kv = heads // (num_heads // num_kv_heads)
    return heads, kv, kv


def plan_tables(plan: AttentionPlan, num_heads: int, num_kv_heads: int) -> Tables:
    """An `AttentionPlan` (CHAI): head h uses representative r = head_cluster[b, h], whose query
    head is rep_heads[b, r] and whose K slot is r // M; it mixes its own KV head's values."""
    rep = plan.head_cluster.astype(jnp.int32)  # [B, H]
    q_head = jnp.take_along_axis(plan.rep_heads.astype(jnp.int32), rep, axis=1)
    k_head = rep // plan.reps_per_slot
    _, v_head, _ = gqa_tables(rep.shape[0], num_heads, num_kv_heads)
    return q_head, k_head, v_head


def head_sparse_tables(active: jax.Array, num_heads: int, num_kv_heads: int) -> Tables:
    """Head sparsity (Deja Vu): only the query heads in `active` [B, K] are computed; output head i
    is head active[b, i] (its own query, its KV head's keys and values). The caller scatters the
    [B, S_q, K, hd] result back, or feeds it to the matching rows of the output projection."""
    active = jnp.asarray(active, jnp.int32)
    kv = active // (num_heads // num_kv_heads)
    return active, kv, kv

"""Attention under a plan: random per-row plans against a direct head-by-head reference, in prefill
(multi-token, ragged positions) and decode; the identity plan given as data against dense attention
exactly; a batch of rows with different maps against each row alone; caches sized by the plan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.attention import attend
from jaxmodels.attention_plan import (AttentionPlan, check_plans, cluster_plan, identity_plan, k_slots, pack_plan,
                                      plan_problems, take_plan_rows)
from jaxmodels.kv_cache import KVCache
from jaxmodels.testing import tiny_config

HD, S, T0, T1 = 8, 16, 6, 3  # head dim, cache length, first chunk, second chunk
LENS = np.array([2, 6, 4])  # valid positions per row after the first chunk (ragged)
SHAPES = [(8, 4), (4, 4), (4, 1)]  # (H, KV): grouped-query, multi-head, multi-query


def random_plan(rng: np.random.Generator, batch: int, h: int, kv: int, ck: int, m: int) -> AttentionPlan:
    """Arbitrary index maps (not only CHAI-shaped ones), one set per row."""
    return AttentionPlan(k_source=jnp.asarray(rng.integers(0, kv, (batch, ck)), jnp.int32),
                         rep_heads=jnp.asarray(rng.integers(0, h, (batch, ck * m)), jnp.int32),
                         head_cluster=jnp.asarray(rng.integers(0, ck * m, (batch, h)), jnp.int32))


def reference(q, k, v, q_pos, plan, rep_kslot=None) -> np.ndarray:
    """Clustered attention written out head by head, over a dense cache.

    q [B, T, H, hd] at q_pos [B, T]; k, v [B, KV, N, hd]: every KV head's keys and values at
    positions 0..N-1. Head h takes representative i = head_cluster[b, h]. That representative's
    scores are query head rep_heads[b, i] against the keys of KV head k_source[b, c], where
    c = rep_kslot[b, i] when given explicitly, else i // M. Heads that name the same
    representative share those scores. Each head applies them to the values of its own KV head
    h // G.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    ks, rh, hc = (np.asarray(x) for x in (plan.k_source, plan.rep_heads, plan.head_cluster))
    b_n, t_n, h_n, hd = q.shape
    g, m = h_n // v.shape[1], rh.shape[1] // ks.shape[1]
    out = np.zeros(q.shape)
    for b in range(b_n):
        for h in range(h_n):
            i = hc[b, h]
            rep, src = rh[b, i], ks[b, i // m if rep_kslot is None else int(rep_kslot[b, i])]
            for t in range(t_n):
                n = int(q_pos[b, t]) + 1  # keys at positions <= the query's
                s = k[b, src, :n] @ q[b, t, rep] / np.sqrt(hd)
                p = np.exp(s - s.max())
                out[b, t, h] = (p / p.sum()) @ v[b, h // g, :n]
    return out


def make_inputs(seed: int, b: int, h: int, kv: int):
    """Random q, k, v for a first chunk (T0 tokens at 0), a second (T1 at LENS) and one decode token."""
    keys = iter(jax.random.split(jax.random.key(seed), 9))
    chunk = lambda t: (jax.random.normal(next(keys), (b, t, h, HD)),  # noqa: E731
                       jax.random.normal(next(keys), (b, kv, t, HD)),
                       jax.random.normal(next(keys), (b, kv, t, HD)))
    return chunk(T0), chunk(T1), chunk(1)


def run_chunks(chunks, plan, lens, kv: int, ck: int):
    """The three chunks through `attend` with a cache: outputs per chunk and the final buffers."""
    b = chunks[0][0].shape[0]
    state = (jnp.zeros((b * ck, S, HD)), jnp.zeros((b * kv, S, HD)))
    starts = (jnp.zeros((b,), jnp.int32), jnp.asarray(lens, jnp.int32), jnp.asarray(lens + T1, jnp.int32))
    outs = []
    for (q, k, v), at in zip(chunks, starts):
        positions = at[:, None] + jnp.arange(q.shape[1])[None]
        out, state = jax.jit(attend)(q, k, v, state, positions, at, plan)
        outs.append(out)
    return outs, state


def true_sequence(chunks, lens):
    """Each row's keys and values by position: the first chunk's first LENS[b], then the rest."""
    (_, ka, va), (_, kb, vb), (_, kd, vd) = chunks
    n = T0 + T1 + 1
    k = np.zeros(ka.shape[:2] + (n, HD))
    v = np.zeros_like(k)
    for b, length in enumerate(lens):
        k[b, :, :length + T1 + 1] = np.concatenate([ka[b, :, :length], kb[b], kd[b]], axis=1)
        v[b, :, :length + T1 + 1] = np.concatenate([va[b, :, :length], vb[b], vd[b]], axis=1)
    return k, v


@pytest.mark.parametrize("h, kv", SHAPES)
@pytest.mark.parametrize("ck, m", [(1, 1), (2, 3), (3, 2), (1, 4)])
def test_random_plans_match_the_reference_in_prefill_and_decode(h, kv, ck, m):
    ck = min(ck, kv)  # a layer has at most KV K slots
    chunks = make_inputs(ck * 10 + m, 3, h, kv)
    plan = random_plan(np.random.default_rng(ck * 7 + m), 3, h, kv, ck, m)
    (out_a, out_b, out_d), state = run_chunks(chunks, plan, LENS, kv, ck)
    assert state[0].shape == (3 * ck, S, HD) and state[1].shape == (3 * kv, S, HD)
    # first chunk: every row sees the chunk itself, positions 0..T0-1
    np.testing.assert_allclose(out_a, reference(chunks[0][0], chunks[0][1], chunks[0][2],
                                                np.broadcast_to(np.arange(T0), (3, T0)), plan), atol=2e-5)
    k, v = true_sequence(chunks, LENS)
    pos_b = LENS[:, None] + np.arange(T1)[None]
    np.testing.assert_allclose(out_b, reference(chunks[1][0], k, v, pos_b, plan), atol=2e-5)
    np.testing.assert_allclose(out_d, reference(chunks[2][0], k, v, (LENS + T1)[:, None], plan), atol=2e-5)


@pytest.mark.parametrize("h, kv", SHAPES)
def test_without_a_cache_the_chunk_attends_to_itself_under_the_plan(h, kv):
    (q, k, v), _, _ = make_inputs(1, 2, h, kv)
    plan = random_plan(np.random.default_rng(1), 2, h, kv, min(2, kv), 2)
    positions = jnp.broadcast_to(jnp.arange(T0), (2, T0))
    out, state = attend(q, k, v, None, positions, positions[:, 0], plan)
    assert state is None
    np.testing.assert_allclose(out, reference(q, k, v, positions, plan), atol=2e-5)


@pytest.mark.parametrize("h, kv", SHAPES)
def test_the_identity_plan_as_data_equals_dense_attention_exactly(h, kv):
    chunks = make_inputs(2, 3, h, kv)
    config = tiny_config(hidden_size=h * HD, num_attention_heads=h, num_key_value_heads=kv)
    dense_outs, dense_state = run_chunks(chunks, None, LENS, kv, kv)
    outs, state = run_chunks(chunks, identity_plan(config, 3), LENS, kv, kv)
    for a, b in zip(dense_outs + list(dense_state), outs + list(state)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("h, kv", SHAPES)
def test_a_batch_with_different_maps_per_row_equals_each_row_alone(h, kv):
    ck, m = min(2, kv), 2
    chunks = make_inputs(3, 3, h, kv)
    plan = random_plan(np.random.default_rng(3), 3, h, kv, ck, m)
    assert len({str(np.asarray(plan.head_cluster[b])) for b in range(3)}) > 1  # the rows really differ
    outs, state = run_chunks(chunks, plan, LENS, kv, ck)
    for b in range(3):
        row = [tuple(x[b:b + 1] for x in chunk) for chunk in chunks]
        alone, alone_state = run_chunks(row, take_plan_rows((plan,), b, b + 1)[0], LENS[b:b + 1], kv, ck)
        for together, single in zip(outs, alone):
            np.testing.assert_allclose(together[b:b + 1], single, atol=1e-6)
        np.testing.assert_array_equal(state[0][b * ck:(b + 1) * ck], alone_state[0])


def test_cluster_plan_follows_chai_rules():
    """Representative = lowest-index member; each group's j-th query head uses the representative
    group's j-th scores; an empty cluster's slot stores KV head 0; C = KV in order is the identity."""
    labels = jnp.array([[1, 0, 1, 0], [0, 0, 0, 0]])  # KV = 4, G = 2, C = 2 (row 1: cluster 1 empty)
    plan = cluster_plan(labels, 2, 8)
    np.testing.assert_array_equal(plan.k_source, [[1, 0], [0, 0]])
    np.testing.assert_array_equal(plan.rep_heads, [[2, 3, 0, 1], [0, 1, 0, 1]])
    np.testing.assert_array_equal(plan.head_cluster, [[2, 3, 0, 1, 2, 3, 0, 1], [0, 1, 0, 1, 0, 1, 0, 1]])
    config = tiny_config(hidden_size=64, num_attention_heads=8, num_key_value_heads=4)
    ident = cluster_plan(jnp.broadcast_to(jnp.arange(4), (3, 4)), 4, 8)
    for a, b in zip(jax.tree_util.tree_leaves(ident), jax.tree_util.tree_leaves(identity_plan(config, 3))):
        np.testing.assert_array_equal(a, b)
    jitted = jax.jit(cluster_plan, static_argnums=(1, 2))(labels, 2, 8)  # traceable: runs inside jit
    np.testing.assert_array_equal(jitted.rep_heads, plan.rep_heads)


@pytest.mark.parametrize("h, kv", SHAPES)
def test_packing_an_explicit_slot_plan_keeps_its_meaning(h, kv):
    """Maps that name each representative's K slot (unequal counts per slot) packed into the static
    slot order, padded to M = min(G, Cq), attend as the explicit maps say."""
    rng, g, cq, ck = np.random.default_rng(5), h // kv, min(h, 3), kv
    rows = [rng.choice(h, cq, replace=False) for _ in range(3)]  # distinct query heads per row
    rep_heads = np.stack(rows)
    explicit = AttentionPlan(k_source=np.broadcast_to(np.arange(kv), (3, kv)), rep_heads=rep_heads,
                             head_cluster=rng.integers(0, cq, (3, h)))
    rep_kslot = rep_heads // g  # each representative reads its own KV head, as in GQA
    packed = pack_plan(explicit.rep_heads, rep_kslot, explicit.head_cluster, explicit.k_source, min(g, cq))
    assert packed.num_k_slots == ck and packed.num_reps == ck * min(g, cq)
    chunks = make_inputs(5, 3, h, kv)
    (out_a, _, _), _ = run_chunks(chunks, packed, LENS, kv, ck)
    q, k, v = chunks[0]
    positions = np.broadcast_to(np.arange(T0), (3, T0))
    np.testing.assert_allclose(out_a, reference(q, k, v, positions, explicit, rep_kslot), atol=2e-5)
    ident = identity_plan(tiny_config(hidden_size=h * HD, num_attention_heads=h, num_key_value_heads=kv), 3)
    again = pack_plan(ident.rep_heads, ident.rep_kslot, ident.head_cluster, ident.k_source, g)
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(ident)):
        np.testing.assert_array_equal(a, b)


def test_the_cache_is_built_per_layer_from_the_plans():
    config = tiny_config(num_hidden_layers=3)  # H 4, KV 2, hd 16
    plans = (None, cluster_plan(jnp.zeros((2, 2), jnp.int32), 1, 4), None)
    assert k_slots(config, plans) == (2, 1, 2) and k_slots(config, None) == (2, 2, 2)
    cache = KVCache.create(config, 2, 32, k_slots=k_slots(config, plans))
    assert [k.shape for k in cache.k] == [(4, 32, 16), (2, 32, 16), (4, 32, 16)]
    assert all(v.shape == (4, 32, 16) for v in cache.v) and cache.k_slots == (2, 1, 2)
    dense = KVCache.create(config, 2, 32)
    assert dense.nbytes() == dense.dense_nbytes() == 2 * 3 * 4 * 32 * 16 * 4
    assert cache.dense_nbytes() == dense.nbytes() and cache.nbytes() == dense.nbytes() - 2 * 32 * 16 * 4
    with pytest.raises(ValueError, match="k_slots must give"):
        KVCache.create(config, 2, 32, k_slots=(2, 1))


def test_a_cache_without_the_plans_slots_is_refused():
    (q, k, v), _, _ = make_inputs(4, 2, 4, 2)
    plan = cluster_plan(jnp.zeros((2, 2), jnp.int32), 1, 4)
    state = (jnp.zeros((4, S, HD)), jnp.zeros((4, S, HD)))  # dense: 2 K slots per row
    at = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="cache holds 2 K slots .* needs 1"):
        attend(q, k, v, state, jnp.broadcast_to(jnp.arange(T0), (2, T0)), at, plan)


def test_plan_problems_name_the_layer_and_the_fix():
    config = tiny_config(num_hidden_layers=2)  # H 4, KV 2
    good = cluster_plan(jnp.zeros((3, 2), jnp.int32), 1, 4)
    assert plan_problems(config, (None, good), 3) == []
    assert "one entry per layer (2" in plan_problems(config, (good,), 3)[0]
    assert "k_source must have shape [2, n]" in plan_problems(config, (None, good), 2)[0]
    bad_range = AttentionPlan(good.k_source, good.rep_heads, good.head_cluster.at[0, 0].set(5))
    assert "layer 1: head_cluster must lie in [0, 2)" in plan_problems(config, (None, bad_range), 3)[0]
    uneven = AttentionPlan(jnp.zeros((3, 2), jnp.int32), jnp.zeros((3, 3), jnp.int32), jnp.zeros((3, 4), jnp.int32))
    assert "do not split evenly" in plan_problems(config, (uneven, None), 3)[0]
    too_many = AttentionPlan(jnp.zeros((3, 3), jnp.int32), jnp.zeros((3, 3), jnp.int32), jnp.zeros((3, 4), jnp.int32))
    assert "1 to 2" in plan_problems(config, (too_many, None), 3)[0]
    floats = AttentionPlan(good.k_source.astype(jnp.float32), good.rep_heads, good.head_cluster)
    assert "integers" in plan_problems(config, (floats, None), 3)[0]
    with pytest.raises(ValueError, match="layer 0"):
        check_plans(config, (bad_range, None), 3)
    normalized = check_plans(config, (None, jax.tree_util.tree_map(np.asarray, good)), 3)
    assert normalized[0] is None and normalized[1].k_source.dtype == jnp.int32

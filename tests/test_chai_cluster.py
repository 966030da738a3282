"""CHAI online membership (jaxmodels.chai): the jit-able average linkage against the plain host rule,
ties, identical heads, determinism, short prompts, and the plan index maps of both granularities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxmodels import chai
from jaxmodels.attention import gqa_attention, merge_kv_heads

linkage = jax.jit(chai.average_linkage, static_argnums=1)
plan_fn = jax.jit(chai.plan_from_prompt, static_argnums=(3, 4, 5))  # fallback: a tuple (static)
cluster_fn = jax.jit(chai.cluster_rows, static_argnums=1)


def _random_dist(rng, n):
    x = rng.normal(size=(n, 6))
    return np.asarray(chai.cosine_distances_host(x), np.float32)


@pytest.mark.parametrize("n", [2, 3, 5, 9, 12])
def test_linkage_matches_host_on_random_distances(n):
    rng = np.random.default_rng(n)
    for _ in range(8):
        dist = _random_dist(rng, n)
        for k in range(1, n + 1):
            np.testing.assert_array_equal(np.asarray(linkage(jnp.asarray(dist), k)),
                                          chai.average_linkage_host(dist, k), err_msg=f"k={k}")


@st.composite
def integer_distances(draw):
    """Symmetric matrices of small integers: many exact ties, and sums/means that both float32
    (jit) and float64 (host) represent exactly, so the tie rule is what decides."""
    n = draw(st.integers(2, 8))
    values = draw(st.lists(st.integers(0, 3), min_size=n * (n - 1) // 2, max_size=n * (n - 1) // 2))
    dist = np.zeros((n, n), np.float32)
    dist[np.triu_indices(n, 1)] = values
    return dist + dist.T, draw(st.integers(1, n))


@settings(max_examples=150, deadline=None)
@given(integer_distances())
def test_linkage_ties_match_host(case):
    dist, k = case
    np.testing.assert_array_equal(np.asarray(linkage(jnp.asarray(dist), k)), chai.average_linkage_host(dist, k))


def test_tie_rule_merges_lowest_pair_first():
    dist = np.ones((4, 4), np.float32) - np.eye(4, dtype=np.float32)  # every pair tied
    assert np.asarray(linkage(jnp.asarray(dist), 3)).tolist() == [0, 0, 2, 3]
    assert np.asarray(linkage(jnp.asarray(dist), 2)).tolist() == [0, 0, 0, 3]


def test_canonical_clusters_orders_by_representative():
    reps, cluster = chai.canonical_clusters(jnp.asarray([[0, 1, 0, 1, 4]]), 3)
    assert reps.tolist() == [[0, 1, 4]] and cluster.tolist() == [[0, 1, 0, 1, 2]]


def _qk(seed, b=3, t=7, h=6, kv=2, hd=8, scale=2.0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(b, t, h, hd)).astype(np.float32) * scale,
            rng.normal(size=(b, kv, t, hd)).astype(np.float32) * scale)


@pytest.mark.parametrize("causal", [True, False])
def test_first_token_probs_match_host(causal):
    q, k = _qk(0)
    lengths = np.array([7, 3, 1])
    got = np.asarray(chai.first_token_probs(jnp.asarray(q), jnp.asarray(k), jnp.asarray(lengths), causal=causal))
    for row, n in enumerate(lengths):
        want = chai.first_token_probs_host(q[row], k[row], int(n), causal=causal)
        np.testing.assert_allclose(got[row], want, atol=1e-6)


@pytest.mark.parametrize("granularity", ["query", "kv"])
@pytest.mark.parametrize("seed", range(4))
def test_plan_matches_host_pipeline(granularity, seed):
    """Random prompts, every cluster count: the compiled membership equals the host rule per row."""
    h, kv = (9, 3) if seed % 2 else (6, 2)
    q, k = _qk(seed, b=4, h=h, kv=kv)
    lengths = np.array([7, 5, 4, 2])
    n = h if granularity == "query" else kv
    probs = [chai.first_token_probs_host(q[row], k[row], int(length)).reshape(h, -1)
             for row, length in enumerate(lengths)]
    for clusters in sorted({1, 2, n // 2, n - 1} - {0, n}):
        plan = plan_fn(jnp.asarray(q), jnp.asarray(k), jnp.asarray(lengths), clusters, granularity)
        for row in range(len(lengths)):
            feats = probs[row] if granularity == "query" else probs[row].reshape(kv, -1)
            reps, cluster = (jnp.asarray(x)[None] for x in chai.cluster_host(feats, clusters))
            want = (chai.query_plan(reps, cluster, kv) if granularity == "query"
                    else chai.kv_plan(reps, cluster, h))
            for name, got_x, want_x in zip(chai.HeadPlan._fields, plan, want):
                np.testing.assert_array_equal(np.asarray(got_x)[row], np.asarray(want_x)[0], err_msg=name)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=8, max_size=8), st.integers(0, 2**31 - 1))
def test_identical_heads_cluster_together(groups, seed):
    """Heads with bitwise-identical features share a cluster whenever k <= the number of distinct ones."""
    rng = np.random.default_rng(seed)
    protos = rng.random((4, 20)).astype(np.float32)
    feats = jnp.asarray(protos[groups][None])  # [1, n, F]
    distinct = len(set(groups))
    for k in range(1, distinct + 1):
        _, cluster = cluster_fn(feats, k, jnp.asarray([True]))
        cluster = np.asarray(cluster)[0]
        for a in range(len(groups)):
            for b in range(len(groups)):
                if groups[a] == groups[b]:
                    assert cluster[a] == cluster[b]
        if k == distinct:  # exactly the prototypes
            assert len(set(zip(groups, cluster.tolist()))) == distinct


def test_deterministic_and_rows_independent():
    q, k = _qk(7, b=3, h=9, kv=3)
    lengths = jnp.asarray([7, 6, 5])
    fn = plan_fn
    first = fn(jnp.asarray(q), jnp.asarray(k), lengths, 4, "query")
    again = chai.plan_from_prompt(jnp.asarray(q), jnp.asarray(k), lengths, 4, "query")  # not jitted
    for a, b in zip(first, again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for row in range(3):
        alone = fn(jnp.asarray(q[row:row + 1]), jnp.asarray(k[row:row + 1]), lengths[row:row + 1], 4, "query")
        for a, b in zip(first, alone):
            np.testing.assert_array_equal(np.asarray(a)[row], np.asarray(b)[0])


def test_short_prompts():
    """t in [2, 5): cluster on the t x t block (same as a prompt that short alone); 1 token: fallback."""
    q, k = _qk(3, b=2, t=7, h=6, kv=2)
    lengths = jnp.asarray([3, 1])
    fallback = (0, 1, 1, 0, 2, 2)
    plan = plan_fn(jnp.asarray(q), jnp.asarray(k), lengths, 3, "query", fallback)
    short = plan_fn(jnp.asarray(q[:1, :3]), jnp.asarray(k[:1, :, :3]), lengths[:1], 3, "query")
    for a, b in zip(plan, short):
        np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(b)[0])
    assert np.asarray(plan.head_cluster)[1].tolist() == list(fallback)
    assert np.asarray(plan.rep_heads)[1].tolist() == [0, 1, 4]
    # without a fallback: the tie rule on equal distances (heads 0..n-k together)
    plain = plan_fn(jnp.asarray(q[1:]), jnp.asarray(k[1:]), lengths[1:], 3, "query")
    assert np.asarray(plain.head_cluster)[0].tolist() == [0, 0, 0, 0, 1, 2]
    # a bucket shorter than 5 tokens, and a 1-token bucket
    for t in (1, 2, 4):
        tiny = plan_fn(jnp.asarray(q[:, :t]), jnp.asarray(k[:, :, :t]), jnp.asarray([t, t]), 1, "kv")
        assert np.asarray(tiny.head_cluster).shape == (2, 6)


def test_fallback_must_match_count():
    q, k = _qk(0)
    with pytest.raises(ValueError, match="fallback"):
        chai.plan_from_prompt(jnp.asarray(q), jnp.asarray(k), jnp.asarray([7, 7, 7]), 3, "query",
                              np.array([0, 0, 1, 1, 1, 1]))


# --------------------------------------------------------------------------- plans
def test_identity_plan():
    plan = chai.identity_plan(2, 9, 3)
    assert np.asarray(plan.rep_heads).tolist() == [list(range(9))] * 2
    assert np.asarray(plan.rep_kslot).tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2]] * 2
    assert np.asarray(plan.head_cluster).tolist() == [list(range(9))] * 2
    assert np.asarray(plan.k_source).tolist() == [[0, 1, 2]] * 2


@pytest.mark.parametrize("granularity", ["query", "kv"])
def test_full_cluster_count_is_identity(granularity):
    q, k = _qk(1, h=9, kv=3)
    n = 9 if granularity == "query" else 3
    plan = chai.plan_from_prompt(jnp.asarray(q), jnp.asarray(k), jnp.asarray([7, 2, 1]), n, granularity)
    for a, b in zip(plan, chai.identity_plan(3, 9, 3)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_kv_plan_by_hand():
    """SmolLM2 shape: 9 heads over 3 KV heads; groups 0 and 1 share group 0's scores."""
    plan = chai.kv_plan(jnp.asarray([[0, 2]]), jnp.asarray([[0, 0, 1]]), 9)
    assert np.asarray(plan.rep_heads).tolist() == [[0, 1, 2, 6, 7, 8]]
    assert np.asarray(plan.rep_kslot).tolist() == [[0, 0, 0, 1, 1, 1]]
    assert np.asarray(plan.head_cluster).tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 5]]
    assert np.asarray(plan.k_source).tolist() == [[0, 2]]


def test_query_plan_by_hand():
    plan = chai.query_plan(jnp.asarray([[0, 4, 7]]), jnp.asarray([[0, 0, 0, 1, 1, 1, 2, 2, 2]]), 3)
    assert np.asarray(plan.rep_kslot).tolist() == [[0, 1, 2]]
    assert np.asarray(plan.k_source).tolist() == [[0, 1, 2]]


@pytest.mark.parametrize("granularity", ["query", "kv"])
def test_plan_invariants(granularity):
    """Each representative is in its own cluster and reads its own KV head's keys."""
    h, kv = 9, 3
    q, k = _qk(5, b=4, h=h, kv=kv)
    n = h if granularity == "query" else kv
    for clusters in sorted({1, 2, n // 2 + 1, n}):
        plan = plan_fn(jnp.asarray(q), jnp.asarray(k), jnp.asarray([7, 5, 3, 2]), clusters, granularity)
        reps, slot, hc, src = (np.asarray(x) for x in plan)
        for row in range(4):
            assert (np.diff(reps[row]) > 0).all()
            assert (hc[row][reps[row]] == np.arange(len(reps[row]))).all()
            assert (src[row][slot[row]] == reps[row] // (h // kv)).all()
            if granularity == "kv":  # head m of a group uses head m of the representative group
                assert (reps[row][hc[row]] % (h // kv) == np.arange(h) % (h // kv)).all()


def _planned_attention(q, k, v, plan):
    """The meaning of a plan, written directly (one row, one head at a time): head h uses the
    probabilities of score head rep_heads[c] (c = head_cluster[h]) against K slot rep_kslot[c],
    which holds KV head k_source[slot]'s keys, and applies them to its own KV head's V."""
    b, t, h, hd = q.shape
    g = h // k.shape[1]
    out = np.zeros_like(q)
    causal = np.tril(np.ones((t, t), bool))
    for row in range(b):
        for head in range(h):
            c = plan.head_cluster[row, head]
            r, slot = plan.rep_heads[row, c], plan.rep_kslot[row, c]
            s = q[row, :, r] @ k[row, plan.k_source[row, slot]].T / np.sqrt(hd)
            p = np.exp(np.where(causal, s, -np.inf) - s.max(-1, keepdims=True))
            out[row, :, head] = (p / p.sum(-1, keepdims=True)) @ v[row, head // g]
    return out


def test_identity_plan_means_gqa_attention():
    q, k = _qk(2, b=2, t=6, h=6, kv=2)
    v = np.random.default_rng(9).normal(size=k.shape).astype(np.float32)
    plan = jax.tree_util.tree_map(np.asarray, chai.identity_plan(2, 6, 2))
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    dense = gqa_attention(jnp.asarray(q), merge_kv_heads(jnp.asarray(k)), merge_kv_heads(jnp.asarray(v)), pos, pos)
    np.testing.assert_allclose(_planned_attention(q, k, v, plan), np.asarray(dense), atol=1e-5)


def test_kv_plan_shares_the_representative_groups_scores():
    q, k = _qk(4, b=1, t=6, h=6, kv=2)
    v = np.random.default_rng(3).normal(size=k.shape).astype(np.float32)
    plan = jax.tree_util.tree_map(np.asarray, chai.kv_plan(jnp.asarray([[0]]), jnp.asarray([[0, 0]]), 6))
    q_shared, k_shared = q.copy(), k.copy()
    q_shared[:, :, 3:] = q[:, :, :3]  # group 1's heads scored as group 0's
    k_shared[:, 1] = k[:, 0]
    want = _planned_attention(q_shared, k_shared, v, jax.tree_util.tree_map(np.asarray, chai.identity_plan(1, 6, 2)))
    np.testing.assert_allclose(_planned_attention(q, k, v, plan), want, atol=1e-6)


@pytest.mark.parametrize("granularity, clusters", [("query", 4), ("query", 1), ("kv", 2), ("kv", 1)])
def test_plan_drives_clustered_attention(granularity, clusters):
    """The attention of part 1 (`pack_plan` + `clustered_attention`) reads these maps as
    `_planned_attention` does, with K slots filled from `k_source`."""
    from jaxmodels.attention import clustered_attention
    from jaxmodels.attention_plan import pack_plan

    h, kv, b, t = 9, 3, 2, 6
    q, k = _qk(6, b=b, t=t, h=h, kv=kv)
    v = np.random.default_rng(8).normal(size=k.shape).astype(np.float32)
    plan = plan_fn(jnp.asarray(q), jnp.asarray(k), jnp.asarray([6, 4]), clusters, granularity)
    packed = pack_plan(*plan, reps_per_slot=min(h // kv, plan.rep_heads.shape[1]))
    k_slots = k[np.arange(b)[:, None], np.asarray(plan.k_source)]  # [B, Ck, T, hd]
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    got = clustered_attention(jnp.asarray(q), merge_kv_heads(jnp.asarray(k_slots)), merge_kv_heads(jnp.asarray(v)),
                              pos, pos, packed)
    want = _planned_attention(q, k, v, jax.tree_util.tree_map(np.asarray, plan))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)

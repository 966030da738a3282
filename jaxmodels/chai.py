"""CHAI clustered heads, online part: per-row cluster membership from the first prompt tokens, and
the index maps ("plan") that clustered attention consumes. Everything here is jit-able with static
shapes, so membership is decided inside the compiled prefill, per row of a (ragged) batch.

**The rule** (Agarwal et al., ICML 2024; facebookresearch/chai `llama.patch`): from the first five
prompt tokens, each head's 5x5 softmax score matrix is flattened to a vector; pairwise cosine
distances between heads; average-linkage agglomerative clustering down to the layer's cluster count
k; the representative of a cluster is its lowest-index head. Then only representatives compute
Q.K^T and softmax, and every member applies its representative's probabilities to its own V.

**Departures from the reference code, and why.**
- Causal mask (default `causal=True`). The reference computes the 5x5 block without a mask. Our
  attention is causal and the probabilities heads will share are causal ones, so the heads are
  compared on the rows they actually use. Row 0 of a causal block is [1, 0, 0, 0, 0] for every head:
  it carries no information and would only shrink every distance, so it is left out (features:
  rows 1..4, 20 numbers, zeros above the diagonal). `causal=False` gives the reference's 25 numbers.
- Average linkage is written as a fixed number of merge steps (`lax.fori_loop`, H - k steps over an
  [H, H] matrix of summed pairwise distances) instead of scikit-learn's `AgglomerativeClustering`
  on the host in the middle of the forward pass. Same criterion (the mean pairwise distance between
  two clusters), exact up to float32 rounding; `average_linkage_host` is the plain reference.
- **Ties** (equal average distances) merge the pair with the lowest (representative, representative)
  index first, i.e. the first minimum in row-major order. Identical heads have distance exactly 0
  (bitwise-equal features are forced to 0, not 1 - 0.99999994), so they merge before anything else.
  Results are deterministic: no randomness, no data-dependent host code.
- **Prompts shorter than five tokens**: a row with t = min(length, 5) >= 2 tokens clusters on its
  t x t block (rows past t zeroed, keys past t masked). A row with fewer than 2 tokens has no
  information to cluster on (a causal 1x1 block is [1] for every head); it takes `fallback`, the
  static grouping the calibration found (`jaxmodels.chai_file`), or, without one, the tie rule on
  equal distances (heads 0..n-k in one cluster, every later head alone). Never an error.
- Batches: the reference asserts batch size 1; here every row gets its own clustering (vmapped).

**GQA granularity.** `granularity="query"` clusters the H query heads (saves score FLOPs only: every
KV head's K is still read by some head). `granularity="kv"` clusters the KV groups (a group's feature
is its G = H/KV heads' vectors concatenated), so a whole KV head's K is no longer needed: query head
m of group g uses the probabilities of head m of the representative group of g's cluster.

**The plan** (`HeadPlan`, per row; Cq score heads, Ck K-cache slots):
    rep_heads    [B, Cq]  the representative query heads, ascending (which Q rows compute scores)
    rep_kslot    [B, Cq]  the K-cache slot each representative reads
    head_cluster [B, H]   index into rep_heads of the probabilities each query head uses
    k_source     [B, Ck]  which KV head's K is written into K slot c
Dense / GQA is the identity plan: Cq = H, rep_heads = arange(H), rep_kslot = h // G, head_cluster
= arange(H), Ck = KV, k_source = arange(KV). Attention runs it as
`jaxmodels.attention_plan.pack_plan(*plan, reps_per_slot=min(G, Cq))` (tested in test_chai_cluster).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

FIRST_TOKENS = 5  # the paper's membership window
GRANULARITIES = ("query", "kv")

__all__ = ["FIRST_TOKENS", "GRANULARITIES", "HeadPlan", "first_token_probs", "head_features",
           "group_features", "cosine_distances", "average_linkage", "canonical_clusters",
           "cluster_rows", "identity_plan", "query_plan", "kv_plan", "plan_from_prompt",
           "fallback_representatives", "average_linkage_host", "cluster_host", "first_token_probs_host",
           "cosine_distances_host"]


class HeadPlan(NamedTuple):
    """Per-row index maps of one layer's clustered attention (int32; shapes in the module docstring)."""
    rep_heads: jax.Array  # [B, Cq]
    rep_kslot: jax.Array  # [B, Cq]
    head_cluster: jax.Array  # [B, H]
    k_source: jax.Array  # [B, Ck]


# --------------------------------------------------------------------------- features and distances
def first_token_probs(q: jax.Array, k: jax.Array, lengths: jax.Array, *, tokens: int = FIRST_TOKENS,
                      causal: bool = True) -> jax.Array:
    """Softmax scores of the first `tokens` prompt positions, per head.

    q [B, T, H, hd] and k [B, KV, T, hd] (RoPE applied, as the layer computes them); lengths [B]
    (prompt length per row). Returns probs [B, H, t, t] in float32 (t = min(tokens, T)) with the
    rows of positions >= min(length, t) zeroed and, when `causal`, row 0 zeroed as well (it is
    [1, 0, ...] for every head). Query head h reads KV head h // (H / KV), as in GQA.
    """
    t = min(tokens, q.shape[1])
    b, _, h, hd = q.shape
    kh = jnp.repeat(k[:, :, :t].astype(jnp.float32), h // k.shape[1], axis=1)  # [B, H, t, hd]
    scores = jnp.einsum("bqhd,bhkd->bhqk", q[:, :t].astype(jnp.float32), kh,
                        precision=jax.lax.Precision.HIGHEST) * (hd ** -0.5)  # [B, H, t, t]
    pos = jnp.arange(t)
    n = jnp.minimum(lengths, t)  # [B] valid tokens in the window
    mask = jnp.broadcast_to(pos[None, None, None, :] < n[:, None, None, None], scores.shape)
    if causal:
        mask = mask & (pos[None, None, None, :] <= pos[None, None, :, None])
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
    keep = pos[None, :] < n[:, None]  # [B, t] rows that are real queries
    if causal:
        keep = keep & (pos[None, :] > 0)
    return jnp.where(keep[:, None, :, None] & mask, probs, 0.0)


def head_features(probs: jax.Array) -> jax.Array:
    """probs [B, H, t, t] -> one vector per query head [B, H, t*t]."""
    b, h, t, _ = probs.shape
    return probs.reshape(b, h, t * t)


def group_features(probs: jax.Array, num_kv_heads: int) -> jax.Array:
    """probs [B, H, t, t] -> one vector per KV group [B, KV, G*t*t]: its heads' vectors concatenated."""
    b, h, t, _ = probs.shape
    return probs.reshape(b, num_kv_heads, (h // num_kv_heads) * t * t)


def cosine_distances(x: jax.Array) -> jax.Array:
    """x [..., n, F] -> 1 - cosine similarity [..., n, n], clipped to [0, 2].

    A zero vector has similarity 0 to every other vector (distance 1). Bitwise-equal vectors (zero
    ones too) get exactly 0, so identical heads are never kept apart by rounding. Elementwise
    products and a sum (not a matmul), so that equal rows give bitwise-equal distances to the rest.
    """
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    unit = x / jnp.maximum(norm, 1e-30)
    cos = jnp.sum(unit[..., :, None, :] * unit[..., None, :, :], axis=-1)
    same = jnp.all(x[..., :, None, :] == x[..., None, :, :], axis=-1)
    return jnp.where(same, 0.0, jnp.clip(1.0 - cos, 0.0, 2.0))


# --------------------------------------------------------------------------- average linkage
def average_linkage(dist: jax.Array, k: int) -> jax.Array:
    """Average-linkage agglomerative clustering of n items into k clusters, jit-able.

    dist [n, n] symmetric; k static in [1, n]. Returns rep [n] int32: each item's representative
    (the lowest index in its cluster). Cluster slot i (alive while i is a representative) keeps
    `total[i, j]`, the sum of pairwise distances between the members of i and j, so the average
    linkage is total / (size_i size_j) at every step with no Lance-Williams rounding drift. Each of
    the n - k steps merges the closest pair (ties: lowest (i, j) in row-major order) into slot i.
    """
    n = dist.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"cluster count must be in [1, {n}], got {k}")
    idx = jnp.arange(n)
    upper = idx[:, None] < idx[None, :]

    def merge(_, carry):
        total, size, rep, alive = carry
        avg = total / (size[:, None] * size[None, :])
        candidates = jnp.where(upper & alive[:, None] & alive[None, :], avg, jnp.inf)
        flat = jnp.argmin(candidates.reshape(-1))  # first minimum: the lowest (i, j) on ties
        i, j = flat // n, flat % n
        total = total.at[i, :].add(total[j, :])
        total = total.at[:, i].add(total[:, j])
        return total, size.at[i].add(size[j]), jnp.where(rep == j, i, rep), alive.at[j].set(False)

    init = (dist.astype(jnp.float32), jnp.ones((n,), jnp.float32), idx, jnp.ones((n,), bool))
    return jax.lax.fori_loop(0, n - k, merge, init)[2].astype(jnp.int32)


def canonical_clusters(rep: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """rep [..., n] (representative per item, exactly k distinct) -> (reps [..., k] ascending,
    cluster [..., n] = index of each item's representative in reps)."""
    n = rep.shape[-1]
    is_rep = rep == jnp.arange(n)  # [..., n]
    order = jnp.cumsum(is_rep, axis=-1) - 1  # cluster index of each representative slot
    cluster = jnp.take_along_axis(order, rep, axis=-1)
    reps = jnp.sort(jnp.where(is_rep, jnp.arange(n), n), axis=-1)[..., :k]
    return reps.astype(jnp.int32), cluster.astype(jnp.int32)


def fallback_representatives(labels: np.ndarray | list[int]) -> np.ndarray:
    """A static grouping (cluster label per item) -> rep [n]: the lowest item of each item's cluster."""
    labels = np.asarray(labels)
    first = {c: int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)}
    return np.asarray([first[c] for c in labels], np.int32)


def cluster_rows(features: jax.Array, k: int, informative: jax.Array,
                 fallback: Sequence[int] | np.ndarray | None = None) -> tuple[jax.Array, jax.Array]:
    """Cluster each row's items: features [B, n, F], k static, informative [B] bool (False: the row's
    prompt is too short to cluster on, use `fallback`, a static grouping [n], see the module docstring).
    Returns (reps [B, k] ascending, cluster [B, n] index into reps)."""
    n = features.shape[1]
    rep = jax.vmap(lambda d: average_linkage(d, k))(cosine_distances(features))  # [B, n]
    if fallback is not None:
        fixed = jnp.asarray(fallback_representatives(fallback))
        if len(np.unique(np.asarray(fallback))) != k or fixed.shape != (n,):
            raise ValueError(f"fallback grouping must label {n} items with {k} clusters, got {fallback!r}")
        rep = jnp.where(informative[:, None], rep, fixed[None, :])
    return canonical_clusters(rep, k)


# --------------------------------------------------------------------------- plans
def _rows(x: jax.Array | np.ndarray, batch: int) -> jax.Array:
    x = jnp.asarray(x, jnp.int32)
    return jnp.broadcast_to(x, (batch, x.shape[-1]))


def identity_plan(batch: int, num_heads: int, num_kv_heads: int) -> HeadPlan:
    """Dense / GQA attention as a plan: every head its own scores, K slot = its KV head."""
    g = num_heads // num_kv_heads
    heads = np.arange(num_heads)
    return HeadPlan(_rows(heads, batch), _rows(heads // g, batch), _rows(heads, batch),
                    _rows(np.arange(num_kv_heads), batch))


def query_plan(rep_heads: jax.Array, head_cluster: jax.Array, num_kv_heads: int) -> HeadPlan:
    """Query-head clusters (rep_heads [B, Cq], head_cluster [B, H]) -> plan; every KV head keeps its K
    (Ck = KV), a representative reads its own KV head's slot."""
    b, h = head_cluster.shape
    g = h // num_kv_heads
    return HeadPlan(rep_heads.astype(jnp.int32), (rep_heads // g).astype(jnp.int32),
                    head_cluster.astype(jnp.int32), _rows(np.arange(num_kv_heads), b))


def kv_plan(rep_kv: jax.Array, kv_cluster: jax.Array, num_heads: int) -> HeadPlan:
    """KV-group clusters (rep_kv [B, Ck], kv_cluster [B, KV]) -> plan with Cq = Ck * G score heads:
    head m of representative group rep_kv[c] is score head c*G + m, reads K slot c, and serves
    head m of every group in cluster c. K slot c holds KV head rep_kv[c]'s keys."""
    b, ck = rep_kv.shape
    kv = kv_cluster.shape[1]
    g = num_heads // kv
    member = jnp.arange(g)
    rep_heads = (rep_kv[:, :, None] * g + member).reshape(b, ck * g)
    rep_kslot = jnp.broadcast_to(jnp.repeat(jnp.arange(ck), g), (b, ck * g))
    heads = jnp.arange(num_heads)
    head_cluster = kv_cluster[:, heads // g] * g + heads % g
    return HeadPlan(rep_heads.astype(jnp.int32), rep_kslot.astype(jnp.int32),
                    head_cluster.astype(jnp.int32), rep_kv.astype(jnp.int32))


def plan_from_prompt(q: jax.Array, k: jax.Array, lengths: jax.Array, clusters: int,
                     granularity: str = "kv", fallback: Sequence[int] | np.ndarray | None = None, *,
                     causal: bool = True) -> HeadPlan:
    """One layer's plan for a prefill: q [B, T, H, hd], k [B, KV, T, hd] (RoPE applied), lengths [B].

    `clusters` (static) counts query heads ("query") or KV heads ("kv"); at its maximum the plan is
    the identity and nothing is computed. `fallback`: the calibration's static grouping of the same
    items (host data, not traced: a tuple when passed to `jax.jit` as a static argument), used for
    rows with fewer than 2 prompt tokens.
    """
    b, _, h, _ = q.shape
    kv = k.shape[1]
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    n = h if granularity == "query" else kv
    if not 1 <= clusters <= n:
        raise ValueError(f"{granularity} cluster count must be in [1, {n}], got {clusters}")
    if clusters == n:
        return identity_plan(b, h, kv)
    probs = first_token_probs(q, k, lengths, causal=causal)
    informative = jnp.minimum(lengths, probs.shape[-1]) >= (2 if causal else 1)
    if causal and probs.shape[-1] < 2:  # no query row left to compare: every row uses the fallback
        informative = jnp.zeros_like(informative)
    feats = head_features(probs) if granularity == "query" else group_features(probs, kv)
    reps, cluster = cluster_rows(feats, clusters, informative, fallback)
    return query_plan(reps, cluster, kv) if granularity == "query" else kv_plan(reps, cluster, h)


# --------------------------------------------------------------------------- host reference
def first_token_probs_host(q: np.ndarray, k: np.ndarray, length: int, *, tokens: int = FIRST_TOKENS,
                           causal: bool = True) -> np.ndarray:
    """One row, loops and float64: q [T, H, hd], k [KV, T, hd] -> probs [H, t, t] (see
    `first_token_probs` for which rows are zeroed)."""
    t = min(tokens, q.shape[0])
    h, hd, kv = q.shape[1], q.shape[2], k.shape[0]
    n = min(length, t)
    out = np.zeros((h, t, t))
    for head in range(h):
        for i in range(1 if causal else 0, n):
            keys = range(0, i + 1) if causal else range(n)
            s = np.array([q[i, head].astype(np.float64) @ k[head // (h // kv), j].astype(np.float64)
                          for j in keys]) / np.sqrt(hd)
            e = np.exp(s - s.max())
            out[head, i, list(keys)] = e / e.sum()
    return out


def cosine_distances_host(x: np.ndarray) -> np.ndarray:
    """x [n, F] -> [n, n] cosine distances in float64 (zero vectors: distance 1; equal rows: 0)."""
    n = x.shape[0]
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            a, b = x[i].astype(np.float64), x[j].astype(np.float64)
            na, nb = np.linalg.norm(a), np.linalg.norm(b)
            cos = 0.0 if na == 0 or nb == 0 else float(a @ b) / (na * nb)
            out[i, j] = 0.0 if np.array_equal(x[i], x[j]) else min(max(1.0 - cos, 0.0), 2.0)
    return out


def average_linkage_host(dist: np.ndarray, k: int) -> np.ndarray:
    """The plain rule: repeatedly merge the two clusters with the smallest mean pairwise distance
    (ties: the lowest pair of representatives) until k remain. Returns rep [n] (lowest member)."""
    dist = np.asarray(dist, np.float64)
    clusters = [[i] for i in range(dist.shape[0])]  # kept ordered by their lowest member
    while len(clusters) > k:
        best = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                d = dist[np.ix_(clusters[a], clusters[b])].mean()
                if best is None or d < best[0]:
                    best = (d, a, b)
        _, a, b = best
        clusters[a] = sorted(clusters[a] + clusters.pop(b))
    rep = np.zeros(dist.shape[0], np.int32)
    for members in clusters:
        rep[members] = members[0]
    return rep


def cluster_host(features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One row on the host: features [n, F] -> (reps [k] ascending, cluster [n] index into reps)."""
    rep = average_linkage_host(cosine_distances_host(features), k)
    reps = np.unique(rep)
    return reps.astype(np.int32), np.searchsorted(reps, rep).astype(np.int32)

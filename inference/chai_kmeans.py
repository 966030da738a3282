"""CHAI offline clustering on the host: k-means of a layer's heads, elbow curves, the choice of k.

Each calibration sample gives, per layer, one point per head: its causal attention-probability
matrix over the sample, flattened (T*T numbers). The paper's script (facebookresearch/chai,
`perform_offline_clustering.py`) runs scikit-learn `KMeans(k, random_state=2, n_init="auto")` on
those points for k = 1..H per sample and sums `inertia_` over samples. We do the same k-means
(Lloyd's algorithm with k-means++ seeding, a fixed seed, best of `N_INIT` starts) without
scikit-learn, and on Gram matrices: every k-means quantity is a function of the points' inner
products (|x_i - mean(S)|^2 = G_ii - 2 mean_s G_is + mean_{s,t} G_st), and a layer's Gram matrix is
[H, H] where its points have T*T coordinates. At KV granularity a group's point is its heads' points
concatenated, so its Gram matrix is a sum of head Gram blocks (`group_gram`).

**Choice of k (`auto`).** With I_k the inertia summed over samples (I_n = 0 for n items), the
unexplained share u_k = I_k / I_1 is the part of the heads' disagreement (their spread around one
shared score matrix) that k clusters leave. `auto` takes the smallest k with u_k <= tolerance. Why
this and not the maximum distance to the chord (kneedle): kneedle finds a knee in every curve, even
a straight line, which is the shape of a layer whose heads do not cluster at all, where the paper
keeps every head; the tolerance rule keeps every head there (a straight line reaches u <= 0.1 only
at k = n for n <= 10) and stops at the elbow where the curve drops steeply. u is scale-free, so one
tolerance serves every layer and model; a layer whose heads are all alike (I_1 = 0) takes k = 1.
"""

from __future__ import annotations

import numpy as np

N_INIT = 4
MAX_ITER = 100
SEED = 0
DEFAULT_TOLERANCE = 0.1

__all__ = ["kmeans_gram", "inertia_curve", "group_gram", "unexplained", "choose_k", "canonical_labels",
           "N_INIT", "SEED", "DEFAULT_TOLERANCE"]


def _sq_distances(gram: np.ndarray) -> np.ndarray:
    """gram [n, n] -> squared distances between the points [n, n] (>= 0)."""
    diag = np.diag(gram)
    return np.maximum(diag[:, None] + diag[None, :] - 2 * gram, 0.0)


def _centroid_distances(gram: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Squared distance of every point to every cluster mean [n, k] (inf for an empty cluster)."""
    n = len(labels)
    onehot = np.zeros((n, k))
    onehot[np.arange(n), labels] = 1.0
    counts = onehot.sum(0)
    safe = np.maximum(counts, 1.0)
    cross = gram @ onehot / safe  # mean inner product with the members
    within = np.einsum("sk,st,tk->k", onehot, gram, onehot) / safe ** 2  # |mean|^2
    dist = np.maximum(np.diag(gram)[:, None] - 2 * cross + within[None, :], 0.0)
    dist[:, counts == 0] = np.inf
    return dist


def _fill_empty(gram: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Give every empty cluster the point farthest from its own mean (taken from a cluster of >= 2)."""
    labels = labels.copy()
    while len(np.unique(labels)) < k:
        empty = int(np.setdiff1d(np.arange(k), labels)[0])
        dist = _centroid_distances(gram, labels, k)
        own = dist[np.arange(len(labels)), labels]
        movable = np.bincount(labels, minlength=k)[labels] > 1
        labels[int(np.argmax(np.where(movable, own, -1.0)))] = empty
    return labels


def _kmeans_pp(d2: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """k-means++ seeding: each next centre drawn with probability proportional to its squared
    distance to the nearest centre so far (uniformly among the rest when all are 0)."""
    n = d2.shape[0]
    centers = [int(rng.integers(n))]
    closest = d2[centers[0]].copy()
    for _ in range(1, k):
        weight = closest.copy()
        weight[centers] = 0.0
        if weight.sum() <= 0:
            rest = [i for i in range(n) if i not in centers]
            centers.append(rest[int(rng.integers(len(rest)))])
        else:
            centers.append(int(rng.choice(n, p=weight / weight.sum())))
        closest = np.minimum(closest, d2[centers[-1]])
    return centers


def _lloyd(gram: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Alternate assignment and update from `labels` until stable; (labels, inertia)."""
    for _ in range(MAX_ITER):
        labels = _fill_empty(gram, labels, k)
        new = np.argmin(_centroid_distances(gram, labels, k), axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
    labels = _fill_empty(gram, labels, k)
    dist = _centroid_distances(gram, labels, k)
    return labels, float(dist[np.arange(len(labels)), labels].sum())


def kmeans_gram(gram: np.ndarray, k: int, seed: int = SEED, n_init: int = N_INIT) -> tuple[np.ndarray, float]:
    """k-means of the n points whose Gram matrix is gram [n, n]: (labels [n], inertia), the best of
    `n_init` k-means++ starts drawn from `seed` (deterministic)."""
    gram = np.asarray(gram, np.float64)
    n = gram.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if k == n:
        return np.arange(n), 0.0
    d2 = _sq_distances(gram)
    rng = np.random.default_rng(seed)
    best: tuple[np.ndarray, float] | None = None
    for _ in range(n_init if k > 1 else 1):
        centers = _kmeans_pp(d2, k, rng)
        labels, inertia = _lloyd(gram, np.argmin(d2[:, centers], axis=1), k)
        if best is None or inertia < best[1]:
            best = (labels, inertia)
    return best


def inertia_curve(gram: np.ndarray, seed: int = SEED) -> np.ndarray:
    """Inertia for k = 1..n of one sample's points: [n]."""
    n = gram.shape[0]
    return np.array([kmeans_gram(gram, k, seed)[1] for k in range(1, n + 1)])


def group_gram(gram: np.ndarray, num_kv_heads: int) -> np.ndarray:
    """Head Gram [..., H, H] -> KV-group Gram [..., KV, KV]: a group's point is its G heads' points
    concatenated in head order, so <group a, group b> = sum_m <head aG+m, head bG+m>."""
    h = gram.shape[-1]
    g = h // num_kv_heads
    blocks = gram.reshape(*gram.shape[:-2], num_kv_heads, g, num_kv_heads, g)
    return np.einsum("...ambm->...ab", blocks)


def unexplained(inertia: np.ndarray) -> np.ndarray:
    """u_k = I_k / I_1 (0 everywhere when I_1 = 0: the items are all alike)."""
    inertia = np.maximum(np.asarray(inertia, np.float64), 0.0)
    return inertia / inertia[0] if inertia[0] > 0 else np.zeros_like(inertia)


def choose_k(inertia: np.ndarray, tolerance: float = DEFAULT_TOLERANCE) -> int:
    """The `auto` rule: the smallest k with u_k <= tolerance (see the module docstring)."""
    u = unexplained(inertia)
    return int(np.flatnonzero(u <= tolerance + 1e-12)[0]) + 1


def canonical_labels(labels: np.ndarray) -> list[int]:
    """Renumber clusters by their lowest member (cluster 0 holds item 0), the order of `jaxmodels.chai`."""
    order: dict[int, int] = {}
    for label in np.asarray(labels).tolist():
        order.setdefault(label, len(order))
    return [order[label] for label in np.asarray(labels).tolist()]

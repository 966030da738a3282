"""Activation-aware low-rank compression: truncate by the error on real inputs (SVD-LLM's whitening).

Plain truncated SVD keeps the directions of a weight W [m, n] with the largest singular values. What
matters is the layer's output on the inputs it sees, ||X W - X W'||_F. With the Gram matrix
G = X^T X = L L^T (Cholesky), that error is ||L^T (W - W')||_F, so the best rank-r W' is L^{-T}
times the rank-r SVD of L^T W, and its error is the root of the discarded squared singular values of
L^T W (Wang et al., "SVD-LLM", 2024). Plain SVD of SmolLM2-135M at rank ratio 0.25 takes held-out
perplexity from 8.7 to 3e8 (BENCHMARKS.md, low-rank compression): the directions it drops are
small in W but large in what the activations use.

The Grams come from calibration text (the stdlib *train* split; perplexity is measured on the
held-out split), one forward and backward pass per batch with every targeted weight wrapped in a
`GramTap`. G gets `damp` x its mean diagonal added (GPTQ's 1% convention), so input channels the
calibration text never used keep G positive definite and the fit does not rest on them alone.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxmodels.config import LlamaConfig
from jaxmodels.model import Params, forward
from jaxmodels.params import stack_layers, unstack_layers
from jaxmodels.weights import FACTORIZABLE, GramTap, LowRank

Grams = list[dict[str, np.ndarray]]  # per layer: {weight name: X^T X [m, m]} in float64
DAMP = 0.01  # G + DAMP * mean(diag G) * I


def _is_tap(x) -> bool:
    return isinstance(x, GramTap)


def tap_params(config: LlamaConfig, params: Params, targets: Sequence[str] = FACTORIZABLE) -> Params:
    """The model with each targeted matmul weight of every layer wrapped in a `GramTap` (zero Grams),
    restacked into the config's segments."""
    layers = []
    for lp in unstack_layers(params)["layers"]:
        layers.append({k: GramTap(w, jnp.zeros((w.shape[-2],) * 2, jnp.float32)) if k in targets else w
                       for k, w in lp.items()})
    return {**params, "layers": stack_layers(config, layers)}


def _gram_program(config: LlamaConfig):
    """jit(tapped params, tokens [B, T]) -> the tree of X^T X per tap (None elsewhere) for one batch."""
    def grams(tapped: Params, tokens: jax.Array):
        zeros = jax.tree_util.tree_map(lambda t: t.gram if _is_tap(t) else None, tapped, is_leaf=_is_tap)

        def logits_sum(g):
            p = jax.tree_util.tree_map(lambda t, gi: GramTap(t.w, gi) if _is_tap(t) else t, tapped, g,
                                       is_leaf=_is_tap)
            return jnp.sum(forward(p, config, tokens)[0])
        return jax.grad(logits_sum)(zeros)
    return jax.jit(grams)


def _per_layer(tree: Params) -> Grams:
    """The stacked gradient tree's `layers` -> one {name: [m, m]} dict per layer (float64)."""
    layers = tree["layers"]
    out = []
    for seg in ((layers,) if isinstance(layers, dict) else layers):
        grams = {k: np.asarray(v, np.float64) for k, v in seg.items() if v is not None}
        n = next(iter(grams.values())).shape[0]
        out += [{k: g[i] for k, g in grams.items()} for i in range(n)]
    return out


def activation_grams(config: LlamaConfig, params: Params, batches: Iterable[np.ndarray],
                     targets: Sequence[str] = FACTORIZABLE, progress: bool = False) -> Grams:
    """Sum over `batches` (token arrays [B, T]) of X^T X for every targeted weight of every layer."""
    tapped = tap_params(config, jax.tree_util.tree_map(jnp.asarray, params), targets)
    program = _gram_program(config)
    total: Grams | None = None
    for tokens in tqdm(list(batches), desc="activation statistics", unit="batch", disable=not progress,
                       leave=False):
        grams = _per_layer(jax.device_get(program(tapped, jnp.asarray(tokens, jnp.int32))))
        total = grams if total is None else [{k: t[k] + g[k] for k in t} for t, g in zip(total, grams)]
    if total is None:
        raise ValueError("activation_grams needs at least one batch of calibration tokens")
    return total


def cholesky_factor(gram: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """L (lower triangular, float64) with L L^T = gram + damp * mean(diag gram) * I."""
    g = np.asarray(gram, np.float64)
    scale = max(float(np.mean(np.diag(g))), 1e-12)
    return np.linalg.cholesky(g + damp * scale * np.eye(g.shape[0]))


def whitened_singular_values(w: np.ndarray, gram: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """Singular values of L^T W: the spectrum that ranks by energy or stable rank should read."""
    return np.linalg.svd(cholesky_factor(gram, damp).T @ np.asarray(w, np.float64), compute_uv=False)


def whitened_factor(w: np.ndarray, gram: np.ndarray, rank: int, damp: float = DAMP) -> LowRank:
    """The rank-`rank` factors of w [m, n] with the least output error on inputs whose Gram is `gram`:
    u = L^{-T} U_r sqrt(S_r) [m, r], v = sqrt(S_r) V_r^T [r, n] from the SVD of L^T W (float32 out)."""
    lower = cholesky_factor(gram, damp)
    U, S, Vt = np.linalg.svd(lower.T @ np.asarray(w, np.float64), full_matrices=False)
    root = np.sqrt(S[:rank])
    u = np.linalg.solve(lower.T, U[:, :rank] * root)
    return LowRank(u=u.astype(np.float32), v=(root[:, None] * Vt[:rank]).astype(np.float32))

"""Low-rank training: Pufferfish and Cuttlefish (DESIGN.md §6), as small pure functions the train loop calls.

Both train full rank first, then switch once: every targeted matmul weight W [m, n] of the layers
[full_rank_layers, L) becomes `LowRank(u = U_r sqrt(S_r), v = sqrt(S_r) V_r^T)` by truncated SVD
(batched over the stacked layers, on device), the step is rebuilt and recompiled for the new tree.

* **Pufferfish** switches after `lowrank.warmup_steps` steps at rank `rank_ratio * min(m, n)`.
* **Cuttlefish** measures each targeted weight's stable rank ||W||_F^2 / ||W||_2^2 every
  `track_every` steps (power iteration on device), scaled so a random Gaussian init counts as full
  rank; it switches at the first tracked step >= `warmup_steps` where every scaled rank of the layers
  it will factorize moved by at most `threshold * min(m, n)` over the last `window` measurements,
  at the scaled stable rank. The change is measured against the full rank, not the rank itself: a
  rank that drifts 21 -> 23 of 512 changes the factorization by nothing that matters, and a
  rank-relative test never settled in a 300-step run (benchmarks/history/low-rank-training.md). The
  reference code smooths per-epoch ranks with an EMA and thresholds |d rank / d epoch| in rank units
  instead; its units (epochs, CNN layer sizes) do not carry over to steps of a language model.

Ranks are rounded up to a multiple of `rank_multiple` (matmul tiles) and clipped to [1, min(m, n)].

Optimizer state at the switch (`switch_opt_state`): the AdamW moments of untouched weights
(embeddings, norms, head, dense layers) are kept, so their effective step sizes do not jump; the
moments of replaced weights are re-initialised to zero. Projecting them (mu_u = mu_W V^T ...) is
possible for the first moment but not for the second (nu is elementwise, not a linear map of W), and
a fresh zero state with the kept step count gives small, bias-corrected first updates, a gentle
restart of just the new factors.

The switch is recorded in RUN_DIR/lowrank.json ({"switch_step", "layer_variants"}); a resume whose
checkpoint is after that step rebuilds the low-rank tree before restoring (`resume_variants`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.config import LlamaConfig
from jaxmodels.params import Params, stack_layers, unstack_layers
from jaxmodels.weights import WEIGHTS, LayerVariants, LowRank, layer_ranks

RECORD = "lowrank.json"


# --------------------------------------------------------------------------- ranks
def pays(m: int, n: int, rank: int) -> bool:
    """Whether u [m, r] + v [r, n] is smaller than the dense [m, n] (else the weight stays dense)."""
    return (m + n) * rank < m * n


def round_rank(rank: float, m: int, n: int, multiple: int = 8) -> int:
    """`rank` rounded up to a multiple of `multiple`, clipped to [1, min(m, n)]."""
    r = int(math.ceil(max(rank, 1.0) / multiple) * multiple)
    return max(1, min(r, m, n))


def pufferfish_variants(config: LlamaConfig, targets: Sequence[str], rank_ratio: float,
                        full_rank_layers: int, multiple: int = 8) -> LayerVariants:
    """Pufferfish's hybrid: layers [0, full_rank_layers) dense, the rest with every target at
    `rank_ratio * min(m, n)`, rounded."""
    ranks = {}
    for name in targets:
        m, n = WEIGHTS[name].shape(config)
        ranks[name] = round_rank(rank_ratio * min(m, n), m, n, multiple)
    return LayerVariants.hybrid(config.num_hidden_layers, ranks, full_rank_layers)


def cuttlefish_variants(config: LlamaConfig, scaled: dict[str, np.ndarray], full_rank_layers: int,
                        multiple: int = 8) -> LayerVariants:
    """Per layer, each target at its scaled stable rank (`scaled[name]` [L]), rounded; a weight
    whose rank would not save parameters (`pays`) stays dense."""
    per_layer = []
    for i in range(config.num_hidden_layers):
        entry = {}
        if i >= full_rank_layers:
            for name, r in scaled.items():
                m, n = WEIGHTS[name].shape(config)
                rank = round_rank(float(r[i]), m, n, multiple)
                if pays(m, n, rank):  # a high stable rank keeps the weight dense
                    entry[name] = rank
        per_layer.append(entry)
    return LayerVariants.from_ranks(per_layer)


# --------------------------------------------------------------------------- stable rank
def random_stable_rank(m: int, n: int) -> float:
    """Stable rank of an m x n i.i.d. Gaussian matrix: ||W||_F^2 ~ mn s^2, ||W||_2 ~ s (sqrt m + sqrt n)."""
    return m * n / (math.sqrt(m) + math.sqrt(n)) ** 2


def stable_rank(w: jax.Array, iters: int = 20) -> jax.Array:
    """||W||_F^2 / ||W||_2^2 of w [..., m, n] (batched over leading axes), the spectral norm by
    `iters` power iterations on W^T W from a fixed start vector (deterministic, no full SVD)."""
    w = w.astype(jnp.float32)
    x = jnp.ones(w.shape[:-2] + (w.shape[-1],), jnp.float32) / math.sqrt(w.shape[-1])  # [..., n]

    def body(_, x):
        y = jnp.einsum("...mn,...n->...m", w, x)
        z = jnp.einsum("...mn,...m->...n", w, y)
        return z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + 1e-30)

    x = jax.lax.fori_loop(0, iters, body, x)
    sigma2 = jnp.sum(jnp.einsum("...mn,...n->...m", w, x) ** 2, axis=-1)
    return jnp.sum(w * w, axis=(-2, -1)) / sigma2


def scaled_stable_rank(w: jax.Array, iters: int = 20) -> jax.Array:
    """Stable rank scaled so a random init counts as full rank: sr * min(m, n) / sr_random, <= min(m, n)."""
    m, n = w.shape[-2:]
    return jnp.minimum(stable_rank(w, iters) * min(m, n) / random_stable_rank(m, n), min(m, n))


def track_ranks(params: Params, targets: Sequence[str], iters: int = 20) -> dict[str, jax.Array]:
    """{target: scaled stable rank [L]} of a dense, single-segment stacked layer tree (jit this)."""
    return {name: scaled_stable_rank(params["layers"][name], iters) for name in targets}


def ranks_settled(history: Sequence[dict[str, Sequence[float]]], window: int, threshold: float,
                  full: Mapping[str, int], first_layer: int = 0) -> bool:
    """Whether every tracked rank of layers [first_layer, L) changed by at most `threshold * full[name]`
    over the last `window` measurements (history: one {target: [L ranks]} per measurement, oldest
    first; full: each target's min(m, n))."""
    if len(history) <= window:
        return False
    old, new = history[-1 - window], history[-1]
    return all(abs(b - a) <= threshold * full[k]
               for k in new for a, b in zip(old[k][first_layer:], new[k][first_layer:]))


def due(lr: Any, config: LlamaConfig, params: Params, step: int, memo: dict[str, Any]) -> LayerVariants | None:
    """The variants to switch to before training step `step` + 1, or None (`lr`: the config's
    LowRankSection). Pufferfish: once `warmup_steps` steps are done. Cuttlefish: measures the scaled
    stable ranks every `track_every` steps into memo['lowrank_history'] (checkpointed with the
    run, so a resume sees the same history) and switches once they have settled."""
    if lr.method == "pufferfish":
        if step < lr.warmup_steps:
            return None
        return pufferfish_variants(config, lr.targets, lr.rank_ratio, lr.full_rank_layers, lr.rank_multiple)
    history = memo["lowrank_history"]
    if step % lr.track_every or (history and history[-1]["step"] >= step):
        return None
    if "track" not in memo:  # compiled once per run
        memo["track"] = jax.jit(lambda p: track_ranks(p, lr.targets, lr.power_iters))
    ranks = jax.device_get(memo["track"](params))
    history.append({"step": step, "ranks": {k: [float(x) for x in v] for k, v in ranks.items()}})
    full = {name: min(WEIGHTS[name].shape(config)) for name in lr.targets}
    settled = ranks_settled([h["ranks"] for h in history], lr.window, lr.threshold, full, lr.full_rank_layers)
    if step < lr.warmup_steps or not settled:
        return None
    scaled = {k: np.asarray(v) for k, v in history[-1]["ranks"].items()}
    return cuttlefish_variants(config, scaled, lr.full_rank_layers, lr.rank_multiple)


# --------------------------------------------------------------------------- the switch
_svd = jax.jit(lambda w: jnp.linalg.svd(w, full_matrices=False))  # [L, m, k], [L, k], [L, k, n]


def _factor(w: jax.Array, ranks: Sequence[int]) -> list[LowRank]:
    """Per layer, the truncated-SVD factors of w [L, m, n] at ranks[i] (one batched SVD, finished
    before this returns: see `switch_params`)."""
    U, S, Vt = jax.block_until_ready(_svd(w.astype(jnp.float32)))
    root = jnp.sqrt(S)
    return [LowRank(u=(U[i, :, :r] * root[i, :r]).astype(w.dtype),
                    v=(root[i, :r, None] * Vt[i, :r]).astype(w.dtype)) for i, r in enumerate(ranks)]


def restructure(new: LlamaConfig, tree: Params, factor: Any) -> Params:
    """A dense param-shaped tree (params or an AdamW moment) in `new`'s layout: weights that
    `new.layer_variants` factorizes are replaced by `factor(w [L, m, n], ranks [L]) -> [LowRank]`
    (None rank = a dense layer), the layers restacked into the new segments."""
    layers = unstack_layers(tree)["layers"]
    per_layer = [dict(lp) for lp in layers]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
    names = {k for i in range(len(layers)) for k in layer_ranks(new, i)}
    for name in sorted(names):
        idx = [i for i in range(len(layers)) if name in layer_ranks(new, i)]
        parts = factor(stacked[name][jnp.asarray(idx)], [layer_ranks(new, i)[name] for i in idx])
        for i, part in zip(idx, parts):
            per_layer[i][name] = part
    return {**tree, "layers": stack_layers(new, per_layer)}


def switch_params(new: LlamaConfig, params: Params) -> Params:
    """Pufferfish/Cuttlefish's split of dense params into `new`'s low-rank tree (SVD on device).

    Call it outside `jit`: it runs one batched SVD program per weight kind and waits for each.
    jaxlib's CPU SVD spreads a batch over the thread pool its program runs on and blocks until the
    batch is done, so two SVDs running at once on a 2-thread pool each hold a thread and wait for
    the other: one program with every SVD in it hung at d=512, 4 layers (independent SVDs run
    concurrently, and XLA drops an optimization barrier that would order them)."""
    return restructure(new, params, _factor)


def _zeros(w: jax.Array, ranks: Sequence[int]) -> list[LowRank]:
    m, n = w.shape[-2:]
    return [LowRank(u=jnp.zeros((m, r), w.dtype), v=jnp.zeros((r, n), w.dtype)) for r in ranks]


def switch_opt_state(new: LlamaConfig, old_params: Params, opt_state: Any) -> Any:
    """The optimizer state for the low-rank tree: every param-shaped subtree (AdamW mu, nu) is
    restructured with zero moments for the new factors and its other entries kept; step counts kept."""
    pdef = jax.tree_util.tree_structure(old_params)
    is_moment = lambda x: jax.tree_util.tree_structure(x) == pdef  # noqa: E731
    return jax.tree_util.tree_map(lambda x: restructure(new, x, _zeros) if is_moment(x) else x,
                                  opt_state, is_leaf=is_moment)


def frobenius_decay(params: Params) -> jax.Array:
    """Sum over factorized weights of ||u @ v||_F^2, as tr((u^T u)(v v^T)): r x r work, not m x n."""
    total = jnp.zeros((), jnp.float32)
    leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, LowRank))
    for w in leaves:
        if isinstance(w, LowRank):
            uu = jnp.einsum("...mr,...ms->...rs", w.u, w.u)
            vv = jnp.einsum("...rn,...sn->...rs", w.v, w.v)
            total = total + jnp.sum(uu * vv).astype(jnp.float32)
    return total


# --------------------------------------------------------------------------- the record
def write_record(run_dir: Path, step: int, variants: LayerVariants, extra: dict[str, Any]) -> None:
    """RUN_DIR/lowrank.json: the switch step and the variants, so a resume rebuilds the low-rank tree."""
    record = {"switch_step": int(step), "layer_variants": variants.to_json(), **extra}
    tmp = run_dir / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(run_dir / RECORD)


def resume_variants(run_dir: Path, checkpoint_step: int | None) -> tuple[int, LayerVariants] | None:
    """(switch step, variants) when the checkpoint to resume from is after the recorded switch (a
    switch at step s happens after s steps, after the checkpoint of step s); None otherwise (a
    fresh run, or a checkpoint from before the switch: the resumed run switches again, identically)."""
    path = run_dir / RECORD
    if checkpoint_step is None or not path.is_file():
        return None
    record = json.loads(path.read_text())
    if checkpoint_step <= record["switch_step"]:  # the checkpoint of the switch step is saved before it
        return None
    return record["switch_step"], LayerVariants.from_json(record["layer_variants"])

"""The parameter tree, derived from the weight table (`jaxmodels.weights`): shapes, init, checks,
building from and flattening to named tensors, and the layer stack's layouts.

Tree (L layers, D hidden, F mlp, V vocab, H*hd query width, KV*hd key/value width):

    embed       [V, D]
    layers      attn_norm [L, D]   wq [L, D, H*hd]  wk, wv [L, D, KV*hd]  wo [L, H*hd, D]
                mlp_norm  [L, D]   w_gate, w_up [L, D, F]                 w_down [L, F, D]
    final_norm  [D]
    lm_head     [D, V]   (absent when embeddings are tied)

A matmul weight that the config's `layer_variants` factorizes is a `LowRank(u [L, m, r], v [L, r, n])`
in place of the array. `layers` takes one of three layouts:

  * a dict of stacked weights (leading axis = layer): one homogeneous segment, the usual case;
  * a tuple of such dicts, one per segment, when layers differ (hybrid low-rank: the first k layers
    dense, the rest factorized); each segment is scanned on its own;
  * a tuple of per-layer dicts (no layer axis), from `unstack_layers`, run unrolled.

A stacked dict is told from a per-layer one by its norm weight's rank (2 vs 1).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels import huge_pages
from jaxmodels.config import LlamaConfig
from jaxmodels.quantize import Int8Weight
from jaxmodels.weights import (FACTORIZABLE, LAYER_KEYS, LAYER_WEIGHTS, MODEL_WEIGHTS, LowRank, OutputMajor,
                               WeightSpec, factor_shapes, layer_ranks, segments)

Params = dict[str, Any]
Layers = Params | tuple[Params, ...]
__all__ = ["LAYER_KEYS", "Params", "param_shapes", "init_params", "check_param_shapes", "build_params",
           "iter_weights", "layer_pieces", "layer_slice", "unstack_layers", "decode_layout", "is_stacked",
           "stack_layers", "svd_factor", "with_variants"]


def _layer_shapes(config: LlamaConfig, layer: int, lead: tuple[int, ...]) -> Params:
    """One layer's (or a segment's, with `lead` = (n,)) weight shapes; LowRank of shapes if factorized."""
    ranks, out = layer_ranks(config, layer), {}
    for spec in LAYER_WEIGHTS:
        shape = spec.shape(config)
        if spec.name in ranks:
            f = factor_shapes(shape, ranks[spec.name])
            out[spec.name] = LowRank(u=lead + f.u, v=lead + f.v)
        else:
            out[spec.name] = lead + shape
    return out


def param_shapes(config: LlamaConfig, stacked: bool = True) -> Params:
    """The shape of every parameter (tuples; `LowRank` of tuples for a factorized weight), in the
    stacked layout above, or with `layers` as per-layer dicts when not `stacked`."""
    shapes: Params = {s.name: s.shape(config) for s in MODEL_WEIGHTS if s.present(config)}
    if not stacked:
        shapes["layers"] = tuple(_layer_shapes(config, i, ()) for i in range(config.num_hidden_layers))
        return shapes
    segs = tuple(_layer_shapes(config, a, (b - a,)) for a, b in segments(config))
    shapes["layers"] = segs[0] if len(segs) == 1 else segs
    return shapes


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def init_params(config: LlamaConfig, key: jax.Array, dtype: jnp.dtype = jnp.float32,
                std: float = 0.02) -> Params:
    """Random weights: normal with `std` (as HF initializes Llama), norms at one. A factorized
    weight draws u and v with std sqrt(std / sqrt(r)) each, so u @ v has entries of about `std`."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(config), is_leaf=_is_shape)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, shape), k in zip(leaves, keys):
        name = [getattr(p, "key", None) for p in path if isinstance(getattr(p, "key", None), str)][-1]
        if name.endswith("norm"):
            out.append(jnp.ones(shape, dtype))
            continue
        factor = getattr(path[-1], "name", None)
        rank = shape[-1] if factor == "u" else shape[-2] if factor == "v" else None
        scale = std if rank is None else (std / rank ** 0.5) ** 0.5
        out.append((scale * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


# --------------------------------------------------------------------------- checks
def _shape_problems(expected: Any, actual: Any, where: str) -> list[str]:
    """Every disagreement between an expected shape tree and actual parameters, by key path."""
    if isinstance(expected, LowRank):
        if not isinstance(actual, LowRank):
            got = tuple(actual.shape) if hasattr(actual, "shape") else type(actual).__name__
            return [f"{where}: layer_variants factorizes it (u {expected.u}, v {expected.v}) but it is "
                    f"dense {got}; factorize it, or drop its entry from the config's layer_variants"]
        return (_shape_problems(expected.u, actual.u, where + ".u")
                + _shape_problems(expected.v, actual.v, where + ".v"))
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"missing parameter {where} (expected a dict of {sorted(expected)})"]
        return [p for k, e in expected.items()
                for p in (_shape_problems(e, actual[k], f"{where}['{k}']") if k in actual
                          else [f"missing parameter {where}['{k}'] (expected {e})"])]
    if not _is_shape(expected):  # a tuple of segments or of layers
        if not isinstance(actual, (tuple, list)) or len(actual) != len(expected):
            return [f"{where}: expected {len(expected)} layer segments/layers as the config's layer_variants "
                    f"imply, got {type(actual).__name__} of {len(actual) if isinstance(actual, (tuple, list)) else 1}"]
        return [p for i, (e, a) in enumerate(zip(expected, actual)) for p in _shape_problems(e, a, f"{where}[{i}]")]
    if isinstance(actual, LowRank):
        return [f"{where}: it is factorized (rank {actual.rank}) but the config has no layer_variants entry "
                f"for it; load the checkpoint's layer_variants.json with it (or merge u @ v)"]
    if not hasattr(actual, "shape"):
        return [f"missing parameter {where} (expected {expected})"]
    if tuple(actual.shape) != tuple(expected):
        return [f"{where}: expected {tuple(expected)} from the config, got {tuple(actual.shape)}"]
    return []


def check_param_shapes(config: LlamaConfig, params: Params) -> None:
    """Raise a ValueError naming every parameter whose shape (or factorization) disagrees with the
    config. Accepts the stacked / segmented layout and the per-layer one (`unstack_layers`)."""
    layers = params.get("layers") if isinstance(params, dict) else None
    first = layers[0] if isinstance(layers, (tuple, list)) and layers else None
    stacked = not (isinstance(first, dict) and "attn_norm" in first and not is_stacked(first))
    problems = _shape_problems(param_shapes(config, stacked=stacked), params, "")
    if problems:
        raise ValueError("weights do not match the config (is config.json from the same model?):\n  "
                         + "\n  ".join(problems))


# --------------------------------------------------------------------------- layer stack layouts
def is_stacked(layer: Params) -> bool:
    """Whether a layers dict carries a leading layer axis (a segment) or is one layer's weights."""
    return jnp.ndim(layer["attn_norm"]) == 2


def layer_pieces(layers: Layers, start: int, stop: int) -> list[tuple[Params, bool]]:
    """Layers [start, stop) as runs to execute: (a stacked segment's slice, True) or (one layer, False)."""
    parts = (layers,) if isinstance(layers, dict) else layers
    out, first = [], 0
    for part in parts:
        n = part["attn_norm"].shape[0] if is_stacked(part) else 1
        lo, hi = max(start, first), min(stop, first + n)
        if lo < hi:
            if is_stacked(part):
                out.append((jax.tree_util.tree_map(lambda p: p[lo - first:hi - first], part), True))
            else:
                out.append((part, False))
        first += n
    return out


def layer_slice(params: Params, start: int, stop: int) -> Layers:
    """The `layers` value of layers [start, stop): a stacked dict (one segment), a tuple of
    segment dicts, or a tuple of per-layer dicts (unstacked)."""
    pieces = layer_pieces(params["layers"], start, stop)
    if len(pieces) == 1 and pieces[0][1]:
        return pieces[0][0]
    return tuple(p for p, _ in pieces)


def unstack_layers(params: Params) -> Params:
    """Same parameters with `layers` as a tuple of per-layer dicts (for unrolled execution).

    On CPU, matmuls on weights sliced from a stacked array inside `lax.scan` run at about half the
    memory bandwidth of matmuls on standalone arrays (measured: 30 ms vs 16 ms per token for the
    SmolLM2-135M layers), so decoding unstacks once and unrolls the layer loop. Training keeps the
    stacked form (compile time independent of depth).
    """
    layers = params["layers"]
    if isinstance(layers, (tuple, list)) and not is_stacked(layers[0]):
        return params
    out = []
    for seg in ((layers,) if isinstance(layers, dict) else layers):
        n = seg["attn_norm"].shape[0]
        out += [jax.tree_util.tree_map(lambda p: p[i], seg) for i in range(n)]
    return {**params, "layers": tuple(out)}


def _output_major(w: Any) -> Any:
    """One matmul weight in the output-major layout (factors and int8 values too); idempotent."""
    if isinstance(w, LowRank):
        return LowRank(u=_output_major(w.u), v=_output_major(w.v))
    if isinstance(w, Int8Weight):
        return Int8Weight(q=_output_major(w.q), scale=w.scale)
    if isinstance(w, OutputMajor) or jnp.ndim(w) != 2:
        return w
    return OutputMajor(jnp.asarray(w).T.copy())


def decode_layout(params: Params, output_major: bool | None = None) -> Params:
    """The parameters as decoding runs them: layers unstacked (`unstack_layers`) and, on CPU
    (output_major None) or when asked, every matmul weight `OutputMajor` (`layers.output_major_matmul`:
    decoding 8 rows of SmolLM2 1.43x faster on a 2-core EPYC, `benchmarks/decode_profile.py`).
    On CPU the large arrays then move into memory backed by 2 MiB pages (`huge_pages.place`:
    decoding 3-14% faster). One copy of the weights, made once per call; pass the result to skip
    it. Idempotent."""
    params = unstack_layers(jax.tree_util.tree_map(jnp.asarray, params))
    if not (jax.default_backend() == "cpu" if output_major is None else output_major):
        return params
    layers = tuple({k: _output_major(v) if k in FACTORIZABLE else v for k, v in lp.items()} for lp in params["layers"])
    out = {**params, "layers": layers}
    if "lm_head" in params:
        out["lm_head"] = _output_major(params["lm_head"])
    return huge_pages.place(out)


# --------------------------------------------------------------------------- named tensors
Take = Callable[[WeightSpec, "int | None", "str | None", tuple], np.ndarray]


def build_params(config: LlamaConfig, take: Take) -> Params:
    """The parameter tree, each tensor from `take(spec, layer, factor, shape)`: layer None for a
    model weight, factor "u" / "v" for a factorized weight's halves (else None), shape in our
    layout. Layers are stacked per segment (numpy)."""
    params: Params = {s.name: take(s, None, None, s.shape(config)) for s in MODEL_WEIGHTS if s.present(config)}
    segs = []
    for a, b in segments(config):
        ranks, seg = layer_ranks(config, a), {}
        for spec in LAYER_WEIGHTS:
            if spec.name in ranks:
                f = factor_shapes(spec.shape(config), ranks[spec.name])
                seg[spec.name] = LowRank(u=np.stack([take(spec, i, "u", f.u) for i in range(a, b)]),
                                         v=np.stack([take(spec, i, "v", f.v) for i in range(a, b)]))
            else:
                seg[spec.name] = np.stack([take(spec, i, None, spec.shape(config)) for i in range(a, b)])
        segs.append(seg)
    params["layers"] = segs[0] if len(segs) == 1 else tuple(segs)
    return params


def iter_weights(config: LlamaConfig, params: Params) -> Iterator[tuple[WeightSpec, int | None, str | None, Any]]:
    """Every tensor as (spec, layer or None, factor "u"/"v" or None, array in our layout), after
    checking the tree against the config."""
    check_param_shapes(config, params)
    for spec in MODEL_WEIGHTS:
        if spec.present(config):
            yield spec, None, None, params[spec.name]
    layer = 0
    for part, stacked in layer_pieces(params["layers"], 0, config.num_hidden_layers):
        n = part["attn_norm"].shape[0] if stacked else 1
        for spec in LAYER_WEIGHTS:
            w = part[spec.name]
            for i in range(n):
                for factor in (("u", "v") if isinstance(w, LowRank) else (None,)):
                    x = w if factor is None else getattr(w, factor)
                    yield spec, layer + i, factor, (x[i] if stacked else x)
        layer += n


# --------------------------------------------------------------------------- changing variants
def stack_layers(config: LlamaConfig, layers: list[Params]) -> Layers:
    """Per-layer dicts -> the stacked `layers` value for the config's segments."""
    segs = tuple(jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers[a:b]) for a, b in segments(config))
    return segs[0] if len(segs) == 1 else segs


def svd_factor(w: jax.Array | np.ndarray, rank: int) -> LowRank:
    """The best rank-`rank` factorization of w [m, n] (truncated SVD, Pufferfish's split):
    u = U_r sqrt(S_r) [m, r], v = sqrt(S_r) V_r^T [r, n]; exact at rank min(m, n). A numpy `w` is
    factorized on the host (LAPACK: several times faster than XLA:CPU's SVD for SmolLM2's
    [576, 1536] weights) and gives numpy factors; a jax array gives jax factors."""
    xp = np if isinstance(w, np.ndarray) else jnp
    U, S, Vt = xp.linalg.svd(xp.asarray(w, xp.float32), full_matrices=False)
    root = xp.sqrt(S[:rank])
    return LowRank(u=(U[:, :rank] * root).astype(w.dtype), v=(root[:, None] * Vt[:rank]).astype(w.dtype))


Factorize = Callable[[int, str, Any, int], LowRank]  # (layer, weight name, dense w, rank) -> factors


def with_variants(config: LlamaConfig, params: Params, variants: Any,
                  on_factor: Callable[[], Any] | None = None,
                  factorize: Factorize | None = None) -> tuple[LlamaConfig, Params]:
    """The model re-expressed with `variants` (a `LayerVariants`, or None for all dense): weights the
    variants factorize are split by `factorize` (default `svd_factor`; factorized ones are merged
    first), the others are merged to dense; layers are restacked into the new segments.
    `on_factor()` is called after each factorization (a progress bar's update)."""
    new = config.replace(layer_variants=variants)
    factorize = factorize or (lambda i, name, w, rank: svd_factor(w, rank))
    per_layer = []
    for i, lp in enumerate(unstack_layers(params)["layers"]):
        ranks, out = layer_ranks(new, i), {}
        for k, w in lp.items():
            w = w.merge() if isinstance(w, LowRank) else w
            out[k] = factorize(i, k, w, ranks[k]) if k in ranks else w
            if k in ranks and on_factor is not None:
                on_factor()
        per_layer.append(out)
    return new, {**params, "layers": stack_layers(new, per_layer)}

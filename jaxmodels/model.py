"""The Llama-family decoder: a pure functional core over a parameter pytree, and an NNX shell.

The parameter tree and its layouts are described in `jaxmodels.params` (derived from the weight
table in `jaxmodels.weights`). Layers are stacked along a leading axis and run with `lax.scan`, so
compile time does not grow with depth and any layer range `[start, stop)` is a slice of the stack:
early exit, self-speculative drafting/verification and pipeline stages all run this same code.
Where layers differ (hybrid low-rank) the stack is a few homogeneous segments, each scanned.
`decoder_layer` is one layer; `run_layers` only iterates it. `exit_logits` is the shared exit
(final norm + LM head) and applies to the hidden state after any layer.

Attention (and its cache) follows an optional per-layer plan (`jaxmodels.attention_plan`): index
maps as runtime data, e.g. CHAI's clustered heads. Without plans every program is the dense one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels import cpu_matvec
from jaxmodels.attention import KVState, attend
from jaxmodels.attention_plan import AttentionPlan, LayerPlans, plan_signature, stack_plans
from jaxmodels.config import LlamaConfig
from jaxmodels.kv_cache import KVCache
from jaxmodels.layers import (apply_rope, dense, dense_many, output_major_matmul, rms_norm, rope_cos_sin,
                              rope_inverse_frequencies, swiglu)
from jaxmodels.quantize import Int8Rows
from jaxmodels.params import (LAYER_KEYS, Params, check_param_shapes, init_params, layer_pieces, layer_slice,
                              param_shapes, unstack_layers)
from jaxmodels.weights import LAYER_WEIGHTS, MODEL_WEIGHTS

__all__ = ["LAYER_KEYS", "Params", "check_param_shapes", "init_params", "layer_slice", "param_shapes",
           "unstack_layers", "embed_tokens", "decode_embedding", "exit_logits", "LayerContext", "decoder_layer",
           "run_layers", "forward", "plans_from_prefix", "LayerStack", "Llama"]


# --------------------------------------------------------------------------- functional core
def embed_tokens(params: Params, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] int -> hidden [B, T, D]."""
    table = params["embed"]
    if isinstance(table, Int8Rows):
        return jnp.take(table.q, tokens, axis=0).astype(table.dtype) * table.row_scales(tokens)
    return jnp.take(table, tokens, axis=0)


def decode_embedding(params: Params, tokens: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`embed_tokens` as decoding starts from it: in `dtype` (the KV cache's, `KVCache.dtype`). A
    bf16 table on CPU is read by `cpu_matvec.take_rows`: XLA:CPU gathers bf16 through float32, and
    in a decode loop it hoisted that widening of the whole table out of the loop (SmolLM2: a 113 MB
    float32 copy, 35 ms, on every `generate` call; `benchmarks.decode_profile`)."""
    table = params["embed"]
    if isinstance(table, Int8Rows) or not cpu_matvec.takes_rows(table):
        return embed_tokens(params, tokens).astype(dtype)
    rows = jax.lax.platform_dependent(cpu=lambda: cpu_matvec.take_rows(table, tokens),
                                      default=lambda: embed_tokens(params, tokens))
    return rows.astype(dtype)


def exit_logits(params: Params, config: LlamaConfig, h: jax.Array) -> jax.Array:
    """The shared exit: final RMSNorm + LM head on hidden states [..., D] -> logits [..., V]."""
    h = rms_norm(h, params["final_norm"], config.rms_norm_eps)
    if config.tie_word_embeddings:
        table = params["embed"]
        if isinstance(table, Int8Rows):  # weight-only int8: scales per token and group of features
            return output_major_matmul(table.q, h, table.scale)
        return output_major_matmul(table, h)  # the table [V, D] is the head, output-major
    return dense(params["lm_head"], h)


def _qkv(lp: Params, config: LlamaConfig, h: jax.Array, cos: jax.Array, sin: jax.Array):
    """Pre-norm projections: q [B, T, H, hd] and k, v [B, KV, T, hd], RoPE applied to q and k."""
    b, t, _ = h.shape
    hd, nh, nkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    x = rms_norm(h, lp["attn_norm"], config.rms_norm_eps)
    q, k, v = dense_many([lp["wq"], lp["wk"], lp["wv"]], x)  # one CPU decode kernel call where it applies
    q = apply_rope(q.reshape(b, t, nh, hd), cos, sin)
    k = apply_rope(k.reshape(b, t, nkv, hd), cos, sin)
    v = v.reshape(b, t, nkv, hd)
    return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _mlp_block(lp: Params, config: LlamaConfig, h: jax.Array) -> jax.Array:
    x = rms_norm(h, lp["mlp_norm"], config.rms_norm_eps)
    return h + swiglu(x, lp["w_gate"], lp["w_up"], lp["w_down"])


@dataclasses.dataclass(frozen=True)
class LayerContext:
    """What every layer of one call shares: the config, RoPE tables [B, T, hd], positions [B, T]
    and each row's cache write position [B] (= positions[:, 0])."""
    config: LlamaConfig
    cos: jax.Array
    sin: jax.Array
    positions: jax.Array
    write_at: jax.Array
    attention_impl: str = "auto"  # the KV cache's choice (`KVCache.attention_impl`)
    attention_interpret: bool = False


LayerState = KVState | None  # this layer's cache buffers (K [B*Ck, S, hd], V [B*KV, S, hd]), or None


def decoder_layer(lp: Params, h: jax.Array, state: LayerState, ctx: LayerContext,
                  plan: AttentionPlan | None = None) -> tuple[jax.Array, LayerState, Any]:
    """One pre-norm decoder layer on h [B, T, D] -> (h, state, aux).

    Attention owns the cache (`jaxmodels.attention.attend`): without one (state None) the sequence
    attends to itself (training); with one, the layer writes this chunk's keys/values at
    `positions[:, 0]` and attends to its buffers by position. `plan` (None = dense) is this layer's
    attention plan. `aux` is None for now (a place for per-layer statistics).
    """
    q, k, v = _qkv(lp, ctx.config, h, ctx.cos, ctx.sin)
    out, state = attend(q, k, v, state, ctx.positions, ctx.write_at, plan,  # out [B, T, H, hd]
                        impl=ctx.attention_impl, interpret=ctx.attention_interpret)
    h = h + dense(lp["wo"], out.reshape(h.shape[0], h.shape[1], -1))
    return _mlp_block(lp, ctx.config, h), state, None


def _layer_step(ctx: LayerContext, collect_hidden: bool, remat: bool, skippable: bool) -> Callable:
    """`decoder_layer` as a scan body: (h, (lp, k, v, plan[, skipped])) -> (h, (k, v, hidden or None)).

    `remat` recomputes the layer's activations in the backward pass. `skippable` runs the layer
    under `lax.cond` on a per-layer flag, so a skipped layer (LayerSkip's layer dropout) is the
    identity on the residual stream and its forward and backward are not computed at all.
    """
    def step(h, xs):
        lp, k, v, plan = xs
        h, state, _ = decoder_layer(lp, h, None if k is None else (k, v), ctx, plan)
        k, v = (None, None) if state is None else state
        return h, (k, v, h if collect_hidden else None)

    step = jax.checkpoint(step) if remat else step
    if not skippable:
        return step

    def maybe_skipped(h, xs):
        *layer_xs, skipped = xs
        identity = lambda h: (h, (None, None, h if collect_hidden else None))  # noqa: E731
        return jax.lax.cond(skipped, identity, lambda h: step(h, tuple(layer_xs)), h)
    return maybe_skipped


def _run_piece(step: Callable, part: Params, stacked: bool, h: jax.Array,
               kv: tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]] | None, skip: jax.Array | None,
               plans: LayerPlans) -> tuple[jax.Array, list, list, jax.Array | None]:
    """Run one piece of the stack: a stacked run of layers under `lax.scan`, or one layer's weights.

    kv: the piece's per-layer (K buffers, V buffers) or None; skip: its layers' flags or None;
    plans: its layers' attention plans (all None, or all of one signature: stacked as scan xs).
    Returns (h, new K buffers, new V buffers, hidden [n, B, T, D] or None).
    """
    if stacked:  # the cache goes through as stacked per-layer slices (xs in, ys out)
        plan_xs = None if plans[0] is None else stack_plans(plans)
        xs = (part, *((None, None) if kv is None else (jnp.stack(kv[0]), jnp.stack(kv[1]))), plan_xs)
        h, (ks, vs, hid) = jax.lax.scan(step, h, xs if skip is None else (*xs, skip))
        return h, ([] if kv is None else list(ks)), ([] if kv is None else list(vs)), hid
    xs = (part, *((None, None) if kv is None else (kv[0][0], kv[1][0])), plans[0])  # buffers updated in place
    h, (k, v, hid) = step(h, xs if skip is None else (*xs, skip[0]))
    return h, ([] if kv is None else [k]), ([] if kv is None else [v]), (None if hid is None else hid[None])


def _plan_runs(part: Params, stacked: bool, plans: LayerPlans) -> list[tuple[Params, int]]:
    """A piece of the stack as runs (weights, layer count) whose layers share a plan signature.

    Layers whose plans differ in static sizes (dense vs clustered, or other cluster counts) cannot
    share a `lax.scan`, so a stacked segment is sliced where the signature changes. A piece whose
    plans agree (always so without plans) is returned as it is.
    """
    sigs = [plan_signature(p) for p in plans]
    bounds = [0] + [i for i in range(1, len(sigs)) if sigs[i] != sigs[i - 1]] + [len(sigs)]
    if not stacked or len(bounds) == 2:
        return [(part, len(sigs))]
    return [(jax.tree_util.tree_map(lambda w: w[a:b], part), b - a) for a, b in zip(bounds, bounds[1:])]


def _layer_plans(config: LlamaConfig, plan: LayerPlans | None) -> tuple[AttentionPlan | None, ...]:
    """One plan (or None) per layer of the model."""
    n = config.num_hidden_layers
    if plan is None:
        return (None,) * n
    if len(plan) != n:
        raise ValueError(f"attention plans: expected one entry per layer ({n}; None for a dense layer), "
                         f"got {len(plan)}")
    return tuple(plan)


def run_layers(params: Params, config: LlamaConfig, h: jax.Array, positions: jax.Array,
               cache: KVCache | None = None, *, start: int = 0, stop: int | None = None,
               collect_hidden: bool = False, remat: bool = False, skip: jax.Array | None = None,
               plan: LayerPlans | None = None) -> tuple[jax.Array, KVCache | None, jax.Array | None]:
    """Run layers [start, stop) on hidden states h [B, T, D] at absolute positions [B, T].

    Positions must be contiguous per row. With a cache, each layer writes its keys/values at
    `positions[:, 0]` and attends to every cached position <= the query's; `cache.lengths` is the
    caller's bookkeeping and is returned unchanged. Without a cache the sequence attends to itself
    (training). Returns (h, cache, hidden) where hidden [stop-start, B, T, D] holds the state after
    each layer when `collect_hidden`. Stacked segments run under `lax.scan`; unstacked layers (see
    `unstack_layers`) run as an unrolled loop.

    `skip` [stop-start] bool (training only) makes layer i the identity on the residual stream when
    set: LayerSkip's layer dropout, under `lax.cond` (see `_layer_step`); the draw is per call.

    `plan` holds one attention plan per layer of the model (`jaxmodels.attention_plan`; None for a
    dense layer; indexed by absolute layer, like the cache), so the layers of any range run with
    their own plans. A stacked segment is scanned in runs of equal plan signature (`_plan_runs`).
    """
    stop = config.num_hidden_layers if stop is None else stop
    if not 0 <= start <= stop <= config.num_hidden_layers:
        raise ValueError(f"layer range [{start}, {stop}) is outside [0, {config.num_hidden_layers}]")
    if start == stop:
        return h, cache, (jnp.zeros((0,) + h.shape, h.dtype) if collect_hidden else None)
    if skip is not None and cache is not None:
        raise ValueError("layer skipping is a training feature; it cannot be combined with a KV cache")
    plans = _layer_plans(config, plan)
    cos, sin = rope_cos_sin(positions, jnp.asarray(rope_inverse_frequencies(config)))
    ctx = LayerContext(config, cos, sin, positions, positions[:, 0], *(
        () if cache is None else (cache.attention_impl, cache.attention_interpret)))
    step = _layer_step(ctx, collect_hidden, remat, skip is not None)
    k_out, v_out, hidden, i = [], [], [], start
    for piece, stacked in layer_pieces(params["layers"], start, stop):
        n = piece["attn_norm"].shape[0] if stacked else 1
        for part, m in _plan_runs(piece, stacked, plans[i:i + n]):
            kv = None if cache is None else (cache.k[i:i + m], cache.v[i:i + m])
            flags = None if skip is None else skip[i - start:i - start + m]
            h, ks, vs, hid = _run_piece(step, part, stacked, h, kv, flags, plans[i:i + m])
            k_out, v_out, i = k_out + ks, v_out + vs, i + m
            hidden.append(hid)
    if cache is not None:
        cache = cache.replace(k=cache.k[:start] + tuple(k_out) + cache.k[stop:],
                              v=cache.v[:start] + tuple(v_out) + cache.v[stop:])
    return h, cache, (jnp.concatenate(hidden) if collect_hidden else None)


def forward(params: Params, config: LlamaConfig, tokens: jax.Array,
            positions: jax.Array | None = None, cache: KVCache | None = None,
            plan: LayerPlans | None = None) -> tuple[jax.Array, KVCache | None]:
    """Full model: tokens [B, T] -> logits [B, T, V] (and the updated cache, lengths unchanged).
    `plan`: optional per-layer attention plans (see `run_layers`)."""
    if positions is None:
        base = cache.lengths[:, None] if cache is not None else 0
        positions = base + jnp.arange(tokens.shape[1])[None, :]
        positions = jnp.broadcast_to(positions, tokens.shape)
    h, cache, _ = run_layers(params, config, embed_tokens(params, tokens), positions, cache, plan=plan)
    return exit_logits(params, config, h), cache


Planner = Callable[[int, jax.Array, jax.Array], "AttentionPlan | None"]


def plans_from_prefix(params: Params, config: LlamaConfig, tokens: jax.Array, planner: Planner
                      ) -> tuple[AttentionPlan | None, ...]:
    """Per-layer attention plans decided online from a prompt prefix (CHAI: the first 5 tokens).

    Runs the prefix tokens [B, T] (positions 0..T-1, no cache) through every layer in turn. At
    layer i, `planner(i, q [B, T, H, hd], k [B, KV, T, hd])` (RoPE applied) returns the layer's
    plan, or None for a dense layer. The layer then runs with that plan, so the planner of every
    later layer sees the hidden states of the planned model. Attention is causal, so these are the
    plans a full prefill would decide inline, layer by layer. Traceable when `planner` is.
    """
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1])[None], tokens.shape)
    cos, sin = rope_cos_sin(positions, jnp.asarray(rope_inverse_frequencies(config)))
    ctx = LayerContext(config, cos, sin, positions, positions[:, 0])
    h, plans = embed_tokens(params, tokens), []
    for i, lp in enumerate(unstack_layers(params)["layers"]):
        q, k, _ = _qkv(lp, config, h, cos, sin)
        plans.append(planner(i, q, k))
        h, _, _ = decoder_layer(lp, h, None, ctx, plans[-1])
    return tuple(plans)


# --------------------------------------------------------------------------- NNX shell
class LayerStack(nnx.Module):
    """One segment of stacked per-layer weights (leading axis = layer), one nnx.Param per kind
    (a factorized weight's Param holds its `LowRank`)."""

    def __init__(self, layers: Params):
        for spec in LAYER_WEIGHTS:
            setattr(self, spec.name, nnx.Param(layers[spec.name]))


class Llama(nnx.Module):
    """A Llama-family causal LM as an NNX module.

    The module owns the parameters; the math lives in the pure functions above, which hot paths
    call directly on `model.params()` under `jax.jit`. A segmented stack (hybrid low-rank) is an
    `nnx.List` of `LayerStack`s.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs | None = None,
                 params: Params | None = None, dtype: jnp.dtype = jnp.float32):
        if params is None:
            rngs = rngs if rngs is not None else nnx.Rngs(0)
            params = init_params(config, rngs.params(), dtype)
        check_param_shapes(config, params)
        self.config = config
        for spec in MODEL_WEIGHTS:
            if spec.present(config):
                setattr(self, spec.name, nnx.Param(params[spec.name]))
        layers = params["layers"]
        self.layers = (LayerStack(layers) if isinstance(layers, dict)
                       else nnx.List([LayerStack(seg) for seg in layers]))

    def params(self) -> Params:
        """The parameters as a plain nested dict of arrays (the functional core's input)."""
        out = nnx.to_pure_dict(nnx.state(self, nnx.Param))
        if isinstance(self.layers, nnx.List):
            out["layers"] = tuple(out["layers"][i] for i in range(len(self.layers)))
        return out

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 cache: KVCache | None = None, plan: LayerPlans | None = None
                 ) -> tuple[jax.Array, KVCache | None]:
        return forward(self.params(), self.config, tokens, positions, cache, plan)

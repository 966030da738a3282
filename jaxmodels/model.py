"""The Llama-family decoder: a pure functional core over a parameter pytree, and an NNX shell.

Parameters are one nested dict (shapes with L layers, D hidden, F mlp, V vocab):

    embed       [V, D]
    layers      attn_norm [L, D]   wq [L, D, H*hd]  wk, wv [L, D, KV*hd]  wo [L, H*hd, D]
                mlp_norm  [L, D]   w_gate, w_up [L, D, F]                 w_down [L, F, D]
    final_norm  [D]
    lm_head     [D, V]   (absent when embeddings are tied)

Layers are stacked along a leading axis and run with `lax.scan`, so compile time does not grow with
depth and any layer range `[start, stop)` is a slice of the stack: early exit, self-speculative
drafting/verification and pipeline stages all run this same code. `exit_logits` is the shared exit
(final norm + LM head) and applies to the hidden state after any layer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.attention import gqa_attention, merge_kv_heads
from jaxmodels.config import LlamaConfig
from jaxmodels.kv_cache import KVCache
from jaxmodels.layers import apply_rope, rms_norm, rope_cos_sin, rope_inverse_frequencies, swiglu

Params = dict[str, Any]
LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")


def param_shapes(config: LlamaConfig) -> Params:
    """The shape of every parameter, in the tree layout above."""
    L, D, F, V = (config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                  config.vocab_size)
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    shapes: Params = {
        "embed": (V, D),
        "layers": {"attn_norm": (L, D), "wq": (L, D, q), "wk": (L, D, kv), "wv": (L, D, kv),
                   "wo": (L, q, D), "mlp_norm": (L, D), "w_gate": (L, D, F), "w_up": (L, D, F),
                   "w_down": (L, F, D)},
        "final_norm": (D,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def init_params(config: LlamaConfig, key: jax.Array, dtype: jnp.dtype = jnp.float32,
                std: float = 0.02) -> Params:
    """Random weights (normal, std 0.02, as HF initializes Llama); norms start at one."""
    shapes = param_shapes(config)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, shape), k in zip(leaves, keys):
        name = path[-1].key
        if name.endswith("norm"):
            out.append(jnp.ones(shape, dtype))
        else:
            out.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


# --------------------------------------------------------------------------- functional core
def embed_tokens(params: Params, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] int -> hidden [B, T, D]."""
    return jnp.take(params["embed"], tokens, axis=0)


def exit_logits(params: Params, config: LlamaConfig, h: jax.Array) -> jax.Array:
    """The shared exit: final RMSNorm + LM head on hidden states [..., D] -> logits [..., V]."""
    h = rms_norm(h, params["final_norm"], config.rms_norm_eps)
    if config.tie_word_embeddings:
        return jnp.einsum("...d,vd->...v", h, params["embed"])
    return h @ params["lm_head"]


def _qkv(lp: Params, config: LlamaConfig, h: jax.Array, cos: jax.Array, sin: jax.Array):
    """Pre-norm projections: q [B, T, H, hd] and k, v [B, KV, T, hd], RoPE applied to q and k."""
    b, t, _ = h.shape
    hd, nh, nkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    x = rms_norm(h, lp["attn_norm"], config.rms_norm_eps)
    q = apply_rope((x @ lp["wq"]).reshape(b, t, nh, hd), cos, sin)
    k = apply_rope((x @ lp["wk"]).reshape(b, t, nkv, hd), cos, sin)
    v = (x @ lp["wv"]).reshape(b, t, nkv, hd)
    return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _write_rows(layer_cache: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    """Write new [B, KV, T, hd] into one layer's cache [B*KV, S, hd], row b at starts[b].

    One `dynamic_update_slice` per row (in place on a donated buffer); a vmapped update lowers to
    a scatter that is several times slower on CPU. Very large batches use the vmapped form to
    bound program size.
    """
    b, kv, t, hd = new.shape
    new = new.astype(layer_cache.dtype)
    if b > 32:
        put = lambda buf, x, s: jax.lax.dynamic_update_slice(buf, x, (0, s, 0))
        return jax.vmap(put)(layer_cache.reshape(b, kv, -1, hd), new, starts).reshape(b * kv, -1, hd)
    for row in range(b):
        layer_cache = jax.lax.dynamic_update_slice(layer_cache, new[row], (row * kv, starts[row], 0))
    return layer_cache


def _mlp_block(lp: Params, config: LlamaConfig, h: jax.Array) -> jax.Array:
    x = rms_norm(h, lp["mlp_norm"], config.rms_norm_eps)
    return h + swiglu(x, lp["w_gate"], lp["w_up"], lp["w_down"])


def layer_slice(params: Params, start: int, stop: int) -> Params | tuple[Params, ...]:
    """The parameters of layers [start, stop): a stacked slice, or a sub-tuple when unstacked."""
    if isinstance(params["layers"], (tuple, list)):
        return tuple(params["layers"][start:stop])
    return jax.tree_util.tree_map(lambda p: p[start:stop], params["layers"])


def unstack_layers(params: Params) -> Params:
    """Same parameters with `layers` as a tuple of per-layer dicts (for unrolled execution).

    On CPU, matmuls on weights sliced from a stacked array inside `lax.scan` run at about half the
    memory bandwidth of matmuls on standalone arrays (measured: 30 ms vs 16 ms per token for the
    SmolLM2-135M layers), so decoding unstacks once and unrolls the layer loop. Training keeps the
    stacked form (compile time independent of depth).
    """
    if isinstance(params["layers"], (tuple, list)):
        return params
    n = next(iter(params["layers"].values())).shape[0]
    layers = tuple({k: v[i] for k, v in params["layers"].items()} for i in range(n))
    return {**params, "layers": layers}


def run_layers(params: Params, config: LlamaConfig, h: jax.Array, positions: jax.Array,
               cache: KVCache | None = None, *, start: int = 0, stop: int | None = None,
               collect_hidden: bool = False, remat: bool = False, skip: jax.Array | None = None
               ) -> tuple[jax.Array, KVCache | None, jax.Array | None]:
    """Run layers [start, stop) on hidden states h [B, T, D] at absolute positions [B, T].

    Positions must be contiguous per row. With a cache, each layer writes its keys/values at
    `positions[:, 0]` and attends to every cached position <= the query's; `cache.lengths` is the
    caller's bookkeeping and is returned unchanged. Without a cache the sequence attends to itself
    (training). Returns (h, cache, hidden) where hidden [stop-start, B, T, D] holds the state after
    each layer when `collect_hidden`. Stacked layers run under `lax.scan`; unstacked layers (see
    `unstack_layers`) run as an unrolled loop.

    `skip` [stop-start] bool (training only) makes layer i the identity on the residual stream when
    set: LayerSkip's layer dropout. The layer runs under `lax.cond`, so a skipped layer's forward
    and backward are not computed at all; the draw is per call (per micro-batch) for that reason.
    """
    stop = config.num_hidden_layers if stop is None else stop
    if not 0 <= start <= stop <= config.num_hidden_layers:
        raise ValueError(f"layer range [{start}, {stop}) is outside [0, {config.num_hidden_layers}]")
    if start == stop:
        return h, cache, (jnp.zeros((0,) + h.shape, h.dtype) if collect_hidden else None)
    if skip is not None and cache is not None:
        raise ValueError("layer skipping is a training feature; it cannot be combined with a KV cache")
    inv_freq = jnp.asarray(rope_inverse_frequencies(config))
    cos, sin = rope_cos_sin(positions, inv_freq)
    write_at = positions[:, 0]

    def body(h, xs):
        lp, k_layer, v_layer = xs
        q, k, v = _qkv(lp, config, h, cos, sin)
        if k_layer is None:  # training: the sequence attends to itself
            keys, values, k_pos = merge_kv_heads(k), merge_kv_heads(v), positions
        else:  # cached: write this chunk, then attend over the layer's buffer by position
            k_layer = _write_rows(k_layer, k, write_at)
            v_layer = _write_rows(v_layer, v, write_at)
            keys, values = k_layer.astype(k.dtype), v_layer.astype(v.dtype)
            k_pos = jnp.arange(keys.shape[1])
        out = gqa_attention(q, keys, values, positions, k_pos)  # [B, T, H, hd]
        h = h + out.reshape(h.shape[0], h.shape[1], -1) @ lp["wo"]
        h = _mlp_block(lp, config, h)
        return h, (k_layer, v_layer, h if collect_hidden else None)

    if remat:
        body = jax.checkpoint(body)
    if skip is not None:
        layer_body = body

        def body(h, xs):  # noqa: F811 - the same layer, or the identity when skipped
            *layer_xs, skipped = xs
            identity = lambda h: (h, (None, None, h if collect_hidden else None))
            return jax.lax.cond(skipped, identity, lambda h: layer_body(h, tuple(layer_xs)), h)
    k_in = cache.k[start:stop] if cache is not None else None
    v_in = cache.v[start:stop] if cache is not None else None
    layers = layer_slice(params, start, stop)
    if isinstance(layers, tuple):  # unrolled: each layer's cache buffer is updated in place
        outs = []
        for i, lp in enumerate(layers):
            xs = (lp, None if k_in is None else k_in[i], None if v_in is None else v_in[i])
            h, out = body(h, xs if skip is None else (*xs, skip[i]))
            outs.append(out)
        k_out, v_out = (None, None) if cache is None else ([o[0] for o in outs], [o[1] for o in outs])
        hidden = jnp.stack([o[2] for o in outs]) if collect_hidden else None
    else:  # scanned: the cache goes through as stacked per-layer slices (xs in, ys out)
        stacked = (None, None) if cache is None else (jnp.stack(k_in), jnp.stack(v_in))
        xs = (layers, *stacked) if skip is None else (layers, *stacked, skip)
        h, (k_out, v_out, hidden) = jax.lax.scan(body, h, xs)
    if cache is not None:
        merge = lambda old, new: old[:start] + tuple(new[i] for i in range(stop - start)) + old[stop:]
        cache = cache.replace(k=merge(cache.k, k_out), v=merge(cache.v, v_out))
    return h, cache, hidden


def forward(params: Params, config: LlamaConfig, tokens: jax.Array,
            positions: jax.Array | None = None, cache: KVCache | None = None
            ) -> tuple[jax.Array, KVCache | None]:
    """Full model: tokens [B, T] -> logits [B, T, V] (and the updated cache, lengths unchanged)."""
    if positions is None:
        base = cache.lengths[:, None] if cache is not None else 0
        positions = base + jnp.arange(tokens.shape[1])[None, :]
        positions = jnp.broadcast_to(positions, tokens.shape)
    h, cache, _ = run_layers(params, config, embed_tokens(params, tokens), positions, cache)
    return exit_logits(params, config, h), cache


# --------------------------------------------------------------------------- NNX shell
class LayerStack(nnx.Module):
    """The stacked per-layer weights (leading axis = layer), one nnx.Param per kind."""

    def __init__(self, layers: Params):
        for name in LAYER_KEYS:
            setattr(self, name, nnx.Param(layers[name]))


class Llama(nnx.Module):
    """A Llama-family causal LM as an NNX module.

    The module owns the parameters; the math lives in the pure functions above, which hot paths
    call directly on `model.params()` under `jax.jit`.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs | None = None,
                 params: Params | None = None, dtype: jnp.dtype = jnp.float32):
        if params is None:
            rngs = rngs if rngs is not None else nnx.Rngs(0)
            params = init_params(config, rngs.params(), dtype)
        check_param_shapes(config, params)
        self.config = config
        self.embed = nnx.Param(params["embed"])
        self.layers = LayerStack(params["layers"])
        self.final_norm = nnx.Param(params["final_norm"])
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Param(params["lm_head"])

    def params(self) -> Params:
        """The parameters as a plain nested dict of arrays (the functional core's input)."""
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        return forward(self.params(), self.config, tokens, positions, cache)


def check_param_shapes(config: LlamaConfig, params: Params) -> None:
    """Raise a ValueError naming every parameter whose shape disagrees with the config."""
    expected = param_shapes(config)
    problems = []
    flat_expected = jax.tree_util.tree_flatten_with_path(expected, is_leaf=lambda x: isinstance(x, tuple))[0]
    for path, shape in flat_expected:
        node = params
        try:
            for p in path:
                node = node[p.key]
        except (KeyError, TypeError):
            problems.append(f"missing parameter {jax.tree_util.keystr(path)} (expected {shape})")
            continue
        if tuple(node.shape) != tuple(shape):
            problems.append(f"{jax.tree_util.keystr(path)}: expected {tuple(shape)} from the config, "
                            f"got {tuple(node.shape)}")
    if problems:
        raise ValueError("weights do not match the config (is config.json from the same model?):\n  "
                         + "\n  ".join(problems))

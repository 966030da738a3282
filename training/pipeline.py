"""Pipeline parallelism: the layer stack split into stages over the mesh axis `stage`, micro-batches
flowing through them under `jax.shard_map`, one `ppermute` per hand-off.

Schedules (S stages, M micro-batches, V repeats; L layers in S*V chunks of K = L/(S*V) layers):

  gpipe     V = 1: stage s holds layers [s*K, (s+1)*K). All forwards, then (by autodiff of the same
            loop) all backwards. M + S - 1 iterations; bubble (S-1) / (M + S - 1).
  circular  V > 1 (interleaved / looped stages, as MaxText's circular pipeline): stage s holds
            chunks s, S+s, 2S+s, ...; a micro-batch goes round the ring V times (stage S-1 hands
            it back to stage 0 for the next chunk). V*M + S - 1 iterations of 1/V the work each;
            bubble (S-1) / (V*M + S - 1): V times smaller, for V times more hand-offs. Needs M >= S
            (a micro-batch must be back at stage 0 before its next round).

At iteration t stage s works on j = t - s (repeat j // M, micro-batch j % M) when 0 <= j < V*M,
otherwise it idles (the bubble; in SPMD it computes on stale data and the result is masked). Stage 0
keeps a slot per micro-batch: the embedded input first, then what stage S-1 hands back.

The loss is the model's loss exactly (tests: equal to the unpipelined loss and gradients):
- the shared exit (final norm + LM head / tied embedding) is replicated on every stage, so every
  stage scores its own layers' exits (LayerSkip's early-exit loss) locally, and the exit's gradient
  is summed over stages by `shard_map`'s transpose; without the exit loss only the last chunk scores;
- layer dropout draws one mask per micro-batch exactly as the unpipelined step does, and each stage
  reads its layers' flags;
- `remat` and low-rank layers come with `run_layers`; a hybrid stack (segments) is not supported.

Parameters live in the *stage layout*: every stacked layer weight [L, ...] as [S, V, K, ...]
(`to_stage_layout`), sharded over `stage` on its first axis. For GPipe that is a free reshape.
Other mesh axes (`data`, `fsdp`) are manual too: the batch is split over them, and with fsdp > 1
each stage keeps 1/fsdp of its chunk's weights and all-gathers a chunk when it runs it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxmodels.config import LlamaConfig
from jaxmodels.model import Params, embed_tokens, exit_logits, run_layers
from training import parallel
from training.config import ConfigError
from training.handoff import ring
from training.layerskip import early_exit_loss
from training.step import cast_params, make_varying, token_cross_entropy, typed_zero

BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """Stages S (the mesh's `stage` size), micro-batches M per step, repeats V (1 = GPipe)."""

    stages: int
    microbatches: int
    repeats: int = 1

    @property
    def iterations(self) -> int:
        return self.repeats * self.microbatches + self.stages - 1

    def bubble(self) -> float:
        """The share of (stage, iteration) slots without work: (S-1) / (V*M + S - 1)."""
        return (self.stages - 1) / self.iterations


def check_spec(spec: PipelineSpec, num_layers: int) -> None:
    """ConfigError naming the setting when the stack cannot be split as asked."""
    s, m, v = spec.stages, spec.microbatches, spec.repeats
    if s < 1 or m < 1 or v < 1:
        raise ConfigError(f"pipeline: mesh.stage={s}, pipeline.microbatches={m} and pipeline.repeats={v} "
                          f"must be positive")
    if s > num_layers:
        raise ConfigError(f"mesh.stage={s} stages is more than the model's {num_layers} layers; use at most "
                          f"{num_layers} stages")
    if num_layers % (s * v):
        raise ConfigError(f"the model's {num_layers} layers do not split into mesh.stage={s} x "
                          f"pipeline.repeats={v} equal chunks; choose stages x repeats dividing {num_layers}")
    if v > 1 and m < s:
        raise ConfigError(f"the circular schedule needs at least as many micro-batches as stages "
                          f"(pipeline.microbatches={m} < mesh.stage={s}); raise optimizer.grad_accum or "
                          f"use pipeline.repeats=1")


# --------------------------------------------------------------------------- layouts
def _stacked_layers(params: Params) -> Params:
    layers = params["layers"]
    if not isinstance(layers, dict):
        raise ConfigError("pipeline parallelism needs one homogeneous layer stack; this model's layers are "
                          "in segments (hybrid low-rank: lowrank.full_rank_layers > 0); factorize every "
                          "layer alike or train without mesh.stage")
    return layers


def to_stage_layout(params: Params, spec: PipelineSpec) -> Params:
    """Stacked layer weights [L, ...] -> [S, V, K, ...]: chunk r*S + s (layers of it in order) at [s, r]."""
    s, v = spec.stages, spec.repeats

    def split(w):
        k = w.shape[0] // (s * v)
        return jnp.swapaxes(w.reshape(v, s, k, *w.shape[1:]), 0, 1)

    return {**params, "layers": jax.tree_util.tree_map(split, _stacked_layers(params))}


def from_stage_layout(params: Params) -> Params:
    """The inverse of `to_stage_layout`: [S, V, K, ...] -> [L, ...]."""
    def join(w):
        w = jnp.swapaxes(w, 0, 1)
        return w.reshape(-1, *w.shape[3:])

    return {**params, "layers": jax.tree_util.tree_map(join, params["layers"])}


def stage_specs(params: Params, fsdp_axes: Any = None) -> Params:
    """shard_map in_specs of a stage-layout tree: layers on `stage` (and `fsdp` on the axis named in
    `fsdp_axes`, a same-structured tree of ints, -1 = none), everything else replicated."""
    def layer_spec(w, ax=-1):
        dims: list[Any] = ["stage"] + [None] * (len(w.shape) - 1)
        if ax >= 0:
            dims[ax] = "fsdp"
        return P(*dims)

    layers = params["layers"]
    specs = (jax.tree_util.tree_map(layer_spec, layers) if fsdp_axes is None
             else jax.tree_util.tree_map(layer_spec, layers, fsdp_axes))
    return {k: (specs if k == "layers" else jax.tree_util.tree_map(lambda _: P(), v)) for k, v in params.items()}



def _is_layer_leaf(path: tuple) -> bool:
    return any(getattr(k, "key", None) == "layers" for k in path)


def _layer_dims(path: tuple, shape: tuple[int, ...], fsdp: int) -> list[Any]:
    """A stage-layout layer leaf's spec: `stage` on axis 0, `fsdp` where `parallel.fsdp_spec` puts it."""
    dims = list(parallel.fsdp_spec(path, shape, fsdp))
    dims += [None] * (len(shape) - len(dims))
    dims[0] = "stage"
    return dims


def state_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for params or optimizer state in stage layout: layer leaves on `stage` (and
    `fsdp` as in `training.parallel`), the shared leaves (embedding, final norm, LM head, step
    counts) replicated: every stage uses the shared exit."""
    fsdp = mesh.shape["fsdp"]

    def spec(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        if not shape or not _is_layer_leaf(path):
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, P(*_layer_dims(path, shape, fsdp)))

    return jax.tree_util.tree_map_with_path(spec, tree)


def fsdp_axes(params: Params, fsdp: int) -> Any | None:
    """Per layer leaf of a stage-layout params tree, the axis sharded over `fsdp` (-1: whole);
    None without fsdp."""
    if fsdp == 1:
        return None

    def axis(path, leaf):
        dims = _layer_dims(path, tuple(leaf.shape), fsdp)
        return dims.index("fsdp") if "fsdp" in dims else -1

    return jax.tree_util.tree_map_with_path(axis, {"layers": params["layers"]})["layers"]


# --------------------------------------------------------------------------- the stage program
@dataclasses.dataclass(frozen=True)
class StageLoss:
    """What every stage computes: the model, whether LayerSkip's early-exit loss scores every layer
    (else only the last), layer dropout on/off, remat and the compute dtype."""

    config: LlamaConfig
    exit_loss: bool = False
    dropout: bool = False
    remat: bool = False
    compute_dtype: Any = jnp.float32


def _chunk(setup: StageLoss, params: Params, x: jax.Array, flags: jax.Array | None, targets: jax.Array,
           weights: jax.Array, is_last: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Run one chunk of K layers on x [b, T, D] and score it: -> (y, weighted loss, final-exit
    accuracy, final-exit CE); the last two are 0 unless this is the model's last chunk."""
    cfg, k = setup.config, params["layers"]["attn_norm"].shape[0]
    b, t = targets.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    y, _, hidden = run_layers(params, cfg, x, positions, stop=k, collect_hidden=setup.exit_loss,
                              remat=setup.remat, skip=flags)
    zero = typed_zero(y)
    if setup.exit_loss:
        total, ce, acc = early_exit_loss(params, cfg, hidden, targets, weights)
        return y, total, jnp.where(is_last, acc[-1], zero), jnp.where(is_last, ce[-1], zero)

    def score(y):
        ce, correct = token_cross_entropy(exit_logits(params, cfg, y), targets)
        return ce.mean(), correct.mean()

    loss, acc = jax.lax.cond(is_last, score, lambda y: (zero, zero), y)
    return y, loss, acc, loss


def _gather_fsdp(tree: Any, axes: Any) -> Any:
    """All-gather each leaf over `fsdp` along its axis in `axes` (-1: not sharded; None: no fsdp)."""
    if axes is None:
        return tree
    return jax.tree_util.tree_map(
        lambda w, ax: w if ax < 0 else jax.lax.all_gather(w, "fsdp", axis=ax, tiled=True), tree, axes)


def _slots(t: int, s: jax.Array, spec: PipelineSpec) -> tuple[tuple, tuple]:
    """Which per-example memory slots stage s uses at iteration t (AC-SGD, `training.handoff`):
    send = (repeat r, micro-batch m, valid) of what it sends now, recv = the same for what it receives
    (from stage s-1; stage 0's slot r is what enters its chunk of repeat r, so r = 0 never arrives)."""
    S, M, V = spec.stages, spec.microbatches, spec.repeats
    j, jr = t - s, t - (s - 1) % S
    r, m = jnp.clip(j, 0, V * M - 1) // M, jnp.clip(j, 0, V * M - 1) % M
    send = (r, m, (j >= 0) & (j < V * M) & (r * S + s != S * V - 1))  # the last chunk sends nothing
    rr = jnp.clip(jr, 0, V * M - 1) // M + (s == 0)
    recv = (jnp.minimum(rr, V - 1), jnp.clip(jr, 0, V * M - 1) % M, (jr >= 0) & (jr < V * M) & (rr < V))
    return send, recv


def _stage_program(setup: StageLoss, spec: PipelineSpec, chunk_axes: Any, handoff: Callable) -> Callable:
    """The per-device body: (layers [1, V, K, ...], shared, inputs/targets [M, b, T], skip [M, L],
    weights [L], memory) -> (loss, accuracy, final CE, busy [1, iterations], memory), summed over
    stages and averaged over batch shards. `handoff(y, memory, slots) -> (received, memory)` moves
    activations one stage along the ring (`training.handoff`); memory is None or AC-SGD's buffers."""
    S, M, V = spec.stages, spec.microbatches, spec.repeats

    def body(layers, shared, inputs, targets, skip, weights, memory):
        s = jax.lax.axis_index("stage")
        every = ("stage", *BATCH_AXES)  # gradient reductions at these casts, not inside a cond branch
        layers = jax.tree_util.tree_map(lambda w: w[0], make_varying(cast_params(layers, setup.compute_dtype), every))
        shared = make_varying(cast_params(shared, setup.compute_dtype), every)
        memory = None if memory is None else tuple(m[0] for m in memory)  # [V, M, b, T, D] each
        k = layers["attn_norm"].shape[1]
        buf = embed_tokens(shared, inputs)  # [M, b, T, D]: stage 0's slot per micro-batch
        state = jnp.zeros_like(buf[0])
        sums, busy = [jnp.zeros((), jnp.float32)] * 3, []
        for t in range(spec.iterations):
            j = t - s
            valid = (j >= 0) & (j < V * M)
            r, m = jnp.clip(j, 0, V * M - 1) // M, jnp.clip(j, 0, V * M - 1) % M
            chunk = r * S + s  # layers [chunk*K, chunk*K + K)
            params = {**shared, "layers": _gather_fsdp(jax.tree_util.tree_map(lambda w: w[r], layers), chunk_axes)}
            flags = jax.lax.dynamic_slice_in_dim(skip[m], chunk * k, k) if setup.dropout else None
            w = jax.lax.dynamic_slice_in_dim(weights, chunk * k, k)
            x = jnp.where(s == 0, buf[m], state)
            y, *scores = _chunk(setup, params, x, flags, targets[m], w, chunk == S * V - 1)
            sums = [acc + jnp.where(valid, v, 0.0) for acc, v in zip(sums, scores)]
            busy.append(valid)
            if t == spec.iterations - 1:
                break  # the last iteration's output goes nowhere: no hand-off
            state, memory = handoff(y, memory, _slots(t, s, spec))
            done = t - (S - 1)  # the micro-batch stage S-1 finished now goes round again
            if 0 <= done < (V - 1) * M:
                buf = buf.at[done % M].set(jnp.where(s == 0, state, buf[done % M]))
        sums = [jax.lax.pmean(jax.lax.psum(v, "stage"), BATCH_AXES) / M for v in sums]
        return (*sums, jnp.stack(busy)[None], None if memory is None else tuple(m[None] for m in memory))

    return body


def pipeline_loss(setup: StageLoss, mesh: Mesh, spec: PipelineSpec, params_like: Params,
                  fsdp_axes: Any = None, handoff: Callable | None = None) -> Callable:
    """`(params in stage layout, inputs [M, b, T], targets, skip [M, L] bool, weights [L], memory=None)
    -> (loss, {accuracy, final_loss, busy [S, iterations], memory})`: the mean over micro-batches of
    each micro-batch's loss, as the unpipelined accumulation computes it.

    `params_like`: the stage-layout tree (arrays or shapes) for the specs; `fsdp_axes`: per layer
    leaf the stage-layout axis sharded over `fsdp` (-1: none), or None; `handoff`: default
    `training.handoff.ring`; with `training.handoff.acsgd`, `memory` is its (send, recv) buffers
    [S, V, M, b, T, D] each, returned updated."""
    check_spec(spec, setup.config.num_hidden_layers)
    chunk_axes = (None if fsdp_axes is None else  # [S, V, K, ...] -> a chunk's [K, ...]
                  jax.tree_util.tree_map(lambda ax: ax - 2 if ax >= 0 else -1, fsdp_axes))
    body = _stage_program(setup, spec, chunk_axes, handoff or ring(spec.stages))
    specs = stage_specs(params_like, fsdp_axes)
    shared_specs = {k: v for k, v in specs.items() if k != "layers"}
    batch, mem = P(None, BATCH_AXES, None), P("stage", None, None, BATCH_AXES)

    def loss_fn(params, inputs, targets, skip, weights, memory=None):
        mem_specs = None if memory is None else (mem, mem)
        mapped = jax.shard_map(body, mesh=mesh,
                               in_specs=(specs["layers"], shared_specs, batch, batch, P(), P(), mem_specs),
                               out_specs=(P(), P(), P(), P("stage"), mem_specs))
        shared = {k: v for k, v in params.items() if k != "layers"}
        loss, acc, final, busy, memory = mapped(params["layers"], shared, inputs, targets, skip, weights, memory)
        return loss, {"accuracy": acc, "final_loss": final, "busy": busy, "memory": memory}

    return loss_fn

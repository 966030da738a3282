"""The train step and the eval step: pure functions of pytrees, jit-compiled once per run.

    train_step(params, opt_state, batch, rng, step) -> (params, opt_state, metrics)
    eval_step(params, batch) -> sums of (loss, correct, tokens)

`batch` holds `inputs` and `targets` as [A, b, T] int32: A micro-batches of b sequences. The train
step scans over the micro-batches, sums their gradients (gradient accumulation without a second
compiled program or an optimizer wrapper), then applies one AdamW update. Parameters and optimizer
state stay fp32 (master weights); with `compute_dtype=bfloat16` the loss casts a bf16 copy of the
parameters inside the differentiated function, so the forward and backward run in bf16 and the
gradients arrive in fp32.

`loss_fn` is separate so features can replace it: anything with the signature
`(params, batch, rng, step) -> (loss, aux)` plugs into `make_train_step` (LayerSkip's layer dropout
and early-exit loss do, see `training.layerskip.make_loss`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxmodels.config import LlamaConfig
from jaxmodels.model import Params, embed_tokens, exit_logits, run_layers
from training.config import OptimizerSection, ScheduleSection

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[[Params, Batch, jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits [..., V], targets [...] -> (cross-entropy [...], correct [...]) in fp32."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return logz - target_logit, correct


def varying_axes(x: jax.Array) -> frozenset:
    """The `shard_map` axes over which x varies (empty outside shard_map)."""
    mat = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset()


def make_varying(tree: Any, axes: tuple[str, ...]) -> Any:
    """Every leaf marked as varying over `axes` (inside `shard_map`). Done once at the top of a
    per-device program, so that no implicit cast, whose transpose is a reduction, lands inside a
    `lax.cond` branch that only some devices take (a deadlock)."""
    def cast(x):
        missing = tuple(a for a in axes if a not in varying_axes(x))
        return jax.lax.pcast(x, missing, to="varying") if missing else x
    return jax.tree_util.tree_map(cast, tree)


def typed_zero(like: jax.Array) -> jax.Array:
    """A float32 scalar 0 that varies over the same `shard_map` axes as `like` (plain 0 outside one):
    both branches of a `lax.cond` inside `shard_map` must agree on that (pipeline stages)."""
    return make_varying(jnp.zeros((), jnp.float32), tuple(sorted(varying_axes(like))))


def cast_params(params: Params, dtype: jnp.dtype) -> Params:
    return jax.tree_util.tree_map(lambda p: p.astype(dtype), params)


def model_logits(params: Params, config: LlamaConfig, inputs: jax.Array, remat: bool = False) -> jax.Array:
    """inputs [B, T] -> logits [B, T, V] through `embed_tokens`, `run_layers`, `exit_logits`."""
    b, t = inputs.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))
    h = embed_tokens(params, inputs)
    h, _, _ = run_layers(params, config, h, positions, remat=remat)
    return exit_logits(params, config, h)


def next_token_loss(params: Params, config: LlamaConfig, batch: Batch, rng: jax.Array,
                    step: jax.Array | None = None, *,
                    compute_dtype: jnp.dtype = jnp.float32, remat: bool = False
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-token cross-entropy of one micro-batch (inputs/targets [b, T]); aux: accuracy.

    `rng` and `step` are unused here; they are part of the signature for stochastic and scheduled
    losses (layer dropout, early-exit curricula).
    """
    del rng, step
    logits = model_logits(cast_params(params, compute_dtype), config, batch["inputs"], remat)
    ce, correct = token_cross_entropy(logits, batch["targets"])
    return ce.mean(), {"accuracy": correct.mean()}


# --------------------------------------------------------------------------- optimizer
def learning_rate_schedule(opt: OptimizerSection, sched: ScheduleSection, total_steps: int
                           ) -> optax.Schedule:
    """Linear warm-up from lr/warmup to lr over `warmup_steps`, then cosine (or constant) to the end."""
    warmup = max(sched.warmup_steps, 0)
    end = opt.lr * sched.min_lr_ratio
    decay_steps = max(total_steps - warmup, 1)

    def schedule(count: jax.Array) -> jax.Array:
        count = jnp.asarray(count, jnp.float32)
        warm = opt.lr * (count + 1.0) / max(warmup, 1)
        frac = jnp.clip((count - warmup) / decay_steps, 0.0, 1.0)
        if sched.decay == "cosine":
            decayed = end + 0.5 * (opt.lr - end) * (1.0 + jnp.cos(jnp.pi * frac))
        else:
            decayed = jnp.asarray(opt.lr, jnp.float32)
        return jnp.where(count < warmup, warm, decayed)

    return schedule


def decay_mask(params: Params) -> Any:
    """Weight decay on matrices only: not on norms (which are [L, D] when stacked, so test by name)."""
    def keep(path, _):
        return not str(getattr(path[-1], "key", "")).endswith("norm")
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(opt: OptimizerSection, sched: ScheduleSection, total_steps: int
                   ) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the warm-up + cosine schedule."""
    parts = [optax.clip_by_global_norm(opt.grad_clip)] if opt.grad_clip > 0 else []
    parts.append(optax.adamw(learning_rate_schedule(opt, sched, total_steps), b1=opt.b1, b2=opt.b2,
                             eps=opt.eps, weight_decay=opt.weight_decay, mask=decay_mask))
    return optax.chain(*parts)


# --------------------------------------------------------------------------- steps
@dataclasses.dataclass(frozen=True)
class StepFns:
    """The pure step functions (not yet jitted: `training.parallel` adds shardings and jit)."""

    train_step: Callable[..., tuple[Params, Any, Metrics]]
    eval_step: Callable[..., Metrics]
    optimizer: optax.GradientTransformation


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule | None = None) -> Callable:
    """(params, opt_state, batch [A, b, T], rng, step) -> (params, opt_state, metrics)."""

    def train_step(params: Params, opt_state: Any, batch: Batch, rng: jax.Array, step: jax.Array):
        rng = jax.random.fold_in(rng, step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        num_micro = batch["inputs"].shape[0]

        def micro(carry, xs):
            grads, loss_sum, acc_sum = carry
            mb, i = xs
            (loss, aux), g = grad_fn(params, mb, jax.random.fold_in(rng, i), step)
            grads = jax.tree_util.tree_map(jnp.add, grads, g)
            return (grads, loss_sum + loss, acc_sum + aux["accuracy"]), None

        if num_micro == 1:  # no accumulation buffers: one less pass over parameter-sized memory
            first = jax.tree_util.tree_map(lambda x: x[0], batch)
            (loss_sum, aux), grads = grad_fn(params, first, jax.random.fold_in(rng, 0), step)
            acc_sum = aux["accuracy"]
        else:
            zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
            (grads, loss_sum, acc_sum), _ = jax.lax.scan(micro, init, (batch, jnp.arange(num_micro)))
            grads = jax.tree_util.tree_map(lambda g: g / num_micro, grads)
        return apply_gradients(optimizer, schedule, params, opt_state, grads, step,
                               loss_sum / num_micro, acc_sum / num_micro)

    return train_step


def apply_gradients(optimizer: optax.GradientTransformation, schedule: optax.Schedule | None, params: Params,
                    opt_state: Any, grads: Params, step: jax.Array, loss: jax.Array, accuracy: jax.Array
                    ) -> tuple[Params, Any, Metrics]:
    """One optimizer update from the step's mean gradients -> (params, opt_state, metrics)."""
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.global_norm(grads)}
    if schedule is not None:
        metrics["lr"] = schedule(step)
    return params, opt_state, metrics


def make_eval_step(config: LlamaConfig, compute_dtype: jnp.dtype = jnp.float32) -> Callable:
    """(params, batch {inputs, targets [B, T], weights [B]}) -> sums {loss, correct, tokens}.

    Sums, not means, so evaluations over several batches (and weight-0 padding rows) combine exactly.
    """

    def eval_step(params: Params, batch: Batch) -> Metrics:
        logits = model_logits(cast_params(params, compute_dtype), config, batch["inputs"])
        ce, correct = token_cross_entropy(logits, batch["targets"])
        w = jnp.broadcast_to(batch["weights"][:, None], ce.shape)
        return {"loss": (ce * w).sum(), "correct": (correct * w).sum(), "tokens": w.sum()}

    return eval_step


def build_steps(config: LlamaConfig, opt: OptimizerSection, sched: ScheduleSection, total_steps: int,
                compute_dtype: str = "float32", remat: bool = False, loss_fn: LossFn | None = None
                ) -> StepFns:
    """The default recipe: next-token loss (or `loss_fn`), AdamW + warm-up/cosine, accumulation."""
    dtype = jnp.dtype(compute_dtype)
    schedule = learning_rate_schedule(opt, sched, total_steps)
    optimizer = make_optimizer(opt, sched, total_steps)
    if loss_fn is None:
        def loss_fn(params, batch, rng, step):
            return next_token_loss(params, config, batch, rng, step, compute_dtype=dtype, remat=remat)

    return StepFns(make_train_step(loss_fn, optimizer, schedule), make_eval_step(config, dtype), optimizer)

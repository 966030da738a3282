"""LayerSkip training: layer dropout that grows with depth, and the early-exit loss.

Formulas (DESIGN.md section 4; L layers, step t of T, layers 0-based, exits 1-based):

  dropout    p(l, t) = S(t) * D(l) * p_max,  D(l) = 2^(l/(L-1)) - 1  (layer 0 never, last at p_max),
             S(t) = 1 (continual pretraining / fine-tuning) or 2^(t/(T-1)) - 1 (from scratch).
  exit loss  J = sum_l w(t, l) * CE(exit_logits(h_l), y) over exits l = 1..L (h_l: after layer l),
             w(t, l) = C(t, l) e(l) / sum_i C(t, i) e(i),  e(l) = e_scale * l(l+1)/2 for l < L,
             e(L) = L(L+1)/2 (unscaled). The final exit (the model's output) is always in.
  curricula  none: every exit; rotational(R): exit l when (l-1) mod R == t mod R;
             gradual: exit l once t/T >= 0.5 (L-l)/L (switched on top-down, all on by mid-training).

Granularity of dropout: one draw per layer per micro-batch (all rows skip together), so a skipped
layer is a `lax.cond` branch that XLA does not execute, forward or backward. Per-row skipping, as
torchtune does with index_select, would need dynamic shapes and saves nothing under jit.
The exit loss runs one exit at a time under `lax.scan` with rematerialization, and exits with
zero weight are skipped by `lax.cond`: `[exits, batch, seq, vocab]` logits never exist.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxmodels.config import LlamaConfig
from jaxmodels.model import Params, exit_logits

CURRICULA = ("none", "rotational", "gradual")
DROPOUT_SCHEDULES = ("constant", "exp")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerSkipConfig:
    """LayerSkip knobs (all off by default)."""

    dropout_max: float = 0.0  # p_max; 0 disables layer dropout
    dropout_schedule: str = "constant"  # S(t): 'constant' (continual) or 'exp' (from scratch)
    exit_loss: bool = False  # the early-exit loss through the shared exit
    e_scale: float = 1.0  # weight scale of the non-final exits
    curriculum: str = "none"  # which exits are in the loss at step t: none | rotational | gradual
    rotation: int = 4  # R of the rotational curriculum

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout_max <= 1.0:
            raise ValueError(f"layerskip.dropout_max must be in [0, 1], got {self.dropout_max}")
        if self.dropout_schedule not in DROPOUT_SCHEDULES:
            raise ValueError(f"layerskip.dropout_schedule must be one of {DROPOUT_SCHEDULES}, "
                             f"got '{self.dropout_schedule}'")
        if self.curriculum not in CURRICULA:
            raise ValueError(f"layerskip.curriculum must be one of {CURRICULA}, got '{self.curriculum}'")
        if self.rotation < 1:
            raise ValueError(f"layerskip.rotation must be >= 1, got {self.rotation}")
        if self.e_scale < 0:
            raise ValueError(f"layerskip.e_scale must be >= 0, got {self.e_scale}")

    @property
    def dropout(self) -> bool:
        return self.dropout_max > 0.0


def _progress(step: jax.Array, total_steps: int) -> jax.Array:
    return jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps - 1, 1), 0.0, 1.0)


def dropout_probabilities(num_layers: int, step: jax.Array, total_steps: int, p_max: float,
                          schedule: str) -> jax.Array:
    """p(l, t) for l = 0..L-1 -> [L] float32."""
    depth = 2.0 ** (jnp.arange(num_layers, dtype=jnp.float32) / max(num_layers - 1, 1)) - 1.0
    time = 2.0 ** _progress(step, total_steps) - 1.0 if schedule == "exp" else 1.0
    return jnp.clip(time * depth * p_max, 0.0, 1.0)


def sample_skip_mask(key: jax.Array, probs: jax.Array) -> jax.Array:
    """One Bernoulli draw per layer: [L] bool, True = skip this layer for this micro-batch."""
    return jax.random.uniform(key, probs.shape) < probs


def exit_curriculum(num_layers: int, step: jax.Array, total_steps: int, curriculum: str,
                    rotation: int) -> jax.Array:
    """C(t, l) for exits l = 1..L -> [L] bool; the final exit is always on."""
    exits = jnp.arange(1, num_layers + 1)
    if curriculum == "rotational":
        on = (exits - 1) % rotation == jnp.asarray(step) % rotation
    elif curriculum == "gradual":
        on = _progress(step, total_steps) * (total_steps > 1) >= 0.5 * (num_layers - exits) / num_layers
    else:
        on = jnp.ones((num_layers,), bool)
    return on | (exits == num_layers)


def exit_weights(num_layers: int, step: jax.Array, total_steps: int, e_scale: float,
                 curriculum: str, rotation: int) -> jax.Array:
    """Normalized w(t, l) for exits l = 1..L -> [L] float32 summing to 1."""
    exits = jnp.arange(1, num_layers + 1, dtype=jnp.float32)
    e = exits * (exits + 1) / 2
    e = jnp.where(exits < num_layers, e_scale * e, e)
    c = exit_curriculum(num_layers, step, total_steps, curriculum, rotation)
    w = jnp.where(c, e, 0.0)
    return w / jnp.sum(w)


def token_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean next-token CE over positions where mask is set. logits [B, T, V]; targets, mask [B, T]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1)


def early_exit_loss(params: Params, config: LlamaConfig, hidden: jax.Array, targets: jax.Array,
                    mask: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """J = sum_l weights[l] * CE(exit_logits(hidden[l]), targets), one exit at a time.

    hidden [L, B, T, D] (state after each layer); returns (J, per-exit CE [L], 0 where unweighted).
    """
    @jax.checkpoint
    def one_exit(h):
        return token_cross_entropy(exit_logits(params, config, h), targets, mask)

    def body(total, xs):
        h, w = xs
        ce = jax.lax.cond(w > 0, one_exit, lambda h: jnp.zeros((), jnp.float32), h)
        return total + w * ce, ce

    total, per_exit = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hidden, weights))
    return total, per_exit


def exit_eval_sums(params: Params, config: LlamaConfig, inputs: jax.Array, targets: jax.Array,
                   weights: jax.Array) -> dict[str, jax.Array]:
    """Per-exit held-out sums for exits 1..L: CE `loss` [L], `agree` [L] (top-1 equal to the final
    exit's), `correct` [L] (top-1 equal to the target), and `tokens`. inputs/targets [B, T],
    weights [B] (0 for padding rows). One exit's logits exist at a time."""
    from jaxmodels.model import embed_tokens, run_layers
    b, t = inputs.shape
    positions = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
    h, _, hidden = run_layers(params, config, embed_tokens(params, inputs), positions, collect_hidden=True)
    final = jnp.argmax(exit_logits(params, config, h), axis=-1)
    w = jnp.broadcast_to(weights[:, None], (b, t)).astype(jnp.float32)

    def one_exit(h_l):
        logits = exit_logits(params, config, h_l).astype(jnp.float32)
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
        top1 = jnp.argmax(logits, -1)
        return ((nll * w).sum(), ((top1 == final) * w).sum(), ((top1 == targets) * w).sum())

    loss, agree, correct = jax.lax.map(one_exit, hidden)
    return {"loss": loss, "agree": agree, "correct": correct, "tokens": w.sum()}

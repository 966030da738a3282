"""LayerSkip training: layer dropout that grows with depth, and the early-exit loss.

Formulas (DESIGN.md section 4; L layers, step t of T, layers 0-based, exits 1-based):

  dropout    p(l, t) = S(t) * D(l) * p_max,  D(l) = 2^(l/(L-1)) - 1  (layer 0 never, last at p_max),
             S(t) = 1 (continual pretraining / fine-tuning) or 2^(t/(T-1)) - 1 (from scratch).
  exit loss  J = sum_l w(t, l) * CE(exit_logits(h_l), y) over exits l = 1..L (h_l: after layer l),
             w(t, l) = C(t, l) e(l) / sum_i C(t, i) e(i),  e(l) = e_scale * f(l) for l < L,
             e(L) = f(L) (unscaled). The final exit (the model's output) is always in.
             f (`exit_scale`): sum_l l(l+1)/2 (the paper's), linear_l l, sqrt_l sqrt(l), uniform 1.
  distill    with `exit_distill` beta > 0 each non-final exit's CE becomes
             (1 - beta) CE(exit_logits(h_l), y) + beta KL(p_L || p_l), p_L the final exit's
             distribution held constant (stop-gradient): self-distillation toward the final layer.
             Not in the LayerSkip paper. Measured (BENCHMARKS.md): more held-out agreement, but
             less acceptance along the model's greedy output and a higher loss; off by default.
  curricula  none: every exit; rotational(R): exit l when (l-1) mod R == t mod R;
             gradual: exit l once t/T >= 0.5 (L-l)/L (switched on top-down, all on by mid-training).

Granularity of dropout: one draw per layer per micro-batch (all rows skip together), so a skipped
layer is a `lax.cond` branch that XLA does not execute, forward or backward. Per-row skipping, as
torchtune does with index_select, would need dynamic shapes and saves nothing under jit.
The exit loss runs one exit at a time under `lax.scan` with rematerialization, and exits with
zero weight are skipped by `lax.cond`: `[exits, batch, seq, vocab]` logits never exist.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxmodels.config import LlamaConfig
from jaxmodels.model import Params, embed_tokens, exit_logits, run_layers
from training.config import LayerSkipSection
from training.step import cast_params, token_cross_entropy, typed_zero

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


def exit_scale(exits: jax.Array, scale: str) -> jax.Array:
    """f(l), how an exit's loss weight grows with its depth l (1-based), before e_scale."""
    if scale == "sum_l":
        return exits * (exits + 1) / 2
    if scale == "linear_l":
        return exits
    if scale == "sqrt_l":
        return jnp.sqrt(exits)
    if scale == "uniform":
        return jnp.ones_like(exits)
    raise ValueError(f"unknown exit scale '{scale}'")


def exit_weights(num_layers: int, step: jax.Array, total_steps: int, e_scale: float,
                 curriculum: str, rotation: int, scale: str = "sum_l") -> jax.Array:
    """Normalized w(t, l) for exits l = 1..L -> [L] float32 summing to 1."""
    exits = jnp.arange(1, num_layers + 1, dtype=jnp.float32)
    e = exit_scale(exits, scale)
    e = jnp.where(exits < num_layers, e_scale * e, e)
    c = exit_curriculum(num_layers, step, total_steps, curriculum, rotation)
    w = jnp.where(c, e, 0.0)
    return w / jnp.sum(w)


def early_exit_loss(params: Params, config: LlamaConfig, hidden: jax.Array, targets: jax.Array,
                    weights: jax.Array, distill: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """J = sum_l weights[l] * loss_l, one exit at a time; loss_l = CE(exit_logits(hidden[l]), targets),
    or for non-final exits with `distill` beta > 0, (1 - beta) CE + beta KL(final || exit l).

    hidden [L, B, T, D] (state after each layer), targets [B, T]. Returns (J, per-exit mean CE [L],
    per-exit accuracy [L]); both 0 for exits with zero weight, which are not computed. Distillation
    adds one [B, T, V] array, the final exit's log-probabilities (the same size as one exit's logits).
    """
    num_exits = hidden.shape[0]
    betas = jnp.where(jnp.arange(num_exits) < num_exits - 1, distill, 0.0)
    teacher = None
    if distill > 0:
        final = exit_logits(params, config, hidden[-1]).astype(jnp.float32)
        teacher = jax.lax.stop_gradient(jax.nn.log_softmax(final, axis=-1))  # [B, T, V]

    @jax.checkpoint
    def one_exit(h, beta):
        logits = exit_logits(params, config, h)
        ce, correct = token_cross_entropy(logits, targets)
        objective = ce
        if teacher is not None:
            student = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
            objective = (1.0 - beta) * ce + beta * kl
        return objective.mean(), ce.mean(), correct.mean()

    def body(total, xs):
        h, w, beta = xs
        zero = typed_zero(h)
        objective, ce, acc = jax.lax.cond(w > 0, one_exit, lambda h, b: (zero, zero, zero), h, beta)
        return total + w * objective, (ce, acc)

    total, (per_exit, accuracy) = jax.lax.scan(body, typed_zero(hidden), (hidden, weights, betas))
    return total, per_exit, accuracy


def make_loss(config: LlamaConfig, ls: LayerSkipSection, total_steps: int,
              compute_dtype: jnp.dtype = jnp.float32, remat: bool = False) -> Callable:
    """The LayerSkip training loss `(params, batch, rng, step) -> (loss, aux)` for `build_steps`.

    Layer dropout draws one skip mask per micro-batch from `rng`; the early-exit loss replaces the
    plain next-token loss (its final exit is that loss, weighted). aux: accuracy of the final exit.
    """
    L = config.num_hidden_layers

    def loss_fn(params, batch, rng, step):
        p = cast_params(params, compute_dtype)
        inputs, targets = batch["inputs"], batch["targets"]
        positions = jnp.broadcast_to(jnp.arange(inputs.shape[1])[None], inputs.shape)
        skip = None
        if ls.dropout:
            probs = dropout_probabilities(L, step, total_steps, ls.dropout_max, ls.dropout_schedule)
            skip = sample_skip_mask(rng, probs)
        h, _, hidden = run_layers(p, config, embed_tokens(p, inputs), positions, remat=remat,
                                  skip=skip, collect_hidden=ls.exit_loss)
        if not ls.exit_loss:
            ce, correct = token_cross_entropy(exit_logits(p, config, h), targets)
            return ce.mean(), {"accuracy": correct.mean()}
        weights = exit_weights(L, step, total_steps, ls.e_scale, ls.curriculum, ls.rotation, ls.exit_scale)
        loss, per_exit, accuracy = early_exit_loss(p, config, hidden, targets, weights, ls.exit_distill)
        return loss, {"accuracy": accuracy[-1], "final_loss": per_exit[-1]}

    return loss_fn


def exit_eval_sums(params: Params, config: LlamaConfig, inputs: jax.Array, targets: jax.Array,
                   weights: jax.Array) -> dict[str, jax.Array]:
    """Per-exit held-out sums for exits 1..L: CE `loss` [L], `agree` [L] (top-1 equal to the final
    exit's), `correct` [L] (top-1 equal to the target), and `tokens`. inputs/targets [B, T],
    weights [B] (0 for padding rows). One exit's logits exist at a time."""
    b, t = inputs.shape
    positions = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
    h, _, hidden = run_layers(params, config, embed_tokens(params, inputs), positions, collect_hidden=True)
    final = jnp.argmax(exit_logits(params, config, h), axis=-1)
    w = jnp.broadcast_to(weights[:, None], (b, t)).astype(jnp.float32)

    def one_exit(h_l):
        logits = exit_logits(params, config, h_l)
        nll, correct = token_cross_entropy(logits, targets)
        agree = jnp.argmax(logits, -1) == final
        return (nll * w).sum(), (agree * w).sum(), (correct * w).sum()

    loss, agree, correct = jax.lax.map(one_exit, hidden)
    return {"loss": loss, "agree": agree, "correct": correct, "tokens": w.sum()}


def evaluate_exits(exit_eval_step, params: Params, batches) -> dict[str, list[float]]:
    """Per-exit held-out loss, agreement with the final exit and accuracy over (batch) dicts."""
    total = None
    for batch in batches:
        sums = jax.device_get(exit_eval_step(params, batch))
        total = sums if total is None else jax.tree_util.tree_map(lambda a, b: a + b, total, sums)
    n = max(float(total["tokens"]), 1.0)
    return {"exit_loss": [round(float(x) / n, 4) for x in total["loss"]],
            "exit_agreement": [round(float(x) / n, 4) for x in total["agree"]],
            "exit_accuracy": [round(float(x) / n, 4) for x in total["correct"]]}


def decode_report(params: Params, config: LlamaConfig, calibration: list[list[int]],
                  prompts: list[list[int]], new_tokens: int = 96, note: Callable[[str], None] = print) -> dict:
    """Plain greedy vs self-speculative decoding on held-out prompts, at batch 1 (the prompts one
    after another) and at batch len(prompts): tokens/s, acceptance, whether the tokens are
    identical. E and d are chosen per batch size by calibration (the model's top 3 timed against
    plain); when plain decoding wins the calibration, the report says so and times the best
    self-speculation setting anyway. `note` receives a line as each part starts (about 45 s each
    on 2 CPU cores for the default model)."""
    from inference import generate_batches
    from inference.calibrate import choose_exit_and_draft
    from inference.speculative import SpecConfig
    from jaxmodels.model import unstack_layers
    params = unstack_layers(jax.tree_util.tree_map(jnp.asarray, params))
    report = {}
    for size in (1, len(prompts)):
        note(f"  batch {size}: calibrating E and d (the model's best 3 settings timed against plain decoding)")
        choice = choose_exit_and_draft(params, config, calibration, new_tokens=new_tokens, batch_size=size, trials=3)
        spec = SpecConfig(choice.exit_layer, choice.draft_len, adaptive=False)
        run = lambda **kw: generate_batches(params, config, prompts, size, new_tokens,  # noqa: E731
                                            eos_token_ids=(), **kw)
        note(f"  batch {size}: timing plain and self-speculative decoding (E={spec.exit_layer}, d={spec.draft_len}), "
             f"{len(prompts)} prompts x {new_tokens} tokens")
        run(), run(speculative=spec)  # compile both programs first
        plain = max((run() for _ in range(2)), key=lambda r: r.tokens_per_second)
        fast = max((run(speculative=spec) for _ in range(2)), key=lambda r: r.tokens_per_second)
        report[f"batch{size}"] = {
            "exit_layer": spec.exit_layer, "draft_len": spec.draft_len,
            "calibration_speedup": round(choice.expected_speedup, 3),
            "calibration_prefers_plain": choice.spec() is None,
            "plain_tokens_per_second": round(plain.tokens_per_second, 1),
            "self_speculative_tokens_per_second": round(fast.tokens_per_second, 1),
            "speedup": round(fast.tokens_per_second / plain.tokens_per_second, 3),
            "acceptance_rate": round(fast.acceptance_rate, 3),
            "identical": fast.tokens == plain.tokens}
    return report

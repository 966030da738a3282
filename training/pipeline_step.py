"""The pipelined train step and `training.train`'s hooks for pipeline stages (`mesh.stage` > 1).

`make_pipeline_train_step` is `training.step.make_train_step` with the micro-batch loop replaced
by the pipeline (`training.pipeline.pipeline_loss`): the same layer-dropout draws, exit weights,
gradient mean and optimizer update. A pipelined run keeps its parameters and AdamW moments in stage
layout (`StageLayout`), so no step moves weights between stages.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxmodels.config import LlamaConfig
from jaxmodels.model import Params
from training.config import ConfigError
from training.layerskip import dropout_probabilities, exit_weights, sample_skip_mask
from training.pipeline import (PipelineSpec, StageLoss, check_spec, fsdp_axes, from_stage_layout, pipeline_loss,
                               state_shardings, to_stage_layout)
from training.step import apply_gradients


# --------------------------------------------------------------------------- the train step
def step_masks(setup: StageLoss, ls: Any, microbatches: int, rng: jax.Array, step: jax.Array,
               total_steps: int) -> tuple[jax.Array, jax.Array]:
    """Layer-dropout flags [M, L] (one draw per micro-batch from fold_in(rng, i), as the unpipelined
    step draws them) and exit weights [L] (LayerSkip's, or all weight on the last layer)."""
    n = setup.config.num_hidden_layers
    skip = jnp.zeros((microbatches, n), bool)
    if setup.dropout:
        probs = dropout_probabilities(n, step, total_steps, ls.dropout_max, ls.dropout_schedule)
        skip = jnp.stack([sample_skip_mask(jax.random.fold_in(rng, i), probs) for i in range(microbatches)])
    if setup.exit_loss:
        weights = exit_weights(n, step, total_steps, ls.e_scale, ls.curriculum, ls.rotation, ls.exit_scale)
    else:
        weights = jax.nn.one_hot(n - 1, n, dtype=jnp.float32)
    return skip, weights


def stage_loss_setup(config: LlamaConfig, ls: Any = None, remat: bool = False,
                     compute_dtype: str = "float32") -> StageLoss:
    """A `StageLoss` from the LayerSkip section (None or disabled: the plain next-token loss)."""
    on = ls is not None and ls.enabled
    if on and ls.exit_distill > 0:
        raise ConfigError("layerskip.exit_distill > 0 is not supported with pipeline stages (the final "
                          "layer's distribution lives on the last stage); set it to 0 or mesh.stage=1")
    return StageLoss(config, exit_loss=on and ls.exit_loss, dropout=on and ls.dropout_max > 0,
                     remat=remat, compute_dtype=jnp.dtype(compute_dtype))


def make_pipeline_train_step(setup: StageLoss, mesh: Mesh, spec: PipelineSpec, optimizer: Any,
                             schedule: Any, params_like: Params, total_steps: int, ls: Any = None,
                             fsdp_axes: Any = None, handoff: Callable | None = None) -> Callable:
    """(params [stage layout], opt_state, batch [M, b, T], rng, step) -> (params, opt_state, metrics):
    the unpipelined `make_train_step` with the micro-batch loop replaced by the pipeline. With an
    AC-SGD `handoff` (`training.handoff.acsgd`) the step takes its memory as a sixth argument and
    returns it updated as a fourth result (`training.activation_memory.PipelineMemory`)."""
    loss_fn = pipeline_loss(setup, mesh, spec, params_like, fsdp_axes, handoff)

    def train_step(params, opt_state, batch, rng, step, memory=None):
        rng = jax.random.fold_in(rng, step)
        skip, weights = step_masks(setup, ls, batch["inputs"].shape[0], rng, step, total_steps)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch["inputs"], batch["targets"], skip, weights, memory)
        out = apply_gradients(optimizer, schedule, params, opt_state, grads, step, loss, aux["accuracy"])
        return out if memory is None else (*out, aux["memory"])

    return train_step


# --------------------------------------------------------------------------- training.train's hooks
@dataclasses.dataclass(frozen=True)
class StageLayout:
    """How `training.train` keeps a pipelined run's state: params and AdamW moments in stage layout
    (so each stage's chunks are contiguous on its devices: no re-layout per step), converted back
    to the model's layout for evaluation and export."""

    spec: PipelineSpec

    def to_train(self, params: Params) -> Params:
        return to_stage_layout(params, self.spec)

    def to_model(self, params: Params) -> Params:
        return from_stage_layout(params)

    def shardings(self, tree: Any, mesh: Mesh) -> Any:
        return state_shardings(tree, mesh)


def spec_for(cfg: Any) -> PipelineSpec:
    """The PipelineSpec of a TrainConfig: S = mesh.stage, M = optimizer.grad_accum, V from pipeline.*."""
    repeats = cfg.pipeline.repeats if cfg.pipeline.schedule == "circular" else 1
    return PipelineSpec(cfg.mesh.stage, cfg.optimizer.grad_accum, repeats)


def build_steps(cfg: Any, model_config: LlamaConfig, mesh: Mesh, total_steps: int,
                handoff: Callable | None = None) -> Any:
    """`training.step.StepFns` for a pipelined run: the pipelined train step on stage-layout state
    (plain hand-offs, or `handoff`: AC-SGD's, whose step takes and returns its memory), and the
    usual eval step on the params converted back to the model's layout."""
    from jaxmodels.model import init_params
    from training.step import StepFns, learning_rate_schedule, make_eval_step, make_optimizer

    spec = spec_for(cfg)
    check_spec(spec, model_config.num_hidden_layers)
    setup = stage_loss_setup(model_config, cfg.layerskip, cfg.model.remat, cfg.model.compute_dtype)
    optimizer = make_optimizer(cfg.optimizer, cfg.schedule, total_steps)
    schedule = learning_rate_schedule(cfg.optimizer, cfg.schedule, total_steps)
    like = jax.eval_shape(lambda: to_stage_layout(init_params(model_config, jax.random.key(0)), spec))
    train = make_pipeline_train_step(setup, mesh, spec, optimizer, schedule, like, total_steps, cfg.layerskip,
                                     fsdp_axes(like, mesh.shape["fsdp"]), handoff)
    plain_eval = make_eval_step(model_config, setup.compute_dtype)
    return StepFns(train, lambda p, b: plain_eval(from_stage_layout(p), b), optimizer)

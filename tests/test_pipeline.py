"""Pipeline parallelism (training/pipeline.py) on 8 fake CPU devices: the pipelined loss and gradients
are the unpipelined model's (GPipe and circular, with LayerSkip, low rank, data and fsdp axes), the
executed schedule has the theory's bubble, and bad settings are refused with the fix named."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.model import init_params
from jaxmodels.testing import tiny_config
from jaxmodels.weights import LayerVariants
from training import parallel
from training.config import ConfigError, LayerSkipSection, MeshSection
from training.layerskip import make_loss
from training.pipeline import (PipelineSpec, check_spec, fsdp_axes, from_stage_layout, pipeline_loss,
                               state_shardings, to_stage_layout)
from training.pipeline_step import stage_loss_setup, step_masks
from training.step import next_token_loss

CONFIG = tiny_config(num_hidden_layers=8, vocab_size=96, hidden_size=32, intermediate_size=64,
                     num_attention_heads=4, num_key_value_heads=2)
LAYERSKIP = LayerSkipSection(dropout_max=0.5, exit_loss=True, e_scale=1.0)
TOTAL_STEPS = 10


def _batch(m, b=4, t=8, seed=0):
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, CONFIG.vocab_size, (m, b, t + 1)).astype(np.int32)
    return jnp.asarray(blocks[..., :-1]), jnp.asarray(blocks[..., 1:])


def _reference(config, params, inputs, targets, ls, rng, step):
    """The unpipelined step's loss and gradients: the mean over micro-batches, rng folded per micro-batch."""
    if ls is None:
        loss_fn = lambda p, mb, r, s: next_token_loss(p, config, mb, r, s)  # noqa: E731
    else:
        loss_fn = make_loss(config, ls, TOTAL_STEPS)

    def total(p):
        losses = [loss_fn(p, {"inputs": inputs[i], "targets": targets[i]}, jax.random.fold_in(rng, i), step)[0]
                  for i in range(inputs.shape[0])]
        return sum(losses) / len(losses)

    return jax.value_and_grad(total)(params)


def _pipelined(config, params, inputs, targets, ls, rng, step, spec, mesh_cfg):
    mesh = parallel.make_mesh(mesh_cfg, jax.devices()[:mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.stage])
    setup = stage_loss_setup(config, ls)
    staged = to_stage_layout(params, spec)
    loss_fn = pipeline_loss(setup, mesh, spec, staged, fsdp_axes(staged, mesh_cfg.fsdp))
    staged = jax.device_put(staged, state_shardings(staged, mesh))
    skip, weights = step_masks(setup, ls, inputs.shape[0], rng, step, TOTAL_STEPS)
    (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(staged, inputs, targets, skip, weights)
    return loss, from_stage_layout(grads), aux


def _close(a, b, tol=2e-5):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol, err_msg=str(path))


CASES = [  # (stages, repeats, micro-batches, data, fsdp, layerskip)
    pytest.param(4, 1, 4, 1, 1, LAYERSKIP, id="gpipe-4-layerskip"),
    pytest.param(2, 2, 2, 1, 1, LAYERSKIP, id="circular-2x2-layerskip"),
    pytest.param(2, 2, 3, 2, 2, None, id="circular-2x2-data2-fsdp2"),
]


@pytest.mark.parametrize("stages,repeats,micro,data,fsdp,ls", CASES)
def test_pipeline_equals_unpipelined(stages, repeats, micro, data, fsdp, ls):
    params = init_params(CONFIG, jax.random.key(0))
    inputs, targets = _batch(micro)
    rng, step = jax.random.key(3), jnp.int32(7)
    ref_loss, ref_grads = _reference(CONFIG, params, inputs, targets, ls, rng, step)
    spec = PipelineSpec(stages, micro, repeats)
    loss, grads, aux = _pipelined(CONFIG, params, inputs, targets, ls, rng, step, spec,
                                  MeshSection(data=data, fsdp=fsdp, stage=stages))
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    _close(grads, ref_grads)
    busy = np.asarray(aux["busy"])  # [S, iterations]: which (stage, iteration) slots did work
    assert busy.shape == (stages, spec.iterations)
    np.testing.assert_array_equal(busy.sum(axis=1), repeats * micro)  # every chunk of every micro-batch once
    assert 1 - busy.mean() == pytest.approx(spec.bubble())


def test_pipeline_with_low_rank_layers():
    config = dataclasses.replace(CONFIG, layer_variants=LayerVariants.hybrid(8, {"wq": 4, "w_up": 8}))
    params = init_params(config, jax.random.key(1))
    inputs, targets = _batch(2)
    rng, step = jax.random.key(0), jnp.int32(0)
    ref_loss, ref_grads = _reference(config, params, inputs, targets, None, rng, step)
    loss, grads, _ = _pipelined(config, params, inputs, targets, None, rng, step, PipelineSpec(2, 2),
                                MeshSection(data=1, stage=2))
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    _close(grads, ref_grads)


def test_stage_layout_puts_chunks_round_the_ring():
    params = {"embed": jnp.zeros((3, 2)), "layers": {"attn_norm": jnp.arange(8.0)[:, None]}}
    staged = to_stage_layout(params, PipelineSpec(stages=2, microbatches=2, repeats=2))
    # chunk r*S + s at [s, r]: stage 0 holds layers 0-1 and 4-5, stage 1 holds 2-3 and 6-7
    np.testing.assert_array_equal(staged["layers"]["attn_norm"][..., 0], [[[0, 1], [4, 5]], [[2, 3], [6, 7]]])
    np.testing.assert_array_equal(from_stage_layout(staged)["layers"]["attn_norm"], params["layers"]["attn_norm"])


@pytest.mark.parametrize("spec,message", [
    (PipelineSpec(16, 4), "more than the model's 8 layers"),
    (PipelineSpec(3, 4), "do not split into mesh.stage=3"),
    (PipelineSpec(2, 1, repeats=2), "at least as many micro-batches as stages"),
    (PipelineSpec(0, 1), "must be positive"),
])
def test_bad_pipeline_settings_are_named(spec, message):
    with pytest.raises(ConfigError, match=message):
        check_spec(spec, 8)


def test_mesh_must_divide_the_devices():
    with pytest.raises(ConfigError, match="mesh.stage=3 must be positive and divide the 8 devices"):
        parallel.make_mesh(MeshSection(stage=3))
    assert dict(parallel.make_mesh(MeshSection(fsdp=2, stage=2)).shape) == {"data": 2, "fsdp": 2, "stage": 2}


def test_hybrid_stack_is_refused():
    config = dataclasses.replace(CONFIG, layer_variants=LayerVariants.hybrid(8, {"wq": 4}, full_rank_layers=2))
    with pytest.raises(ConfigError, match="homogeneous layer stack"):
        to_stage_layout(jax.eval_shape(lambda: init_params(config, jax.random.key(0))), PipelineSpec(2, 2))

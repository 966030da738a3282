"""AC-SGD between pipeline stages (training/handoff.py) on fake CPU devices: the first (exact) pass is
the plain pipeline, both copies of every example's memory stay bitwise equal, a later compressed pass
stays within the quantizer's reach of the exact loss, and the compiled program sends exactly the
analytic bytes between stages (plain and compressed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.model import init_params
from jaxmodels.testing import tiny_config
from training import handoff, parallel
from training.config import MeshSection
from training.hlo_bytes import collective_bytes
from training.pipeline import PipelineSpec, pipeline_loss, state_shardings, to_stage_layout
from training.pipeline_step import stage_loss_setup, step_masks

CONFIG = tiny_config(num_hidden_layers=4, vocab_size=96, hidden_size=32, intermediate_size=64,
                     num_attention_heads=4, num_key_value_heads=2)
B, T = 4, 8  # rows per micro-batch, tokens


def _setup(spec):
    mesh = parallel.make_mesh(MeshSection(data=1, stage=spec.stages), jax.devices()[:spec.stages])
    params = to_stage_layout(init_params(CONFIG, jax.random.key(0)), spec)
    params = jax.device_put(params, state_shardings(params, mesh))
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, CONFIG.vocab_size, (spec.microbatches, B, T + 1)).astype(np.int32)
    setup = stage_loss_setup(CONFIG)
    skip, weights = step_masks(setup, None, spec.microbatches, jax.random.key(0), jnp.int32(0), 10)
    batch = (jnp.asarray(blocks[..., :-1]), jnp.asarray(blocks[..., 1:]), skip, weights)
    return mesh, setup, params, batch


def _memory(spec):
    shape = handoff.memory_shape(spec.stages, spec.repeats, spec.microbatches, B, T, CONFIG.hidden_size)
    return (jnp.zeros(shape, jnp.float16), jnp.zeros(shape, jnp.float16))


def _loss_and_grads(mesh, setup, spec, params, batch, hand, memory=None):
    loss_fn = pipeline_loss(setup, mesh, spec, params, handoff=hand)
    run = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, aux), grads = run(params, *batch, memory)
    return float(loss), grads, aux["memory"]


def _assert_copies_equal(memory, spec):
    """The sender's copy on stage s equals the receiver's copy on stage s+1, bitwise, for every
    boundary (stage S-1's sends of repeat r arrive at stage 0's slot r+1)."""
    send, recv = (np.asarray(m) for m in memory)
    S, V = spec.stages, spec.repeats
    for s in range(S):
        for r in range(V):
            if r * S + s == S * V - 1:
                continue  # the last chunk sends nothing
            dst, slot = (s + 1, r) if s < S - 1 else (0, r + 1)
            np.testing.assert_array_equal(send[s, r], recv[dst, slot])


@pytest.mark.parametrize("stages,repeats,micro", [(2, 1, 2), (2, 2, 2)], ids=["gpipe", "circular"])
def test_acsgd_first_pass_is_exact_then_compressed_stays_close(stages, repeats, micro):
    spec = PipelineSpec(stages, micro, repeats)
    mesh, setup, params, batch = _setup(spec)
    plain_loss, plain_grads, _ = _loss_and_grads(mesh, setup, spec, params, batch, handoff.ring(stages))
    loss, grads, memory = _loss_and_grads(mesh, setup, spec, params, batch,
                                          handoff.acsgd(stages, bwd_bits=None, exact=True), _memory(spec))
    assert loss == plain_loss  # the exact pass sends the activations themselves
    for g, h in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(plain_grads)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(h))
    _assert_copies_equal(memory, spec)
    assert np.abs(np.asarray(memory[0], np.float32)).max() > 0  # filled

    # A later pass after the weights moved: 4-bit deltas against the memory, 8-bit gradients back.
    moved = jax.tree_util.tree_map(lambda p, g: p - 0.05 * g, params, plain_grads)
    exact_loss, exact_grads, _ = _loss_and_grads(mesh, setup, spec, moved, batch, handoff.ring(stages))
    loss, grads, memory = _loss_and_grads(mesh, setup, spec, moved, batch, handoff.acsgd(stages), memory)
    assert loss != exact_loss and loss == pytest.approx(exact_loss, rel=1e-3)
    g, h = (np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)]) for t in (grads, exact_grads))
    assert np.linalg.norm(g - h) / np.linalg.norm(h) < 0.05
    _assert_copies_equal(memory, spec)


@pytest.mark.parametrize("fwd,bwd", [(None, None), (4, 8), (2, 8)], ids=["plain", "acsgd-4-8", "acsgd-2-8"])
def test_bytes_between_stages_match_the_analytic_count(fwd, bwd):
    spec = PipelineSpec(2, 2)
    mesh, setup, params, batch = _setup(spec)
    hand = handoff.ring(2) if fwd is None else handoff.acsgd(2, fwd, bwd)
    memory = None if fwd is None else _memory(spec)
    loss_fn = pipeline_loss(setup, mesh, spec, params, handoff=hand)
    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    measured = collective_bytes(step.lower(params, *batch, memory).compile().as_text())
    expected = handoff.handoff_bytes(spec.iterations - 1, B, T, CONFIG.hidden_size, fwd, bwd)
    # one hand-off per iteration but the last (its output goes nowhere), forward and backward
    assert measured["payload_bytes"]["collective-permute"] == expected["forward"] + expected["backward"]


def test_host_memory_round_trip_and_limit(tmp_path):
    from training.activation_memory import PipelineMemory
    from training.config import ConfigError

    spec = PipelineSpec(2, 2, 2)
    mesh = parallel.make_mesh(MeshSection(data=2, stage=2), jax.devices()[:4])
    memory = PipelineMemory(spec, mesh, T, CONFIG.hidden_size, max_buffer_bytes=10**7)
    ids = np.array([[3, 9, 4, 1], [7, 2, 8, 5]])
    assert memory.first_pass(ids)
    np.testing.assert_array_equal(np.asarray(memory.arrays(ids)[0]), 0)
    rng = np.random.default_rng(0)
    shape = handoff.memory_shape(2, 2, 2, 4, T, CONFIG.hidden_size)
    new = tuple(jax.device_put(rng.normal(size=shape).astype(np.float16), memory.sharding) for _ in range(2))
    memory.update(ids, new)
    assert not memory.first_pass(ids) and memory.first_pass(ids + 100)
    for got, want in zip(memory.arrays(ids[:, ::-1]), new):  # by example id, whatever the batch order
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want)[:, :, :, ::-1])
    memory.save(tmp_path)
    restored = PipelineMemory(spec, mesh, T, CONFIG.hidden_size, max_buffer_bytes=10**7)
    restored.load(tmp_path)
    for got, want in zip(restored.arrays(ids), new):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    small = PipelineMemory(spec, mesh, T, CONFIG.hidden_size, max_buffer_bytes=4096)
    with pytest.raises(ConfigError, match="pipeline.acsgd_buffer_mb"):
        small.update(ids, new)

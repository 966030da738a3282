"""The pure train/eval steps: learning, gradient accumulation, bf16, schedule, 1 vs 8 devices, FSDP."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxmodels.model import forward, init_params
from jaxmodels.testing import tiny_config
from training import parallel
from training.config import MeshSection, OptimizerSection, ScheduleSection
from training.data import split_batch
from training.step import build_steps, learning_rate_schedule, token_cross_entropy

CONFIG = tiny_config(num_hidden_layers=2, vocab_size=128, hidden_size=64, intermediate_size=128)
OPT = OptimizerSection(lr=3e-3, grad_accum=1)
SCHED = ScheduleSection(warmup_steps=2)


def _batches(n, batch=8, seq=16, seed=0):
    """Learnable data: each row counts up by a row-specific stride (mod vocab)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        start = rng.integers(0, 128, (batch, 1))
        stride = rng.integers(1, 4, (batch, 1))
        out.append(((start + stride * np.arange(seq + 1)) % 128).astype(np.int32))
    return out


def _run(mesh_cfg, steps=4, grad_accum=1, compute_dtype="float32", devices=None, batches=None):
    opt = OptimizerSection(lr=3e-3, grad_accum=grad_accum)
    fns = build_steps(CONFIG, opt, SCHED, 20, compute_dtype)
    mesh = parallel.make_mesh(mesh_cfg, devices)
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    psh = parallel.state_shardings(params, mesh)
    osh = parallel.state_shardings(jax.eval_shape(fns.optimizer.init, params), mesh)
    params = parallel.put(params, psh)
    opt_state = jax.jit(fns.optimizer.init, out_shardings=osh)(params)
    step_fn = parallel.jit_train_step(fns.train_step, mesh, psh, osh)
    losses = []
    for i, blocks in enumerate(batches or _batches(steps)):
        batch = parallel.put(split_batch(blocks, grad_accum), parallel.batch_sharding(mesh))
        params, opt_state, m = step_fn(params, opt_state, batch, jax.random.PRNGKey(1), jnp.int32(i))
        losses.append(float(m["loss"]))
    return np.asarray(losses), jax.device_get(params), params


@functools.lru_cache(maxsize=None)
def _run_cached(data, fsdp=1, grad_accum=1, compute_dtype="float32"):
    """3 steps on the standard batches (shared by the tests that compare setups)."""
    devices = jax.devices()[:data * fsdp]
    return _run(MeshSection(data=data, fsdp=fsdp), steps=3, grad_accum=grad_accum,
                compute_dtype=compute_dtype, devices=devices)


def test_cross_entropy_matches_log_softmax():
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 11))
    targets = jnp.array([[1, 2, 3, 4, 5], [0, 10, 9, 8, 7]])
    ce, correct = token_cross_entropy(logits, targets)
    ref = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(ce, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(correct, (logits.argmax(-1) == targets))


def test_loss_goes_down():
    batches = _batches(1) * 30  # one batch repeated: must be memorized
    losses, _, _ = _run(MeshSection(data=1), batches=batches, devices=jax.devices()[:1])
    assert losses[0] == pytest.approx(np.log(128), rel=0.05)
    assert losses[-1] < 0.5 * losses[0]


def test_gradient_accumulation_matches_one_big_batch():
    one, four = _run_cached(1), _run_cached(1, grad_accum=4)
    np.testing.assert_allclose(one[0], four[0], rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5), one[1], four[1])


def test_data_parallel_and_fsdp_match_one_device():
    assert len(jax.devices()) == 8
    single, dp, fsdp = _run_cached(1), _run_cached(8), _run_cached(2, fsdp=4)
    for other in (dp, fsdp):
        np.testing.assert_allclose(other[0], single[0], rtol=1e-5)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5),
                               other[1], single[1])
    # the parameters really are sharded: largest divisible non-layer axis over fsdp
    live = fsdp[2]
    assert live["embed"].sharding.spec == P("fsdp", None)  # [V=128, D=64]
    assert live["layers"]["w_up"].sharding.spec == P(None, None, "fsdp")  # [L, D=64, F=128]
    assert live["layers"]["attn_norm"].sharding.spec == P(None, "fsdp")  # never the layer axis
    assert dp[2]["embed"].sharding.spec == P()


def test_bf16_compute_keeps_fp32_master_weights():
    f32, bf16 = _run_cached(1), _run_cached(1, compute_dtype="bfloat16")
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(bf16[1]))
    np.testing.assert_allclose(bf16[0], f32[0], rtol=2e-2)


def test_remat_gives_the_same_step():
    blocks = _batches(1)[0]
    batch = split_batch(blocks, 1)
    outs = []
    for remat in (False, True):
        fns = build_steps(CONFIG, OPT, SCHED, 10, remat=remat)
        params = init_params(CONFIG, jax.random.PRNGKey(0))
        outs.append(jax.jit(fns.train_step)(params, fns.optimizer.init(params), batch,
                                            jax.random.PRNGKey(1), jnp.int32(0)))
    np.testing.assert_allclose(outs[0][2]["loss"], outs[1][2]["loss"], rtol=1e-6)
    np.testing.assert_allclose(outs[0][2]["grad_norm"], outs[1][2]["grad_norm"], rtol=1e-5)


def test_eval_step_matches_forward():
    fns = build_steps(CONFIG, OPT, SCHED, 10)
    params = init_params(CONFIG, jax.random.PRNGKey(3))
    blocks = _batches(1, batch=4)[0]
    weights = np.array([1, 1, 1, 0], np.float32)
    sums = jax.jit(fns.eval_step)(params, {"inputs": blocks[:, :-1], "targets": blocks[:, 1:],
                                           "weights": weights})
    logits, _ = forward(params, CONFIG, jnp.asarray(blocks[:3, :-1]))
    ce, _ = token_cross_entropy(logits, jnp.asarray(blocks[:3, 1:]))
    assert float(sums["tokens"]) == 3 * 16
    np.testing.assert_allclose(float(sums["loss"]), float(ce.sum()), rtol=1e-5)


def test_schedule_warmup_then_cosine():
    sched = learning_rate_schedule(OptimizerSection(lr=1.0), ScheduleSection(warmup_steps=4, min_lr_ratio=0.1),
                                   total_steps=104)
    lrs = np.asarray([float(sched(i)) for i in range(105)])
    np.testing.assert_allclose(lrs[:4], [0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[54] == pytest.approx(0.55) and lrs[104] == pytest.approx(0.1)
    assert np.all(np.diff(lrs[4:]) <= 1e-7)

"""AC-SGD (training/acsgd.py): the quantizer, the pipeline hand-off inside `jax.shard_map` on 4 fake CPU
devices, its gradient, and the host-memory activation store."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from jax.sharding import AxisType, Mesh, PartitionSpec as P

from training import acsgd
from training.config import ConfigError

S = 4  # pipeline stages (devices)
PERM = [(s, (s + 1) % S) for s in range(S)]  # cyclic: stage s sends to s + 1
MB, T, D = 2, 8, 16  # per-device micro-batch [MB, T, D]


def _bound(x: np.ndarray, bits: int) -> np.ndarray:
    """The promised error bound of quantize/dequantize: half a step of the (rounded-up) scale,
    per channel [D], from amax over every axis but the last; slack for float32 arithmetic."""
    levels = 2 ** (bits - 1)
    amax = np.abs(np.asarray(x, np.float64)).max(axis=tuple(range(x.ndim - 1)))
    return amax * levels / (levels - 0.5) * (1 + 2.0 ** -14) / levels / 2 * (1 + 1e-4) + 1e-37


@functools.partial(jax.jit, static_argnums=1)
def _round_trip(x: jax.Array, bits: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    codes, scale = acsgd.quantize(x, bits)
    return codes, scale, acsgd.dequantize(codes, scale, bits, jnp.float32)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bits=st.sampled_from([2, 4, 8]), shape=st.sampled_from([(8,), (1, 3, 8), (2, 5, 24)]),
       seed=st.integers(0, 2 ** 31 - 1), magnitude=st.sampled_from([1e-30, 1e-6, 1.0, 3e4, 1e20]))
def test_quantize_round_trip_within_half_a_step(bits, shape, seed, magnitude):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * magnitude).astype(np.float32)
    x.reshape(-1, shape[-1])[0, 0] = np.abs(x[..., 0]).max()  # +amax: the reference quantizer's worst case
    codes, scale, back = _round_trip(jnp.asarray(x), bits)
    assert codes.dtype == jnp.uint8 and codes.shape == (*shape[:-1], shape[-1] * bits // 8)
    assert scale.dtype == jnp.float32 and scale.shape == (shape[-1],)
    err = np.abs(np.asarray(back, np.float64) - x)
    assert np.all(err <= _bound(x, bits)), (err / _bound(x, bits)).max()
    step = np.asarray(scale, np.float64) / 2 ** (bits - 1)  # the bound in terms of the sent scale
    assert np.all(err <= step / 2 * (1 + 1e-4) + 1e-37)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packing_is_exact_for_every_code(bits):
    every = np.arange(2 ** bits, dtype=np.uint8)
    codes = np.stack([np.roll(every, k) for k in range(3)])  # [3, 2^bits]: each code in each slot
    packed = acsgd._pack(jnp.asarray(codes), bits)
    assert packed.dtype == jnp.uint8 and packed.shape == (3, codes.shape[1] * bits // 8)
    np.testing.assert_array_equal(np.asarray(acsgd._unpack(packed, bits)), codes)
    if bits == 4:  # code j of a byte sits in bits [4j, 4j + 4)
        assert int(packed[0, 0]) == codes[0, 0] | codes[0, 1] << 4


def test_quantize_signs_zero_channels_and_bad_input():
    x = jnp.asarray([[1.0, -2.0, 0.0, 0.0, 3.0, -3.0, 0.5, 0.0]])
    for bits in (2, 4, 8):
        codes, scale = acsgd.quantize(x, bits)
        back = np.asarray(acsgd.dequantize(codes, scale, bits, jnp.float32))
        assert np.all(np.isfinite(back)) and np.all(back[:, [2, 3, 7]] == 0)
        assert np.all(np.asarray(scale)[[2, 3, 7]] == 0)
        assert np.all(np.sign(back[:, [0, 1, 4, 5]]) == np.sign(np.asarray(x)[:, [0, 1, 4, 5]]))
    with pytest.raises(ConfigError, match="one of"):
        acsgd.quantize(x, 3)
    with pytest.raises(ConfigError, match="divisible by 4"):
        acsgd.quantize(jnp.ones((2, 6)), 2)
    assert acsgd.message_bytes((MB, T, D), 4) == MB * T * D // 2 + 4 * D
    assert acsgd.message_bytes((MB, T, D), None, jnp.bfloat16) == MB * T * D * 2


# --- the hand-off inside shard_map --------------------------------------------------------------

@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()[:S]), ("stage",), axis_types=(AxisType.Auto,))


def _sharded(fn, mesh):
    spec = P("stage")
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec))


def _handoff(mesh, **kw):
    return _sharded(lambda x, ms, mr: acsgd.handoff(x, ms, mr, axis_name="stage", perm=PERM, **kw), mesh)


def _to_next(a: np.ndarray) -> np.ndarray:
    """What each device holds after the cyclic send: device s gets device s-1's block."""
    return np.roll(np.asarray(a).reshape(S, MB, T, D), 1, axis=0).reshape(S * MB, T, D)


def _blocks(a) -> np.ndarray:
    return np.asarray(a, np.float64).reshape(S, MB * T, D)


def _random(seed: int, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((S * MB, T, D)) * scale).astype(np.float32)


def test_exact_handoff_is_ppermute(mesh):
    x = _random(0)
    ref = _sharded(lambda v: jax.lax.ppermute(v, "stage", PERM), mesh)(x)
    received, m_send, m_recv = _handoff(mesh, exact=True)(x, np.zeros_like(x), np.zeros_like(x))
    np.testing.assert_array_equal(np.asarray(received), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(received), _to_next(x))
    np.testing.assert_array_equal(np.asarray(m_send), x)
    np.testing.assert_array_equal(np.asarray(m_recv), np.asarray(received))


def _check_compressed(x, m_send, received, m_send_new, m_recv_new, bits):
    """received is within the bound of the sender's true x, and both copies of m agree bitwise."""
    bound = np.stack([_bound(block, bits) for block in _blocks(x - m_send)])  # [S, D], per sender
    bound = bound + np.abs(x).max() * 2.0 ** -22  # the float32 rounding of x - m and of m + delta
    err = np.abs(_blocks(received) - _blocks(_to_next(x)))  # device s vs sender s-1
    assert np.all(err <= np.roll(bound, 1, axis=0)[:, None, :])
    np.testing.assert_array_equal(np.asarray(m_recv_new).view(np.uint32),
                                  _to_next(np.asarray(m_send_new)).view(np.uint32))
    return err.max()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_compressed_handoff_bound_and_identical_copies(mesh, bits):
    x, m_send = _random(1), _random(2, 0.5)
    m_recv = _to_next(m_send)  # the receiver's copy of what the sender has
    received, m_send_new, m_recv_new = _handoff(mesh, fwd_bits=bits)(x, m_send, m_recv)
    _check_compressed(x, m_send, received, m_send_new, m_recv_new, bits)
    np.testing.assert_array_equal(np.asarray(m_recv_new), np.asarray(received))


def test_bfloat16_activations_with_float16_buffers(mesh):
    """Mixed dtypes: outputs in x's dtype, and the two copies still agree bitwise."""
    x = _random(1).astype(jnp.bfloat16)
    m_send = _random(2, 0.5).astype(np.float16)
    received, m_send_new, m_recv_new = _handoff(mesh)(x, m_send, _to_next(m_send))
    assert received.dtype == m_send_new.dtype == m_recv_new.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(m_recv_new).view(np.uint16),
                                  _to_next(np.asarray(m_send_new)).view(np.uint16))
    delta = np.asarray(x, np.float32) - np.asarray(m_send, np.float32)
    bound = np.stack([_bound(block, 4) for block in _blocks(delta)])  # [S, D], per sender
    bound = bound + np.abs(_blocks(x)).max() * 2.0 ** -7  # the bfloat16 rounding of received
    err = np.abs(_blocks(received) - _blocks(_to_next(x)))
    assert np.all(err <= np.roll(bound, 1, axis=0)[:, None, :])


def test_repeated_passes_shrink_the_error(mesh):
    """Pass 0 is exact; later passes of a slowly changing activation send only the change, so the
    reconstruction error falls well below that of quantizing the activation itself."""
    x = _random(3)
    received, m_send, m_recv = _handoff(mesh, exact=True)(x, np.zeros_like(x), np.zeros_like(x))
    np.testing.assert_array_equal(np.asarray(m_recv), _to_next(x))
    step = _handoff(mesh, fwd_bits=4)
    direct = _bound(x, 4).max()  # the error bound of 4-bit quantization of x itself
    errors = []
    for k in range(1, 7):
        x = x + _random(10 + k, 0.01)  # a small drift per pass, like an example between epochs
        ms, mr = np.asarray(m_send), np.asarray(m_recv)
        received, m_send, m_recv = step(x, ms, mr)
        errors.append(_check_compressed(x, ms, received, m_send, m_recv, 4))
    assert max(errors) < direct / 10, (errors, direct)
    assert errors[-1] <= 3 * errors[0], errors  # stays bounded: the two copies do not drift apart


def _loss_grads(mesh, w, **kw):
    """Gradients of sum(w * received) with respect to (x, m_send, m_recv)."""
    fn = _handoff(mesh, **kw)
    return jax.grad(lambda x, ms, mr: jnp.sum(w * fn(x, ms, mr)[0]), argnums=(0, 1, 2))


@pytest.mark.parametrize("exact", [False, True])
def test_gradient_is_the_quantized_ppermute_gradient(mesh, exact):
    x, m_send, w = _random(4), _random(5, 0.5), _random(6)
    m_recv = _to_next(m_send)
    ref = jax.grad(lambda v: jnp.sum(w * _sharded(lambda a: jax.lax.ppermute(a, "stage", PERM), mesh)(v)))(x)
    ref = np.asarray(ref)
    np.testing.assert_array_equal(ref, np.roll(w.reshape(S, MB, T, D), -1, axis=0).reshape(w.shape))
    g_exact = _loss_grads(mesh, w, exact=exact, bwd_bits=None)(x, m_send, m_recv)
    np.testing.assert_array_equal(np.asarray(g_exact[0]), ref)
    g = _loss_grads(mesh, w, exact=exact, bwd_bits=8)(x, m_send, m_recv)
    bound = np.stack([_bound(block, 8) for block in _blocks(ref)])  # per receiver's cotangent
    assert np.all(np.abs(_blocks(g[0]) - _blocks(ref)) <= bound[:, None, :])
    assert not np.array_equal(np.asarray(g[0]), ref)  # really quantized
    for zero in (*g[1:], *g_exact[1:]):
        np.testing.assert_array_equal(np.asarray(zero), 0)


def test_handoff_rejects_bad_arguments(mesh):
    x = np.zeros((S * MB, T, 5), np.float32)  # 5 is odd: 4-bit codes cannot pair up
    with pytest.raises(ConfigError, match="divisible"):
        _sharded(lambda a, b, c: acsgd.handoff(a, b, c, axis_name="stage", perm=PERM), mesh)(x, x, x)
    with pytest.raises(ConfigError, match="bwd_bits"):
        acsgd.handoff(jnp.zeros((2, 8)), jnp.zeros((2, 8)), jnp.zeros((2, 8)), axis_name="stage",
                      perm=PERM, bwd_bits=16)


# --- ActivationStore ----------------------------------------------------------------------------

def test_store_gather_scatter():
    store = acsgd.ActivationStore((T, D), max_buffer_bytes=10 ** 6)
    values, seen = store.gather([3, 7])
    assert values.shape == (2, T, D) and values.dtype == np.float16 and not seen.any()
    assert np.all(values == 0)
    a = _random(7)[:3]
    store.scatter(np.array([7, 3, 11]), a)
    values, seen = store.gather(np.array([11, 5, 7]))
    assert seen.tolist() == [True, False, True]
    np.testing.assert_array_equal(values[[0, 2]], a[[2, 0]].astype(np.float16))
    assert np.all(values[1] == 0)
    store.scatter([3, 3], np.stack([a[0], a[1]]))  # a repeated id keeps its last value
    np.testing.assert_array_equal(store.gather([3])[0][0], a[1].astype(np.float16))
    assert len(store) == 3 and 3 in store and 5 not in store and store.nbytes == 3 * T * D * 2
    with pytest.raises(ConfigError, match="1-D integer"):
        store.gather(np.array([[1, 2]]))
    with pytest.raises(ConfigError, match="do not match"):
        store.scatter([1], a[:2])
    with pytest.raises(ConfigError, match="float16 or float32"):
        acsgd.ActivationStore((2,), max_buffer_bytes=100, dtype=np.float64)


def test_store_limit_error_names_the_key_and_keeps_the_contents():
    row = T * D * 4
    store = acsgd.ActivationStore((T, D), max_buffer_bytes=3 * row, dtype=np.float32)
    a = _random(8)[:4]
    store.scatter([0, 1, 2], a[:3])
    store.scatter([2, 1], a[:2])  # known ids need no room
    with pytest.raises(ConfigError) as err:
        store.scatter([1, 9], a[:2])
    message = str(err.value)
    assert "pipeline.acsgd_buffer_mb" in message
    assert str(3 * row) in message and str(4 * row) in message and "raise" in message
    assert len(store) == 3 and 9 not in store
    np.testing.assert_array_equal(store.gather([1])[0][0], a[1])


@settings(max_examples=30, deadline=None)
@given(ops=st.lists(st.lists(st.integers(0, 40), min_size=1, max_size=6), min_size=1, max_size=12))
def test_store_matches_a_dict(ops):
    store = acsgd.ActivationStore((2, 4), max_buffer_bytes=10 ** 6, dtype=np.float32)
    model: dict[int, np.ndarray] = {}
    for n, ids in enumerate(ops):
        values = np.arange(len(ids) * 8, dtype=np.float32).reshape(len(ids), 2, 4) + 100 * n
        store.scatter(ids, values)
        model.update({i: v for i, v in zip(ids, values)})
    probe = sorted(set(model) | {41, 42})
    got, seen = store.gather(probe)
    for i, value, was_seen in zip(probe, got, seen):
        assert was_seen == (i in model)
        np.testing.assert_array_equal(value, model.get(i, np.zeros((2, 4), np.float32)))


def test_store_save_load(tmp_path: Path):
    store = acsgd.ActivationStore((T, D), max_buffer_bytes=10 ** 6)
    a = _random(9)
    store.scatter(np.arange(100, 100 + len(a)), a)
    store.scatter([5], a[:1] * 2)
    path = tmp_path / "acts.npz"
    store.save(path)
    store.save(path)  # overwriting is atomic too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts.npz"]  # no temporary left behind
    again = acsgd.ActivationStore((T, D), max_buffer_bytes=10 ** 6)
    again.scatter([1], a[:1])  # replaced by the file's contents
    again.load(path)
    ids = [5, *range(100, 100 + len(a)), 1]
    v1, s1 = store.gather(ids)
    v2, s2 = again.gather(ids)
    np.testing.assert_array_equal(v1, v2)
    np.testing.assert_array_equal(s1, s2)
    assert s2.tolist() == [True] * (len(a) + 1) + [False]
    with pytest.raises(ConfigError, match="pipeline.acsgd_buffer_mb"):
        acsgd.ActivationStore((T, D), max_buffer_bytes=T * D * 2 * 3).load(path)
    with pytest.raises(ConfigError, match="holds"):
        acsgd.ActivationStore((T, D), max_buffer_bytes=10 ** 6, dtype=np.float32).load(path)
    with pytest.raises(ConfigError, match="does not exist"):
        again.load(tmp_path / "missing.npz")

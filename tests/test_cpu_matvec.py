"""The CPU decode kernel (jaxmodels/cpu_matvec.py + .cc): equal to the float64 product of the
stored weights for every format and for shapes with vector tails, a row's result independent of
the rows beside it, greedy decoding through it equal to decoding through XLA, and a clear fallback
where it cannot be built."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from inference import engine, generate
from jaxmodels import cpu_matvec, init_params
from jaxmodels.config import ConfigError
from jaxmodels.params import decode_layout
from jaxmodels.quantize import convert_weights
from jaxmodels.testing import tiny_config

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU kernel")


def _weight(rng, n, m, dtype):
    """A weight [n, m] in `dtype`, its scale [n] (int8) or None, and its value in float64."""
    w = rng.standard_normal((n, m)).astype(np.float32)
    if dtype == "int8":
        scale = np.abs(w).max(1) / 127 + 1e-6
        q = np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8)
        return jnp.asarray(q), jnp.asarray(scale, jnp.float32), q.astype(np.float64) * scale[:, None].astype(np.float64)
    wt = jnp.asarray(w).astype(dtype)
    return wt, None, np.asarray(wt.astype(jnp.float32), np.float64)


@settings(max_examples=25, deadline=None)
@given(dtype=st.sampled_from(["float32", "bfloat16", "int8"]), rows=st.integers(1, 13),
       n=st.integers(1, 70), m=st.sampled_from([1, 7, 16, 37, 64, 200]), seed=st.integers(0, 2**16))
def test_the_kernel_equals_the_float64_product_of_the_stored_weights(dtype, rows, n, m, seed):
    """Every format, batch rows with and without full 4- and 8-row tiles, m with and without a tail
    past the last full vector; the error is float32 accumulation only."""
    rng = np.random.default_rng(seed)
    wt, scale, exact_w = _weight(rng, n, m, dtype)
    x = rng.standard_normal((rows, m)).astype(np.float32)
    y = np.asarray(cpu_matvec.matvec(jnp.asarray(x), wt, scale))
    exact = x.astype(np.float64) @ exact_w.T
    bound = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(exact_w).T) + 1e-30
    assert y.shape == (rows, n) and y.dtype == np.float32
    assert np.all(np.abs(y - exact) <= bound), np.max(np.abs(y - exact) / bound)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_a_weight_split_among_threads_equals_the_float64_product(dtype):
    """A weight large enough to be split into chunks for XLA's intra-op threads (the shapes above
    run on the calling thread alone): every chunk, the last one short, is computed."""
    rng = np.random.default_rng(7)
    wt, scale, exact_w = _weight(rng, 1001, 600, dtype)  # >= 2 chunks of JAXMODELS_MIN_CHUNK_BYTES
    x = rng.standard_normal((5, 600)).astype(np.float32)
    y = np.asarray(cpu_matvec.matvec(jnp.asarray(x), wt, scale))
    exact = x.astype(np.float64) @ exact_w.T
    assert np.all(np.abs(y - exact) <= 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(exact_w).T))


@pytest.mark.parametrize("m", [2 * cpu_matvec.WIDEST_VECTOR, 6 * cpu_matvec.WIDEST_VECTOR, 576])
def test_bf16_read_in_pairs_equals_the_float64_product(m):
    """bf16 rows of whole pairs of vectors take `pair_tile` (even and odd inputs summed apart),
    in 8-, 4- and 1-row tiles; tails of other lengths are covered above."""
    rng = np.random.default_rng(m)
    wt, _, exact_w = _weight(rng, 37, m, "bfloat16")
    x = rng.standard_normal((13, m)).astype(np.float32)
    y = np.asarray(cpu_matvec.matvec(jnp.asarray(x), wt))
    exact = x.astype(np.float64) @ exact_w.T
    assert np.all(np.abs(y - exact) <= 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(exact_w).T))


def test_a_rows_result_does_not_depend_on_the_rows_beside_it():
    """Each output is summed in the same order whatever the batch (1-, 4- and 8-row tiles alike),
    so a sequence decodes to the same bits alone or batched."""
    rng = np.random.default_rng(0)
    wt, _, _ = _weight(rng, 300, 576, "bfloat16")
    x = jnp.asarray(rng.standard_normal((13, 576)).astype(np.float32))
    batched = np.asarray(cpu_matvec.matvec(x, wt))
    alone = np.stack([np.asarray(cpu_matvec.matvec(x[i:i + 1], wt))[0] for i in range(13)])
    np.testing.assert_array_equal(batched, alone)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_several_weights_in_one_call_equal_one_call_each(dtype):
    """`matvecs` shares one call's chunks among the weights (a tiny one, one on the calling thread
    alone, one split among threads): each result is its own `matvec`, bit for bit."""
    rng = np.random.default_rng(5)
    weights = [_weight(rng, n, 600, dtype) for n in (3, 60, 1001)]
    x = jnp.asarray(rng.standard_normal((5, 600)).astype(np.float32))
    together = jax.jit(cpu_matvec.matvecs)(x, [w for w, _, _ in weights], [s for _, s, _ in weights])
    for (wt, scale, _), got in zip(weights, together):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(cpu_matvec.matvec(x, wt, scale)))
    with pytest.raises(ConfigError, match="one dtype"):
        cpu_matvec.matvecs(x, [weights[0][0], weights[1][0].astype(jnp.float16)], [None, None])


def test_a_decode_step_calls_the_kernel_once_for_q_k_v_and_once_for_gate_up(monkeypatch):
    """`layers.dense_many`: 4 kernel calls per layer (q/k/v, o, gate/up, down) and one for the head."""
    config = tiny_config(tie_word_embeddings=True)
    params = decode_layout(convert_weights(init_params(config, jax.random.key(3), std=0.2), "bfloat16"))
    monkeypatch.setattr(engine, "_COMPILED", {})
    generate(params, config, [[1, 2, 3]], 4, eos_token_ids=())
    hlo = [exe for key, exe in engine._COMPILED.items() if key[0] == "decode_loop"][-1].as_text()
    calls = hlo.count(f'custom_call_target="{cpu_matvec.TARGETS[jnp.dtype(jnp.bfloat16)]}"')
    assert calls == 4 * config.num_hidden_layers + 1, calls


def test_it_runs_under_jit_loops_and_vmap_and_keeps_the_input_dtype():
    rng = np.random.default_rng(1)
    wt, _, exact_w = _weight(rng, 48, 48, "bfloat16")
    x = jnp.asarray(rng.standard_normal((3, 2, 48)), jnp.bfloat16)
    looped = jax.jit(lambda x: jax.lax.fori_loop(0, 2, lambda _, h: cpu_matvec.matvec(h, wt) / 8, x))(x)
    mapped = jax.vmap(lambda r: cpu_matvec.matvec(r, wt))(x)
    assert looped.dtype == mapped.dtype == jnp.bfloat16 and looped.shape == mapped.shape == (3, 2, 48)
    once = np.asarray(x.astype(jnp.float32), np.float64) @ exact_w.T
    np.testing.assert_allclose(np.asarray(mapped, np.float64), once, rtol=2e-2, atol=2e-2)
    twice = (np.asarray(cpu_matvec.matvec(x, wt) / 8, np.float64) @ exact_w.T) / 8
    np.testing.assert_allclose(np.asarray(looped, np.float64), twice, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("rows,n,m,groups", [(1, 37, 64, 4), (5, 20, 192, 12), (8, 1001, 600, 1), (3, 1001, 640, 10)])
def test_int8_scales_per_group_of_inputs_equal_the_float64_product(rows, n, m, groups):
    """scale [G, n]: each group of m / G inputs times its own scale (`quantize.Int8Weight`), on one
    thread and split among threads; the same numbers as XLA's grouped product within rounding."""
    from jaxmodels.layers import _xla_matmul

    rng = np.random.default_rng(groups)
    w = rng.standard_normal((n, m)).astype(np.float32)
    wg = w.reshape(n, groups, m // groups)
    scale = np.abs(wg).max(2).T / 127 + 1e-6  # [G, n]
    q = np.clip(np.round(wg / scale.T[:, :, None]), -127, 127).astype(np.int8)
    exact_w = (q.astype(np.float64) * scale.T[:, :, None]).reshape(n, m)
    x = rng.standard_normal((rows, m)).astype(np.float32)
    q, scale = jnp.asarray(q.reshape(n, m)), jnp.asarray(scale, jnp.float32)
    assert cpu_matvec.applies(q, jnp.asarray(x), scale)
    y = np.asarray(cpu_matvec.matvec(jnp.asarray(x), q, scale))
    exact = x.astype(np.float64) @ exact_w.T
    bound = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(exact_w).T) + 1e-30
    assert np.all(np.abs(y - exact) <= bound), np.max(np.abs(y - exact) / bound)
    np.testing.assert_allclose(np.asarray(_xla_matmul(q, jnp.asarray(x), scale)), y, rtol=1e-5, atol=1e-4)


def test_it_applies_to_a_few_rows_of_supported_weights_only():
    w32, w16 = jnp.zeros((8, 16)), jnp.zeros((8, 16), jnp.float16)
    assert cpu_matvec.applies(w32, jnp.zeros((1, 1, 16)))
    assert cpu_matvec.applies(jnp.zeros((8, 16), jnp.int8), jnp.zeros((16, 16)))
    assert not cpu_matvec.applies(w32, jnp.zeros((cpu_matvec.MAX_ROWS[w32.dtype] + 1, 16)))  # XLA's GEMM
    assert not cpu_matvec.applies(w16, jnp.zeros((1, 16)))  # float16: no kernel
    s8, x = jnp.zeros((8, 96), jnp.int8), jnp.zeros((1, 96))
    assert cpu_matvec.applies(s8, x, jnp.ones((3, 8))) and cpu_matvec.applies(s8, x, jnp.ones((8,)))
    assert not cpu_matvec.applies(s8, x, jnp.ones((4, 8)))  # groups of 24 inputs: not a multiple of 16


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
def test_greedy_decoding_through_the_kernel_equals_decoding_through_xla(weights, monkeypatch):
    """The same tokens with the kernel and with XLA's matmuls (the kernel off), and logits within
    float32 rounding of each other, at batch 1 and 3; the compiled loop calls the kernel."""
    config = tiny_config(tie_word_embeddings=True)
    params = decode_layout(convert_weights(init_params(config, jax.random.key(3), std=0.2), weights))
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [200, 13, 77, 4]]
    monkeypatch.setattr(engine, "_COMPILED", {})
    ours = [generate(params, config, prompts[:b], 10, eos_token_ids=()) for b in (1, 3)]
    hlo = [exe for key, exe in engine._COMPILED.items() if key[0] == "decode_loop"][-1].as_text()
    assert cpu_matvec.TARGETS[jnp.dtype(jnp.float32 if weights == "float32" else weights)] in hlo
    monkeypatch.setattr(cpu_matvec, "MAX_ROWS", {})
    monkeypatch.setattr(engine, "_COMPILED", {})
    xla = [generate(params, config, prompts[:b], 10, eos_token_ids=()) for b in (1, 3)]
    assert "jaxmodels_matvec" not in [exe for key, exe in engine._COMPILED.items() if key[0] == "decode_loop"][-1].as_text()
    for a, b in zip(ours, xla):
        assert a.tokens == b.tokens


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_take_rows_copies_the_stored_rows_and_clamps_ids(dtype):
    table = jnp.asarray(np.random.default_rng(0).standard_normal((50, 37)), dtype)
    ids = jnp.asarray([[3, 0, 49], [-5, 53, 7]], jnp.int32)
    assert cpu_matvec.takes_rows(table) and not cpu_matvec.takes_rows(table.astype(jnp.float32))
    for got in (cpu_matvec.take_rows(table, ids), jax.jit(cpu_matvec.take_rows)(table, ids)):
        assert got.shape == (2, 3, 37) and got.dtype == dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(table)[np.clip(np.asarray(ids), 0, 49)])
    # differentiable in the table (`decode_embedding` is public): the same gradient as jnp.take's
    ids = jnp.clip(ids, 0, 49)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 37)), jnp.float32)
    loss = lambda take: lambda t: (take(t, ids).astype(jnp.float32) * weights).sum()  # noqa: E731
    ours = jax.jit(jax.grad(loss(cpu_matvec.take_rows)))(table)
    xla = jax.grad(loss(lambda t, i: jnp.take(t, i, axis=0)))(table)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(xla))


def test_a_bf16_decode_loop_gathers_the_embedding_as_stored(monkeypatch):
    """XLA:CPU gathers from a bf16 table through float32 and hoists the widening of the whole
    table out of the decode loop; through `take_rows` the compiled loop holds no float32 table,
    and decodes the same tokens."""
    config = tiny_config(tie_word_embeddings=True)
    params = decode_layout(convert_weights(init_params(config, jax.random.key(3), std=0.2), "bfloat16"))
    widened = f"f32[{config.vocab_size},{config.hidden_size}]"
    runs = {}
    for kernel in (True, False):
        monkeypatch.setattr(cpu_matvec, "takes_rows", lambda table, on=kernel: on)
        monkeypatch.setattr(engine, "_COMPILED", {})
        runs[kernel] = generate(params, config, [[1, 2, 3, 4, 5]], 8, eos_token_ids=()).tokens
        hlo = [exe for key, exe in engine._COMPILED.items() if key[0] == "decode_loop"][-1].as_text()
        assert (widened in hlo) is not kernel and (cpu_matvec.TAKE_ROWS in hlo) is kernel
    assert runs[True] == runs[False]


def test_without_a_compiler_it_warns_once_and_decoding_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.setenv("JAXMODELS_CACHE", str(tmp_path / "cache"))
    cpu_matvec.available.cache_clear()
    try:
        with pytest.warns(UserWarning, match="no-such-c\\+\\+.*JAXMODELS_CPU_MATVEC=0"):
            assert not cpu_matvec.available()
        assert not cpu_matvec.applies(jnp.zeros((8, 16)), jnp.zeros((1, 16)))
        config = tiny_config()
        monkeypatch.setattr(engine, "_COMPILED", {})
        res = generate(decode_layout(init_params(config, jax.random.key(0))), config, [[1, 2, 3]], 3)
        assert len(res.tokens[0]) == 3
        with pytest.raises(Exception, match="not available"):
            cpu_matvec.matvec(jnp.zeros((1, 16)), jnp.zeros((8, 16)))
    finally:
        cpu_matvec.available.cache_clear()


def test_the_switch_turns_it_off_without_a_warning(monkeypatch, recwarn):
    monkeypatch.setenv(cpu_matvec.ENV_SWITCH, "0")
    cpu_matvec.available.cache_clear()
    try:
        assert not cpu_matvec.available()
        assert not [w for w in recwarn if "kernel" in str(w.message)]
    finally:
        cpu_matvec.available.cache_clear()


def test_a_build_is_cached_by_source_compiler_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXMODELS_CACHE", str(tmp_path))
    first = cpu_matvec.build()
    assert first.exists() and first.parent == tmp_path / "cpu_matvec"
    stamp = first.stat().st_mtime_ns
    assert cpu_matvec.build() == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt
    monkeypatch.setattr(cpu_matvec, "cpu_flags", lambda: {"another-cpu"})
    assert cpu_matvec.build() != first

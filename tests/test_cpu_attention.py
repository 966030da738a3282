"""The CPU decode attention kernel (jaxmodels/cpu_attention.py + .cc): equal to the jnp path for
ragged rows, GQA groups, head sizes and up to 16 new tokens; a query's bits independent of the other
queries and rows of the call; slots past what a row sees never read; "auto" on CPU uses it for dense
layers only, and decoding through it gives the jnp path's tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from inference import engine, generate
from jaxmodels import cpu_attention, cpu_matvec, init_params
from jaxmodels.attention import attend, gqa_attention
from jaxmodels.attention_plan import identity_plan
from jaxmodels.config import ConfigError
from jaxmodels.params import decode_layout
from jaxmodels.testing import tiny_config

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU kernel")


def _problem(rng, b, t, h, kv, s, hd, scale=1.0):
    """q [B, T, H, hd] and a cache k, v [B*KV, S, hd]; row b's T queries at consecutive positions
    from a random start (ragged rows)."""
    q = jnp.asarray(scale * rng.standard_normal((b, t, h, hd)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b * kv, s, hd)), jnp.float32) for _ in range(2))
    starts = rng.integers(0, max(s - t, 0) + 1, size=b)
    return q, k, v, jnp.asarray(starts[:, None] + np.arange(t)[None], jnp.int32)


@settings(max_examples=15, deadline=None)  # each example compiles its own shapes: about 1 s
@given(b=st.integers(1, 5), t=st.sampled_from([1, 2, 5, 16]), kv=st.integers(1, 3), group=st.sampled_from([1, 3, 4]),
       s=st.integers(16, 90), hd=st.sampled_from([16, 48, 64, 128]), scale=st.sampled_from([1.0, 8.0]),
       seed=st.integers(0, 2**16))
def test_the_kernel_equals_the_jnp_path(b, t, kv, group, s, hd, scale, seed):
    """scale 8 makes softmax peaky (scores of tens), which tests the exp's range reduction; a
    score's float32 rounding (the dot's summation order differs) then moves its weight by scale
    times more, hence the tolerance."""
    q, k, v, pos = _problem(np.random.default_rng(seed), b, t, kv * group, kv, s, hd, scale)
    want = gqa_attention(q, k, v, pos, jnp.arange(s))
    got = jax.jit(cpu_attention.decode_attention)(q, k, v, pos)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6 * scale)


def test_positions_past_the_buffer_see_every_slot():
    q, k, v, _ = _problem(np.random.default_rng(1), 2, 3, 6, 2, 20, 64)
    pos = jnp.asarray([[30, 31, 32], [19, 20, 21]], jnp.int32)
    want = gqa_attention(q, k, v, pos, jnp.arange(20))
    np.testing.assert_allclose(np.asarray(cpu_attention.decode_attention(q, k, v, pos)), np.asarray(want),
                               rtol=2e-5, atol=2e-6)


def test_a_querys_bits_do_not_depend_on_the_other_queries_or_rows():
    """What makes verifying d + 1 tokens give the tokens decoding them one by one gives."""
    q, k, v, pos = _problem(np.random.default_rng(2), 4, 6, 9, 3, 64, 64)
    together = np.asarray(cpu_attention.decode_attention(q, k, v, pos))
    for row in (0, 3):
        rk, rv = k[row * 3:(row + 1) * 3], v[row * 3:(row + 1) * 3]
        for j in range(6):
            alone = cpu_attention.decode_attention(q[row:row + 1, j:j + 1], rk, rv, pos[row:row + 1, j:j + 1])
            np.testing.assert_array_equal(np.asarray(alone)[0, 0], together[row, j])


def test_slots_past_what_a_row_sees_are_not_read():
    """NaN in every slot past a row's furthest query: the result is the same bits as with zeros
    there (the jnp path reads them: NaN times a zero probability is NaN)."""
    q, k, v, _ = _problem(np.random.default_rng(3), 2, 2, 4, 2, 32, 16)
    pos = jnp.asarray([[5, 6], [20, 21]], jnp.int32)
    seen = (jnp.arange(32)[None, :] <= jnp.repeat(pos[:, -1], 2)[:, None])[:, :, None]  # [B*KV, S, 1]
    clean = cpu_attention.decode_attention(q, jnp.where(seen, k, 0.0), jnp.where(seen, v, 0.0), pos)
    dirty = cpu_attention.decode_attention(q, jnp.where(seen, k, jnp.nan), jnp.where(seen, v, jnp.nan), pos)
    assert np.isfinite(np.asarray(dirty)).all()
    np.testing.assert_array_equal(np.asarray(dirty), np.asarray(clean))


def test_it_applies_to_float32_few_queries_and_head_sizes_it_takes():
    q, k = jnp.zeros((1, 1, 4, 64)), jnp.zeros((2, 32, 64))
    assert cpu_attention.applies(q, k)
    assert not cpu_attention.applies(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16))
    assert not cpu_attention.applies(jnp.zeros((1, 17, 4, 64)), k)  # a prefill chunk
    assert not cpu_attention.applies(jnp.zeros((1, 1, 4, 24)), jnp.zeros((2, 32, 24)))
    assert cpu_attention.decode_attention(jnp.zeros((1, 0, 4, 64)), k, k, jnp.zeros((1, 0), jnp.int32)).shape == (1, 0, 4, 64)
    with pytest.raises(ConfigError, match="multiple of KV"):
        cpu_attention.decode_attention(jnp.zeros((1, 1, 3, 64)), k, k, jnp.zeros((1, 1), jnp.int32))


def _attend_hlo(impl: str, plan=None) -> str:
    b, kv, h, s, hd = 1, 2, 4, 32, 16
    q, k_new, v_new = jnp.zeros((b, 1, h, hd)), jnp.zeros((b, kv, 1, hd)), jnp.zeros((b, kv, 1, hd))
    state = (jnp.zeros((b * kv, s, hd)), jnp.zeros((b * kv, s, hd)))
    pos = jnp.zeros((b, 1), jnp.int32)
    step = jax.jit(lambda q, kn, vn, st, p: attend(q, kn, vn, st, p, p[:, 0], plan, impl=impl)[0])
    return step.lower(q, k_new, v_new, state, pos).compile().as_text()


def test_auto_runs_it_for_dense_layers_and_reference_keeps_the_jnp_path():
    assert cpu_matvec.ATTENTION in _attend_hlo("auto")
    assert cpu_matvec.ATTENTION not in _attend_hlo("reference")
    assert cpu_matvec.ATTENTION not in _attend_hlo("auto", identity_plan(tiny_config(), 1))  # plans: the jnp path


@pytest.mark.parametrize("weights", ["float32", "int8"])
def test_greedy_decoding_through_it_equals_the_jnp_path(weights):
    from jaxmodels.quantize import convert_weights

    config = tiny_config()
    params = decode_layout(convert_weights(init_params(config, jax.random.key(0)), weights))
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    runs = {impl: generate(params, config, prompts, 12, eos_token_ids=(), attention_impl=impl).tokens
            for impl in ("auto", "reference")}
    hlo = [exe for key, exe in engine._COMPILED.items() if key[0] == "decode_loop"]
    assert runs["auto"] == runs["reference"]
    assert any(cpu_matvec.ATTENTION in exe.as_text() for exe in hlo)


def test_the_benchmark_times_both_paths_and_compares_their_tokens():
    from benchmarks.cpu_attention import padded, run

    config = tiny_config()
    params = decode_layout(init_params(config, jax.random.key(0)))
    assert padded([[1, 2, 3]], 7) == [[1, 2, 3, 1, 2, 3, 1]] and padded([[1, 2]], 0) == [[1, 2]]
    body = run({"float32": params}, config, [[1, 2, 3], [4, 5]], [1, 2], [0, 20], 4, 1)
    rows = [line for line in body.splitlines() if line.startswith("| float32")]
    assert len(rows) == 4 and all(row.endswith("| yes |") for row in rows)


@pytest.mark.parametrize("isa", ["-mno-avx512f", "-march=x86-64"])
def test_the_avx2_and_scalar_builds_compute_the_same(isa, tmp_path):
    """The library built without AVX-512 (AVX2 lanes) and for any x86-64 (scalar lanes), as
    another CPU would build it: attention, the grouped int8 product and the bf16 product (its
    weights read in pairs) equal the jnp path / the float64 product."""
    import ctypes
    import subprocess

    lib_path = tmp_path / "kernels.so"
    subprocess.run([cpu_matvec.compiler(), *cpu_matvec.FLAGS, isa, f"-I{jax.ffi.include_dir()}",
                    *map(str, cpu_matvec.SOURCES), "-o", str(lib_path)], check=True)
    lib = ctypes.cdll.LoadLibrary(str(lib_path))
    tag = isa.strip("-").replace("=", "_").replace("-", "_")
    for name in (cpu_matvec.ATTENTION, cpu_matvec.TARGETS[jnp.dtype(jnp.int8)], cpu_matvec.TARGETS[jnp.dtype(jnp.bfloat16)]):
        jax.ffi.register_ffi_target(f"{name}_{tag}", jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    q, k, v, pos = _problem(np.random.default_rng(4), 3, 5, 6, 2, 40, 64, scale=4.0)
    got = jax.ffi.ffi_call(f"{cpu_matvec.ATTENTION}_{tag}", jax.ShapeDtypeStruct(q.shape, jnp.float32),
                           vmap_method="sequential")(q, k, v, pos)
    np.testing.assert_allclose(np.asarray(got), np.asarray(gqa_attention(q, k, v, pos, jnp.arange(40))),
                               rtol=2e-5, atol=1e-5)
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.integers(-127, 128, (24, 128)), jnp.int8)
    scale = jnp.asarray(rng.uniform(0.01, 0.1, (2, 24)), jnp.float32)  # 2 groups of 64 inputs
    x = jnp.asarray(rng.standard_normal((3, 128)), jnp.float32)
    y = jax.ffi.ffi_call(f"{cpu_matvec.TARGETS[jnp.dtype(jnp.int8)]}_{tag}", jax.ShapeDtypeStruct((3, 24), jnp.float32),
                         vmap_method="sequential")(x, w, scale.reshape(-1))
    exact = sum(np.asarray(x[:, g * 64:(g + 1) * 64], np.float64) @ (np.asarray(w[:, g * 64:(g + 1) * 64], np.float64)
                                                                     * np.asarray(scale[g], np.float64)[:, None]).T
                for g in range(2))
    np.testing.assert_allclose(np.asarray(y), exact, rtol=1e-5, atol=1e-5)
    w16 = jnp.asarray(rng.standard_normal((24, 128)), jnp.bfloat16)
    x13 = jnp.asarray(rng.standard_normal((13, 128)), jnp.float32)  # 8-, 4- and 1-row tiles
    y16 = jax.ffi.ffi_call(f"{cpu_matvec.TARGETS[jnp.dtype(jnp.bfloat16)]}_{tag}", jax.ShapeDtypeStruct((13, 24), jnp.float32),
                           vmap_method="sequential")(x13, w16, jnp.zeros((0,), jnp.float32))
    exact16 = np.asarray(x13, np.float64) @ np.asarray(w16.astype(jnp.float32), np.float64).T
    np.testing.assert_allclose(np.asarray(y16), exact16, rtol=1e-5, atol=1e-5)

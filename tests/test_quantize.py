"""bfloat16 and int8 weights for decoding (jaxmodels/quantize.py): the rounding bound, the int8
program equal to the float model it dequantizes to, bf16 logits near float32, and both formats
through prefill, decoding and self-speculation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from inference import generate
from inference.speculative import SpecConfig
from jaxmodels import init_params
from jaxmodels.model import forward
from jaxmodels.params import svd_factor
from jaxmodels.quantize import Int8Rows, Int8Weight, convert_weights, quantize_int8, quantize_rows, weight_bytes
from jaxmodels.testing import tiny_config

TOKENS = jnp.array([[1, 5, 9, 2, 7, 3, 11, 4], [6, 6, 2, 8, 1, 0, 3, 9]], jnp.int32)


@pytest.fixture(scope="module", params=[False, True], ids=["lm_head", "tied"])
def model(request):
    config = tiny_config(tie_word_embeddings=request.param)
    return config, init_params(config, jax.random.key(0), std=0.2)


def _dequantized(params):
    """The float model an int8 tree stands for."""
    return jax.tree_util.tree_map(lambda x: x.dequantize() if isinstance(x, (Int8Weight, Int8Rows)) else x,
                                  params, is_leaf=lambda x: isinstance(x, (Int8Weight, Int8Rows)))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 9), st.integers(1, 9), st.floats(1e-3, 1e3), st.integers(0, 2**31 - 1))
def test_int8_rounding_is_within_half_a_step_per_group(groups, size, n, magnitude, seed):
    """One scale per output column and group of `size` inputs: every weight within half its
    group's step, and each group's largest weight on the full range."""
    w = magnitude * np.random.default_rng(seed).standard_normal((groups * size, n)).astype(np.float32)
    q = quantize_int8(w, group_size=size)
    assert q.q.dtype == jnp.int8 and q.scale.shape == (groups, n)
    err = np.abs(np.asarray(q.dequantize()) - w).reshape(groups, size, n)
    assert (err <= np.asarray(q.scale)[:, None, :] * 0.5 * (1 + 1e-5)).all()
    assert (np.abs(np.asarray(q.q)).reshape(groups, size, n).max(axis=1) == 127).all()
    assert quantize_int8(w, group_size=None).scale.shape == (1, n)  # one per column
    assert quantize_int8(w, group_size=groups * size + 1).scale.shape == (1, n)  # a size that does not divide m


def test_groups_keep_an_outlier_from_coarsening_its_whole_column():
    """One large input row (an outlier feature, as trained models have) sets the step of every
    weight in its column with one scale per column; with groups, only of its own group's."""
    w = np.random.default_rng(1).standard_normal((256, 32)).astype(np.float32)
    w[3] *= 50.0
    rest = slice(64, None)  # the groups without the outlier
    per_column = np.abs(np.asarray(quantize_int8(w, group_size=None).dequantize()) - w)[rest].max()
    grouped = np.abs(np.asarray(quantize_int8(w, group_size=64).dequantize()) - w)[rest].max()
    assert grouped * 10 < per_column


@pytest.mark.parametrize("rows", [3, 200])  # the group-by-group product, and past FEW_ROWS the dequantized one
def test_a_grouped_int8_matmul_equals_the_float64_product_of_its_dequantized_weight(rows):
    from jaxmodels.layers import FEW_ROWS, _xla_matmul, dense

    rng = np.random.default_rng(rows)
    w = quantize_int8(jnp.asarray(rng.standard_normal((192, 40)), jnp.float32))  # 3 groups of 64 inputs
    x = jnp.asarray(rng.standard_normal((rows, 192)), jnp.float32)
    exact = np.asarray(x, np.float64) @ np.asarray(w.dequantize(), np.float64)
    assert (rows > FEW_ROWS) == (rows == 200)
    np.testing.assert_allclose(np.asarray(dense(w, x)), exact, rtol=1e-5, atol=1e-4)  # stored [m, n]
    np.testing.assert_allclose(np.asarray(_xla_matmul(w.q.T, x, w.scale)), exact, rtol=1e-5, atol=1e-4)  # [n, m]


def test_embedding_rows_share_one_scale_for_lookup_and_head():
    e = np.random.default_rng(0).standard_normal((11, 4)).astype(np.float32)
    rows = quantize_rows(e, group_size=None)
    assert rows.q.shape == (11, 4) and rows.scale.shape == (1, 11)
    assert np.abs(np.asarray(rows.dequantize()) - e).max() <= np.asarray(rows.scale).max() / 2 * (1 + 1e-5)
    assert rows[:3].shape == (3, 4) and rows[:3].scale.shape == (1, 3)  # a draft head's first K rows
    grouped = quantize_rows(e, group_size=2)  # a scale per row and pair of features
    assert grouped.scale.shape == (2, 11)
    err = np.abs(np.asarray(grouped.dequantize()) - e).reshape(11, 2, 2)
    assert (err <= np.asarray(grouped.scale).T[:, :, None] / 2 * (1 + 1e-5)).all()
    tokens = jnp.asarray([[3, 0], [10, 3]])
    np.testing.assert_array_equal(grouped.q[tokens] * grouped.row_scales(tokens), grouped.dequantize()[tokens])


def test_int8_logits_are_those_of_the_dequantized_float_model(model):
    config, params = model
    q = convert_weights(params, "int8")
    layer = q["layers"]
    assert isinstance(q["embed"], Int8Rows) and all(isinstance(layer[k], Int8Weight) for k in ("wq", "w_down"))
    assert layer["attn_norm"].dtype == jnp.float32  # norms are not matmul weights
    got, _ = forward(q, config, TOKENS)
    want, _ = forward(_dequantized(q), config, TOKENS)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    ref, _ = forward(params, config, TOKENS)
    rel = float(jnp.abs(got - ref).max() / jnp.abs(ref).max())
    assert 0 < rel < 0.15  # lossy: ~8% of the largest logit on this random 4-layer model (measured);
    # SmolLM2's held-out figures are in BENCHMARKS.md (benchmarks/decode.py)


def test_bfloat16_halves_the_bytes_and_stays_near_float32(model):
    config, params = model
    b = convert_weights(params, "bfloat16")
    assert weight_bytes(b) * 2 == weight_bytes(params)
    got, _ = forward(b, config, TOKENS)
    ref, _ = forward(params, config, TOKENS)
    assert got.dtype == jnp.bfloat16
    rel = float(jnp.abs(got.astype(jnp.float32) - ref).max() / jnp.abs(ref).max())
    assert 0 < rel < 0.05


def test_int8_reads_about_a_quarter_of_the_bytes(model):
    _, params = model
    ratio = weight_bytes(convert_weights(params, "int8")) / weight_bytes(params)
    assert 0.25 < ratio < 0.3  # int8 values plus float scales and norms


def test_float32_is_the_identity_and_unsupported_requests_are_named(model):
    config, params = model
    assert convert_weights(params, "float32") is params
    with pytest.raises(ValueError, match="weights must be one of"):
        convert_weights(params, "int4")
    factorized = {**params, "layers": {**params["layers"], "wq": svd_factor(params["layers"]["wq"][0], 8)}}
    with pytest.raises(ValueError, match="low-rank.*use bfloat16"):
        convert_weights(factorized, "int8")


def test_self_speculation_with_int8_weights_equals_their_greedy_decoding(model):
    """int8 computes in float32, so self-speculation stays lossless (draft heads sliced too)."""
    config, params = model
    q = convert_weights(params, "int8")
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    plain = generate(q, config, prompts, 12)
    spec = generate(q, config, prompts, 12, speculative=SpecConfig(exit_layer=1, draft_len=3, draft_vocab=32))
    assert spec.tokens == plain.tokens


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="float32 hidden states are CPU's choice")
def test_bfloat16_weights_decode_on_cpu_as_float32_arithmetic_on_the_rounded_weights(model):
    """Weight-only: on CPU the hidden states stay float32 (`engine.cache_dtype`), so decoding bf16
    weights computes the products float32 decoding computes on the same weights widened (the CPU
    kernel sums a bf16 row's even and odd inputs apart, so the last bits may differ). With bf16
    hidden states the tokens here diverged (the random model has many near-ties)."""
    config, params = model
    b = convert_weights(params, "bfloat16")
    widened = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), b)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [200, 13, 77, 4]]
    assert generate(b, config, prompts, 12).tokens == generate(widened, config, prompts, 12).tokens


def test_self_speculation_in_bfloat16_agrees_with_greedy_up_to_rounding(model):
    """In bf16 the verifier's multi-token pass and one-token decoding round differently, so a
    near-tie can flip: lossless only up to bf16 rounding (the random model here has many near-ties)."""
    config, params = model
    b = convert_weights(params, "bfloat16")
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [200, 13, 77, 4]]
    plain = generate(b, config, prompts, 12).tokens
    spec = generate(b, config, prompts, 12, speculative=SpecConfig(exit_layer=1, draft_len=3)).tokens
    prefix = [next((i for i, (x, y) in enumerate(zip(p, s)) if x != y), len(p)) for p, s in zip(plain, spec)]
    assert sum(prefix) >= 0.5 * sum(map(len, plain)), (prefix, plain, spec)


def test_the_cpu_note_warns_only_where_the_cpu_kernel_is_missing(monkeypatch):
    import jaxmodels.quantize as quantize
    from jaxmodels import cpu_matvec
    assert quantize.cpu_decoding_note("float32") is None
    monkeypatch.setattr(cpu_matvec, "available", lambda: True)
    assert quantize.cpu_decoding_note("bfloat16") is None and quantize.cpu_decoding_note("int8") is None
    monkeypatch.setattr(cpu_matvec, "available", lambda: False)  # no compiler, or switched off
    assert "float32 copies" in quantize.cpu_decoding_note("bfloat16")
    assert "JAXMODELS_CPU_MATVEC=0" in quantize.cpu_decoding_note("int8")


def test_bfloat16_weights_decode_with_a_float32_cache_on_cpu_that_no_step_converts(model, monkeypatch):
    """XLA:CPU updates a bf16 buffer in float32 (convert the whole buffer, write the row, convert
    back): a bf16 cache was rewritten whole in every layer and step, and SmolLM2 with bf16 weights
    decoded at 0.37x float32's speed at batch 8. On CPU the cache is float32, attention reads it in
    its own dtype, and the compiled decode loop converts no cache-sized buffer; on other backends
    the cache follows the weights."""
    from inference import engine

    config, params = model
    prompts = [[1, 2, 3, 4, 5]] * 8
    res = generate(convert_weights(params, "bfloat16"), config, prompts, 6)
    hlo = [exe for key, exe in engine._COMPILED.items() if key[0] == "decode_loop"][-1].as_text()
    assert res.kv_cache_bytes == generate(params, config, prompts, 6).kv_cache_bytes  # float32, as the f32 model's
    rows, hd = 8 * config.num_key_value_heads, config.head_dim
    positions = res.kv_cache_bytes // (2 * config.num_hidden_layers * rows * hd * 4)
    converts = [line for line in hlo.splitlines() if " convert(" in line and f"[{rows},{positions},{hd}]" in line]
    assert not converts, converts[:2]
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert engine.cache_dtype(jnp.bfloat16) == jnp.bfloat16

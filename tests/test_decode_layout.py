"""The CPU decoding layout (`params.decode_layout`, `layers.output_major_matmul`): output-major
weights compute what input-major ones do, for every weight kind, row count and layer layout, and
the few-row form (weight as the dot's left operand) is what XLA compiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from inference import generate
from jaxmodels import init_params
from jaxmodels.layers import FEW_ROWS, dense, output_major_matmul
from jaxmodels.model import check_param_shapes, forward
from jaxmodels.params import decode_layout, svd_factor, unstack_layers
from jaxmodels.quantize import convert_weights, quantize_int8
from jaxmodels.testing import tiny_config
from jaxmodels.weights import OutputMajor

TOKENS = jnp.array([[1, 5, 9, 2, 7, 3, 11, 4], [6, 6, 2, 8, 1, 0, 3, 9]], jnp.int32)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([(1,), (2,), (7,), (3, 5), (FEW_ROWS,), (FEW_ROWS + 1,), (2, 100)]),
       st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_output_major_matmul_is_the_plain_product(lead, m, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, m)).astype(np.float32)
    w = rng.standard_normal((m, n)).astype(np.float32)
    got = output_major_matmul(jnp.asarray(w.T), jnp.asarray(x))
    assert got.shape == (*lead, n)
    np.testing.assert_allclose(got, x @ w, rtol=1e-5, atol=1e-5 * np.sqrt(m))


@pytest.mark.parametrize("kind", ["dense", "lowrank", "int8"])
def test_every_weight_kind_applies_the_same_in_both_layouts(kind):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((24, 40)), jnp.float32)
    weight = {"dense": lambda: w, "lowrank": lambda: svd_factor(w, 8), "int8": lambda: quantize_int8(w)}[kind]()
    params = decode_layout({"layers": ({"attn_norm": jnp.ones(24), "wq": weight},)}, output_major=True)
    moved = params["layers"][0]["wq"]
    leaves = jax.tree_util.tree_leaves(moved, is_leaf=lambda x: isinstance(x, OutputMajor))
    assert any(isinstance(x, OutputMajor) for x in leaves)
    x = jnp.asarray(rng.standard_normal((3, 24)), jnp.float32)
    np.testing.assert_allclose(dense(moved, x), dense(weight, x), rtol=1e-5, atol=1e-5)


def test_few_rows_compile_with_the_weight_as_left_operand():
    wt = jnp.ones((48, 16))
    few = jax.jit(output_major_matmul).lower(wt, jnp.ones((8, 16))).compile().as_text()
    many = jax.jit(output_major_matmul).lower(wt, jnp.ones((FEW_ROWS + 1, 16))).compile().as_text()
    assert "f32[48,8]{1,0} fusion" in few or "f32[48,8]{1,0} dot" in few  # y^T [n, rows]: weight as lhs
    assert "f32[48,65]" not in many and "f32[65,48]" in many


@pytest.fixture(scope="module", params=[False, True], ids=["lm_head", "tied"])
def model(request):
    config = tiny_config(tie_word_embeddings=request.param)
    return config, init_params(config, jax.random.key(0), std=0.2)


def test_decode_layout_is_checked_idempotent_and_keeps_the_logits(model):
    config, params = model
    moved = decode_layout(params, output_major=True)
    check_param_shapes(config, moved)  # the shape check reads an OutputMajor weight's logical shape
    assert decode_layout(moved, output_major=True)["layers"][0]["wq"].wt is moved["layers"][0]["wq"].wt
    plain = decode_layout(params, output_major=False)
    assert not any(isinstance(x, OutputMajor) for x in jax.tree_util.tree_leaves(
        plain, is_leaf=lambda x: isinstance(x, OutputMajor)))
    if "lm_head" in moved:
        assert moved["lm_head"][:, :10].shape == (config.hidden_size, 10)  # a draft head's slice
        np.testing.assert_array_equal(moved["lm_head"][:, :10].wt, params["lm_head"][:, :10].T)
    for tokens in (TOKENS, TOKENS[:1, :1]):  # many rows (plain product) and one (few-row form)
        np.testing.assert_allclose(forward(moved, config, tokens)[0], forward(unstack_layers(params), config, tokens)[0],
                                   rtol=2e-5, atol=2e-5)


def _greedy(params, config, prompt, n):
    """Greedy tokens by recomputing the whole sequence each step (no cache, plain layout; one
    padded length, so one compile: causal attention ignores the padding after the last token)."""
    tokens, width = list(prompt), len(prompt) + n
    logits_at = jax.jit(lambda t, i: forward(params, config, t)[0][0, i])
    for _ in range(n):
        padded = jnp.asarray([tokens + [0] * (width - len(tokens))], jnp.int32)
        tokens.append(int(logits_at(padded, len(tokens) - 1).argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("weights", ["float32", "int8"])
def test_generate_in_the_decode_layout_gives_the_greedy_tokens(model, weights):
    config, params = model
    params = convert_weights(params, weights)
    prompts = [[1, 5, 9], [6, 6, 2, 8, 1], [3], [4, 4]]
    out = generate(params, config, prompts, 12, eos_token_ids=()).tokens
    assert out == [_greedy(params, config, p, 12) for p in prompts]
    w_up = decode_layout(params)["layers"][0]["w_up"]
    if jax.default_backend() == "cpu":  # what generate ran: output-major weights
        assert isinstance(w_up.q if weights == "int8" else w_up, OutputMajor)

"""The decoder's functional core: cache path, layer ranges, shared exit, NNX shell."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmodels import KVCache, Llama, embed_tokens, exit_logits, forward, init_params, run_layers
from jaxmodels.config import ConfigError, LlamaConfig
from jaxmodels.model import check_param_shapes
from jaxmodels.testing import tiny_config

CONFIG = tiny_config()
PARAMS = init_params(CONFIG, jax.random.key(0))
TOKENS = jax.random.randint(jax.random.key(1), (3, 20), 0, CONFIG.vocab_size)


def test_kv_cache_path_equals_no_cache_forward():
    full, _ = forward(PARAMS, CONFIG, TOKENS)
    cache = KVCache.create(CONFIG, 3, 64)
    chunks, pieces = [(0, 7), (7, 8), (8, 15), (15, 16), (16, 20)], []
    for a, b in chunks:  # prefill, single tokens and multi-token chunks, as verification will do
        logits, cache = forward(PARAMS, CONFIG, TOKENS[:, a:b], cache=cache)
        cache = cache.replace(lengths=cache.lengths + (b - a))
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5)


def test_ragged_rows_write_at_their_own_lengths():
    """Rows at different lengths in one call equal each row run alone."""
    cache = KVCache.create(CONFIG, 3, 64)
    _, cache = forward(PARAMS, CONFIG, TOKENS[:, :12], cache=cache)
    cache = cache.replace(lengths=jnp.array([5, 12, 9]))  # right-padded prompts of 5, 12, 9
    step, _ = forward(PARAMS, CONFIG, TOKENS[:, 12:13], cache=cache)
    for row, n in enumerate([5, 12, 9]):
        seq = jnp.concatenate([TOKENS[row, :n], TOKENS[row, 12:13]])[None]
        alone, _ = forward(PARAMS, CONFIG, seq)
        np.testing.assert_allclose(step[row, 0], alone[0, -1], atol=1e-5)


def test_layer_ranges_compose_and_hidden_states_feed_the_shared_exit():
    positions = jnp.broadcast_to(jnp.arange(20), TOKENS.shape)
    h0 = embed_tokens(PARAMS, TOKENS)
    h_full, _, hidden = run_layers(PARAMS, CONFIG, h0, positions, collect_hidden=True)
    h_a, _, _ = run_layers(PARAMS, CONFIG, h0, positions, start=0, stop=1)
    h_b, _, _ = run_layers(PARAMS, CONFIG, h_a, positions, start=1, stop=4)
    np.testing.assert_allclose(h_b, h_full, atol=1e-5)
    np.testing.assert_allclose(hidden[0], h_a, atol=1e-6)
    assert hidden.shape == (4, 3, 20, CONFIG.hidden_size)
    full_logits, _ = forward(PARAMS, CONFIG, TOKENS)
    np.testing.assert_allclose(exit_logits(PARAMS, CONFIG, hidden[-1]), full_logits, atol=1e-5)
    with pytest.raises(ValueError, match="layer range"):
        run_layers(PARAMS, CONFIG, h0, positions, start=2, stop=9)


def test_nnx_module_matches_functional_core_and_round_trips_params():
    model = Llama(CONFIG, params=PARAMS)
    logits, _ = model(TOKENS)
    np.testing.assert_array_equal(logits, forward(PARAMS, CONFIG, TOKENS)[0])
    jax.tree_util.tree_map(np.testing.assert_array_equal, model.params(), PARAMS)
    graphdef, state = nnx.split(model)
    assert len(jax.tree_util.tree_leaves(state)) == 12  # embed, 9 stacked, final_norm, lm_head
    tied = Llama(tiny_config(tie_word_embeddings=True), rngs=nnx.Rngs(0))
    assert "lm_head" not in tied.params()


def test_shape_mismatch_names_the_parameter():
    bad = jax.tree_util.tree_map(lambda x: x, PARAMS)
    bad["layers"] = dict(bad["layers"], wk=jnp.zeros((4, 64, 64)))
    with pytest.raises(ValueError, match=r"\['layers'\]\['wk'\].*expected \(4, 64, 32\)"):
        check_param_shapes(CONFIG, bad)


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        tiny_config(num_key_value_heads=3)
    with pytest.raises(ConfigError, match="unsupported architecture"):
        LlamaConfig.from_hf_dict({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(ConfigError, match="rope_scaling type 'yarn'"):
        tiny_config(rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ConfigError, match="did you mean 'num_hidden_layers'"):
        LlamaConfig.from_overrides(CONFIG, {"num_hiden_layers": 2})


def test_skipped_layers_are_the_identity_and_get_no_gradient():
    positions = jnp.broadcast_to(jnp.arange(20), TOKENS.shape)
    h0 = embed_tokens(PARAMS, TOKENS)
    skip = jnp.array([False, True, False, True])
    h, _, hidden = run_layers(PARAMS, CONFIG, h0, positions, skip=skip, collect_hidden=True)
    h_a, _, _ = run_layers(PARAMS, CONFIG, h0, positions, start=0, stop=1)
    h_b, _, _ = run_layers(PARAMS, CONFIG, h_a, positions, start=2, stop=3)
    np.testing.assert_allclose(h, h_b, atol=1e-6)
    np.testing.assert_allclose(hidden[1], hidden[0], atol=0)  # layer 1 passed its input through
    loss = lambda p: run_layers(p, CONFIG, h0, positions, skip=skip, remat=True)[0].sum()
    grads = jax.grad(loss)(PARAMS)["layers"]["wq"]
    assert float(jnp.abs(grads[1]).sum()) == 0 and float(jnp.abs(grads[3]).sum()) == 0
    assert float(jnp.abs(grads[0]).sum()) > 0
    with pytest.raises(ValueError, match="cannot be combined with a KV cache"):
        run_layers(PARAMS, CONFIG, h0, positions, KVCache.create(CONFIG, 3, 32), skip=skip)

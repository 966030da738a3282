"""Factorized (low-rank) weights as per-layer variants: same forward code, segments, checkpoints."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxmodels import KVCache, LayerVariants, Llama, LowRank, dense, embed_tokens, forward, init_params, run_layers
from jaxmodels.config import ConfigError
from jaxmodels.convert import CheckpointError, load_model, save_hf_checkpoint
from jaxmodels.model import check_param_shapes, unstack_layers
from jaxmodels.params import svd_factor, with_variants
from jaxmodels.testing import tiny_config
from jaxmodels.weights import FACTORIZABLE

CONFIG = tiny_config()  # 4 layers, D 64, q 64, kv 32, F 128
PARAMS = init_params(CONFIG, jax.random.key(0), std=0.1)
TOKENS = jax.random.randint(jax.random.key(1), (2, 12), 0, CONFIG.vocab_size)
FULL = {"wq": 64, "wk": 32, "wv": 32, "wo": 64, "w_gate": 64, "w_up": 64, "w_down": 64}  # min(m, n)


def hybrid(ranks=None, full_rank_layers=1) -> LayerVariants:
    return LayerVariants.hybrid(CONFIG.num_hidden_layers, ranks or {"wq": 8, "w_up": 16, "w_down": 16},
                                full_rank_layers)


def test_dense_applies_arrays_and_factors():
    x = jax.random.normal(jax.random.key(2), (3, 5, 64))
    w = LowRank(jax.random.normal(jax.random.key(3), (64, 4)), jax.random.normal(jax.random.key(4), (4, 32)))
    np.testing.assert_allclose(dense(w, x), x @ (w.u @ w.v), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(dense(w.merge(), x), x @ w.merge())
    assert w.shape == (64, 32) and w.rank == 4


def test_full_rank_factorization_reproduces_the_dense_model():
    """Every matmul weight of layers 1-3 split by SVD at full rank: two segments, same logits."""
    config, params = with_variants(CONFIG, PARAMS, hybrid(FULL))
    assert isinstance(params["layers"], tuple) and len(params["layers"]) == 2  # [dense 0] + [low-rank 1..3]
    assert isinstance(params["layers"][1]["wq"], LowRank) and params["layers"][1]["wq"].u.shape == (3, 64, 64)
    dense_logits = forward(PARAMS, CONFIG, TOKENS)[0]
    np.testing.assert_allclose(forward(params, config, TOKENS)[0], dense_logits, atol=2e-4)
    np.testing.assert_allclose(forward(unstack_layers(params), config, TOKENS)[0], dense_logits, atol=2e-4)


def test_segments_compose_over_ranges_caches_and_unstacked_layers():
    config, params = with_variants(CONFIG, PARAMS, hybrid(full_rank_layers=2))
    positions = jnp.broadcast_to(jnp.arange(12), TOKENS.shape)
    h0 = embed_tokens(params, TOKENS)
    h, _, hidden = run_layers(params, config, h0, positions, collect_hidden=True)
    assert hidden.shape == (4, 2, 12, 64)
    h_a, _, _ = run_layers(params, config, h0, positions, start=0, stop=3)  # crosses the boundary at 2
    h_b, _, _ = run_layers(params, config, h_a, positions, start=3, stop=4)
    np.testing.assert_allclose(h_b, h, atol=1e-5)
    np.testing.assert_allclose(hidden[2], h_a, atol=1e-5)
    full = forward(params, config, TOKENS)[0]
    # compiled as a whole, once per chunk length and layout (op by op, each one compiles every op)
    chunk = jax.jit(lambda p, tokens, cache: forward(p, config, tokens, cache=cache))
    for p in (params, unstack_layers(params)):  # scanned segments and the unrolled decode layout
        cache, pieces = KVCache.create(config, 2, 32), []
        for a, b in [(0, 5), (5, 6), (6, 12)]:
            logits, cache = chunk(p, TOKENS[:, a:b], cache)
            cache = cache.replace(lengths=cache.lengths + (b - a))
            pieces.append(logits)
        np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-4)


def test_bad_ranks_are_config_errors_naming_the_key_and_the_fix():
    with pytest.raises(ConfigError, match=r"layer 3 'wk': rank 33 is outside \[1, 32\].*min\(m, n\) = 32"):
        CONFIG.replace(layer_variants=hybrid({"wk": 33}))
    with pytest.raises(ConfigError, match=r"layer 1 'wq': rank 0 is outside"):
        CONFIG.replace(layer_variants=hybrid({"wq": 0}))
    with pytest.raises(ConfigError, match="'attn_norm' is not a factorizable weight; choose from wq"):
        CONFIG.replace(layer_variants=hybrid({"attn_norm": 4}))
    with pytest.raises(ConfigError, match="lists 3 layers but num_hidden_layers is 4"):
        CONFIG.replace(layer_variants=LayerVariants.hybrid(3, {"wq": 4}))
    assert CONFIG.replace(layer_variants=LayerVariants.hybrid(4, {})).layer_variants is None  # all dense


def test_shape_checks_and_counts_know_factorized_weights():
    config, params = with_variants(CONFIG, PARAMS, hybrid())
    check_param_shapes(config, params)
    check_param_shapes(config, unstack_layers(params))
    assert config.num_params() == sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert config.num_params() < CONFIG.num_params()
    with pytest.raises(ValueError, match=r"\['layers'\]\[1\]\['wq'\]: layer_variants factorizes it"):
        dense_wq = dict(params["layers"][1], wq=jnp.zeros((3, 64, 64)))
        check_param_shapes(config, {**params, "layers": (params["layers"][0], dense_wq)})
    with pytest.raises(ValueError, match=r"\['layers'\]\['w_up'\]: it is factorized \(rank 16\)"):
        low_up = svd_factor(PARAMS["layers"]["w_up"][0], 16)
        check_param_shapes(CONFIG, {**PARAMS, "layers": dict(PARAMS["layers"], w_up=low_up)})
    low = params["layers"][1]["w_down"]
    bad = dict(params["layers"][1], w_down=LowRank(low.u[..., :8], low.v[:, :8]))
    with pytest.raises(ValueError, match=r"\['layers'\]\[1\]\['w_down'\]\.u: expected \(3, 128, 16\)"):
        check_param_shapes(config, {**params, "layers": (params["layers"][0], bad)})


def test_init_gives_factors_whose_product_has_the_dense_scale():
    config = CONFIG.replace(layer_variants=hybrid({"w_gate": 16}))
    params = init_params(config, jax.random.key(7), std=0.02)
    check_param_shapes(config, params)
    product = params["layers"][1]["w_gate"].merge()
    assert 0.014 < float(product.std()) < 0.026
    assert float(params["layers"][1]["attn_norm"].min()) == 1.0


def _loss(params, config):
    logits, _ = forward(params, config, TOKENS[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, TOKENS[:, 1:]).mean()


def test_lowrank_params_go_through_jit_grad_and_adamw():
    config, params = with_variants(CONFIG, PARAMS, hybrid())
    opt = optax.adamw(1e-2)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(_loss)(params, config)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss, grads

    state = opt.init(params)
    new, state, loss0, grads = step(params, state)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    assert float(jnp.abs(grads["layers"][1]["wq"].u).sum()) > 0
    for _ in range(3):
        new, state, loss, _ = step(new, state)
    assert float(loss) < float(loss0)
    assert isinstance(new["layers"][1]["w_up"], LowRank) and new["layers"][1]["w_up"].u.shape == (3, 64, 16)


def test_nnx_shell_holds_segments_and_factorized_weights():
    config, params = with_variants(CONFIG, PARAMS, hybrid())
    model = Llama(config, params=params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, model.params(), params)
    np.testing.assert_array_equal(model(TOKENS)[0], forward(params, config, TOKENS)[0])
    _, state = nnx.split(model)
    assert len(jax.tree_util.tree_leaves(state)) == 3 + 9 + 12  # top, dense segment, 3 factorized of 9
    fresh = Llama(config, rngs=nnx.Rngs(0))
    assert jax.tree_util.tree_structure(fresh.params()) == jax.tree_util.tree_structure(params)


def test_orbax_checkpointer_round_trips_lowrank_training_state(tmp_path):
    from training.checkpoint import Checkpointer

    config, params = with_variants(CONFIG, PARAMS, hybrid())
    state = {"params": params, "opt_state": optax.adamw(1e-3).init(params)}
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(3, state, {"note": "low-rank"})
    ckpt.wait()
    restored, meta = ckpt.restore(3, jax.tree_util.tree_map(jnp.zeros_like, state))
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, state)
    ckpt.close()


def test_lowrank_hf_checkpoint_round_trips_and_dense_saves_stay_plain(tmp_path):
    config, params = with_variants(CONFIG, PARAMS, hybrid())
    save_hf_checkpoint(tmp_path / "run" / "model", config, params)
    folder = tmp_path / "run" / "model"
    assert json.loads((folder / "config.json").read_text())["jaxmodels_layer_variants"] == "layer_variants.json"
    for path in (folder, tmp_path / "run"):  # the HF folder and the run folder around it
        loaded_config, loaded, _ = load_model(path)
        assert loaded_config == config
        assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(params)
        jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
    save_hf_checkpoint(folder, CONFIG, PARAMS)  # overwritten by a dense model: a plain HF folder again
    assert not (folder / "layer_variants.json").exists()
    assert "jaxmodels_layer_variants" not in json.loads((folder / "config.json").read_text())
    assert load_model(folder)[0].layer_variants is None


def test_variant_files_that_do_not_match_the_weights_are_clear_errors(tmp_path):
    config, params = with_variants(CONFIG, PARAMS, hybrid())
    save_hf_checkpoint(tmp_path, config, params)
    variants_file = tmp_path / "layer_variants.json"
    good = variants_file.read_text()
    variants_file.write_text(good.replace('"wq": 8', '"wq": 4'))
    with pytest.raises(CheckpointError, match=r"q_proj.weight_u' has shape \(8, 64\).*rank 4.*restore the "
                                              r"layer_variants.json saved with them"):
        load_model(tmp_path)
    variants_file.write_text(good.replace('"wq": 8', '"wq": 99'))
    with pytest.raises(CheckpointError, match=r"layer_variants.json does not fit config.json.*'wq': rank 99"):
        load_model(tmp_path)
    variants_file.unlink()
    with pytest.raises(CheckpointError, match="layer_variants.json is missing"):
        load_model(tmp_path)
    save_hf_checkpoint(tmp_path, CONFIG, PARAMS)  # dense weights ...
    variants_file.write_text(good)  # ... with a stray variant file
    with pytest.raises(CheckpointError, match="holds it dense.*remove layer_variants.json"):
        load_model(tmp_path)


def test_every_factorizable_weight_is_a_matmul_of_the_table():
    assert FACTORIZABLE == ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")

"""training.whiten: Gram taps record each weight's inputs, whitened SVD minimizes the output error,
and `training.compress --whiten` writes a checkpoint that loads and beats plain SVD on its inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.convert import load_model
from jaxmodels.layers import rms_norm
from jaxmodels.model import embed_tokens, forward
from jaxmodels.params import svd_factor
from jaxmodels.weights import LowRank
from tests.tiny_model import tiny_model_folder
from training.compress import choose_ranks, compress, main
from training.whiten import activation_grams, cholesky_factor, tap_params, whitened_factor

TOKENS = np.random.RandomState(0).randint(0, 256, (2, 12))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model folder (4 layers, D 64, F 128, byte tokenizer) and its loaded weights."""
    folder = tiny_model_folder(tmp_path_factory.mktemp("tiny"))
    return folder, *load_model(folder)[:2]


def test_taps_record_the_inputs_gram_and_leave_the_output_alone(tiny):
    _, config, params = tiny
    tapped = tap_params(config, jax.tree_util.tree_map(jnp.asarray, params))
    np.testing.assert_array_equal(forward(tapped, config, TOKENS)[0], forward(params, config, TOKENS)[0])

    grams = activation_grams(config, params, [TOKENS[:1], TOKENS[1:]])
    assert len(grams) == config.num_hidden_layers and set(grams[0]) == {"wq", "wk", "wv", "wo", "w_gate",
                                                                        "w_up", "w_down"}
    x = rms_norm(embed_tokens(params, TOKENS), params["layers"]["attn_norm"][0], config.rms_norm_eps)
    x = np.asarray(x, np.float64).reshape(-1, config.hidden_size)  # layer 0's attention input, both batches
    np.testing.assert_allclose(grams[0]["wq"], x.T @ x, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(grams[0]["wq"], grams[0]["wk"])  # the same input, the same Gram
    assert grams[0]["w_down"].shape == (config.intermediate_size,) * 2
    assert not np.allclose(grams[1]["wq"], grams[0]["wq"])  # layer 1 sees layer 0's output


def test_whitened_factor_has_the_least_output_error_and_its_bound():
    rng = np.random.RandomState(1)
    x = rng.randn(300, 16) @ rng.randn(16, 16) * np.linspace(0.1, 3, 16)  # correlated, uneven inputs
    w = rng.randn(16, 12)
    gram = x.T @ x
    full = whitened_factor(w, gram, 12, damp=0.0)
    np.testing.assert_allclose(full.merge(), w, rtol=1e-4, atol=1e-4)

    err = lambda f: np.linalg.norm(x @ (w - np.asarray(f.merge(), np.float64)))  # noqa: E731
    for rank in (2, 4, 8):
        whitened, plain = whitened_factor(w, gram, rank, damp=0.0), svd_factor(w.astype(np.float32), rank)
        s = np.linalg.svd(cholesky_factor(gram, 0.0).T @ w, compute_uv=False)
        assert err(whitened) == pytest.approx(np.sqrt(np.sum(s[rank:] ** 2)), rel=1e-4)
        assert err(whitened) < 0.9 * err(plain), rank


def test_whiten_cli_writes_a_lowrank_model_closer_to_dense_on_real_inputs(tiny, tmp_path, capsys):
    folder, config, params = tiny
    out = tmp_path / "white"
    argv = ["--model", str(folder), "--out", str(out), "--rank-ratio", "0.25", "--whiten", "--calib-tokens", "96",
            "--eval-tokens", "64"]
    assert main(argv) == 0
    assert "after:" in capsys.readouterr().out
    got_config, got, _ = load_model(out)
    assert isinstance(got["layers"]["wq"], LowRank) and got["layers"]["wq"].u.shape == (4, 64, 16)

    grams = activation_grams(config, params, [TOKENS])
    variants, _ = choose_ranks(config, params, "rank_ratio", 0.25)
    dense = forward(params, config, TOKENS)[0]
    white = forward(compress(config, params, variants, grams=grams)[1], config, TOKENS)[0]
    plain = forward(compress(config, params, variants)[1], config, TOKENS)[0]
    assert float(jnp.linalg.norm(white - dense)) < float(jnp.linalg.norm(plain - dense))


def test_whiten_errors_name_the_flag(tiny, tmp_path, capsys):
    folder, _, _ = tiny
    for extra in (["--calib-tokens", "0"], ["--merge"]):
        argv = ["--model", str(folder), "--out", str(tmp_path / "o"), "--whiten", *extra]
        argv += [] if "--merge" in extra else ["--rank", "8"]
        assert main(argv) == 2
        assert "--whiten" in capsys.readouterr().err.strip().splitlines()[-1]

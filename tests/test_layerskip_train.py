"""LayerSkip training math: dropout rates, exit weights, curricula, the chunked exit loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels import embed_tokens, exit_logits, init_params, run_layers
from jaxmodels.testing import tiny_config
from training.config import LayerSkipSection
from training.layerskip import (dropout_probabilities, early_exit_loss,
                                exit_curriculum, exit_weights, sample_skip_mask)
from training.step import token_cross_entropy


def mean_ce(logits, targets):
    return token_cross_entropy(logits, targets)[0].mean()


def test_dropout_probabilities_follow_the_formula():
    L, T, p_max = 8, 101, 0.2
    for t in (0, 37, 100):
        p = np.asarray(dropout_probabilities(L, t, T, p_max, "exp"))
        s = 2 ** (t / (T - 1)) - 1
        expected = [s * (2 ** (l / (L - 1)) - 1) * p_max for l in range(L)]
        np.testing.assert_allclose(p, expected, rtol=1e-6, atol=1e-7)
    constant = np.asarray(dropout_probabilities(L, 0, T, p_max, "constant"))
    assert constant[0] == 0 and np.isclose(constant[-1], p_max)  # layer 0 never, last at p_max


def test_empirical_skip_rates_match_the_probabilities():
    probs = dropout_probabilities(6, 0, 10, 0.5, "constant")
    keys = jax.random.split(jax.random.key(0), 20_000)
    rates = np.asarray(jax.vmap(lambda k: sample_skip_mask(k, probs))(keys).mean(0))
    np.testing.assert_allclose(rates, np.asarray(probs), atol=0.015)  # ~4.5 sigma at p = 0.5
    assert rates[0] == 0


def test_exit_weights_grow_with_depth_and_always_include_the_final_layer():
    L = 6
    w = np.asarray(exit_weights(L, 0, 100, 0.5, "none", 4))
    e = np.array([0.5 * l * (l + 1) / 2 for l in range(1, L)] + [L * (L + 1) / 2])
    np.testing.assert_allclose(w, e / e.sum(), rtol=1e-6)
    assert np.isclose(w.sum(), 1) and np.all(np.diff(w) > 0)
    for curriculum in ("rotational", "gradual"):
        for t in range(0, 100, 7):
            wt = np.asarray(exit_weights(L, t, 100, 1.0, curriculum, 3))
            assert wt[-1] > 0 and np.isclose(wt.sum(), 1)  # the model's output is always trained


@pytest.mark.parametrize("scale, f", [("sum_l", lambda l: l * (l + 1) / 2), ("linear_l", lambda l: l),
                                      ("sqrt_l", np.sqrt), ("uniform", lambda l: 1.0)])
def test_exit_scales_match_their_definitions_with_the_final_exit_unscaled(scale, f):
    L = 5
    w = np.asarray(exit_weights(L, 0, 100, 2.0, "none", 4, scale))
    e = np.array([2.0 * f(l) for l in range(1, L)] + [f(L)], dtype=np.float64)
    np.testing.assert_allclose(w, e / e.sum(), rtol=1e-6)


def test_rotational_curriculum_rotates_every_r_th_exit():
    on = [np.asarray(exit_curriculum(8, t, 100, "rotational", 4)) for t in range(4)]
    assert on[0].tolist() == [1, 0, 0, 0, 1, 0, 0, 1]  # exits 1, 5 and the final exit 8
    assert on[1].tolist() == [0, 1, 0, 0, 0, 1, 0, 1]
    assert on[3].tolist() == [0, 0, 0, 1, 0, 0, 0, 1]  # exit 4 and exit 8 (= final)
    assert np.asarray(exit_curriculum(8, 4, 100, "rotational", 4)).tolist() == on[0].tolist()


def test_gradual_curriculum_switches_exits_on_from_the_top_and_all_by_mid_training():
    L, T = 4, 101
    assert np.asarray(exit_curriculum(L, 0, T, "gradual", 1)).tolist() == [0, 0, 0, 1]
    # exit l turns on when t/T >= 0.5 (L - l) / L: exit 3 at t/100 >= 0.125
    assert np.asarray(exit_curriculum(L, 13, T, "gradual", 1)).tolist() == [0, 0, 1, 1]
    assert np.asarray(exit_curriculum(L, 50, T, "gradual", 1)).tolist() == [1, 1, 1, 1]


def test_early_exit_loss_equals_the_weighted_sum_of_per_exit_losses():
    config = tiny_config()
    params = init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, config.vocab_size)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    positions = jnp.broadcast_to(jnp.arange(16), inputs.shape)
    h, _, hidden = run_layers(params, config, embed_tokens(params, inputs), positions, collect_hidden=True)
    np.testing.assert_allclose(hidden[-1], h)  # exit L is the model's own output
    weights = exit_weights(4, 1, 10, 1.0, "rotational", 2)  # exits 2 and 4 on
    loss, per_exit, _ = early_exit_loss(params, config, hidden, targets, weights)
    naive = [mean_ce(exit_logits(params, config, hidden[l]), targets) for l in range(4)]
    np.testing.assert_allclose(loss, sum(float(w) * float(c) for w, c in zip(weights, naive)), rtol=1e-5)
    np.testing.assert_allclose(per_exit, [0, naive[1], 0, naive[3]], rtol=1e-5)
    grads = jax.grad(lambda p: early_exit_loss(p, config, hidden, targets, weights)[0])(params)
    assert float(jnp.abs(grads["final_norm"]).sum()) > 0


def test_distillation_mixes_kl_to_the_final_exit_into_non_final_exits_only():
    config = tiny_config()
    params = init_params(config, jax.random.key(5), std=0.2)
    tokens = jax.random.randint(jax.random.key(6), (2, 13), 0, config.vocab_size)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    positions = jnp.broadcast_to(jnp.arange(12), inputs.shape)
    hidden_of = lambda p: run_layers(p, config, embed_tokens(p, inputs), positions, collect_hidden=True)[2]  # noqa: E731
    hidden, beta = hidden_of(params), 0.3
    weights = exit_weights(4, 0, 10, 1.0, "none", 1)
    loss, per_exit, _ = early_exit_loss(params, config, hidden, targets, weights, distill=beta)
    p_final = jax.nn.softmax(exit_logits(params, config, hidden[-1]), -1)
    expected = []
    for l in range(4):
        logits = exit_logits(params, config, hidden[l])
        kl = jnp.sum(p_final * (jnp.log(p_final) - jax.nn.log_softmax(logits, -1)), -1).mean()
        ce = mean_ce(logits, targets)
        expected.append(ce if l == 3 else (1 - beta) * ce + beta * kl)  # the final exit keeps its CE
        np.testing.assert_allclose(per_exit[l], ce, rtol=1e-5)  # logged per-exit loss stays the CE
    np.testing.assert_allclose(loss, sum(float(w) * float(e) for w, e in zip(weights, expected)), rtol=1e-5)
    # The final exit is a fixed teacher: pure distillation of exit 1 sends no gradient past layer 0.
    only_exit_1 = jnp.array([1.0, 0.0, 0.0, 0.0])
    grads = jax.grad(lambda p: early_exit_loss(p, config, hidden_of(p), targets, only_exit_1, distill=1.0)[0])(params)
    per_layer = np.asarray(jnp.abs(grads["layers"]["w_down"]).sum(axis=(1, 2)))
    assert per_layer[0] > 0 and np.all(per_layer[1:] == 0)


def test_bad_layerskip_settings_are_rejected():
    with pytest.raises(ValueError, match="dropout_max must be in"):
        LayerSkipSection(dropout_max=1.5)
    with pytest.raises(ValueError, match="curriculum must be one of"):
        LayerSkipSection(curriculum="rotate")
    with pytest.raises(ValueError, match="exit_distill must be in"):
        LayerSkipSection(exit_distill=1.5)


def test_exit_eval_sums_match_a_direct_computation():
    from training.layerskip import exit_eval_sums
    config = tiny_config()
    params = init_params(config, jax.random.key(3), std=0.2)
    tokens = jax.random.randint(jax.random.key(4), (3, 13), 0, config.vocab_size)
    inputs, targets, weights = tokens[:, :-1], tokens[:, 1:], jnp.array([1.0, 1.0, 0.0])
    sums = exit_eval_sums(params, config, inputs, targets, weights)
    positions = jnp.broadcast_to(jnp.arange(12), inputs.shape)
    _, _, hidden = run_layers(params, config, embed_tokens(params, inputs), positions, collect_hidden=True)
    final = jnp.argmax(exit_logits(params, config, hidden[-1][:2]), -1)
    for l in range(4):
        logits = exit_logits(params, config, hidden[l][:2])
        agree = int((jnp.argmax(logits, -1) == final).sum())
        assert int(sums["agree"][l]) == agree
        ce = mean_ce(logits, targets[:2])
        np.testing.assert_allclose(sums["loss"][l] / sums["tokens"], ce, rtol=1e-5)
    assert int(sums["tokens"]) == 24 and int(sums["agree"][-1]) == 24

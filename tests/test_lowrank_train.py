"""Low-rank training (training/lowrank.py): the SVD switch and its error bound, stable ranks, the
switch detector, optimizer state at the switch, and whole runs (Pufferfish, Cuttlefish + LayerSkip):
training goes down on both sides of the switch, resume across (and before) the switch is bitwise,
the export reloads low-rank, a changed `lowrank` section is refused on resume."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.config import LlamaConfig
from jaxmodels.convert.load import load_model
from jaxmodels.params import init_params
from jaxmodels.weights import LayerVariants, LowRank
from tests.conftest import FAST_COMPILE
from training import lowrank
from training.config import ConfigError, load_config
from training.step import build_steps
from training.testing import metrics_records, tiny_train_config
from training.train import train

CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2)


def test_switch_error_is_bounded_by_the_discarded_singular_values():
    """||x (W - u v)|| <= ||x|| sigma_{r+1} for every layer and weight, with equality in the spectral norm."""
    params = init_params(CONFIG, jax.random.PRNGKey(0), std=0.3)
    variants = lowrank.pufferfish_variants(CONFIG, ("wq", "w_down"), 0.25, 1, multiple=4)
    new = CONFIG.replace(layer_variants=variants)
    switched = lowrank.switch_params(new, params)
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 48))
    for name in ("wq", "w_down"):
        w = params["layers"][name]  # [3, m, n]
        for i in (1, 2):
            f = switched["layers"][1][name]
            u, v = f.u[i - 1], f.v[i - 1]
            r = u.shape[-1]
            s = np.linalg.svd(np.asarray(w[i]), compute_uv=False)
            diff = np.asarray(w[i] - u @ v)
            assert np.linalg.norm(diff, 2) == pytest.approx(s[r], rel=1e-3)
            xs = np.asarray(x[:, :w.shape[1]])
            assert np.all(np.linalg.norm(xs @ diff, axis=1) <= np.linalg.norm(xs, axis=1) * s[r] * (1 + 1e-4))
    # layer 0 and untouched weights are bitwise the same
    assert np.array_equal(switched["layers"][0]["wq"][0], params["layers"]["wq"][0])
    assert np.array_equal(switched["layers"][1]["wk"], params["layers"]["wk"][1:])


def test_switch_keeps_untouched_adam_moments_and_zeroes_new_ones():
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    fns = build_steps(CONFIG, load_config("tiny").optimizer, load_config("tiny").schedule, 10)
    opt = jax.tree_util.tree_map(lambda x: x + 1.0, fns.optimizer.init(params))  # non-zero moments
    new = CONFIG.replace(layer_variants=LayerVariants.hybrid(3, {"wq": 4}, 1))
    out = lowrank.switch_opt_state(new, params, opt)
    adam = out[1][0]  # chain(clip, adamw(...)): adamw's first state is ScaleByAdamState
    assert np.all(np.asarray(adam.mu["layers"][1]["wq"].u) == 0)
    assert np.all(np.asarray(adam.mu["layers"][0]["wq"]) == 1)
    assert np.all(np.asarray(adam.nu["embed"]) == 1) and np.all(np.asarray(adam.nu["layers"][1]["wk"]) == 1)
    assert int(adam.count) == 1  # the step count is kept
    new_params = lowrank.switch_params(new, params)
    assert jax.tree_util.tree_structure(fns.optimizer.init(new_params)) == jax.tree_util.tree_structure(out)


def test_stable_rank_of_a_random_matrix_scales_to_full_rank():
    w = jax.random.normal(jax.random.PRNGKey(0), (2, 384, 128))
    assert np.allclose(lowrank.scaled_stable_rank(w, iters=50), 128, rtol=0.12)
    low = jax.random.normal(jax.random.PRNGKey(1), (384, 4)) @ jax.random.normal(jax.random.PRNGKey(2), (4, 128))
    assert float(lowrank.scaled_stable_rank(low, iters=50)) < 16
    exact = np.linalg.norm(np.asarray(low)) ** 2 / np.linalg.norm(np.asarray(low), 2) ** 2
    assert float(lowrank.stable_rank(low, iters=50)) == pytest.approx(exact, rel=1e-3)


def test_ranks_rounding_and_settling():
    assert lowrank.round_rank(13.2, 64, 128, 8) == 16 and lowrank.round_rank(0.1, 64, 128, 8) == 8
    assert lowrank.round_rank(500, 64, 128, 8) == 64 and lowrank.round_rank(3, 2, 128, 8) == 2
    h = [{"wq": [10.0, 20.0]}, {"wq": [9.0, 19.0]}, {"wq": [9.0, 19.1]}]  # ranks of a full rank 100
    full = {"wq": 100}
    assert not lowrank.ranks_settled(h, 2, 0.005, full) and lowrank.ranks_settled(h, 2, 0.01, full)
    assert lowrank.ranks_settled(h, 1, 0.0011, full) and not lowrank.ranks_settled(h, 1, 0.0009, full)
    assert not lowrank.ranks_settled(h[:1], 1, 0.5, full)
    moved_dense_layer = [{"wq": [10.0, 20.0]}, {"wq": [50.0, 20.5]}]  # layer 0 stays dense
    assert lowrank.ranks_settled(moved_dense_layer, 1, 0.01, full, first_layer=1)
    assert not lowrank.ranks_settled(moved_dense_layer, 1, 0.01, full)


def test_frobenius_decay_equals_the_merged_norm():
    f = LowRank(u=jax.random.normal(jax.random.PRNGKey(0), (2, 6, 3)), v=jax.random.normal(jax.random.PRNGKey(1), (2, 3, 5)))
    assert float(lowrank.frobenius_decay({"a": f, "n": jnp.ones(3)})) == pytest.approx(
        float(jnp.sum(f.merge() ** 2)), rel=1e-5)


def test_resume_record_applies_only_to_checkpoints_after_the_switch(tmp_path):
    variants = LayerVariants.hybrid(3, {"wq": 8}, 1)
    lowrank.write_record(tmp_path, 4, variants, {"method": "pufferfish"})
    assert lowrank.resume_variants(tmp_path, None) is None and lowrank.resume_variants(tmp_path, 4) is None
    assert lowrank.resume_variants(tmp_path, 5) == (4, variants)


@pytest.mark.parametrize("overrides, key", [
    ({"lowrank.rank_ratio": 0}, "lowrank.rank_ratio"), ({"lowrank.rank_ratio": 1.5}, "lowrank.rank_ratio"),
    ({"lowrank.method": "pufferfish", "lowrank.full_rank_layers": 2}, "lowrank.full_rank_layers"),
    ({"lowrank.targets": "wq,lm_head"}, "lowrank.targets"), ({"lowrank.method": "svd"}, "lowrank.method")])
def test_bad_lowrank_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny", overrides=overrides)


# --------------------------------------------------------------------------- whole runs
def _run(out: Path, corpus, cache, mesh: dict | None = None, **extra) -> dict:
    mesh = mesh or {"mesh.data": 1}
    common = {"run.steps": 10, "schedule.total_steps": 10, "run.eval_every": 0, "checkpoint.every": 3,
              "run.sample_tokens": 0, "lowrank.warmup_steps": 4, "lowrank.rank_ratio": 0.25, **mesh}
    return train(tiny_train_config(out, corpus, cache, **{**common, **extra}))


@pytest.mark.slow
def test_pufferfish_trains_on_both_sides_and_resumes_bitwise_after_the_switch(corpus, cache, tmp_path):
    """With FSDP over 2 devices: the factors are sharded like their dense weight (training.parallel)."""
    fsdp = {"mesh.data": 1, "mesh.fsdp": 2}
    _run(tmp_path / "ref", corpus, cache, fsdp, **{"lowrank.method": "pufferfish"})
    losses = [r["loss"] for r in metrics_records(tmp_path / "ref")]
    switch = metrics_records(tmp_path / "ref", "lowrank")[0]
    assert switch["switch_step"] == 4 and switch["params_after"] < switch["params_before"]
    assert switch["flops_per_token_after"] < switch["flops_per_token_before"]
    assert losses[3] < losses[0] and losses[-1] < losses[4]  # down before and after the switch
    config, params, _ = load_model(tmp_path / "ref")  # the export is low-rank
    assert config.layer_variants is not None and isinstance(params["layers"][1]["wq"], LowRank)

    _run(tmp_path / "res", corpus, cache, fsdp, **{"lowrank.method": "pufferfish", "run.steps": 4})  # dense ckpt 4
    _run(tmp_path / "res", corpus, cache, fsdp, **{"lowrank.method": "pufferfish", "run.steps": 7})  # switches at 4
    summary = _run(tmp_path / "res", corpus, cache, fsdp, **{"lowrank.method": "pufferfish"})
    assert summary["resumed_from"] == 7
    assert [r["loss"] for r in metrics_records(tmp_path / "res")] == losses  # bitwise across the switch
    assert len(metrics_records(tmp_path / "res", "lowrank")) == 1

    with pytest.raises(ConfigError, match=r"lowrank\.rank_ratio"):
        _run(tmp_path / "res", corpus, cache, fsdp, **{"lowrank.method": "pufferfish", "lowrank.rank_ratio": 0.5,
                                                 "run.steps": 12})


@pytest.mark.slow
def test_cuttlefish_with_layerskip_switch_is_deterministic_and_resumes_before_it(corpus, cache, tmp_path):
    extra = {"lowrank.method": "cuttlefish", "lowrank.track_every": 2, "lowrank.window": 1,
             "lowrank.threshold": 0.5, "lowrank.full_rank_layers": 0, "layerskip.dropout_max": 0.2,
             "layerskip.exit_loss": True, "run.decode_report": False}
    _run(tmp_path / "a", corpus, cache, **extra)
    first = metrics_records(tmp_path / "a", "lowrank")
    assert len(first) == 1 and 4 <= first[0]["switch_step"] < 10
    losses = [r["loss"] for r in metrics_records(tmp_path / "a")]
    assert losses[-1] < losses[0]

    _run(tmp_path / "b", corpus, cache, **{**extra, "run.steps": 3})  # checkpoint before the switch
    summary = _run(tmp_path / "b", corpus, cache, **extra)
    assert summary["resumed_from"] == 3
    again = metrics_records(tmp_path / "b", "lowrank")
    assert [(r["switch_step"], r["ranks"]) for r in again] == [(r["switch_step"], r["ranks"]) for r in first]
    assert [r["loss"] for r in metrics_records(tmp_path / "b")] == losses


SWITCH_AT_WIDTH_512 = """
import jax
from jaxmodels.config import LlamaConfig
from jaxmodels.params import init_params
from jaxmodels.weights import FACTORIZABLE
from training import lowrank
config = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=4)
params = init_params(config, jax.random.PRNGKey(0))
variants = lowrank.pufferfish_variants(config, FACTORIZABLE, 0.25, 1)
jax.block_until_ready(lowrank.switch_params(config.replace(layer_variants=variants), params))
print("switched")
"""


def test_switch_at_width_512_finishes_on_few_cpu_threads():
    """Regression: with every SVD in one program, two of jaxlib's batched CPU SVDs ran at once on a
    2-thread pool and waited for each other forever (the benchmark hung at its switch; a 2-core
    machine such as CI's reproduces it; more cores make it rarer). A hang fails by the timeout."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE}  # one CPU device
    done = subprocess.run([sys.executable, "-c", SWITCH_AT_WIDTH_512], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "switched" in done.stdout, done.stderr[-2000:]

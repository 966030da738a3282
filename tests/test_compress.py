"""training.compress: rank choice, the CLI round trip, marked low-rank folders, merged HF export."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxmodels.convert import load_model
from jaxmodels.model import forward
from jaxmodels.weights import LowRank
from tests.hf_models import hf_logits
from tests.tiny_model import tiny_model_folder
from training.compress import choose_ranks, compress, main, raw_rank, round_rank
from training.config import ConfigError

TOKENS = np.random.RandomState(0).randint(0, 256, (2, 16))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model folder (4 layers, D 64, F 128, byte tokenizer) and its loaded weights."""
    folder = tiny_model_folder(tmp_path_factory.mktemp("tiny"))
    return folder, *load_model(folder)[:2]


def test_rank_rules_on_a_known_spectrum():
    w = np.diag([4.0, 2.0, 1.0, 1.0, 0.0, 0.0]).astype(np.float32)  # s^2 = 16, 4, 1, 1
    assert raw_rank(w, "rank_ratio", 0.5) == 3
    assert raw_rank(w, "energy", 16 / 22) == 1 and raw_rank(w, "energy", 0.9) == 2
    assert raw_rank(w, "energy", 1.0) == 4
    assert raw_rank(w, "stable_rank", 1.0) == 2  # 22 / 16 -> 2
    assert round_rank(3, 8, (6, 6)) == 6 and round_rank(3, 2, (6, 6)) == 4 and round_rank(0, 1, (6, 6)) == 1


def test_choose_ranks_rounds_keeps_hybrid_layers_and_names_weights_left_dense(tiny):
    _, config, params = tiny
    variants, notes = choose_ranks(config, params, "rank_ratio", 0.25, full_rank_layers=1, multiple=8)
    assert variants.layers[0] == ()
    assert variants.ranks(1) == {"wq": 16, "wk": 8, "wv": 8, "wo": 16, "w_gate": 16, "w_up": 16, "w_down": 16}
    assert notes == []
    variants, notes = choose_ranks(config, params, "rank_ratio", 0.5, targets=["wq", "w_up"])
    assert variants.ranks(0) == {"w_up": 32}  # wq at 32: 32 x (64 + 64) = 64 x 64, no saving
    assert len(notes) == 4 and "layer 0 'wq' stays dense: rank 32 would not save parameters" in notes[0]
    assert choose_ranks(config, params, "energy", 1.0)[0] is None  # full rank everywhere: nothing saved


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="rank_ratio", value=1.5), r"--rank-ratio 1.5 is outside \(0, 1\]"),
    (dict(method="rank_ratio", value=0.0), r"outside \(0, 1\]"),
    (dict(method="energy", value=-1), r"--energy -1 is outside"),
    (dict(method="rank", value=0), r"--rank 0 is below 1"),
    (dict(method="rank", value=40), r"--rank 40 is above min\(m, n\) = 32 of layer 0 'wk' \[64, 32\]; pass --rank <= 32"),
    (dict(method="rank", value=8, targets=["wx"]), r"wx is not a factorizable weight; choose from wq"),
    (dict(method="rank", value=8, full_rank_layers=5), r"--full-rank-layers 5 is outside \[0, 4\]"),
])
def test_bad_choices_are_config_errors_naming_the_flag_and_the_fix(tiny, kwargs, match):
    _, config, params = tiny
    with pytest.raises(ConfigError, match=match):
        choose_ranks(config, params, **kwargs)


def test_cli_writes_a_lowrank_checkpoint_that_round_trips_and_transformers_refuses(tiny, tmp_path, capsys):
    folder, config, params = tiny
    out = tmp_path / "low"
    assert main(["--model", str(folder), "--out", str(out), "--rank-ratio", "0.25", "--eval-tokens", "64"]) == 0
    text = capsys.readouterr().out
    assert "before:" in text and "after:" in text and "held-out perplexity" in text
    variants, _ = choose_ranks(config, params, "rank_ratio", 0.25)
    want_config, want = compress(config, params, variants)
    got_config, got, tok = load_model(out)
    assert got_config == want_config and tok is not None
    assert isinstance(got["layers"]["wq"], LowRank) and got["layers"]["wq"].u.shape == (4, 64, 16)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)  # exact round trip
    assert json.loads((out / "config.json").read_text())["model_type"] == "jaxmodels_lowrank_llama"
    assert not list(out.glob("model*.safetensors"))
    with pytest.raises(OSError):  # no model.safetensors: never silently random weights
        transformers.LlamaForCausalLM.from_pretrained(out)
    with pytest.raises(ValueError, match="jaxmodels_lowrank_llama"):
        transformers.AutoModelForCausalLM.from_pretrained(out)


def test_merged_export_loads_in_transformers_with_our_lowrank_logits(tiny, tmp_path):
    folder, dense_config, dense_params = tiny
    low, merged = tmp_path / "low", tmp_path / "merged"
    assert main(["--model", str(folder), "--out", str(low), "--energy", "0.6", "--multiple", "4",
                 "--no-eval"]) == 0
    assert main(["--merge", "--model", str(low), "--out", str(merged)]) == 0
    config, params, _ = load_model(low)
    assert config.layer_variants is not None
    ours = np.asarray(forward(params, config, TOKENS)[0])
    model = transformers.LlamaForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    np.testing.assert_allclose(hf_logits(model, TOKENS), ours, atol=1e-4, rtol=0)
    dense = forward(dense_params, dense_config, TOKENS)[0]
    assert np.abs(np.asarray(dense) - ours).max() > 1e-3  # the compression did change the model


def test_train_init_from_reads_a_lowrank_folder(tiny, tmp_path):
    from training.train import load_init

    folder, _, _ = tiny
    assert main(["--model", str(folder), "--out", str(tmp_path), "--rank", "8", "--no-eval"]) == 0
    config, params, tok = load_init(str(tmp_path))
    assert config.layer_variants is not None and isinstance(params["layers"]["w_down"], LowRank)


def test_cli_errors_are_one_line_and_exit_2(tiny, tmp_path, capsys):
    folder, _, _ = tiny
    for argv, match in [(["--rank-ratio", "2"], "outside (0, 1]"), ([], "choose how to pick ranks"),
                        (["--stable-rank", "0"], "must be > 0"), (["--multiple", "0", "--rank", "8"], ">= 1"),
                        (["--rank", "99"], "above min(m, n)"), (["--energy", "x"], "invalid float")]:
        assert main(["--model", str(folder), "--out", str(tmp_path / "o"), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()  # a load progress bar may come first
        errors = [line for line in err if line.startswith("error: ")]
        assert errors == err[-1:] and match in err[-1], err
    assert main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--rank", "8"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_loading_shows_a_progress_bar_only_when_asked(tiny, capsys):
    folder, _, _ = tiny
    load_model(folder)
    assert capsys.readouterr().err == ""
    load_model(folder, progress=True)
    assert "loading weights" in capsys.readouterr().err


def test_benchmark_smoke_prints_a_table_for_a_tiny_model(tiny):
    from benchmarks.compress import run

    folder, _, _ = tiny
    body, rows = run(str(folder), [0.25], [0.9], 0, eval_tokens=64, new_tokens=4, repeats=1)
    assert [r["setting"] for r in rows] == ["dense", "rank ratio 0.25", "energy 0.9"]
    assert rows[1]["params"] < rows[0]["params"] and rows[0]["speedup"] == 1.0
    assert body.startswith("| setting |") and "Target (>= 1.3x decode)" in body


def test_smollm2_compress_cli_reports_before_and_after_and_generates(tmp_path, capsys, smollm2_loaded_once):
    """One real model, kept cheap: w_down of the last 2 layers only, 128 held-out tokens."""
    from inference import generate

    argv = ["--model", "smollm2", "--out", str(tmp_path), "--rank-ratio", "0.25", "--targets", "w_down",
            "--full-rank-layers", "28", "--eval-tokens", "128"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    before, after = (next(x for x in lines if x.strip().startswith(k)) for k in ("before:", "after:"))
    assert "134,515,008 parameters" in before and "held-out perplexity" in after
    config, params, tok = load_model(tmp_path)
    assert config.layer_variants.ranks(29) == {"w_down": 144} and config.layer_variants.ranks(27) == {}
    out = generate(params, config, [tok.encode("def add(a, b):")], 4)
    assert len(out.tokens[0]) == 4


def test_full_rank_compression_reproduces_the_dense_logits(tiny):
    from jaxmodels.weights import LayerVariants

    _, config, params = tiny
    full = {"wq": 64, "wk": 32, "wv": 32, "wo": 64, "w_gate": 64, "w_up": 64, "w_down": 64}
    low_config, low = compress(config, params, LayerVariants.hybrid(4, full, full_rank_layers=1))
    assert isinstance(low["layers"][1]["w_up"], LowRank)
    np.testing.assert_allclose(forward(low, low_config, TOKENS)[0], forward(params, config, TOKENS)[0], atol=2e-4)

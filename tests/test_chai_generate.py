"""CHAI in generation: `python -m inference.generate --chai FILE` end to end on a tiny model (an
`all` calibration is plain generation, self-speculation equals plain clustered decoding, the cache
bytes --json reports, bad files), and ragged batches whose rows have their own cluster maps."""

import json
import re

import jax
import numpy as np
import pytest

from inference.chai_generate import chai_plans, generate_clustered, prefix_batch
from inference.cli import main
from inference.engine import generate, shape_bucket
from jaxmodels import init_params
from jaxmodels.chai_file import ChaiCalibration, model_identity
from jaxmodels.config import ConfigError
from jaxmodels.testing import tiny_config
from tests.tiny_model import tiny_model_folder

PROMPT = "def add(a, b):\n    return"
NEW = 12
SPEC = ("--self-speculative", "--exit-layer", "2", "--draft-len", "3")
# The tiny CLI model has 4 layers of 4 query heads over 2 KV heads.
KV = ("kv", (2, 1, 1, 2), ((0, 1), (0, 0), (0, 0), (0, 1)))
QUERY = ("query", (4, 2, 1, 3), ((0, 1, 2, 3), (0, 0, 1, 1), (0, 0, 0, 0), (0, 1, 2, 2)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("chai_generate") / "model")


@pytest.fixture(scope="module")
def config(model_dir):
    from jaxmodels.convert.load import load_model

    return load_model(str(model_dir))[0]


def _save(tmp_path, calibration: ChaiCalibration, name: str = "chai.json") -> str:
    return str(calibration.save(tmp_path / name))


def _fixed(config, granularity, clusters, groups) -> ChaiCalibration:
    return ChaiCalibration(model_identity(config), granularity, clusters, groups, {"mode": "fixed"})


def _cli(capsys, model_dir, *flags) -> dict:
    code = main(["--model", str(model_dir), "--prompt", PROMPT, "--max-new-tokens", str(NEW), "--json", *flags])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("granularity", ["kv", "query"])
def test_an_all_calibration_is_plain_generation(capsys, tmp_path, model_dir, config, granularity):
    path = _save(tmp_path, ChaiCalibration.identity(config, granularity))
    plain = _cli(capsys, model_dir)
    assert plain["generated_tokens"]
    assert _cli(capsys, model_dir, "--chai", path)["generated_tokens"] == plain["generated_tokens"]
    spec = _cli(capsys, model_dir, "--chai", path, *SPEC)
    assert spec["self_speculative"] and spec["generated_tokens"] == plain["generated_tokens"]


@pytest.mark.parametrize("setting", [KV, QUERY], ids=["kv", "query"])
def test_clustered_self_speculation_equals_clustered_plain_decoding(capsys, tmp_path, model_dir, config, setting):
    path = _save(tmp_path, _fixed(config, *setting))
    plain = _cli(capsys, model_dir, "--chai", path)
    spec = _cli(capsys, model_dir, "--chai", path, *SPEC)
    assert spec["self_speculative"] and spec["rounds"] > 0
    assert spec["generated_tokens"] == plain["generated_tokens"]


def test_json_reports_the_cache_bytes_allocated(capsys, tmp_path, model_dir, config):
    calibration = _fixed(config, *KV)
    path = _save(tmp_path, calibration)
    layers, kv, slot = config.num_hidden_layers, config.num_key_value_heads, config.head_dim * 4  # float32
    plain = _cli(capsys, model_dir)
    for flags, extra in (((), 0), (SPEC, 3 + 1)):  # self-speculation writes up to d + 1 past the end
        out = _cli(capsys, model_dir, "--chai", path, *flags)
        length = shape_bucket(out["prompt_tokens"], NEW + extra)[1]
        assert out["dense_kv_cache_bytes"] == 2 * layers * kv * length * slot
        assert out["kv_cache_bytes"] == (sum(calibration.k_slots()) + layers * kv) * length * slot
    assert 6 == sum(calibration.k_slots()) < layers * kv
    length = shape_bucket(plain["prompt_tokens"], NEW)[1]
    assert plain["kv_cache_bytes"] == plain["dense_kv_cache_bytes"] == 2 * layers * kv * length * slot


@pytest.mark.parametrize("case, message", [
    ("another model", r"calibrated for another model \(num_hidden_layers: file 6, model 4\)"),
    ("corrupt", "is not valid JSON"),
    ("missing", "no such CHAI calibration file"),
    ("zero clusters", "layer 1 has cluster count 0"),
])
def test_bad_calibration_files_are_one_clear_error(capsys, tmp_path, model_dir, config, case, message):
    path = tmp_path / "chai.json"
    if case == "another model":
        ChaiCalibration.identity(config.replace(num_hidden_layers=6)).save(path)
    elif case == "corrupt":
        path.write_text('{"format": "jaxmodels-chai", "vers')
    elif case == "zero clusters":
        raw = ChaiCalibration.identity(config).to_dict()
        raw["clusters"][1] = 0
        path.write_text(json.dumps(raw))
    code = main(["--model", str(model_dir), "--prompt", PROMPT, "--chai", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and str(path) in err[-1], err
    assert re.search(message, err[-1]), err[-1]
    assert "inference.chai_calibrate" in err[-1]  # the fix
    if case != "another model":  # the file is checked before the model is loaded
        assert not any(line.startswith("loading") for line in err)


# --------------------------------------------------------------------------- the library call
WIDE = tiny_config(num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4, hidden_size=128)
WIDE_PARAMS = init_params(WIDE, jax.random.key(0), std=0.2)  # peaky logits: greedy paths differ
WIDE_CHAI = _fixed(WIDE, "kv", (4, 2, 1), ((0, 1, 2, 3), (0, 0, 1, 1), (0, 0, 0, 0)))
RAGGED = [list(range(10, 19)), [7, 3, 9], [42], list(range(60, 80)), [200, 5, 17, 99, 3, 150]]


def test_ragged_batch_rows_with_their_own_maps_equal_each_row_alone():
    batch = generate_clustered(WIDE_PARAMS, WIDE, WIDE_CHAI, RAGGED, 10, eos_token_ids=())
    for row, prompt in enumerate(RAGGED):
        alone = generate_clustered(WIDE_PARAMS, WIDE, WIDE_CHAI, [prompt], 10, eos_token_ids=())
        assert alone.tokens[0] == batch.tokens[row], row
    plans, _, _ = chai_plans(WIDE_PARAMS, WIDE, WIDE_CHAI, RAGGED)
    assert plans[0] is None and plans[1].num_k_slots == 2 and plans[2].num_k_slots == 1
    assert np.asarray(plans[1].k_source)[2].tolist() == [0, 2]  # 1 token: the static grouping's heads
    assert len({tuple(r) for r in np.asarray(plans[1].head_cluster).tolist()}) > 1  # rows differ
    assert batch.tokens != generate(WIDE_PARAMS, WIDE, RAGGED, 10, eos_token_ids=()).tokens  # CHAI is on
    assert batch.kv_cache_bytes * (2 * 3 * 4) == batch.dense_kv_cache_bytes * (4 + 2 + 1 + 3 * 4)  # K 4+2+1, V 3x4


def test_prefix_batch_pads_and_clips_to_five_tokens():
    tokens, lengths = prefix_batch([[1, 2, 3, 4, 5, 6, 7], [9], [4, 4]])
    assert tokens.tolist() == [[1, 2, 3, 4, 5], [9, 0, 0, 0, 0], [4, 4, 0, 0, 0]]
    assert lengths.tolist() == [5, 1, 2]


def test_library_call_rejects_another_models_calibration_and_bad_prompts():
    with pytest.raises(ConfigError, match="calibrated for another model"):
        generate_clustered(WIDE_PARAMS, WIDE, _fixed(tiny_config(), *KV), RAGGED, 4)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_clustered(WIDE_PARAMS, WIDE, WIDE_CHAI, [[1, 2], []], 4)

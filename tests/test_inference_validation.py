"""The inference validation boundary: every bad value is refused before computation, by the Python
API and by the CLI, with InferenceError (a ValueError) or exit code 2 and one `error:` line."""

import math

import jax
import numpy as np
import pytest

from inference import InferenceError, generate, generate_batches
from inference.cli import main
from inference.speculative import SpecConfig
from inference.validate import check_prompts, check_sampling, check_seed
from jaxmodels import init_params
from jaxmodels.testing import tiny_config
from tests.tiny_model import tiny_model_folder

CONFIG = tiny_config(max_position_embeddings=64)
PARAMS = init_params(CONFIG, jax.random.key(0), std=0.2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model", max_position_embeddings=128))


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=math.nan), "temperature must be a finite number"),
    (dict(temperature=math.inf), "temperature must be a finite number"),
    (dict(temperature=1e300), "temperature must be a finite number"),  # inf in float32
    (dict(top_p=math.nan), "top_p must be a finite number"),
    (dict(top_p=1e-300), r"top_p must be in \(0, 1\]"),  # 0 in float32: would keep every token
    (dict(top_k=2.0), "top_k must be an integer"),
    (dict(top_k=True), "top_k must be an integer"),
    (dict(top_k=CONFIG.vocab_size + 1), "at most the vocabulary size 256"),
    (dict(temperature="0.5"), "temperature must be a number"),
    (dict(seed=2 ** 32), r"seed must be in \[0, 4294967295\]"),  # key(2**32) == key(0)
    (dict(seed=-1), r"seed must be in \[0, 4294967295\]"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(early_exit=0), r"early_exit must be in \[1, 4\]"),
    (dict(early_exit=True), "early_exit must be an integer"),
    (dict(early_exit=2, speculative=SpecConfig(1, 2)), "alternatives"),
    (dict(eos_token_ids="</s>"), "encode it first"),
    (dict(eos_token_ids=[999]), r"outside \[0, 256\)"),
    (dict(speculative=SpecConfig(0, 2)), r"exit_layer must be in \[1, 3\]"),
    (dict(speculative=SpecConfig(4, 2)), r"exit_layer must be in \[1, 3\]"),
    (dict(speculative=SpecConfig(1, 33)), r"draft_len must be in \[1, 32\]"),
    (dict(speculative=SpecConfig(1, 2, draft_vocab=0)), r"draft_vocab must be in \[1, 256\]"),
    (dict(speculative=(1, 2)), "must be an inference.speculative.SpecConfig"),
])
def test_bad_arguments_raise_inference_error(kwargs, match):
    with pytest.raises(InferenceError, match=match):
        generate(PARAMS, CONFIG, [[1, 2, 3]], 4, **kwargs)


@pytest.mark.parametrize("prompts, match", [
    ("hello", "encode it first with tokenizer.encode"),
    (["hello", "world"], "encode it first with tokenizer.encode"),
    ([1, 2, 3], r"for one prompt pass \[ids\]"),
    ([[1, 2.5]], "must hold integer token ids"),
    ([[True, 2]], "must hold integer token ids"),
    ([np.array([1.0, 2.0])], "1-D integer array"),
    (np.zeros((2, 2, 2), np.int32), "must be 2-D"),
    ([[1], []], "prompt 1 is empty"),
    ([[1, 256]], r"outside \[0, 256\)"),
    (None, "must be a list of prompts"),
])
def test_bad_prompts_raise_inference_error(prompts, match):
    with pytest.raises(InferenceError, match=match):
        generate(PARAMS, CONFIG, prompts, 4)


def test_numpy_scalars_and_arrays_are_accepted_and_give_the_same_tokens():
    plain = generate(PARAMS, CONFIG, [[5, 6, 7], [8, 9, 10]], 6, eos_token_ids=())
    as_numpy = generate(PARAMS, CONFIG, np.array([[5, 6, 7], [8, 9, 10]], np.int64), np.int32(6),
                        eos_token_ids=np.array([], np.int32))
    assert as_numpy.tokens == plain.tokens
    kw = dict(temperature=np.float32(0.8), top_k=np.int64(20), top_p=np.float64(0.9), eos_token_ids=())
    assert (generate(PARAMS, CONFIG, [[5, 6, 7]], 6, seed=np.uint32(3), **kw).tokens
            == generate(PARAMS, CONFIG, [[5, 6, 7]], 6, seed=3, **{k: v.item() if hasattr(v, "item") else v
                                                                 for k, v in kw.items()}).tokens)


def test_params_that_do_not_match_the_config_are_caught_before_compiling():
    wider = tiny_config(max_position_embeddings=64, hidden_size=32)
    with pytest.raises(InferenceError, match="weights do not match the config"):
        generate(PARAMS, wider, [[1, 2]], 4)
    with pytest.raises(InferenceError, match="weights do not match the config"):
        generate_batches(PARAMS, tiny_config(num_hidden_layers=3), [[1, 2]], 1, 4)
    with pytest.raises(InferenceError, match="config must be a jaxmodels LlamaConfig"):
        generate(PARAMS, {"vocab_size": 256}, [[1, 2]], 4)
    with pytest.raises(InferenceError, match="batch_size must be"):
        generate_batches(PARAMS, CONFIG, [[1, 2]], 0, 4)


def test_inference_error_is_a_value_error_and_validators_normalize():
    assert issubclass(InferenceError, ValueError)
    assert check_sampling(np.float32(0.5), np.int8(3), 1) == (0.5, 3, 1.0)
    assert type(check_sampling(np.float32(0.5), np.int8(3), 1)[1]) is int
    assert check_prompts([np.array([1, 2]), (3,)], 10) == [[1, 2], [3]]
    assert check_seed(np.uint32(2 ** 32 - 1)) == 2 ** 32 - 1


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("extra, message", [
    (["--top-k", "5"], "--top-k: used only when sampling"),
    (["--top-p", "0.9", "--seed", "1"], "--top-p, --seed: used only when sampling"),
    (["--temperature", "0", "--seed", "1"], "--seed: used only when sampling"),
    (["--exit-layer", "1"], "--exit-layer: used only with --self-speculative"),
    (["--draft-len", "2", "--draft-vocab", "9"], "--draft-len, --draft-vocab: used only with --self-speculative"),
    (["--self-speculative", "--early-exit", "2"], "alternatives"),
    (["--system", "be brief"], "--system: used only with --chat"),
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--temperature", "inf"], "temperature must be a finite number"),
    (["--temperature", "1", "--top-p", "nan"], "top_p must be a finite number"),
    (["--temperature", "1", "--seed", str(10 ** 30)], "seed must be in"),
    (["--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
    (["--max-new-tokens", "many"], "invalid int value"),
    (["--bogus"], "unrecognized arguments"),
])
def test_cli_flag_rules_fail_before_loading(capsys, extra, message):
    code, out, err = _cli(capsys, "--model", "/nonexistent", "--prompt", "hi", *extra)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


@pytest.mark.parametrize("extra, message", [
    (["--self-speculative", "--exit-layer", "0", "--draft-len", "2"], r"exit_layer must be in [1, 3]"),
    (["--self-speculative", "--exit-layer", "0"], r"exit_layer must be in [1, 3]"),  # not the calibrated E
    (["--self-speculative", "--exit-layer", "4"], r"exit_layer must be in [1, 3]"),
    (["--self-speculative", "--draft-len", "0"], r"draft_len must be in [1, 32]"),
    (["--self-speculative", "--draft-vocab", "100000"], r"draft_vocab must be in [1, 264]"),
    (["--early-exit", "5"], r"early_exit must be in [1, 4]"),
    (["--temperature", "1", "--top-k", "1000"], "at most the vocabulary size 264"),
    (["--max-new-tokens", "128"], "leaves no room for a prompt"),
])
def test_cli_model_dependent_flags_fail_before_calibrating(capsys, model_dir, extra, message):
    code, out, err = _cli(capsys, "--model", model_dir, "--prompt", "hi", *extra)
    last = err.strip().splitlines()[-1]
    assert code == 2 and out == "" and last.startswith("error: ") and message in last, err
    assert "calibrating" not in err and "compiling" not in err


def test_cli_rejects_a_prompt_that_is_not_utf8(capsys):
    prompt = b"caf\xe9 au lait".decode("utf-8", "surrogateescape")  # what argv gives for Latin-1 bytes
    code, _, err = _cli(capsys, "--model", "/nonexistent", "--prompt", prompt)
    assert code == 2 and "error: the prompt is not valid UTF-8 (byte b'\\xe9' at character 3)" in err


def test_cli_errors_from_python_api_are_one_line(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    code, _, err = _cli(capsys, "--model", str(tmp_path), "--prompt", "hi")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in err

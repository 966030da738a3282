"""Property-based fuzzing (hypothesis) of the generate CLI's arguments and of `generate`'s Python
arguments: every call either succeeds with a well-formed result or is refused (exit code 2 and one
`error: ...` line; InferenceError from Python); never a traceback, never a NaN-driven result.

Bounded for CI: a 2-layer tiny model, few distinct valid values (each new combination compiles a
program), small max_examples, no example database written into the repository.
"""

import contextlib
import io
import json
import math
import sys
from unittest import mock

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference import InferenceError, generate
from inference.calibrate import SpecChoice
from inference.cli import main
from inference.speculative import SpecConfig
from jaxmodels import init_params
from jaxmodels.testing import tiny_config
from tests.tiny_model import tiny_model_folder

FUZZ = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Per flag: (a few valid values: each compiles once at most, many invalid ones).
FLAG_VALUES = {
    "--max-new-tokens": (["1", "4", "16"], ["0", "-3", "256", str(10 ** 20), "1.5", "", "nan"]),
    "--temperature": (["0", "0.7"], ["-1", "nan", "inf", "-inf", "1e309", "", "x", "1e-30"]),
    "--top-k": (["5", "0"], ["-1", "100000", "1.5", "", str(10 ** 30)]),
    "--top-p": (["0.9", "1"], ["0", "2", "nan", "-0.5", "1e-300"]),
    "--seed": (["7", "0"], ["-1", str(2 ** 32), str(10 ** 40), "abc"]),
    "--exit-layer": (["1"], ["0", "2", "-2", "99999999999999999999"]),
    "--draft-len": (["2"], ["0", "33", "-1"]),
    "--draft-vocab": (["50"], ["0", "265", "10000000000"]),
    "--early-exit": (["1", "2"], ["0", "3", "-1"]),
    "--system": (["Be brief."], ["", "\udcff"]),
}
BOOL_FLAGS = ["--chat", "--json", "--self-speculative"]
SAMPLING_ONLY = {"--top-k", "--top-p", "--seed"}
SPEC_ONLY = {"--exit-layer", "--draft-len", "--draft-vocab"}

non_utf8 = st.binary(min_size=1, max_size=6).map(lambda b: b.decode("utf-8", "surrogateescape"))
prompts = st.one_of(st.sampled_from(["hi", "def f(x):", "", "   ", "-x"]), st.text(max_size=6), non_utf8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(tiny_model_folder(tmp_path_factory.mktemp("fuzz") / "model", num_hidden_layers=2))


def _fake_calibration(*args, **kwargs):
    """Calibration costs ~30 s of measurements; its choice is not what is fuzzed here."""
    return SpecChoice(1, 2, 1.5, (0.5,), draft_vocab=kwargs.get("draft_vocab"))


@st.composite
def cli_argv(draw):
    """Flags with values (valid two times in three), switches, usually a prompt, rarely junk; in
    any order."""
    groups = []
    for flag in draw(st.lists(st.sampled_from(sorted(FLAG_VALUES)), unique=True, max_size=4)):
        valid, invalid = FLAG_VALUES[flag]
        value = draw(st.sampled_from(valid if draw(st.integers(0, 2)) else invalid))
        groups.append([f"{flag}={value}"] if draw(st.booleans()) else [flag, value])
    groups += [[flag] for flag in draw(st.lists(st.sampled_from(BOOL_FLAGS), unique=True, max_size=2))]
    if draw(st.integers(0, 9)) > 0:  # usually a prompt; without one (and --chat) stdin is read
        groups.append(["--prompt=" + draw(prompts)])
    if draw(st.integers(0, 19)) == 0:
        groups.append([draw(st.sampled_from(["--bogus", "extra", "--prompt", "--top-k"]))])
    return [arg for group in draw(st.permutations(groups)) for arg in group]


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _given(argv, flag):
    """The value of `flag` in argv (None if absent)."""
    for i, a in enumerate(argv):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _check_cli_outcome(argv, code, out, err):
    assert "Traceback" not in err, err
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        lines = err.strip().splitlines()
        assert lines and lines[-1].startswith("error: ") and len(lines[-1]) > len("error: "), err
        assert sum(line.startswith("error:") for line in lines) == 1, err
        return
    temperature = _float(_given(argv, "--temperature") or "0")
    given = {f for f in FLAG_VALUES if _given(argv, f) is not None}
    assert temperature is not None and math.isfinite(temperature) and temperature >= 0, argv
    assert not (given & SAMPLING_ONLY and temperature == 0), f"sampling flag ignored: {argv}"
    assert not (given & SPEC_ONLY and "--self-speculative" not in argv), f"spec flag ignored: {argv}"
    assert not ("--system" in given and "--chat" not in argv), f"--system ignored: {argv}"
    if "--json" in argv:
        result = json.loads(out.strip().splitlines()[-1])
        n = int(_given(argv, "--max-new-tokens") or 128)
        assert len(result["generated_tokens"]) <= n
        assert all(0 <= t < 264 for t in result["generated_tokens"])


@FUZZ
@given(argv=cli_argv())
def test_cli_either_succeeds_or_says_error_in_one_line(model_dir, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            mock.patch.object(sys, "stdin", io.StringIO("hello\n\n")), \
            mock.patch("inference.cli.choose_exit_and_draft", _fake_calibration):
        code = main(["--model", model_dir, *argv])
    _check_cli_outcome(argv, code, out.getvalue(), err.getvalue())


CONFIG = tiny_config(num_hidden_layers=2, max_position_embeddings=64)
PARAMS = init_params(CONFIG, jax.random.key(0), std=0.2)

def _mostly(valid, invalid):
    """Valid two times in three: enough successes that the happy path is fuzzed too."""
    return st.integers(0, 2).flatmap(lambda i: valid if i else invalid)


ids = st.lists(st.integers(0, 255), min_size=1, max_size=5)
bad_ids = st.one_of(st.lists(st.integers(-2, 300), max_size=5),
                    st.sampled_from(["hello", [1.5], [[1]], np.array([1.0]), [], [True], None]))
py_prompts = _mostly(st.one_of(st.lists(ids, min_size=1, max_size=3), st.lists(ids.map(np.array), min_size=1,
                                                                               max_size=2),
                               st.just(np.array([[5, 6], [7, 8]]))),
                     st.one_of(st.lists(bad_ids, max_size=3), st.sampled_from(["hello", ["hi"], [1, 2], None, []])))
kwarg_values = {
    "temperature": _mostly(st.sampled_from([0.0, 0.7, np.float32(0.9), 1]),
                           st.sampled_from([-1.0, math.nan, math.inf, -math.inf, 1e300, True, None, "0.5"])),
    "top_k": _mostly(st.sampled_from([0, 5, np.int64(5)]), st.sampled_from([-1, 10 ** 30, 2.0, True, "5", 257])),
    "top_p": _mostly(st.sampled_from([1.0, 0.9, np.float64(0.9)]),
                     st.sampled_from([0.0, 1.5, math.nan, -math.inf, 1e-300, None, "1"])),
    "seed": _mostly(st.sampled_from([0, 7, np.uint32(7), 2 ** 32 - 1]),
                    st.sampled_from([-1, 2 ** 32, 10 ** 30, 1.0, None, "7"])),
    "eos_token_ids": _mostly(st.one_of(st.none(), ids, st.just(np.array([2, 3])), st.just(2)),
                             st.one_of(bad_ids, st.just("</s>"))),
    "early_exit": _mostly(st.sampled_from([None, 1, 2, np.int8(1)]), st.sampled_from([0, 3, -1, True, 1.5])),
    "speculative": _mostly(st.sampled_from([None, SpecConfig(1, 2), SpecConfig(1, 2, draft_vocab=50)]),
                           st.builds(SpecConfig, st.sampled_from([0, 2, -1, 1.0]), st.sampled_from([2, 0, 33]),
                                     draft_vocab=st.sampled_from([None, 0, 300]))),
}


@st.composite
def generate_args(draw):
    names = draw(st.lists(st.sampled_from(sorted(kwarg_values)), unique=True, max_size=4))
    kwargs = {name: draw(kwarg_values[name]) for name in names}
    max_new = draw(_mostly(st.sampled_from([1, 4, 8, np.int64(4)]), st.sampled_from([0, -2, 10 ** 12, 4.0, "4"])))
    return draw(py_prompts), max_new, kwargs


@FUZZ
@given(args=generate_args())
def test_generate_either_returns_a_valid_result_or_raises_inference_error(args):
    prompts, max_new_tokens, kwargs = args
    try:
        result = generate(PARAMS, CONFIG, prompts, max_new_tokens, **kwargs)
    except InferenceError as err:
        assert str(err), "an error must say what is wrong"
        return
    temperature = kwargs.get("temperature", 0.0)
    assert math.isfinite(float(temperature)) and temperature >= 0  # nan/inf must have been refused
    assert len(result.tokens) == len(prompts)
    for row in result.tokens:
        assert len(row) <= int(max_new_tokens) and all(0 <= t < CONFIG.vocab_size for t in row)

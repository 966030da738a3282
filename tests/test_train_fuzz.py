"""Property-based fuzzing of the training CLI: every invocation succeeds or says `error: ...` in one
line with exit code 2; never a traceback, never a value silently changed.

Most examples run `--check` (the whole validation boundary: config, model shape, keys without
effect, RUN_DIR, paths), which loads no data; a few run real tiny trainings of 1-3 steps.
"""

import json
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from training.config import _field_type, coerce, load_config, preset_names, valid_keys  # noqa: E402
from training.train import main  # noqa: E402
from training.validation import get  # noqa: E402

import typing  # noqa: E402

KEYS = valid_keys() + ["run.stesp", "run", "optimizer.lr.x", "nosuch", "model.hidden"]
ANY = st.one_of(st.integers(-2**70, 2**70).map(str), st.floats().map(str), st.text(max_size=12),
                st.sampled_from(["true", "none", "", "~", "/no/such", "nan", "-inf", "0x10", "1_000", "a=b",
                                 "\x00", "é", "smollm2", ".py,.txt"]))
TYPED = {
    int: st.one_of(st.integers(-3, 300), st.integers(-2**40, 2**40)).map(str),
    float: st.one_of(st.floats(-0.5, 2), st.floats(allow_nan=True, allow_infinity=True),
                     st.sampled_from([0.0, 1.0, 1e-9, 1e9])).map(str),
    bool: st.sampled_from(["true", "false", "yes", "0", "maybe"]),
    str: st.sampled_from(["stdlib", "cosine", "constant", "float32", "bfloat16", "exp", "constant", "none",
                          "rotational", "gradual", "sum_l", "uniform", "def ", ".py", "x"]),
}


def _value_for(key: str):
    """Mostly values of the key's type (so examples get past coercion), sometimes anything."""
    try:
        tp = _field_type(key)
    except Exception:
        return ANY
    base = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
    base = str if typing.get_origin(base) is tuple else base
    return st.one_of(TYPED.get(base, ANY), TYPED.get(base, ANY), TYPED.get(base, ANY), ANY)


OVERRIDES = st.lists(st.sampled_from(KEYS).flatmap(lambda k: st.tuples(st.just(k), _value_for(k))), max_size=4)
FLAGS = st.one_of(st.just([]), st.just([]), st.just([]), st.lists(st.sampled_from(
    ["--resume", "--help-keys", "--check", "--preset", "--config", "-x", "--", "--preset=tiny",
     "--preset=nosuch", "stray"]), max_size=2))
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def _expected_outcome(code: int, err: str) -> None:
    assert "Traceback" not in err
    if code != 0:
        assert code == 2, err
        assert err.startswith("error: ") and err.count("\n") == 1, err


def _check_values(preset: str, overrides: list[tuple[str, str]]) -> None:
    """A config that passed has exactly the values given (last one wins), as their field types."""
    cfg = load_config(preset, overrides=[f"{k}={v}" for k, v in overrides])
    for key, value in dict(overrides).items():
        assert get(cfg, key) == coerce(key, value.strip(), _field_type(key)), key


@settings(max_examples=250, **SETTINGS)
@given(preset=st.sampled_from(preset_names()), flags=FLAGS, overrides=OVERRIDES)
def test_check_accepts_or_refuses_in_one_line(preset, flags, overrides, tmp_path_factory, capsys):
    out_dir = tmp_path_factory.mktemp("fuzz") / "run"
    args = ["--check", "--preset", preset, f"run.out_dir={out_dir}", *flags]
    args += [f"{k}={v}" for k, v in overrides]
    code = main(args)
    _expected_outcome(code, capsys.readouterr().err)
    if code == 0 and not flags:
        _check_values(preset, [("run.out_dir", str(out_dir))] + overrides)
    assert not out_dir.exists()  # validation writes nothing


TRAIN_KEYS = st.fixed_dictionaries({}, optional={
    "run.steps": st.sampled_from(["1", "2", "3", "0", "-1"]),
    "run.eval_batches": st.sampled_from(["0", "1", "2"]), "run.log_every": st.sampled_from(["1", "2", "7"]),
    "run.seed": st.sampled_from(["0", "7", "4294967295", "4294967296"]),
    "optimizer.lr": st.sampled_from(["1e-3", "nan", "2"]), "optimizer.grad_accum": st.sampled_from(["1", "2", "3"]),
    "schedule.warmup_steps": st.sampled_from(["0", "5"]), "checkpoint.enabled": st.sampled_from(["true", "false"]),
    "layerskip.exit_loss": st.sampled_from(["true", "false"]), "run.decode_report": st.sampled_from(["false"]),
})


@pytest.mark.slow
@settings(max_examples=3, **SETTINGS)
@given(extra=TRAIN_KEYS)
def test_tiny_training_runs_succeed_or_refuse_in_one_line(extra, corpus, tmp_path_factory, capsys):
    out_dir = tmp_path_factory.mktemp("fuzzrun") / "run"
    base = {"run.out_dir": str(out_dir), "data.source": str(corpus), "data.cache_dir": str(corpus.parent / "cache"),
            "run.steps": "2",
            "run.progress": "false", "run.sample_tokens": "0", "run.eval_every": "0", "mesh.data": "1",
            "data.heldout_percent": "10"}
    code = main(["--preset", "tiny", *[f"{k}={v}" for k, v in {**base, **extra}.items()]])
    _expected_outcome(code, capsys.readouterr().err)
    if code == 0:  # the run did what was asked
        cfg = load_config("tiny", overrides={**base, **extra})
        records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, cfg.run.steps + 1))
        final = [r for r in records if r.get("final")]
        assert len(final) == 1 and (cfg.run.eval_batches == 0 or
                                    final[0]["tokens"] <= cfg.run.eval_batches * cfg.run.batch_size * cfg.run.seq_len)
        assert (Path(out_dir) / "model" / "config.json").is_file()

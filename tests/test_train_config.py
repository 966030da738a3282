"""Training config: presets, YAML files, `key=value` overrides with type coercion, clear errors."""

import pytest

from training.config import (ConfigError, TrainConfig, apply_overrides, load_config, parse_overrides,
                             preset_names, valid_keys)
from training.train import main


def test_presets_load():
    assert {"default", "tiny", "smollm2-135m"} <= set(preset_names())
    for name in preset_names():
        assert isinstance(load_config(name), TrainConfig)
    smol = load_config("smollm2-135m")
    assert (smol.model.hidden_size, smol.model.num_hidden_layers, smol.data.vocab_size) == (576, 30, 49152)
    assert load_config() == load_config("default")


def test_overrides_are_coerced_to_field_types():
    cfg = load_config("tiny", overrides=["run.steps=12", "optimizer.lr=1e-3", "model.remat=true",
                                         "model.head_dim=none", "data.extensions=.py,.txt",
                                         "init_from=/some/path", "run.sample_prompt=x = 1"])
    assert cfg.run.steps == 12 and isinstance(cfg.run.steps, int)
    assert cfg.optimizer.lr == 1e-3 and isinstance(cfg.optimizer.lr, float)
    assert cfg.model.remat is True and cfg.model.head_dim is None
    assert cfg.data.extensions == (".py", ".txt")
    assert cfg.init_from == "/some/path"
    assert cfg.run.sample_prompt == "x = 1"  # only the first '=' splits
    assert load_config("tiny", overrides=["model.head_dim=32"]).model.head_dim == 32
    assert load_config("tiny", overrides=["run.steps=1_000"]).run.steps == 1000


@pytest.mark.parametrize("override, fragment", [
    ("run.step=5", "did you mean 'run.steps'"),
    ("optimizer.learning_rate=1", "unknown config key 'optimizer.learning_rate'"),
    ("modle.hidden_size=8", "did you mean 'model.hidden_size'"),
    ("hidden_size=8", "did you mean 'model.hidden_size'"),
    ("run.steps=ten", "'run.steps' expects int, got 'ten'"),
    ("model.remat=maybe", "'model.remat' expects bool"),
    ("run=3", "'run' is a section"),
    ("run.steps.x=3", "unknown config key 'run.steps.x'"),
    ("run.steps", "expected an override 'section.key=value'"),
    ("run.batch_size=10", "multiple of optimizer.grad_accum"),
    ("model.compute_dtype=float16", "model.compute_dtype must be"),
])
def test_bad_overrides_name_the_key(override, fragment):
    overrides = [override] + (["optimizer.grad_accum=4"] if "grad_accum" in fragment else [])
    with pytest.raises(ConfigError, match=None) as info:
        load_config("tiny", overrides=overrides)
    assert fragment in str(info.value)


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  stesp: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'run.steps'"):
        load_config(config_file=bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(config_file=tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        load_config("tiyn")
    good = tmp_path / "good.yaml"
    good.write_text("run:\n  steps: 7\nmodel:\n  rope_theta: 500000\n")
    cfg = load_config(config_file=good, overrides=["run.steps=8"])
    assert cfg.run.steps == 8 and cfg.model.rope_theta == 500000.0


def test_parse_and_apply():
    assert parse_overrides(["a.b=1", "c= 2 "]) == {"a.b": "1", "c": "2"}
    cfg = apply_overrides(TrainConfig(), {"run.seed": "3", "mesh.fsdp": 2})
    assert cfg.run.seed == 3 and cfg.mesh.fsdp == 2
    assert cfg.replace(**{"run.seed": 4}).run.seed == 4
    assert "run.steps" in valid_keys() and "init_from" in valid_keys()


def test_cli_reports_bad_key(capsys):
    assert main(["--preset", "tiny", "run.stpes=3"]) == 2
    assert "did you mean 'run.steps'" in capsys.readouterr().err
    assert main(["--preset", "tiny", "--help-keys"]) == 0
    assert "run.steps = 40" in capsys.readouterr().out

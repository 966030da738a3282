"""benchmarks/layerskip.py: --reuse takes a finished run only when it was trained with the same config."""

import pytest

from benchmarks.layerskip import check_same_config
from training.config import dump_yaml, load_config


def test_reuse_accepts_a_moved_run_with_the_same_config_and_rejects_a_changed_one(tmp_path):
    trained = load_config("default", overrides={"run.out_dir": "elsewhere/layerskip", "run.steps": 7})
    dump_yaml(trained, tmp_path / "config.yaml")
    wanted = load_config("default", overrides={"run.out_dir": str(tmp_path), "run.steps": 7})
    check_same_config(wanted, tmp_path / "config.yaml")  # only the folder differs
    for changed in ({"run.steps": 8}, {"layerskip.exit_scale": "linear_l"}):
        other = load_config("default", overrides={"run.out_dir": str(tmp_path), "run.steps": 7, **changed})
        with pytest.raises(SystemExit, match="differs from the config"):
            check_same_config(other, tmp_path / "config.yaml")
    with pytest.raises(SystemExit, match="differs from the config"):
        check_same_config(wanted, tmp_path / "missing.yaml")


def test_reuse_ignores_the_inert_fields_of_a_switched_off_layerskip_section(tmp_path):
    off = {"run.out_dir": str(tmp_path), "layerskip.dropout_max": 0.0, "layerskip.exit_loss": False}
    dump_yaml(load_config("default", overrides={**off, "layerskip.curriculum": "rotational"}), tmp_path / "c.yaml")
    check_same_config(load_config("default", overrides={**off, "layerskip.curriculum": "gradual"}), tmp_path / "c.yaml")
    on = {**off, "layerskip.exit_loss": True}
    dump_yaml(load_config("default", overrides={**on, "layerskip.curriculum": "rotational"}), tmp_path / "d.yaml")
    with pytest.raises(SystemExit, match="differs from the config"):
        check_same_config(load_config("default", overrides={**on, "layerskip.curriculum": "gradual"}),
                          tmp_path / "d.yaml")

"""benchmarks/layerskip.py: --reuse takes a finished run only when it was trained with the same config."""

import pytest

from benchmarks.layerskip import check_same_config
from training.config import dump_yaml, load_config


def test_reuse_accepts_a_moved_run_with_the_same_config_and_rejects_a_changed_one(tmp_path):
    trained = load_config("tiny", overrides={"run.out_dir": "elsewhere/layerskip", "run.steps": 7})
    dump_yaml(trained, tmp_path / "config.yaml")
    wanted = load_config("tiny", overrides={"run.out_dir": str(tmp_path), "run.steps": 7})
    check_same_config(wanted, tmp_path / "config.yaml")  # only the folder differs
    for changed in ({"run.steps": 8}, {"layerskip.exit_scale": "linear_l"}):
        other = load_config("tiny", overrides={"run.out_dir": str(tmp_path), "run.steps": 7, **changed})
        with pytest.raises(SystemExit, match="differs from the config"):
            check_same_config(other, tmp_path / "config.yaml")
    with pytest.raises(SystemExit, match="differs from the config"):
        check_same_config(wanted, tmp_path / "missing.yaml")

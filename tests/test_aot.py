"""`python -m training.aot`: the train and decode steps compiled for Cloud TPU slices by the real TPU
compiler (libtpu, installed by the test extra) on this CPU machine, with the memory report checked
against what the model must hold.

Each compile runs in its own process (the CLI), as a user runs it. The default preset on v5e-8 and
the SmolLM2-135M preset on v6e-8 cover both presets and both chips the issue names (the other two
pairs compile the same programs for the other chip: JAXMODELS_AOT_ALL=1 adds them)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from training import aot

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e '.[test]' brings it)")
PAIRS = [("default", "v5e-8"), ("smollm2-135m", "v6e-8")]
if os.environ.get("JAXMODELS_AOT_ALL"):
    PAIRS += [("default", "v6e-8"), ("smollm2-135m", "v5e-8")]


def _aot(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "training.aot", *args, "--json"], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("preset,topo", PAIRS)
def test_a_preset_compiles_for_a_slice_and_its_memory_adds_up(preset, topo):
    chips = aot.TOPOLOGIES[topo].chips
    # all weights sharded over the 8 chips (pure FSDP): each chip holds 1/8 of the state
    report = _aot("--topology", topo, "--preset", preset, "mesh.data=1", f"mesh.fsdp={chips}",
                  *(["--no-decode"] if preset == "smollm2-135m" else []))
    assert report["chips"] == chips and report["device_kind"].startswith("TPU v")
    assert report["param_bytes"] == report["params"] * 4  # float32 master weights
    assert report["optimizer_bytes"] >= 2 * report["param_bytes"]  # AdamW's two moments
    train = report["train_step"]
    assert train["fits"] is True and train["memory"]["hbm"] == aot.TOPOLOGIES[topo].hbm_bytes
    state = report["param_bytes"] + report["optimizer_bytes"] + report["batch_bytes"]
    # the compiler's per-chip arguments are the sharded state; a bit more: norms and scalars are
    # replicated, and TPU memory tiles pad a minor dimension to 128 lanes (SmolLM2's 576 takes 640)
    assert state <= train["memory"]["arguments"] * chips <= state * 1.15
    assert train["memory"]["aliased"] > 0.9 * train["memory"]["outputs"]  # the state is updated in place
    assert train["collective_bytes"].get("all-gather", 0) > 0  # FSDP gathers weights
    assert train["flops"] > 0 and train["model_flops_per_chip"] > train["flops"]  # the layer scan counted once
    if preset == "default":
        decode = report["decode_step"]
        assert decode["fits"] is True
        assert decode["memory"]["arguments"] >= report["param_bytes"]  # the whole model on one chip


@needs_libtpu
@pytest.mark.slow
def test_a_run_too_large_for_the_chip_is_reported_not_raised():
    report = _aot("--topology", "v5e-1", "--preset", "tiny", "run.batch_size=1024", "run.seq_len=4096",
                  "--no-decode")
    assert report["train_step"]["fits"] is False
    assert "memory" in report["train_step"]["compiler"].lower()


def test_an_unknown_topology_lists_the_supported_ones(capsys):
    assert aot.main(["--topology", "v9z-8"]) == 2
    err = capsys.readouterr().err
    assert "unknown topology 'v9z-8'" in err and "v5e-8" in err and "v6e-8" in err


def test_list_and_help_name_every_topology(capsys):
    assert aot.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in aot.TOPOLOGIES) and "16 GiB" in out
    assert aot.TOPOLOGIES["v5e-8"].chips == 8 and aot.TOPOLOGIES["v4-8"].chips == 4


def test_without_libtpu_the_error_says_how_to_install_it(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    assert aot.main(["--topology", "v5e-8", "--preset", "tiny"]) == 2
    assert 'pip install -e ".[tpu]"' in capsys.readouterr().err

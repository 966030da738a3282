"""Whole runs: end to end, SIGKILL + resume (bitwise same losses), stdlib learning, init_from, CLI errors."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from jaxmodels.convert.load import load_model
from training.config import ConfigError, TrainConfig
from training.testing import metrics_records, tiny_train_config
from training.train import main, train

ROOT = Path(__file__).resolve().parents[1]


def _overrides(cfg: TrainConfig) -> list[str]:
    keys = {"run.out_dir": cfg.run.out_dir, "data.source": cfg.data.source, "data.cache_dir": cfg.data.cache_dir,
            "run.progress": "false", "run.sample_tokens": str(cfg.run.sample_tokens),
            "data.heldout_percent": str(cfg.data.heldout_percent), "run.steps": str(cfg.run.steps),
            "checkpoint.every": str(cfg.checkpoint.every), "run.eval_every": str(cfg.run.eval_every),
            "mesh.data": str(cfg.mesh.data), "mesh.fsdp": str(cfg.mesh.fsdp)}
    return [f"{k}={v}" for k, v in keys.items()]


@pytest.fixture(scope="module")
def tiny_run(corpus, cache, tmp_path_factory):
    """One complete tiny run on 8 devices (data parallel), with a generated sample."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = tiny_train_config(out, corpus, cache, **{"run.steps": 12, "run.eval_every": 6,
                                                   "checkpoint.every": 5, "run.sample_tokens": 8})
    return cfg, train(cfg)


def test_end_to_end(tiny_run):
    cfg, summary = tiny_run
    out = Path(cfg.run.out_dir)
    train_records = metrics_records(out)
    assert [r["step"] for r in train_records] == list(range(1, 13))
    assert {"loss", "accuracy", "grad_norm", "lr"} <= set(train_records[0])
    held = metrics_records(out, "heldout")
    assert [r["step"] for r in held] == [6, 12] and held[-1]["final"]
    assert held[-1]["perplexity"] == pytest.approx(np.exp(held[-1]["loss"]), rel=1e-6)
    assert summary["last_loss"] < summary["first_loss"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "12", "5"]
    assert (out / "sample.txt").read_text().startswith(cfg.run.sample_prompt)
    # the export loads back through the library's one entry point, with the trained tokenizer
    config, params, tok = load_model(out)
    assert config.vocab_size == tok.vocab_size == cfg.data.vocab_size
    assert config.num_hidden_layers == cfg.model.num_hidden_layers
    assert tok.decode(tok.encode("x = 1\n")) == "x = 1\n"


def test_init_from_a_run_continues_from_its_weights(tiny_run, corpus, cache, tmp_path):
    cfg, summary = tiny_run
    fine = tiny_train_config(tmp_path / "fine", corpus, cache, **{
        "init_from": cfg.run.out_dir, "run.steps": 2, "checkpoint.enabled": False,
        "model.hidden_size": 32})  # the model section is ignored: the checkpoint defines the model
    result = train(fine)
    first = metrics_records(tmp_path / "fine")[0]["loss"]
    assert first < summary["first_loss"] - 0.3  # starts from the trained weights, not from scratch
    assert result["params"] == summary["params"]


RUN_SLOWLY = textwrap.dedent("""
    import sys, time
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")  # as in tests/conftest.py
    from training import data
    original = data.DataSet.train_ids
    def slow(self, *args, **kwargs):  # give the test time to kill the run mid-way
        time.sleep(0.25)
        return original(self, *args, **kwargs)
    data.DataSet.train_ids = slow
    from training.train import main
    sys.exit(main(["--preset", "tiny", *sys.argv[1:]]))
""")


@pytest.mark.parametrize("mesh", [
    {"mesh.data": 1},
    pytest.param({"mesh.data": 2, "mesh.fsdp": 4}, marks=pytest.mark.slow, id="fsdp"),
])
def test_sigkill_and_resume_gives_the_same_losses(corpus, cache, tmp_path, mesh):
    steps = 16
    common = {"run.steps": steps, "checkpoint.every": 4, "run.eval_every": 0, **mesh}
    reference = tiny_train_config(tmp_path / "reference", corpus, cache, **common)
    train(reference)
    expected = [r["loss"] for r in metrics_records(tmp_path / "reference")]

    killed = tiny_train_config(tmp_path / "killed", corpus, cache, **common)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", RUN_SLOWLY, *_overrides(killed)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(l).get("step", 0) >= 10 for l in metrics.read_text().splitlines()
                                    if l.strip().endswith("}")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged = [r["step"] for r in metrics_records(tmp_path / "killed")]
    assert 10 <= logged[-1] < steps  # killed in the middle

    summary = train(killed)  # finds the checkpoints and resumes
    assert 0 < summary["resumed_from"] < steps and summary["resumed_from"] % 4 == 0
    resumed = [r["loss"] for r in metrics_records(tmp_path / "killed")]
    assert len(resumed) == steps
    assert resumed == expected  # bitwise, step for step


def test_stdlib_loss_goes_down(tmp_path):
    """The real default corpus (whole stdlib, small BPE), a short run: the loss clearly falls."""
    cfg = tiny_train_config(tmp_path / "run", "stdlib", tmp_path / "cache", **{
        "run.steps": 30, "run.eval_every": 0, "checkpoint.enabled": False, "data.heldout_percent": 2.0,
        "optimizer.lr": 0.01, "run.seq_len": 64, "run.batch_size": 16, "mesh.data": 1})
    summary = train(cfg)
    losses = [r["loss"] for r in metrics_records(tmp_path / "run")]
    assert np.mean(losses[-5:]) < losses[0] - 0.8
    assert summary["heldout"]["loss"] < losses[0] - 0.5


@pytest.mark.slow
def test_fine_tune_smollm2_gguf(corpus, cache, tmp_path, smollm2_loaded_once):
    """init_from=smollm2: fine-tune the 135M GGUF with its own tokenizer, export it, load it back."""
    pytest.importorskip("gguf")
    from jaxmodels.convert.gguf import smollm2_gguf_path
    try:
        smollm2_gguf_path()
    except Exception as err:
        pytest.skip(str(err))
    cfg = tiny_train_config(tmp_path / "ft", corpus, cache, **{
        "init_from": "smollm2", "run.steps": 4, "run.batch_size": 2, "run.seq_len": 64, "run.eval_every": 0,
        "run.eval_batches": 1, "checkpoint.enabled": False, "optimizer.lr": 1e-4, "schedule.warmup_steps": 1,
        "mesh.data": 1})
    summary = train(cfg)
    assert summary["params"] > 100e6 and summary["first_loss"] < 5.0  # a trained model, not random
    config, _, tok = load_model(tmp_path / "ft")
    assert config.vocab_size == 49152 and tok.vocab_size == 49152


@pytest.mark.parametrize("args, fragment", [
    (["data.source=/no/such/folder"], "data path '/no/such/folder' does not exist"),
    (["data.source={empty}"], "is empty"),
    (["run.stesp=3"], "did you mean 'run.steps'"),
])
def test_cli_errors(args, fragment, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    args = [a.format(empty=tmp_path / "empty") for a in args]
    assert main(["--preset", "tiny", f"run.out_dir={tmp_path / 'run'}", *args]) == 2
    assert fragment in capsys.readouterr().err


def test_resume_flag_without_checkpoint_is_an_error(corpus, cache, tmp_path, capsys):
    cfg = tiny_train_config(tmp_path / "run", corpus, cache)
    assert main(["--preset", "tiny", "--resume", *_overrides(cfg)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_resuming_with_a_config_that_trains_differently_is_refused(corpus, cache, tmp_path):
    cfg = tiny_train_config(tmp_path / "run", corpus, cache, **{"run.steps": 3, "checkpoint.every": 3,
                                                                "run.sample_tokens": 0})
    train(cfg)
    changed = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, lr=cfg.optimizer.lr * 2))
    with pytest.raises(ConfigError, match=r"step 3 of a run trained with another config \(optimizer.lr"):
        train(changed)
    watched = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, log_every=2))  # how it is watched only
    assert train(watched)["resumed_from"] == 3

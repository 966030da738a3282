"""Multi-process training through the launcher (`training.cluster`): 2 processes x 4 CPU devices train
the same losses and checkpoint as 1 process x 8 devices, and pipeline stages spanning the two
processes (mesh.stage=2) train the same losses as the unpipelined run.

Each launch compiles the train step in two processes on 2 shared cores (about half a minute)."""

import io
import json
import os
import sys

import numpy as np
import pytest

from training.cluster import launch
from training.testing import few_blocks_corpus, metrics_records, tiny_train_config
from training.train import train

pytestmark = pytest.mark.slow

COMMON = {"model.num_hidden_layers": 4, "run.steps": 4, "schedule.total_steps": 4, "optimizer.grad_accum": 2,
          "run.batch_size": 16,
          "run.eval_every": 0, "run.eval_batches": 1, "checkpoint.every": 2}


# The CLI, each process counting the train blocks it reads into ROWS_FILE.p{process} at exit.
COUNTING_WORKER = """
import atexit, os, sys
from training import data
original, rows = data.DataSet.train_blocks, []
def counting(self, ids):
    rows.append(len(ids))
    return original(self, ids)
data.DataSet.train_blocks = counting
path = os.environ["ROWS_FILE"] + ".p" + os.environ["JAX_PROCESS_ID"]
atexit.register(lambda: open(path, "w").write(str(sum(rows))))
from training.cli import run_as_script
sys.argv = ["train", *sys.argv[1:]]
run_as_script()
"""


def _cluster_train(run_dir, corpus, cache, processes, devices, rows_file=None, **extra) -> str:
    keys = {"run.out_dir": run_dir, "data.source": corpus, "data.cache_dir": cache, "run.progress": "false",
            "run.sample_tokens": 0, "data.heldout_percent": 10.0, **COMMON, **extra}
    program = ["-c", COUNTING_WORKER] if rows_file else ["-m", "training.train"]
    command = [sys.executable, *program, "--preset", "tiny", *(f"{k}={v}" for k, v in keys.items())]
    env = dict(os.environ, JAX_DISTRIBUTED_TIMEOUT="60")
    if rows_file:
        env.update(ROWS_FILE=str(rows_file), PYTHONPATH=os.getcwd())
    # the launcher replaces XLA_FLAGS' device count with each process's and keeps the other flags
    log = io.StringIO()
    code = launch(command, processes=processes, devices_per_process=devices, timeout=300, env=env, output=log)
    assert code == 0, log.getvalue()[-4000:]
    return log.getvalue()


def _losses(run_dir):
    return np.asarray([r["loss"] for r in metrics_records(run_dir)])


@pytest.mark.parametrize("mesh", [{"mesh.data": 4, "mesh.fsdp": 2}, {"mesh.data": 4, "mesh.stage": 2}],
                         ids=["data-fsdp", "stage"])
def test_two_processes_train_as_one(corpus, cache, tmp_path, mesh):
    reference = train(tiny_train_config(tmp_path / "one", corpus, cache, **COMMON, **mesh))
    out = _cluster_train(tmp_path / "two", corpus, cache, processes=2, devices=4, rows_file=tmp_path / "rows", **mesh)
    np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=1e-4)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["heldout"]["loss"] == pytest.approx(reference["heldout"]["loss"], rel=1e-4)
    assert "[p0]" in out and "[p1]" in out
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert len(metrics_records(tmp_path / "two")) == 4  # process 0 alone writes the metrics
    # each process reads only the rows of its devices: half of every batch when the batch is split
    # over both processes, all of it when they hold different pipeline stages of the same rows
    rows = [int((tmp_path / f"rows.p{p}").read_text()) for p in (0, 1)]
    total = COMMON["run.steps"] * COMMON["run.batch_size"]
    assert rows == ([total, total] if mesh.get("mesh.stage") else [total // 2, total // 2])


def test_acsgd_stages_on_two_processes_train_as_one(cache, tmp_path):
    """Each process holds its stage's per-example memory; from the second epoch on the compressed
    program runs (6 steps over an epoch of 3), with the same losses as on one process."""
    few = few_blocks_corpus(tmp_path / "few")
    keys = {"model.num_hidden_layers": 4, "run.steps": 6, "schedule.total_steps": 6, "optimizer.grad_accum": 2,
            "run.eval_every": 0, "run.eval_batches": 1, "checkpoint.every": 3, "mesh.data": 4, "mesh.stage": 2,
            "run.seq_len": 32, "data.heldout_percent": 50.0, "data.vocab_size": 300, "pipeline.acsgd": True}
    train(tiny_train_config(tmp_path / "one", few, cache, **keys))
    keys = {"run.out_dir": tmp_path / "two", "data.source": few, "data.cache_dir": cache, "run.progress": "false",
            "run.sample_tokens": 0, **keys}
    command = [sys.executable, "-m", "training.train", "--preset", "tiny", *(f"{k}={v}" for k, v in keys.items())]
    env = dict(os.environ)  # the launcher sets each process's device count
    log = io.StringIO()
    code = launch(command, processes=2, devices_per_process=4, timeout=300, output=log,
                  env=dict(env, JAX_DISTRIBUTED_TIMEOUT="60"))
    assert code == 0, log.getvalue()[-4000:]
    np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=1e-5)
    assert sorted(p.name for p in (tmp_path / "two" / "acsgd" / "6").iterdir()) == [
        f"activations-p{p}-{kind}.{ext}" for p in (0, 1) for kind, ext in (("recv", "npz"), ("seen", "npy"),
                                                                           ("send", "npz"))]


# The CLI, with process 1 killed (SIGKILL, no chance to save) when it asks for its KILL_AT-th batch,
# once the checkpoint folder AWAIT exists: checkpoints are written in the background, and one still
# in flight when a process dies is (rightly) lost, so the test waits for it to have a fixed resume point.
KILLED_WORKER = """
import os, signal, sys, time
from training import data
original, calls = data.DataSet.train_ids, []
def dying(self, *args, **kwargs):
    calls.append(1)
    if os.environ["JAX_PROCESS_ID"] == "1" and len(calls) == int(os.environ["KILL_AT"]):
        deadline = time.monotonic() + 120
        while not os.path.isdir(os.environ["AWAIT"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args, **kwargs)
data.DataSet.train_ids = dying
from training.cli import run_as_script
sys.argv = ["train", *sys.argv[1:]]
run_as_script()
"""


def test_a_killed_process_ends_the_cluster_and_the_run_resumes(corpus, cache, tmp_path):
    steps = {"run.steps": 6, "schedule.total_steps": 6}
    _cluster_train(tmp_path / "reference", corpus, cache, 2, 1, **steps)
    keys = {"run.out_dir": tmp_path / "run", "data.source": corpus, "data.cache_dir": cache, "run.progress": "false",
            "run.sample_tokens": 0, "data.heldout_percent": 10.0, **COMMON, **steps}
    command = [sys.executable, "-c", KILLED_WORKER, "--preset", "tiny", *(f"{k}={v}" for k, v in keys.items())]
    log = io.StringIO()
    env = dict(os.environ)  # the launcher sets each process's device count
    code = launch(command, processes=2, devices_per_process=1, timeout=300, output=log,
                  env=dict(env, KILL_AT="4", AWAIT=str(tmp_path / "run" / "checkpoints" / "2"),
                           JAX_DISTRIBUTED_TIMEOUT="60", PYTHONPATH=os.getcwd()))
    assert code == 128 + 9 and "process 1" in log.getvalue(), log.getvalue()[-3000:]
    assert "2" in [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()]
    out = _cluster_train(tmp_path / "run", corpus, cache, 2, 1, **steps)  # resumes from step 2
    assert "resumed from" in out
    np.testing.assert_array_equal(_losses(tmp_path / "run"), _losses(tmp_path / "reference"))


def test_an_unreachable_coordinator_is_named(tmp_path):
    import socket
    import subprocess
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1",
               JAX_DISTRIBUTED_TIMEOUT="5", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "training.train", "--preset", "tiny", f"run.out_dir={tmp_path}"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"127.0.0.1:{port}" in proc.stderr and "5 s" in proc.stderr

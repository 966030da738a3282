"""Two JAX processes as one cluster (localhost coordinator, 1 CPU device each) training one RUN_DIR.

What issue 12 asks of a multi-host run, checked with real processes (`python -m training.train`'s CLI
with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, see `training.cli`):
- one lock holder: process 0 holds RUN_DIR/.lock, a third run on that RUN_DIR is refused meanwhile;
- SIGTERM sent to ONE process stops BOTH at the same step boundary, with one checkpoint, exit 143;
- the resumed 2-process run reproduces the uninterrupted 2-process loss curve bit for bit.

Each 2-process launch compiles the train step (20-35 s on 2 shared CPU cores); a persistent compilation
cache shared by the launches makes the later ones cheaper. Every subprocess runs under a timeout.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import FAST_COMPILE
from training.runlock import RunLock
from training.testing import small_corpus
from training.train import main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12
TIMEOUT = 150  # seconds, per launch

# The CLI with each step slowed down by STEP_SLEEP seconds, so a test can act mid-run.
WORKER = textwrap.dedent("""
    import os, sys, time
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")  # as in tests/conftest.py
    from training import data
    original, pause = data.DataSet.train_ids, float(os.environ.get("STEP_SLEEP", "0"))
    def slow(self, *args, **kwargs):
        time.sleep(pause)
        return original(self, *args, **kwargs)
    data.DataSet.train_ids = slow
    from training.cli import run_as_script
    sys.argv = ["train", "--preset", "tiny", *sys.argv[1:]]
    run_as_script()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(run_dir: Path, corpus: Path, cache: Path, **extra: object) -> list[str]:
    keys = {"run.out_dir": run_dir, "data.source": corpus, "data.cache_dir": cache, "run.progress": "false",
            "run.sample_tokens": 0, "data.heldout_percent": 10.0, "run.steps": STEPS, "checkpoint.every": 4,
            "run.eval_every": 0, "run.eval_batches": 1, **extra}
    return [f"{k}={v}" for k, v in keys.items()]


class Cluster:
    """Two worker processes forming one JAX cluster; their output goes to files in `logs`."""

    def __init__(self, argv: list[str], logs: Path, jit_cache: Path, step_sleep: float = 0.0):
        port, self.logs = _free_port(), logs
        logs.mkdir(parents=True, exist_ok=True)
        self.procs = []
        for i in range(2):
            env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
                       XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}",
                       JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                       JAX_DISTRIBUTED_TIMEOUT="60", JAX_COMPILATION_CACHE_DIR=str(jit_cache),
                       JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", STEP_SLEEP=str(step_sleep))
            with (logs / f"process{i}.txt").open("w") as out:
                self.procs.append(subprocess.Popen([sys.executable, "-c", WORKER, *argv], env=env, stdout=out,
                                                   stderr=subprocess.STDOUT))

    def output(self, i: int) -> str:
        return (self.logs / f"process{i}.txt").read_text()

    def wait(self, timeout: float = TIMEOUT) -> list[int]:
        """Both exit codes; kills both (and fails) if either runs past `timeout`."""
        deadline = time.time() + timeout
        try:
            return [p.wait(timeout=max(deadline - time.time(), 1)) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the 2-process run took over {timeout}s:\n{self.output(0)[-2000:]}\n{self.output(1)[-2000:]}")

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def curve(run_dir: Path) -> tuple[dict[int, float], int]:
    """{step: train loss} and the largest number of records any step has (copies must agree)."""
    losses: dict[int, set[float]] = {}
    copies: dict[int, int] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("split") == "train":
            losses.setdefault(r["step"], set()).add(r["loss"])
            copies[r["step"]] = copies.get(r["step"], 0) + 1
    assert all(len(v) == 1 for v in losses.values()), f"processes logged different losses: {losses}"
    return {s: v.pop() for s, v in sorted(losses.items())}, max(copies.values())


def _wait_for_step(cluster: Cluster, run_dir: Path, step: int, timeout: float = TIMEOUT) -> None:
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline and all(p.poll() is None for p in cluster.procs):
        if metrics.exists() and any(json.loads(line).get("step", 0) >= step
                                    for line in metrics.read_text().splitlines() if line.endswith("}")):
            return
        time.sleep(0.05)
    cluster.kill()
    pytest.fail(f"the run did not reach step {step}:\n{cluster.output(0)[-2000:]}\n{cluster.output(1)[-2000:]}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(corpus, data cache, jit cache, the uninterrupted 2-process run's folder)."""
    base = tmp_path_factory.mktemp("multihost")
    corpus, cache, jit_cache = small_corpus(base / "corpus"), base / "cache", base / "jit"
    reference = base / "reference"
    cluster = Cluster(_argv(reference, corpus, cache), base / "logs-reference", jit_cache)
    assert cluster.wait() == [0, 0], cluster.output(0)[-3000:] + cluster.output(1)[-3000:]
    return corpus, cache, jit_cache, reference


def test_one_lock_holder_and_sigterm_to_one_process_stops_both_and_resumes_bitwise(setup, tmp_path, capsys):
    corpus, cache, jit_cache, reference = setup
    expected, _ = curve(reference)
    assert sorted(expected) == list(range(1, STEPS + 1))
    run_dir = tmp_path / "run"
    argv = _argv(run_dir, corpus, cache, **{"checkpoint.every": 100})  # the signal's checkpoint is the only one
    cluster = Cluster(argv, tmp_path / "logs", jit_cache, step_sleep=0.3)
    try:
        _wait_for_step(cluster, run_dir, 3)
        # (a) one holder, process 0; a third run on RUN_DIR is refused, naming it
        holder = json.loads((run_dir / ".lock").read_text())
        assert holder["pid"] == cluster.procs[0].pid
        assert main(["--preset", "tiny", *argv]) == 2
        assert f"in use by another training run (pid {cluster.procs[0].pid} on host" in capsys.readouterr().err
        # (b) SIGTERM to process 1 only (not the lock holder nor the coordinator)
        cluster.procs[1].send_signal(signal.SIGTERM)
        codes = cluster.wait()
    finally:
        cluster.kill()
    outputs = [cluster.output(0), cluster.output(1)]
    assert codes == [143, 143], outputs
    stops = [[line for line in out.splitlines() if line.startswith("stopped by SIGTERM after step")] for out in outputs]
    assert len(stops[0]) == 1 and stops[0] == stops[1], stops  # the same step boundary on both
    saved = [int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and f"after step {saved[0]};" in stops[0][0] and 3 <= saved[0] < STEPS
    assert all("Traceback" not in out and "to resume: python -m training.train" in out for out in outputs)
    assert (run_dir / ".lock").read_text() == ""  # released
    assert sorted(curve(run_dir)[0]) == list(range(1, saved[0] + 1))

    resumed = Cluster(argv, tmp_path / "logs-resumed", jit_cache)
    assert resumed.wait() == [0, 0], resumed.output(0)[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / str(saved[0])}" in resumed.output(0)
    assert curve(run_dir)[0] == expected  # bit for bit


def test_when_process_0_is_refused_the_lock_every_process_refuses(setup, tmp_path):
    corpus, cache, jit_cache, _ = setup
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with RunLock(run_dir):  # another run (this test) holds RUN_DIR
        cluster = Cluster(_argv(run_dir, corpus, cache), tmp_path / "logs", jit_cache)
        try:
            codes = cluster.wait(timeout=90)  # without agreement process 1 waits for its peer until killed
        finally:
            cluster.kill()
    outputs = [cluster.output(0), cluster.output(1)]
    assert codes == [2, 2], outputs
    assert f"is in use by another training run (pid {os.getpid()} on host" in outputs[0]
    assert "error: process 0 of this multi-process run could not take" in outputs[1]
    assert not any("Traceback" in out for out in outputs) and not (run_dir / "metrics.jsonl").exists()


def test_each_step_is_logged_once(setup):
    assert curve(setup[3])[1] == 1

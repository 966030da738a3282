"""Everyday accidents: a second run on one RUN_DIR, divergence, SIGTERM / Ctrl-C, bad input, extending runs."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from training import data as data_module
from training.config import ConfigError, TrainConfig, load_config, valid_keys
from training.interrupt import StopSignals
from training.runlock import RunLock, RunLockedError
from training.testing import metrics_records, tiny_train_config
from training.train import main, train
from training.validation import RANGES, get

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12
COMMON = {"run.steps": STEPS, "checkpoint.every": 4, "run.eval_every": 0, "run.eval_batches": 1, "mesh.data": 1}

# The tiny preset, each step slowed down so a test can act mid-run; `main` as the CLI runs it.
RUN_SLOWLY = textwrap.dedent("""
    import sys, time
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")  # as in tests/conftest.py
    from training import data
    original = data.DataSet.train_ids
    def slow(self, *args, **kwargs):
        time.sleep(0.3)
        return original(self, *args, **kwargs)
    data.DataSet.train_ids = slow
    from training.cli import run_as_script
    sys.argv = ["train", "--preset", "tiny", *sys.argv[1:]]
    run_as_script()
""")


@pytest.fixture(scope="module")
def reference(corpus, cache, tmp_path_factory):
    """An uninterrupted run: (config, summary, train losses)."""
    cfg = tiny_train_config(tmp_path_factory.mktemp("runs") / "reference", corpus, cache, **COMMON)
    summary = train(cfg)
    return cfg, summary, [r["loss"] for r in metrics_records(Path(cfg.run.out_dir))]


def _argv(run_dir: Path, corpus: Path, cache: Path, **extra) -> list[str]:
    keys = {"run.out_dir": run_dir, "data.source": corpus, "data.cache_dir": cache, "run.progress": "false",
            "run.sample_tokens": 0, "data.heldout_percent": 10.0, **COMMON, **extra}
    return [f"{k}={v}" for k, v in keys.items()]


def _start_slow_run(argv: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", RUN_SLOWLY, *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(line).get("step", 0) >= step
                                    for line in metrics.read_text().splitlines() if line.endswith("}")):
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"the run did not reach step {step}:\n{proc.communicate()[0][-3000:]}")


# --------------------------------------------------------------------------- run-folder ownership
@pytest.mark.slow
def test_a_second_concurrent_run_is_refused_and_the_first_finishes_untouched(reference, corpus, cache,
                                                                            tmp_path, capsys):
    run_dir = tmp_path / "run"
    proc = _start_slow_run(_argv(run_dir, corpus, cache))
    _wait_for_step(proc, run_dir, 2)
    assert main(["--preset", "tiny", *_argv(run_dir, corpus, cache)]) == 2
    err = capsys.readouterr().err
    assert f"is in use by another training run (pid {proc.pid} on host {socket.gethostname()}" in err
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    assert [r["loss"] for r in metrics_records(run_dir)] == reference[2]  # every step once, bit for bit
    assert json.loads((run_dir / "summary.json").read_text())["last_loss"] == reference[2][-1]
    assert (run_dir / ".lock").read_text() == ""  # released


def test_a_lock_whose_holder_died_is_taken_over(tmp_path):
    hold = ("import os, sys, time; from training.runlock import RunLock; "
            "lock = RunLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(RunLockedError, match=f"pid {proc.pid} on host"):
        RunLock(tmp_path).acquire()
    proc.kill()
    proc.wait()
    notes = []
    with RunLock(tmp_path, note=notes.append):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert len(notes) == 1 and f"pid {proc.pid}" in notes[0] and "took over" in notes[0]
    with RunLock(tmp_path, note=notes.append):  # released cleanly: no note the next time
        pass
    assert len(notes) == 1


def test_a_lock_from_another_host_is_refused_with_the_way_to_break_it(tmp_path, corpus, cache, capsys):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "start": "then"}))
    assert main(["--preset", "tiny", *_argv(tmp_path, corpus, cache)]) == 2
    err = capsys.readouterr().err
    assert "host elsewhere" in err and f"delete {tmp_path / '.lock'}" in err
    assert not (tmp_path / "metrics.jsonl").exists()


# --------------------------------------------------------------------------- divergence
def _poison_blocks(monkeypatch, is_bad) -> None:
    """Make the first row of each batch for which `is_bad(call number, position, batch_size)` holds
    carry a token id beyond the vocabulary (-> a NaN loss), wherever the loop reads that row."""
    original_ids, original_blocks, calls, bad = data_module.DataSet.train_ids, data_module.DataSet.train_blocks, [], set()

    def train_ids(self, position, batch_size):
        ids, after = original_ids(self, position, batch_size)
        calls.append(1)
        if is_bad(len(calls), position, batch_size):
            bad.add(int(ids[0]))
        return ids, after

    def train_blocks(self, ids):
        blocks = original_blocks(self, ids).copy()
        blocks[np.isin(ids, list(bad)), 3] = 10**6
        return blocks

    monkeypatch.setattr(data_module.DataSet, "train_ids", train_ids)
    monkeypatch.setattr(data_module.DataSet, "train_blocks", train_blocks)


def test_an_injected_nan_batch_stops_the_run_and_nothing_is_exported(corpus, cache, tmp_path, capsys,
                                                                       monkeypatch):
    _poison_blocks(monkeypatch, lambda call, position, batch_size: call == 6)  # step 6 reads a bad token
    run_dir = tmp_path / "run"
    assert main(["--preset", "tiny", *_argv(run_dir, corpus, cache, **{"run.log_every": 2})]) == 3
    err = capsys.readouterr().err
    assert "error: training diverged at step 6: loss = nan" in err and "the last checkpoint is step 4" in err
    assert not (run_dir / "model").exists() and not (run_dir / "summary.json").exists()
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [4]  # nothing at or after the diverged step
    assert (run_dir / ".lock").read_text() == ""


def test_divergence_retries_roll_back_and_skip_the_bad_batch(corpus, cache, tmp_path, capsys, monkeypatch):
    # the batch of step 6 (data index 40) is always bad
    _poison_blocks(monkeypatch, lambda call, position, batch_size: position == data_module.DataPosition(0, 5 * batch_size))
    run_dir = tmp_path / "run"
    argv = _argv(run_dir, corpus, cache, **{"run.log_every": 2, "run.divergence_retries": 1})
    assert main(["--preset", "tiny", *argv]) == 0
    assert "step 6 diverged: rolled back to the checkpoint at step 4" in capsys.readouterr().out
    train_records = metrics_records(run_dir)
    assert [r["step"] for r in train_records] == list(range(1, STEPS + 1))
    assert all(np.isfinite(r["loss"]) for r in train_records)
    assert metrics_records(run_dir, "skipped") == [{"split": "skipped", "step": 6, "rolled_back_to": 4}]
    assert (run_dir / "model" / "config.json").is_file()


@pytest.mark.parametrize("value", ["nan", "-1", "inf", "0"])
def test_a_bad_learning_rate_is_refused_before_any_work(value, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["--preset", "tiny", f"run.out_dir={run_dir}", f"optimizer.lr={value}"]) == 2
    assert "'optimizer.lr' must be" in capsys.readouterr().err
    assert not run_dir.exists()


# --------------------------------------------------------------------------- SIGTERM, Ctrl-C
@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_resumed_run_is_bitwise_the_same(reference, corpus, cache, tmp_path):
    run_dir = tmp_path / "run"
    argv = _argv(run_dir, corpus, cache, **{"checkpoint.every": 100})  # the signal's checkpoint is the only one
    proc = _start_slow_run(argv)
    _wait_for_step(proc, run_dir, 5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    assert "Traceback" not in out and "to resume: python -m training.train --preset tiny" in out
    saved = [int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 5 <= saved[0] < STEPS
    assert [r["step"] for r in metrics_records(run_dir)] == list(range(1, saved[0] + 1))

    cfg = load_config("tiny", overrides=argv)
    summary = train(cfg)
    assert summary["resumed_from"] == saved[0]
    assert [r["loss"] for r in metrics_records(run_dir)] == reference[2]  # bit for bit


@pytest.mark.slow
def test_ctrl_c_twice_exits_at_once_without_a_traceback(corpus, cache, tmp_path):
    run_dir = tmp_path / "run"
    proc = _start_slow_run(_argv(run_dir, corpus, cache, **{"run.steps": 400}))
    _wait_for_step(proc, run_dir, 2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "error: interrupted" in out


@pytest.mark.parametrize("signum, checkpoints", [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["sigterm-no-checkpoints", "ctrl-c"])
def test_a_signal_in_the_loop_stops_at_the_step_boundary(signum, checkpoints, corpus, cache, tmp_path, capsys,
                                                         monkeypatch):
    original, calls = data_module.DataSet.train_ids, []

    def preempted(self, *args, **kwargs):  # the signal arrives while step 3 runs
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signum)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(data_module.DataSet, "train_ids", preempted)
    before = signal.getsignal(signum)
    argv = _argv(tmp_path / "run", corpus, cache, **{"checkpoint.enabled": str(checkpoints).lower()})
    if not checkpoints:
        argv.remove("checkpoint.every=4")
    assert main(["--preset", "tiny", *argv]) == 128 + signum
    err = capsys.readouterr().err
    name = "SIGTERM" if signum == signal.SIGTERM else "SIGINT (Ctrl-C)"
    assert f"stopped by {name} after step 3" in err and "Traceback" not in err
    if checkpoints:
        assert "saved a checkpoint at step 3" in err and "to resume: python -m training.train --preset tiny" in err
        assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()] == ["3"]
    else:
        assert "nothing saved" in err and "to resume" not in err
    assert [r["step"] for r in metrics_records(tmp_path / "run")] == [1, 2, 3]
    assert signal.getsignal(signum) is before and not (tmp_path / "run" / "model").exists()


def test_stop_signals_request_a_stop_then_quit_and_restore_the_handlers():
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_second_signal_swallowed_by_a_callback_still_quits(capsys):
    class RaisesWhenCollected:  # stands for JAX's gc callback, where a signal handler may run
        def __del__(self):
            raise KeyboardInterrupt

    hook = sys.unraisablehook
    with pytest.raises(KeyboardInterrupt):
        with StopSignals() as stop:
            stop.requested = signal.SIGINT  # the first signal
            RaisesWhenCollected()  # Python only reports an exception from __del__ ...
            for _ in range(200):  # ... and StopSignals raises it again in the main thread
                time.sleep(0.005)
    assert sys.unraisablehook is hook and "Traceback" not in capsys.readouterr().err


def test_a_signal_while_the_stop_checkpoint_is_written_quits_at_once():
    code = ("import os, signal, time\nfrom training.interrupt import quit_at_once_on_signal\n"
            "with quit_at_once_on_signal():\n    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(30)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and "error: interrupted" in proc.stderr and "Traceback" not in proc.stderr


def test_ctrl_c_while_loading_data_exits_130_without_a_traceback(tmp_path, corpus, cache, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("training.train.prepare_data", interrupted)
    assert main(["--preset", "tiny", *_argv(tmp_path / "run", corpus, cache)]) == 130
    assert "error: interrupted" in capsys.readouterr().err
    assert (tmp_path / "run" / ".lock").read_text() == ""


@pytest.mark.parametrize("env", [{"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
                                 {"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
                                 {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_PROCESS_ID": "0"},
                                 {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0", "JAX_DISTRIBUTED_TIMEOUT": "x"}],
                         ids=["id-out-of-range", "count-not-int", "no-count", "timeout-not-int"])
def test_a_bad_multi_process_environment_is_one_error_line(env, tmp_path, capsys, monkeypatch):
    for key, value in {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", **env}.items():
        monkeypatch.setenv(key, value)
    assert main(["--preset", "tiny", f"run.out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "JAX_" in err
    assert not (tmp_path / "run").exists()  # refused before any work


# --------------------------------------------------------------------------- the end of a run, extending it
def test_the_final_evaluation_honours_eval_batches(reference):
    cfg, summary, _ = reference
    final = metrics_records(Path(cfg.run.out_dir), "heldout")[-1]
    assert final["final"] and final["tokens"] == cfg.run.batch_size * cfg.run.seq_len  # 1 batch, not the split
    assert summary["heldout"]["tokens"] == final["tokens"]


@pytest.mark.slow
def test_extending_a_finished_run_keeps_its_schedule(reference, corpus, cache, tmp_path):
    cfg, _, expected = reference
    short = tiny_train_config(tmp_path / "run", corpus, cache, **{**COMMON, "run.steps": 6})
    train(short)
    summary = train(short.replace(**{"run.steps": STEPS}))
    assert summary["resumed_from"] == 6
    records = metrics_records(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in records[:6]] == expected[:6]  # the steps already trained are untouched
    end_lr = cfg.optimizer.lr * cfg.schedule.min_lr_ratio  # extra steps train at the 6-step schedule's end
    assert all(r["lr"] == pytest.approx(end_lr, rel=1e-6) for r in records[6:])
    assert len([r for r in metrics_records(tmp_path / "run", "heldout") if r.get("final")]) == 1
    saved = load_config(config_file=tmp_path / "run" / "config.yaml")
    assert (saved.run.steps, saved.schedule.total_steps) == (STEPS, 6)
    with pytest.raises(ConfigError, match="schedule.total_steps: 6 -> 20"):
        train(short.replace(**{"run.steps": 20, "schedule.total_steps": 20}))
    with pytest.raises(ConfigError, match="beyond run.steps=4"):
        train(short.replace(**{"run.steps": 4}))


# --------------------------------------------------------------------------- validation boundary
def _numeric_keys() -> list[str]:
    cfg = TrainConfig()
    return [k for k in valid_keys() if isinstance(get(cfg, k), (int, float)) and not isinstance(get(cfg, k), bool)
            or k == "model.head_dim"]


def test_every_numeric_key_has_a_range():
    assert sorted(_numeric_keys()) == sorted(RANGES)


@pytest.mark.parametrize("key", sorted(RANGES))
def test_values_outside_each_range_are_refused(key):
    low, high, lo_in, _ = RANGES[key]
    bad = [low - 1 if lo_in else low, float("nan")]
    bad += [high + 1] if high is not None else [float("inf")]
    for value in bad:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config("tiny", overrides={key: value})


@pytest.mark.parametrize("args, fragment", [
    (["model.num_attention_heads=3", "data.source=/no/such"], "describes no valid model"),  # before the data
    (["model.head_dim=9"], "head_dim must be even"),
    (["run.seed=99999999999999999999999"], "'run.seed' must be in [0, 4294967295]"),
    (["init_from=/x", "model.hidden_size=32"], "model.hidden_size: init_from is set"),
    (["checkpoint.enabled=false", "checkpoint.every=3"], "checkpoint.every: checkpoint.enabled is false"),
    (["layerskip.curriculum=rotational"], "layerskip.exit_loss is false"),
    (["--resume", "checkpoint.enabled=false"], "nothing to resume from"),
    (["--check", "--resume"], "not allowed with argument"),
    (["mesh.data=3"], "multiple of the 3 batch shards"),
])
def test_cli_refuses_bad_or_ineffective_arguments_in_one_line(args, fragment, tmp_path, capsys):
    assert main(["--preset", "tiny", f"run.out_dir={tmp_path / 'run'}", *args]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_run_dir_that_is_a_file_and_a_binary_corpus_are_clear_errors(tmp_path, cache, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["--preset", "tiny", f"run.out_dir={tmp_path / 'file'}"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"text": "fine"}\n\x89PNG\r\n\x1a\n\xff\xfe\n')
    assert main(["--preset", "tiny", f"run.out_dir={tmp_path / 'run'}", f"data.source={corpus}",
                 f"data.cache_dir={cache}"]) == 2
    assert f"{corpus}:2 is not UTF-8 text" in capsys.readouterr().err


def test_check_validates_without_training(tmp_path, corpus, capsys):
    assert main(["--preset", "tiny", "--check", f"run.out_dir={tmp_path / 'run'}", f"data.source={corpus}"]) == 0
    assert capsys.readouterr().out.startswith("ok: config valid")
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()
    with RunLock(tmp_path / "run"):
        assert main(["--preset", "tiny", "--check", f"run.out_dir={tmp_path / 'run'}"]) == 2
    assert "in use by another training run" in capsys.readouterr().err

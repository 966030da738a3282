"""`run.sync_to`: RUN_DIR copied to a remote folder during the run, and a run started from the copy
(training/mirror.py). gs:// itself needs the network; the same fsspec calls are checked here on a
local folder and on fsspec's in-memory filesystem."""

import importlib.util
import shutil
import uuid
from pathlib import Path

import pytest

from training.config import ConfigError
from training.mirror import RunMirror, local_files
from training.testing import metrics_records, tiny_train_config
from training.train import train


def _write(path: Path, text: str = "x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _fake_run(run_dir: Path) -> None:
    """Step 24 complete, step 48 finalized but not yet recorded, an unfinished save, the lock."""
    _write(run_dir / "metrics.jsonl", '{"step": 1}\n')
    _write(run_dir / "config.yaml")
    _write(run_dir / ".lock")
    _write(run_dir / "checkpoints/24/state/array", "a" * 100)
    _write(run_dir / "checkpoints/integrity/24.json", "{}")
    _write(run_dir / "checkpoints/48/state/array", "b" * 100)
    _write(run_dir / "checkpoints/72.orbax-checkpoint-tmp-123/state/array")
    _write(run_dir / "checkpoints/integrity/48.tmp-99")
    _write(run_dir / "checkpoints/damaged-12-1700000000/state/array")


def _copied(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_only_complete_checkpoints_and_the_records_are_copied_records_last(tmp_path):
    run_dir, copy = tmp_path / "run", tmp_path / "copy"
    _fake_run(run_dir)
    mirror = RunMirror(f"file://{copy}", run_dir, note=print)
    sent = []
    put = mirror.fs.put_file
    mirror.fs.put_file = lambda src, dst, **kw: (sent.append(dst), put(src, dst, **kw))
    assert mirror.sync() == 4
    assert _copied(copy) == {"metrics.jsonl", "config.yaml", "checkpoints/24/state/array",
                             "checkpoints/integrity/24.json"}
    assert sent[-1].endswith("checkpoints/integrity/24.json")  # the step is complete there only now
    assert mirror.sync() == 0  # nothing changed, nothing sent
    mirror.close(final=False)


def test_new_steps_changed_files_and_pruned_steps_follow_the_run(tmp_path):
    run_dir, copy = tmp_path / "run", tmp_path / "copy"
    _fake_run(run_dir)
    mirror = RunMirror(str(copy), run_dir, note=print)
    mirror.sync()
    _write(run_dir / "checkpoints/integrity/48.json", "{}")  # step 48 recorded
    shutil.rmtree(run_dir / "checkpoints/24")  # keep-last-K pruned step 24
    (run_dir / "checkpoints/integrity/24.json").unlink()
    _write(run_dir / "metrics.jsonl", '{"step": 1}\n{"step": 2}\n')
    mirror.push()
    mirror.close()  # the final copy waits
    assert _copied(copy) == {"metrics.jsonl", "config.yaml", "checkpoints/48/state/array",
                             "checkpoints/integrity/48.json"}
    assert (copy / "metrics.jsonl").read_text().count("step") == 2


def test_a_fresh_run_dir_is_filled_from_the_copy_complete_steps_only(tmp_path):
    url = f"memory://mirror-{uuid.uuid4().hex}"
    source, fresh = tmp_path / "run", tmp_path / "fresh"
    _fake_run(source)
    RunMirror(url, source, note=print).sync()
    mirror = RunMirror(url, fresh, note=print)
    mirror.fs.pipe_file(f"{mirror.root}/checkpoints/96/state/array", b"half")  # a step whose upload was cut off
    assert mirror.pull() == 4
    assert set(local_files(fresh)) == {"metrics.jsonl", "config.yaml", "checkpoints/24/state/array",
                                       "checkpoints/integrity/24.json"}
    assert mirror.sync() == 0  # what was fetched is not sent back
    mirror.close(final=False)


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_gs_without_gcsfs_is_a_config_error_naming_the_install(tmp_path):
    with pytest.raises(ConfigError, match=r"gcsfs"):
        RunMirror.open("gs://bucket/runs/x", tmp_path)


def test_an_unknown_protocol_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="run.sync_to=nosuch://x"):
        RunMirror.open("nosuch://x", tmp_path)


def test_a_run_on_a_new_machine_resumes_from_the_copy(corpus, cache, tmp_path, monkeypatch):
    """Train 4 steps with a copy, lose the machine's disk, run to 6 from the copy: the losses are
    those of an uninterrupted 6-step run."""
    pushes = []
    push = RunMirror.push
    monkeypatch.setattr(RunMirror, "push", lambda self: (pushes.append(1), push(self)))
    common = {"checkpoint.every": 2, "run.eval_every": 0, "run.eval_batches": 1, "mesh.data": 1,
              "schedule.total_steps": 6}
    reference = train(tiny_train_config(tmp_path / "reference", corpus, cache, **common, **{"run.steps": 6}))
    copy, run_dir = tmp_path / "bucket" / "run", tmp_path / "vm" / "run"
    first = tiny_train_config(run_dir, corpus, cache, **common, **{"run.steps": 4, "run.sync_to": f"file://{copy}"})
    train(first)
    assert len(pushes) >= 2  # a copy asked for at each checkpoint (steps 2 and 4), not only at the end
    assert {"metrics.jsonl", "config.yaml", "summary.json", "checkpoints/integrity/4.json"} <= _copied(copy)
    assert any(name.startswith("checkpoints/4/") for name in _copied(copy))
    assert any(name.startswith("model/") for name in _copied(copy))
    shutil.rmtree(run_dir.parent)  # the VM is gone

    summary = train(tiny_train_config(run_dir, corpus, cache, **common,
                                      **{"run.steps": 6, "run.sync_to": f"file://{copy}"}))
    assert summary["resumed_from"] == 4
    losses = [r["loss"] for r in metrics_records(run_dir)]
    assert losses == [r["loss"] for r in metrics_records(reference["run_dir"])]
    assert [r["step"] for r in metrics_records(copy)] == list(range(1, 7))

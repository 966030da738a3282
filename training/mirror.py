"""A copy of RUN_DIR in a remote folder while the run trains (`run.sync_to=gs://bucket/runs/x`), and
a run started from that copy on a fresh machine.

A Cloud TPU VM's disk goes when the VM does (deleted at the end of a job, or preempted), so the
checkpoints and metrics have to leave it during the run. Any fsspec URL works: `gs://` needs gcsfs
(`pip install -e ".[tpu]"`); the tests use local folders and fsspec's `memory://`.

What is copied, and when:
- **After each checkpoint** (in a background thread, so training goes on): the checkpoints that are
  complete, i.e. whose `checkpoints/integrity/<step>.json` exists (training/checkpoint.py writes it
  once every file is final); `metrics.jsonl`, `config.yaml` and the other small records; files that
  changed since they were sent. A step's files go first and its integrity record last, so a step in
  the copy is complete exactly when its record is there. Steps pruned here (keep last K) are deleted
  there. A failed copy is reported and retried at the next checkpoint; it never stops training.
- **At the end** (also after a stop by SIGTERM or Ctrl-C, once its checkpoint is written): everything,
  `model/` and `summary.json` included; the run waits for it. A second Ctrl-C skips it.
- **At the start**: when RUN_DIR has no complete checkpoint and the copy has, the copy is downloaded
  first (complete steps only), so the same command on a new machine resumes where the old one stopped.

Only process 0 copies; with several processes they must share RUN_DIR (one host, or a shared disk).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

import jax

from training.config import ConfigError

SKIPPED_PARTS = (".lock",)  # the run lock belongs to this machine
INTEGRITY = "checkpoints/integrity/"


def open_filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, root path) for `url`, checked by listing it; ConfigError naming the fix."""
    try:
        import fsspec
        from fsspec.implementations.local import LocalFileSystem
    except ImportError as err:
        raise ConfigError("run.sync_to needs fsspec: pip install fsspec") from err
    try:
        fs, root = fsspec.core.url_to_fs(url)
        if isinstance(fs, LocalFileSystem):
            fs.auto_mkdir = True  # object stores have no folders to make
        fs.find(root)  # credentials, a missing bucket, no network: fail before training, not after
    except ImportError as err:  # e.g. gs:// without gcsfs
        raise ConfigError(f"run.sync_to={url}: {err}. For gs://: pip install -e \".[tpu]\" (or pip install gcsfs)") from err
    except Exception as err:
        raise ConfigError(f"run.sync_to={url} cannot be read ({type(err).__name__}: {err})") from err
    return fs, root.rstrip("/")


def _step_of(rel: str) -> str | None:
    """The checkpoint step a file belongs to: 'checkpoints/24/state/x' and 'checkpoints/integrity/24.json'
    -> '24'; None for the run's other files."""
    parts = rel.split("/")
    if len(parts) > 2 and parts[0] == "checkpoints" and parts[1].isdigit():
        return parts[1]
    if rel.startswith(INTEGRITY) and rel.endswith(".json"):
        return Path(rel).stem
    return None


def _is_sendable(rel: str, complete: set[str]) -> bool:
    parts = rel.split("/")
    if parts[0] in SKIPPED_PARTS or any(".orbax-checkpoint-tmp" in p or ".tmp-" in p for p in parts):
        return False
    if len(parts) > 1 and parts[0] == "checkpoints" and not (parts[1].isdigit() or parts[1] == "integrity"):
        return False  # damaged-<step>-<time>/ folders set aside by the checkpointer stay here
    step = _step_of(rel)
    return step is None or step in complete


def local_files(run_dir: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of the files to copy: complete checkpoints and the records."""
    integrity = run_dir / INTEGRITY
    complete = {p.stem for p in integrity.glob("*.json")} if integrity.is_dir() else set()
    out = {}
    for path in run_dir.rglob("*"):
        rel = path.relative_to(run_dir).as_posix()
        if path.is_file() and _is_sendable(rel, complete):
            st = path.stat()
            out[rel] = (st.st_size, st.st_mtime_ns)
    return out


def _records_last(paths) -> list[str]:
    """Integrity records after every other file (a record marks its step complete)."""
    return sorted(paths, key=lambda rel: (rel.startswith(INTEGRITY), rel))


class RunMirror:
    """Keeps `url` a copy of `run_dir` (see the module docstring); `push()` after each checkpoint,
    `close()` at the end. Built by `RunMirror.open`; a no-op object when `url` is empty."""

    def __init__(self, url: str, run_dir: Path, note: Callable[[str], None] = print):
        self.url, self.run_dir, self.note = url, run_dir, note
        self.fs, self.root = open_filesystem(url)
        self._sent: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()  # one copy at a time
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._work, name="run-mirror", daemon=True)
        self._thread.start()

    def _remote_files(self) -> dict[str, int]:
        found = self.fs.find(self.root, detail=True)
        return {p[len(self.root) + 1:]: int(info.get("size") or 0) for p, info in found.items()
                if info.get("type", "file") == "file"}

    # ------------------------------------------------------------------ copying up
    def sync(self) -> int:
        """Send new and changed files, then delete the copy's pruned checkpoints; the files sent."""
        with self._lock:
            remote, here = self._remote_files(), local_files(self.run_dir)
            changed = [rel for rel, sig in here.items() if self._needs_sending(rel, sig, remote)]
            for rel in _records_last(changed):
                self.fs.put_file(str(self.run_dir / rel), f"{self.root}/{rel}")
                self._sent[rel] = here[rel]
            steps_here = {_step_of(rel) for rel in here}
            pruned = [rel for rel in remote if _step_of(rel) is not None and _step_of(rel) not in steps_here]
            for rel in sorted(pruned, key=lambda rel: not rel.startswith(INTEGRITY)):  # records first
                self.fs.rm_file(f"{self.root}/{rel}")
                self._sent.pop(rel, None)
            return len(changed)

    def _needs_sending(self, rel: str, sig: tuple[int, int], remote: dict[str, int]) -> bool:
        """Changed since sent; a checkpoint file never sent by this process is trusted when the copy
        holds one of the same size (checkpoint files are written once)."""
        if rel in self._sent:
            return self._sent[rel] != sig
        return not (_step_of(rel) is not None and remote.get(rel) == sig[0])

    def push(self) -> None:
        """Ask the background thread for a copy (returns at once)."""
        self._wake.set()

    def _work(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopped:
                return
            try:
                self.sync()
            except Exception as err:  # the network, credentials, quota: training goes on
                self.note(f"run.sync_to: copying {self.run_dir} to {self.url} failed ({type(err).__name__}: "
                          f"{str(err)[:200]}); retried at the next checkpoint")

    def close(self, final: bool = True) -> None:
        """Stop the background thread; with `final`, copy everything now and wait for it."""
        self._stopped = True
        self._wake.set()
        self._thread.join()
        if not final:
            return
        from training.interrupt import quit_at_once_on_signal
        from training.metrics import phase
        try:
            with quit_at_once_on_signal(), phase(f"copying {self.run_dir} to {self.url}"):
                self.sync()
        except Exception as err:
            self.note(f"error: run.sync_to: the final copy to {self.url} failed ({type(err).__name__}: "
                      f"{str(err)[:300]}); the run is complete in {self.run_dir}")

    # ------------------------------------------------------------------ copying down
    def pull(self) -> int:
        """Download the copy into an empty RUN_DIR (complete checkpoints only); the files fetched."""
        remote = self._remote_files()
        complete = {Path(rel).stem for rel in remote if rel.startswith(INTEGRITY)}
        wanted = [rel for rel in remote if _is_sendable(rel, complete)]
        for rel in _records_last(wanted):
            target = self.run_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(f"{self.root}/{rel}", str(target))
        self._sent = {rel: sig for rel, sig in local_files(self.run_dir).items() if rel in remote}
        return len(wanted)

    # ------------------------------------------------------------------ the run's use
    @classmethod
    def open(cls, url: str, run_dir: Path, note: Callable[[str], None] = print) -> "RunMirror | NoMirror":
        """The mirror for a run, on process 0 (the copy downloaded first when RUN_DIR has no
        checkpoint; the other processes wait for that)."""
        if not url:
            return NoMirror()
        mirror = cls(url, run_dir, note) if jax.process_index() == 0 else NoMirror()
        if isinstance(mirror, RunMirror) and not any((run_dir / INTEGRITY).glob("*.json")):
            count = mirror.pull()
            if count:
                note(f"run.sync_to: no checkpoint in {run_dir}; fetched the copy at {url} ({count} files)")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("run.sync_to: the copy is in RUN_DIR")
        return mirror

    def __enter__(self) -> "RunMirror":
        return self

    def __exit__(self, kind, err, tb) -> None:
        self.close(final=kind is None or not issubclass(kind, KeyboardInterrupt))


class NoMirror:
    """No `run.sync_to`: nothing to copy."""

    def push(self) -> None:
        pass

    def __enter__(self) -> "NoMirror":
        return self

    def __exit__(self, *exc) -> None:
        pass

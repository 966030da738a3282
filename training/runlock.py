"""Run-folder ownership: one training run at a time per RUN_DIR.

Two runs writing to one RUN_DIR overwrite each other's checkpoints and interleave `metrics.jsonl`,
so a run holds `RUN_DIR/.lock` for its whole life:

- **Taken atomically** with `fcntl.flock(LOCK_EX | LOCK_NB)` on the open file. The kernel releases a
  flock when its process dies (kill -9 included), so on one host a lock can never outlive its holder.
- **Who holds it** is written into the file as JSON: process id, host name, start time (UTC). A second
  run is refused with a `RunLockedError` that names the holder.
- **Stale locks.** A holder that exits cleanly empties the file. A file that is not empty but not
  flocked was left by a process that died; on the same host it is taken over with a note. If it names
  another host, the flock may not reach across a network file system, so the run is refused and the
  message says how to break the lock (delete the file once no run on that host uses the folder).
- **Multi-host** runs take it on process 0 only (`jax.process_index() == 0`): one holder per run.
  Every process calls `acquire` and they agree on the outcome (one all-gather): if process 0 is refused,
  every process refuses too, instead of waiting in its first collective for a peer that has left.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

from training.config import ConfigError

LOCK_NAME = ".lock"


class RunLockedError(ConfigError):
    """RUN_DIR is in use by another run (or its lock cannot be checked from this host)."""


def prepare_run_dir(path: str | Path) -> Path:
    """RUN_DIR as a folder (created if missing); ConfigError if it is a file or cannot be created."""
    try:
        run_dir = Path(path).expanduser()
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"run.out_dir '{path}' is a file, not a folder; choose another run.out_dir")
        run_dir.mkdir(parents=True, exist_ok=True)
    except (OSError, RuntimeError) as err:
        raise ConfigError(f"cannot create run.out_dir '{path}': {getattr(err, 'strerror', None) or err}") from None
    return run_dir


def describe(holder: dict[str, Any]) -> str:
    """'pid 123 on host h since 2026-01-01 12:00:00 UTC' from a lock record."""
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since "
            f"{holder.get('start', '?')}")


def read_holder(path: Path) -> dict[str, Any] | None:
    """The JSON record in a lock file; None if the file is missing or empty, {} if unreadable."""
    try:
        text = path.read_text().strip()
    except (FileNotFoundError, IsADirectoryError):
        return None
    if not text:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


class RunLock:
    """`with RunLock(run_dir): ...` holds RUN_DIR/.lock for the block (see the module docstring)."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True,
                 note: Callable[[str], None] = print):
        self.path = Path(run_dir) / LOCK_NAME
        self.enabled, self.note = enabled, note
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock (when enabled); in a multi-process run every process learns whether the holder
        got it, and all raise RunLockedError if not (see the module docstring)."""
        error = None
        if self.enabled:
            try:
                self._take()
            except RunLockedError as err:
                error = err
        try:
            refused = _any_process(error is not None)
        except BaseException:
            self.release()
            raise
        if error is not None:
            raise error
        if refused:
            self.release()
            raise RunLockedError(f"process 0 of this multi-process run could not take {self.path} (its error "
                                 f"says why: another run uses {self.path.parent}, or the lock cannot be checked)")

    def _take(self) -> None:
        """flock RUN_DIR/.lock and write this process's record into it (RunLockedError if refused)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another open file holds it
            os.close(fd)
            holder = read_holder(self.path) or {}
            raise RunLockedError(f"{self.path.parent} is in use by another training run ({describe(holder)}); "
                                 f"wait for it to finish, stop it, or choose another run.out_dir") from None
        except OSError as err:
            os.close(fd)
            raise RunLockedError(f"cannot lock {self.path}: {err.strerror or err} (a file system without "
                                 f"file locks?); use a run.out_dir on a local disk") from None
        try:
            self._check_previous(read_holder(self.path))
        except RunLockedError:
            os.close(fd)  # closing releases the flock
            raise
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "start": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def _check_previous(self, holder: dict[str, Any] | None) -> None:
        """A non-empty record in a free lock: its holder died. Take it over, or refuse across hosts."""
        if holder is None:
            return
        host = holder.get("host")
        if host not in (None, socket.gethostname()):
            raise RunLockedError(
                f"{self.path} names another host ({describe(holder)}); a lock cannot be checked across "
                f"hosts. If no run on {host} uses {self.path.parent}, delete {self.path} and start again")
        self.note(f"note: took over the lock of a run that ended without releasing it ({describe(holder)})")

    def release(self) -> None:
        """Empty the record (a clean exit) and drop the flock."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _any_process(flag: bool) -> bool:
    """True if `flag` is true on any process of a multi-process JAX run (else just `flag`).

    Only a run that called `jax.distributed.initialize` communicates, so a single-process caller does
    not start the JAX backend here."""
    import jax

    if not jax.distributed.is_initialized() or jax.process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))

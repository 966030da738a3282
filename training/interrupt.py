"""Preemption and Ctrl-C: stop at the next step boundary with a checkpoint, then exit.

SIGTERM is how Cloud TPU, Kubernetes, Slurm and most schedulers announce preemption; SIGINT is
Ctrl-C. While the training loop runs (`StopSignals` is installed only around it and the previous
handlers are restored afterwards), the first of either signal only records a request; the loop then
finishes the step it is in, writes the metrics, saves a checkpoint (when `checkpoint.enabled`; with
checkpoints off nothing is saved and the message says so) and raises `Interrupted`. The CLI prints how
to resume and exits with 128 + the signal number: **130** for SIGINT, **143** for SIGTERM (the shell
convention). A second signal while the first is being handled raises `KeyboardInterrupt` at once
(exit 130, without a checkpoint); should it land inside a callback that swallows exceptions (JAX's
garbage-collection callback), it is raised again in the main thread. Outside the loop (loading data, compiling, the final evaluation)
SIGINT raises `KeyboardInterrupt` as usual and SIGTERM terminates as usual: no training step is lost
that was not already lost since the last checkpoint.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any, Iterator

import numpy as np

SIGNAL_NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}


class Interrupted(Exception):
    """Training stopped on a signal at a step boundary (after saving a checkpoint when enabled)."""

    def __init__(self, signum: int, step: int, saved: bool, run_dir: str):
        self.signum, self.step, self.saved, self.run_dir = signum, step, saved, run_dir
        what = (f"saved a checkpoint at step {step} in {run_dir}" if saved else
                f"nothing saved at step {step}: checkpoint.enabled is false, so this run cannot be resumed")
        super().__init__(f"stopped by {SIGNAL_NAMES.get(signum, signum)} after step {step}; {what}")

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


EXIT_MESSAGE = "\nerror: interrupted; the run can be resumed from its last checkpoint by the same command\n"


@contextlib.contextmanager
def quit_at_once_on_signal() -> Iterator[None]:
    """While a stopping run finishes its checkpoint save: a further SIGINT / SIGTERM quits at once
    (exit 128 + signal; the unfinished save is discarded on the next start). Raising there instead
    would land inside Orbax's wait, which logs the exception with a traceback before re-raising."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def quit_now(signum: int, frame: FrameType | None) -> None:
        sys.stdout.flush()
        sys.stderr.write(EXIT_MESSAGE)
        sys.stderr.flush()
        os._exit(128 + signum)

    previous = {signum: signal.signal(signum, quit_now) for signum in SIGNAL_NAMES}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class StopSignals:
    """`with StopSignals() as stop:` ... `if stop.requested: ...` (see the module docstring).

    A no-op outside the main thread, where Python cannot install signal handlers.
    """

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:  # the second signal: quit now
            raise KeyboardInterrupt
        self.requested = signum
        print(f"\n{SIGNAL_NAMES.get(signum, signum)}: saving a checkpoint at the end of this step, then "
              f"exiting (send it again to quit at once without saving)", file=sys.stderr, flush=True)

    def agreed(self) -> int | None:
        """The stop request as every process sees it. Multi-host runs must stop (and save, a
        collective) at the same step although each host gets its own signal, so the flag is
        gathered from all processes at every step boundary (single-process: no communication)."""
        import jax

        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.requested or 0))
        return int(np.max(flags)) or None

    def _unraisable(self, info: Any) -> None:
        """A second signal's KeyboardInterrupt raised inside a callback whose exceptions Python only
        reports (a gc callback): raise it again in the main thread, outside that callback."""
        if issubclass(info.exc_type, KeyboardInterrupt) and self.requested is not None:
            threading.Timer(0.05, _thread.interrupt_main).start()  # after the callback has returned
            return
        self._previous_hook(info)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNAL_NAMES:
                self._previous[signum] = signal.signal(signum, self._handle)
            self._previous_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self._previous:
            sys.unraisablehook = self._previous_hook
        self._previous.clear()

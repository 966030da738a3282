"""Run logging: `metrics.jsonl` (one JSON object per line) and the tqdm progress bar.

Records: `{"split": "train", "step": s, "loss", "accuracy", "grad_norm", "lr"[, "tokens_per_s"]}` for
every train step (`step` counts optimizer steps done, so the first is 1), and
`{"split": "heldout", "step": s, "loss", "perplexity", "accuracy", "tokens"[, "final": true]}` for
evaluations. The file is appended to; a resumed run first drops the records after its checkpoint
(and the end-of-run records of a finished run it extends).

Divergence: `check_finite` stops a run whose loss or gradient norm is NaN or infinite
(`DivergenceError`, exit code 3 in the CLI); the trainer calls it on every batch of step records it
writes, which is always before a checkpoint, an evaluation or the export, so a diverged model is never
saved as a checkpoint or exported. `phase` prints what a long step is doing and how long it took.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm


class DivergenceError(RuntimeError):
    """The loss or gradient norm became NaN or infinite at `step`: the model diverged."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


def check_finite(records: list[dict[str, Any]], last_checkpoint: int | None) -> None:
    """DivergenceError at the first step record whose loss or grad_norm is not finite."""
    for r in records:
        bad = [k for k in ("loss", "grad_norm") if k in r and not math.isfinite(r[k])]
        if bad:
            where = (f"the last checkpoint is step {last_checkpoint}" if last_checkpoint else
                     "there is no checkpoint of this run")
            raise DivergenceError(
                f"training diverged at step {r['step']}: {' and '.join(f'{k} = {r[k]}' for k in bad)} "
                f"(lr {r.get('lr', '?')}). Nothing was exported and no checkpoint of a diverged model was "
                f"saved; {where}. Lower optimizer.lr, raise schedule.warmup_steps or set "
                f"optimizer.grad_clip, and check the data (run.divergence_retries=N rolls back to the last "
                f"checkpoint and skips the batch, N times at most)", step=int(r["step"]))


def is_primary() -> bool:
    """Whether this process writes the run's files and messages: process 0 of a multi-process run
    (every process computes; one reports), or the only process."""
    import jax

    return not jax.distributed.is_initialized() or jax.process_index() == 0


@contextlib.contextmanager
def phase(what: str, enabled: bool = True) -> Iterator[None]:
    """Print '<what> ...' before a long step and '<what>: <seconds>s' after it (process 0 only)."""
    t0 = time.time()
    enabled = enabled and is_primary()
    if enabled:
        tqdm.write(f"{what} ...")
    yield
    if enabled:
        tqdm.write(f"{what}: done in {time.time() - t0:.1f}s")


class MetricsLog:
    """Append-only JSONL metrics plus console messages that do not break the progress bar; in a
    multi-process run only process 0 writes and prints (`is_primary`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        if not is_primary():
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
        return out

    def truncate_after(self, step: int) -> None:
        """Keep only records with step <= `step` (a resumed run re-logs the steps after it), without
        the end-of-run records (final evaluation, decode report) that a resumed run writes again."""
        if not self.path.exists() or not is_primary():
            return
        keep = [r for r in self.records() if int(r.get("step", 0)) <= step and not r.get("final")
                and r.get("split") != "decode"]
        tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.path)

    def train_losses(self) -> list[float]:
        return [r["loss"] for r in self.records() if r.get("split") == "train"]

    @staticmethod
    def echo(message: str) -> None:
        if is_primary():
            tqdm.write(message)


class Progress:
    """tqdm bar with loss, tokens/s and ETA; also times the training loop."""

    def __init__(self, total: int, start: int, tokens_per_step: int, enabled: bool = True):
        self.tokens_per_step = tokens_per_step
        self.bar = tqdm(total=total, initial=start, disable=not (enabled and is_primary()), unit="step", dynamic_ncols=True,
                        smoothing=0.1)
        self.t_last, self.step_last = time.time(), start
        self.t_start = self.t_last
        self.seconds = 0.0

    def update(self, step: int, records: list[dict[str, Any]], log: MetricsLog) -> None:
        """Write the records of the steps since the last update and advance the bar to `step`."""
        now = time.time()
        tok_s = (step - self.step_last) * self.tokens_per_step / max(now - self.t_last, 1e-9)
        records[-1]["tokens_per_s"] = round(tok_s, 1)
        for r in records:
            log.write({"split": "train", **r})
        last = records[-1]
        self.bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
        self.bar.update(step - self.step_last)
        self.seconds += now - self.t_last
        self.t_last, self.step_last = now, step

    def rewind(self, step: int) -> None:
        """Move the bar back to `step` (after a rollback to a checkpoint)."""
        self.bar.n = step
        self.bar.refresh()
        self.t_last, self.step_last = time.time(), step

    def note(self, message: str) -> None:
        self.bar.write(message)
        self.t_last = time.time()  # evaluation time is not training time

    def close(self) -> None:
        self.bar.close()

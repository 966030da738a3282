"""Run logging: `metrics.jsonl` (one JSON object per line) and the tqdm progress bar.

Records: `{"split": "train", "step": s, "loss", "accuracy", "grad_norm", "lr"[, "tokens_per_s"]}` for
every train step (`step` counts optimizer steps done, so the first is 1), and
`{"split": "heldout", "step": s, "loss", "perplexity", "accuracy", "tokens"[, "final": true]}` for
evaluations. The file is appended to; a resumed run first drops the records after its checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class MetricsLog:
    """Append-only JSONL metrics plus console messages that do not break the progress bar."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
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
        """Keep only records with step <= `step` (a resumed run re-logs the steps after it)."""
        if not self.path.exists():
            return
        keep = [r for r in self.records() if int(r.get("step", 0)) <= step]
        tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.path)

    def train_losses(self) -> list[float]:
        return [r["loss"] for r in self.records() if r.get("split") == "train"]

    @staticmethod
    def echo(message: str) -> None:
        tqdm.write(message)


class Progress:
    """tqdm bar with loss, tokens/s and ETA; also times the training loop."""

    def __init__(self, total: int, start: int, tokens_per_step: int, enabled: bool = True):
        self.tokens_per_step = tokens_per_step
        self.bar = tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True,
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

    def note(self, message: str) -> None:
        self.bar.write(message)
        self.t_last = time.time()  # evaluation time is not training time

    def close(self) -> None:
        self.bar.close()

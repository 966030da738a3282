"""Pipeline stages across a slow link: step time and bytes between stages, GPipe vs circular, plain vs
AC-SGD, and AC-SGD's held-out loss against plain training.

    python -m benchmarks.pipeline [--links unlimited,1gbit,100mbit] [--steps 5] [--epochs 6]
        [--quick] [--no-append]

**Timing** (per link): two JAX processes on this machine, one CPU device and one pipeline stage each,
joined by `training.cluster` (each in its own network namespace behind a `tbf` rate limit; as root),
train a d=128, 4-layer model (batch 4 micro-batches x 4 rows x 256 tokens) with the pipelined step
(`training.pipeline_step`, AdamW included) in four modes: GPipe and circular (2 chunks per stage),
each plain (float32 activations) and with AC-SGD (`training.handoff.acsgd`: 4-bit deltas forward,
8-bit gradients back; its host-side memory work is inside the timed step). Median of `--steps` steps
after two untimed ones (compilation; AC-SGD's first, exact pass). Bytes: what one device sends to the
other stage per step, read from the compiled program (`training.hlo_bytes`).
**Convergence** (one process, two devices, no link): the same model trained by GPipe for `--epochs`
epochs over 128 fixed stdlib blocks of 128 tokens, plain and with AC-SGD (first epoch exact, as the
paper), held-out loss of each at the end. Targets (issue 15): AC-SGD >= 3x faster steps at 100 Mbit/s
than plain, held-out loss within 1%.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.report import command_line, markdown_table, publish_report
from training.cluster import launch

TITLE = "Pipeline stages over a slow link: GPipe vs circular, plain vs AC-SGD (2 CPU processes)"


def run_worker(task: str, args: argparse.Namespace, processes: int, devices: int, link: str | None) -> list[dict]:
    """Launch `benchmarks.pipeline_worker TASK` as a cluster; its rows (process 0's JSON)."""
    out = Path(tempfile.mkdtemp(prefix="bench-pipeline-")) / "rows.json"
    cmd = [sys.executable, "-m", "benchmarks.pipeline_worker", task, "--out", str(out),
           "--steps", str(args.steps), "--epochs", str(args.epochs)] + (["--quick"] if args.quick else [])
    code = launch(cmd, processes=processes, devices_per_process=devices, bandwidth=link, timeout=3600)
    if code != 0:
        raise SystemExit(f"benchmarks.pipeline: the {task} workers failed (exit {code}) on link {link or 'unlimited'}")
    return json.loads(out.read_text())


def timing_table(by_link: dict[str, list[dict]]) -> str:
    rows = []
    for link, results in by_link.items():
        plain = {r["schedule"]: r["step_s"] for r in results if not r["acsgd"]}
        for r in results:
            rows.append([link, r["schedule"], "AC-SGD 4/8 bit" if r["acsgd"] else "plain fp32",
                         f"{r['bubble']:.2f}", f"{r['bytes_sent'] / 2**20:.2f}", f"{r['step_s']:.3f}",
                         f"{plain[r['schedule']] / r['step_s']:.2f}x", f"{r['tokens_per_step'] / r['step_s']:.0f}"])
    return markdown_table(["link", "schedule", "hand-off", "bubble", "MiB sent / step / device", "step s",
                           "vs plain", "tokens/s"], rows)


def convergence_table(results: list[dict]) -> tuple[str, float]:
    plain = next(r["heldout_loss"] for r in results if not r["acsgd"])
    rows = [["AC-SGD 4/8 bit" if r["acsgd"] else "plain fp32", r["epochs"], r["steps"],
             f"{r['last_train_loss']:.4f}", f"{r['heldout_loss']:.4f}", f"{100 * (r['heldout_loss'] / plain - 1):+.2f}%"]
            for r in results]
    acsgd = next(r["heldout_loss"] for r in results if r["acsgd"])
    return markdown_table(["hand-off", "epochs", "steps", "last train loss", "held-out loss", "vs plain"], rows), \
        acsgd / plain - 1


def verdict(by_link: dict[str, list[dict]], loss_change: float) -> str:
    lines = []
    slow = by_link.get("100mbit")
    if slow:
        for schedule in ("gpipe", "circular"):
            p = next(r["step_s"] for r in slow if r["schedule"] == schedule and not r["acsgd"])
            a = next(r["step_s"] for r in slow if r["schedule"] == schedule and r["acsgd"])
            lines.append(f"- {schedule} at 100 Mbit/s: AC-SGD {p / a:.2f}x faster steps than plain "
                         f"(target >= 3x: {'met' if p / a >= 3 else 'not met'}).")
    lines.append(f"- Held-out loss with AC-SGD {100 * loss_change:+.2f}% against plain (target within 1%: "
                 f"{'met' if abs(loss_change) <= 0.01 else 'not met'}).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--links", default="unlimited,1gbit,100mbit")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--quick", action="store_true", help="a tiny model, few steps, no link limits; writes nothing")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args(argv)
    links = ["unlimited"] if args.quick else args.links.split(",")
    by_link = {}
    for link in links:
        by_link[link] = run_worker("timing", args, 2, 1, None if link == "unlimited" else link)
    conv = run_worker("convergence", args, 1, 2, None)
    table, change = convergence_table(conv)
    body = "\n\n".join([timing_table(by_link), table, verdict(by_link, change)])
    print(body)
    if not (args.quick or args.no_append):
        publish_report(TITLE, command_line("benchmarks.pipeline", argv), body)


if __name__ == "__main__":
    main()

"""Shared benchmark plumbing: machine facts, package versions, memory bandwidth, BENCHMARKS.md."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    import jax
    devices = jax.devices()
    accel = devices[0].device_kind if devices[0].platform != "cpu" else "no accelerator"
    return f"{cpu_model()}, {os.cpu_count()} cores, {accel} (JAX backend: {devices[0].platform})"


def versions_line(packages=("jax", "jaxlib", "flax", "torch", "transformers")) -> str:
    parts = [f"python {sys.version.split()[0]}"]
    for name in packages:
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(parts)


def _timings(fn, repeats: int) -> list[float]:
    fn()  # warm-up (compiles on the JAX side)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of fn() over `repeats` calls after one warm-up call."""
    return statistics.median(_timings(fn, repeats))


def best_seconds(fn, repeats: int) -> float:
    """Fastest wall time of fn() over `repeats` calls after one warm-up (for peak rates)."""
    return min(_timings(fn, repeats))


def measure_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Best-of-N bytes/s of a jitted full reduction over a large float32 array (all cores)."""
    import jax
    import jax.numpy as jnp
    x = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    return nbytes / best_seconds(lambda: total(x).block_until_ready(), repeats)


def markdown_table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line(module: str, argv: list[str] | None = None) -> str:
    """The command that ran this benchmark, flags as given (sys.argv when argv is None), for its report."""
    return " ".join(["python -m", module, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])


def append_report(title: str, command: str, body: str) -> None:
    """Append one dated section (command, machine, versions, body) to BENCHMARKS.md."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = (f"\n## {title} ({stamp})\n\n- command: `{command}`\n- machine: {machine_line()}\n"
               f"- versions: {versions_line()}\n\n{body}\n")
    if not BENCHMARKS_MD.exists():
        BENCHMARKS_MD.write_text("# Benchmarks\n\nEvery table here was appended by a script under "
                                 "`benchmarks/`; the command that produced it is listed with it.\n")
    with BENCHMARKS_MD.open("a") as f:
        f.write(section)


def parse_decode_flags(parser, new_tokens: int):
    """Add the flags the decoding benchmarks share (--new-tokens, --repeats, --quick, --no-append),
    parse, and apply --quick (16 tokens, 1 repeat, nothing appended)."""
    parser.add_argument("--new-tokens", type=int, default=new_tokens)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="16 tokens, 1 repeat (smoke test)")
    parser.add_argument("--no-append", action="store_true", help="do not write BENCHMARKS.md")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.repeats, args.no_append = 16, 1, True
    return args

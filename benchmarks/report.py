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


def alternating_runs(fns: dict, repeats: int) -> dict:
    """Each fn() timed `repeats` times after one warm-up round: name -> [(wall seconds, return
    value)]. Each round calls every fn once, in turn, so a slow spell of a shared machine hits them
    all alike."""
    for fn in fns.values():
        fn()
    runs: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out = fn()
            runs[name].append((time.perf_counter() - t0, out))
    return runs


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of fn() over `repeats` calls after one warm-up call."""
    return statistics.median(_timings(fn, repeats))


def best_seconds(fn, repeats: int) -> float:
    """Fastest wall time of fn() over `repeats` calls after one warm-up (for peak rates)."""
    return min(_timings(fn, repeats))


BANDWIDTH_METHOD = ("the best of several reads (10 alone, 3 beside each round of timed calls) of 1 GiB of float32, "
                    "as 16 independent jitted sums in one program "
                    "and, where it is built, as the CPU decode kernel's product with a [524288, 512] matrix; "
                    "both in huge-page memory where decoding weights are (`jaxmodels.huge_pages`)")


def bandwidth_reader(nbytes: int = 1 << 30, parts: int = 16):
    """A function of `repeats` that returns the bytes/s of reading a large float32 array on all
    cores (`BANDWIDTH_METHOD`): the best of two readers, `repeats` times each, alternating. One
    jitted sum over 1 GiB reads on one core (26-38 GB/s on a 2-core EPYC, 2026-12-03, where 16 sums
    in one program read 36-37 and the decode kernel's matmuls read 43), so it understated the
    machine and overstated our share of it. The arrays go where decoding's weights go
    (`huge_pages.place`) and stay allocated while the function lives, so benchmarks can read the
    bandwidth beside each timed call."""
    import jax
    import jax.numpy as jnp
    from jaxmodels import cpu_matvec, huge_pages

    xs = huge_pages.place([jnp.ones((nbytes // 4 // parts,), jnp.float32) for _ in range(parts)])
    sums = jax.jit(lambda xs: sum(jnp.sum(x) for x in xs))  # independent: XLA:CPU runs them at once
    readers = [lambda: sums(xs).block_until_ready()]
    if jax.default_backend() == "cpu" and cpu_matvec.available():
        w, row = huge_pages.place(jnp.ones((nbytes // 4 // 512, 512), jnp.float32)), jnp.ones((1, 512), jnp.float32)
        product = jax.jit(cpu_matvec.matvec)
        readers.append(lambda: product(row, w).block_until_ready())
    for read in readers:
        read()  # compile

    def measure(repeats: int = 10) -> float:
        best = float("inf")
        for _ in range(repeats):  # alternating, so a slow spell of a shared machine hits both
            for read in readers:
                t0 = time.perf_counter()
                read()
                best = min(best, time.perf_counter() - t0)
        return nbytes / best
    return measure


def measure_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 10, parts: int = 16) -> float:
    """Bytes/s of reading a large float32 array on all cores, once (`bandwidth_reader`)."""
    return bandwidth_reader(nbytes, parts)(repeats)


def markdown_table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line(module: str, argv: list[str] | None = None) -> str:
    """The command that ran this benchmark, flags as given (sys.argv when argv is None), for its report."""
    return " ".join(["python -m", module, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])


HISTORY_DIR = BENCHMARKS_MD.parent / "benchmarks" / "history"
_PREAMBLE = ("# Benchmarks\n\nThe current state: one section per benchmark, the latest run of each, written by "
             "its script under `benchmarks/` with the command, machine and versions. A new run replaces "
             "its section; the tables it replaces move to `benchmarks/history/` (one file per "
             "benchmark, newest first).\n")


def history_path(title: str) -> Path:
    """benchmarks/history/<slug>.md for a section title: the words before its first ':'."""
    head = title.split(":", 1)[0].lower()
    slug = "".join(c if c.isalnum() else "-" for c in head).strip("-")
    return HISTORY_DIR / f"{'-'.join(filter(None, slug.split('-')))}.md"


def split_sections(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(preamble, [(title, section text)]) of a markdown file whose sections start with '## '."""
    parts = ("\n" + text).split("\n## ")
    sections = []
    for part in parts[1:]:
        title = part.split("\n", 1)[0].strip()
        sections.append((title, "## " + part.rstrip("\n") + "\n"))
    return parts[0].lstrip("\n"), sections


def move_to_history(title: str, section: str) -> None:
    """Put a replaced section on top of its benchmark's history file."""
    path = history_path(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# History: {title}\n\nEarlier runs of this BENCHMARKS.md section, newest first.\n"
    old = path.read_text().split("\n", 3)[3].lstrip("\n") if path.exists() else ""
    path.write_text(header + "\n" + section + ("\n" + old if old else ""))


def publish_report(title: str, command: str, body: str) -> None:
    """Write one dated section (command, machine, versions, body) into BENCHMARKS.md, replacing the
    section of the same title (which moves to benchmarks/history/)."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = (f"## {title}\n\n- date: {stamp}\n- command: `{command}`\n- machine: {machine_line()}\n"
               f"- versions: {versions_line()}\n\n{body.strip()}\n")
    preamble, sections = split_sections(BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "")
    out, replaced = [], False
    for old_title, text in sections:
        if old_title == title:
            move_to_history(title, text)
            out.append(section)
            replaced = True
        else:
            out.append(text)
    if not replaced:
        out.append(section)
    BENCHMARKS_MD.write_text((preamble.strip() or _PREAMBLE.strip()) + "\n\n" + "\n".join(out))



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

"""Compile a training run for a Cloud TPU slice on this machine, before anyone pays for the slice.

    python -m training.aot --topology v5e-8                          # the default preset
    python -m training.aot --topology v6e-8 --preset smollm2-135m run.batch_size=64 --json
    python -m training.aot --list                                     # the supported topologies

The real TPU compiler (the `libtpu` wheel: `pip install -e ".[tpu]"`) compiles the run's train step
for the slice's chips, with the run's mesh and shardings, and the decode step of the resulting model
on one chip. It prints, per chip: memory (arguments, outputs, temporaries, generated code; the total
against the chip's HBM: fits or not, and by how much), FLOPs per step, bytes each collective moves
per step (`training.hlo_bytes`), and the compile time. A configuration too large for the chip is
reported as not fitting (when the compiler itself refuses it, with its message), not as a crash.
Nothing is trained and no data is read: the vocabulary is `data.vocab_size` (or `init_from`'s).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
from typing import Any

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Topology:
    """A Cloud TPU slice as libtpu names it: chips, chips per host, and the HBM of one chip."""

    name: str  # as on the command line: v5e-8
    libtpu_name: str  # as libtpu's topology descriptions name it: v5e:2x4
    chips_per_host: tuple[int, int, int]
    hbm_bytes: int
    accelerator_type: str  # gcloud's --accelerator-type

    @property
    def chips(self) -> int:
        dims = [int(d) for d in self.libtpu_name.split(":")[1].split("x")]
        total = 1
        for d in dims:
            total *= d
        return total


TOPOLOGIES = {t.name: t for t in (
    Topology("v4-8", "v4:2x2x1", (2, 2, 1), 32 * GIB, "v4-8"),
    Topology("v4-16", "v4:2x2x2", (2, 2, 1), 32 * GIB, "v4-16"),
    Topology("v5e-1", "v5e:1x1", (1, 1, 1), 16 * GIB, "v5litepod-1"),
    Topology("v5e-4", "v5e:2x2", (2, 2, 1), 16 * GIB, "v5litepod-4"),
    Topology("v5e-8", "v5e:2x4", (2, 4, 1), 16 * GIB, "v5litepod-8"),
    Topology("v5e-16", "v5e:4x4", (2, 2, 1), 16 * GIB, "v5litepod-16"),
    Topology("v5p-8", "v5p:2x2x1", (2, 2, 1), 95 * GIB, "v5p-8"),
    Topology("v6e-1", "v6e:1x1", (1, 1, 1), 32 * GIB, "v6e-1"),
    Topology("v6e-4", "v6e:2x2", (2, 2, 1), 32 * GIB, "v6e-4"),
    Topology("v6e-8", "v6e:2x4", (2, 4, 1), 32 * GIB, "v6e-8"),
    Topology("v6e-16", "v6e:4x4", (2, 2, 1), 32 * GIB, "v6e-16"),
)}


class AotError(Exception):
    """A topology, an environment or a configuration that cannot be compiled here, with the fix."""


def topology(name: str) -> Topology:
    if name not in TOPOLOGIES:
        raise AotError(f"unknown topology '{name}'; supported: {', '.join(TOPOLOGIES)}")
    return TOPOLOGIES[name]


def check_libtpu() -> None:
    if importlib.util.find_spec("libtpu") is None:
        raise AotError("compiling for TPU on this machine needs the libtpu wheel (the TPU compiler): "
                       "pip install -e \".[tpu]\" (or pip install \"jax[tpu]\"), then run this again")


def tpu_devices(topo: Topology) -> list:
    """The slice's chips as compile targets (no TPU needed: libtpu describes them)."""
    check_libtpu()
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server: not on a TPU VM
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.libtpu_name,
                                        chip_config_name="default", chips_per_host_bounds=topo.chips_per_host,
                                        num_slices=1)
    return list(desc.devices)


def memory_report(compiled: Any, hbm_bytes: int) -> dict[str, Any]:
    """Per-chip bytes from the compiler's memory analysis, and whether they fit in HBM."""
    m = compiled.memory_analysis()
    parts = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
             "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
             "code": m.generated_code_size_in_bytes}
    total = parts["arguments"] + parts["outputs"] - parts["aliased"] + parts["temporaries"] + parts["code"]
    return {**parts, "total": total, "hbm": hbm_bytes, "fits": total <= hbm_bytes, "margin": hbm_bytes - total}


def not_fitting(err: Exception, hbm_bytes: int) -> dict[str, Any] | None:
    """The compiler's own refusal to fit the program in HBM, as a report (None: another error)."""
    text = str(err)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    return {"fits": False, "hbm": hbm_bytes, "compiler": text.strip().splitlines()[0][:500]}


def compile_report(lowered: Any, hbm_bytes: int) -> dict[str, Any]:
    """Compile a lowered program: memory, FLOPs, collective bytes and seconds (or why it does not fit)."""
    from training.hlo_bytes import collective_bytes

    t0 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as err:  # noqa: BLE001 - only the compiler's out-of-memory refusal is a report
        report = not_fitting(err, hbm_bytes)
        if report is None:
            raise
        return {**report, "compile_seconds": round(time.perf_counter() - t0, 1)}
    seconds = time.perf_counter() - t0
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    wire = collective_bytes(compiled.as_text())
    memory = memory_report(compiled, hbm_bytes)
    return {"memory": memory, "fits": memory["fits"], "flops": float(cost.get("flops", 0.0)),
            "collective_bytes": {k: int(v) for k, v in wire["payload_bytes"].items()},
            "compile_seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    """The CLI: compile, print the report (or --json), exit 0; 2 with `error: ...` for a user error."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile targets come from libtpu: no TPU runtime here
    from training.aot_programs import run as compile_run  # imports JAX: after --help and --list

    ap = argparse.ArgumentParser(prog="python -m training.aot", description=__doc__.split("\n\n")[0],
                                 epilog="topologies: " + ", ".join(TOPOLOGIES))
    ap.add_argument("--topology", help="the TPU slice, e.g. v5e-8 (--list: all)")
    ap.add_argument("--preset", help="a training preset (default: default)")
    ap.add_argument("--config", help="a YAML config instead of a preset")
    ap.add_argument("--decode-batch", type=int, default=8, help="rows of the decode step (default 8)")
    ap.add_argument("--decode-context", type=int, default=2048, help="KV cache length of the decode step")
    ap.add_argument("--no-decode", action="store_true", help="compile the train step only")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--list", action="store_true", help="list the supported topologies and exit")
    ap.add_argument("overrides", nargs="*", help="section.key=value, as for training.train")
    args = ap.parse_args(argv)
    if args.list:
        for t in TOPOLOGIES.values():
            print(f"{t.name:8s} {t.chips:3d} chips  {t.hbm_bytes / GIB:5.0f} GiB HBM per chip  ({t.accelerator_type})")
        return 0
    if not args.topology:
        ap.error("--topology is required (see --list)")
    from training.config import ConfigError
    try:
        report = compile_run(topology(args.topology), args.preset, args.config, args.overrides,
                             decode=None if args.no_decode else (args.decode_batch, args.decode_context))
    except (AotError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _program_lines(name: str, part: dict[str, Any]) -> list[str]:
    if "memory" not in part:
        return [f"{name}: DOES NOT FIT in {_gib(part['hbm'])} per chip (the compiler: {part['compiler']})"]
    m = part["memory"]
    verdict = f"fits, {_gib(m['margin'])} to spare" if m["fits"] else f"DOES NOT FIT, {_gib(-m['margin'])} over"
    wire = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in part["collective_bytes"].items() if v) or "none"
    return [f"{name} (compiled in {part['compile_seconds']} s), per chip:",
            f"  memory: arguments {_gib(m['arguments'])}, outputs {_gib(m['outputs'])} ({_gib(m['aliased'])} "
            f"aliased), temporaries {_gib(m['temporaries'])}, code {_gib(m['code'])}",
            f"  total {_gib(m['total'])} of {_gib(m['hbm'])} HBM: {verdict}",
            f"  FLOPs per step: {part['model_flops_per_chip']:.3e} (model; the compiler counts {part['flops']:.3e}, "
            f"a layer loop's body once); collectives per step: {wire}"]


def format_report(report: dict[str, Any]) -> str:
    head = (f"{report['topology']} ({report['chips']} chips, {report['device_kind']}): {report['model']}; "
            f"mesh {report['mesh']}; batch {report['batch']}")
    lines = [head, *_program_lines("train step", report["train_step"])]
    if "decode_step" in report:
        lines += _program_lines(f"decode step ({report['decode']})", report["decode_step"])
    if "verify_step" in report:
        lines += _program_lines(f"verification pass, 5 tokens per row ({report['decode']})", report["verify_step"])
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Train on a Cloud TPU VM slice: create it, install this package on every worker, train, fetch, delete.

    python -m training.launch_tpu --name my-run --zone us-west4-a --accelerator v5e-8 --dry-run -- \\
        --preset smollm2-135m run.steps=2000
    python -m training.launch_tpu --name my-run --zone us-west4-a --accelerator v6e-8 --bucket gs://b/runs -- ...

The `gcloud` commands, in order (`--dry-run` prints them and runs nothing):

1. `tpus tpu-vm create` the slice (`--spot` for a preemptible one);
2. copy this checkout (`git archive` of HEAD: committed files only) to every worker and
   `pip install -e ".[tpu]"` there;
3. start `python -m training.train` on every worker at once with `JAX_DISTRIBUTED=auto` (multi-host
   initialisation is automatic on a TPU VM); the output streams here (process 0 prints progress);
4. fetch the run folder from worker 0 to `runs/NAME` here;
5. delete the slice: always, also after a failed step or Ctrl-C, unless `--keep`.

With `--bucket gs://B/runs` the run keeps a copy of its folder at `gs://B/runs/NAME` while it trains
(`run.sync_to`, training/mirror.py: each checkpoint and the metrics as they are written, the model at
the end), so a preempted `--spot` slice loses at most the steps since the last checkpoint: the same
command again starts a new slice that fetches the copy and resumes.

Check the configuration first: `python -m training.aot --topology v5e-8 ...` compiles it for the
slice on this machine and says whether it fits. Not yet run on a real TPU slice (the commands are
tested against a stand-in gcloud). Slices of several hosts train, but their checkpoints need one
folder all hosts share, which a TPU VM's disks are not: not built.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from typing import Sequence

from training.aot import TOPOLOGIES

RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
                    "v6e": "v2-alpha-tpuv6e"}
REMOTE_DIR = "jaxmodels"
ARCHIVE = "/tmp/jaxmodels-src.tar.gz"


class LaunchError(Exception):
    """Arguments that cannot make a TPU job, naming the fix."""


def _tpu(args: argparse.Namespace, *words: str) -> list[str]:
    """`gcloud compute tpus tpu-vm WORDS --zone Z [--project P]`."""
    project = ["--project", args.project] if args.project else []
    return ["gcloud", "compute", "tpus", "tpu-vm", *words, "--zone", args.zone, *project]


def _on_workers(args: argparse.Namespace, command: str, worker: str = "all") -> list[str]:
    return _tpu(args, "ssh", args.name, f"--worker={worker}", f"--command={command}")


def run_dir(overrides: Sequence[str], name: str) -> str:
    """The run folder on the workers (relative to the checkout): `run.out_dir=...`, else runs/NAME."""
    for item in overrides:
        if item.startswith("run.out_dir="):
            return item.split("=", 1)[1]
    return f"runs/{name}"


def commands(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(what, argv) for every step, in order; the last one deletes the slice (unless --keep)."""
    topo = TOPOLOGIES[args.accelerator]
    version = args.version or RUNTIME_VERSIONS[topo.name.split("-")[0]]
    out = run_dir(args.train_args, args.name)
    overrides = [o for o in args.train_args if not o.startswith("run.out_dir=")] + [f"run.out_dir={out}"]
    if args.bucket and not any(o.startswith("run.sync_to=") for o in overrides):
        overrides.append(f"run.sync_to={args.bucket.rstrip('/')}/{args.name}")
    train = shlex.join(["python", "-m", "training.train", *overrides])
    steps = [
        ("create the slice", _tpu(args, "create", args.name, "--accelerator-type", topo.accelerator_type,
                                  "--version", version, *(["--spot"] if args.spot else []))),
        ("pack this checkout", ["git", "archive", "--format=tar.gz", "-o", ARCHIVE, "HEAD"]),
        ("copy it to every worker", _tpu(args, "scp", ARCHIVE, f"{args.name}:~/", "--worker=all")),
        ("install on every worker", _on_workers(
            args, f"mkdir -p {REMOTE_DIR} && tar xzf ~/{ARCHIVE.rsplit('/', 1)[1]} -C {REMOTE_DIR} && "
                  f'cd {REMOTE_DIR} && pip install -q -e ".[tpu]"')),
        ("train on every worker", _on_workers(args, f"cd {REMOTE_DIR} && JAX_DISTRIBUTED=auto {train}")),
        ("fetch the run folder", _tpu(args, "scp", "--recurse", f"{args.name}:~/{REMOTE_DIR}/{out}",
                                      f"runs/{args.name}", "--worker=0")),
    ]
    if not args.keep:
        steps.append(("delete the slice", _tpu(args, "delete", args.name, "--quiet")))
    return steps


def execute(steps: list[tuple[str, list[str]]], keep: bool) -> int:
    """Run the steps in order, stopping at the first failure; the delete step runs in any case."""
    delete = None if keep else steps[-1]
    body = steps[:-1] if delete else steps
    code = 0
    try:
        for what, argv in body:
            print(f"== {what}: {shlex.join(argv)}", flush=True)
            code = subprocess.run(argv).returncode
            if code:
                print(f"error: '{what}' failed (exit {code})", file=sys.stderr)
                break
    except KeyboardInterrupt:
        code = 130
    finally:
        if delete is not None:
            print(f"== {delete[0]}: {shlex.join(delete[1])}", flush=True)
            if subprocess.run(delete[1]).returncode:
                print(f"error: could not delete the slice; delete it yourself: {shlex.join(delete[1])}",
                      file=sys.stderr)
                code = code or 1
    return code


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m training.launch_tpu", description=__doc__.split("\n\n")[0],
                                 epilog=f"accelerators: {', '.join(TOPOLOGIES)}")
    ap.add_argument("--name", required=True, help="the TPU VM's name")
    ap.add_argument("--zone", required=True, help="e.g. us-west4-a (one that offers the accelerator)")
    ap.add_argument("--accelerator", required=True, help="the slice, as training.aot names it: v5e-8, v6e-8, ...")
    ap.add_argument("--project", help="the Google Cloud project (default: gcloud's)")
    ap.add_argument("--version", help="the TPU VM runtime (default: one per chip generation)")
    ap.add_argument("--bucket", help="a gs:// folder: the run keeps a copy of its folder in BUCKET/NAME as it "
                                     "trains, and a relaunch with the same --name resumes from it")
    ap.add_argument("--spot", action="store_true", help="a preemptible (spot) slice")
    ap.add_argument("--keep", action="store_true", help="do not delete the slice at the end")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("train_args", nargs="*", help="after --: training.train's arguments (--preset, key=value)")
    args = ap.parse_args(argv)
    if args.accelerator not in TOPOLOGIES:
        raise LaunchError(f"unknown accelerator '{args.accelerator}'; supported: {', '.join(TOPOLOGIES)}")
    if args.bucket and not args.bucket.startswith("gs://"):
        raise LaunchError(f"--bucket must be a gs:// path, got '{args.bucket}'")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse(argv)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    steps = commands(args)
    if args.dry_run:
        for what, command in steps:
            print(f"# {what}\n{shlex.join(command)}")
        return 0
    return execute(steps, args.keep)


if __name__ == "__main__":
    sys.exit(main())

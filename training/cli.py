"""The training CLI: one validation boundary, one line per error, documented exit codes.

`python -m training.train` checks its arguments in one place. Every user-supplied value is checked where it
enters (types, ranges, non-finite numbers, the model shape: `training.validation`), keys that the
chosen mode would ignore are refused, and every expected failure prints one line `error: ...`:

    0    done (or --check / --help-keys passed)
    2    a user error: bad argument, config, data, checkpoint, RUN_DIR in use by another run; also a
         file-system refusal (permissions, disk full) and running out of memory
    3    training diverged (NaN/Inf loss or gradient norm); nothing exported
    130  SIGINT (Ctrl-C), after a checkpoint at the next step boundary (a second Ctrl-C: at once)
    143  SIGTERM (preemption), after a checkpoint at the next step boundary

Multi-process (multi-host) runs: start one `python -m training.train` per process with the same
arguments and `JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i` (i = 0..N-1;
process 0 hosts the coordinator); the CLI then calls `jax.distributed.initialize` before any JAX work.
`JAX_DISTRIBUTED=auto` calls it without arguments, for clusters JAX detects itself (Cloud TPU, Slurm).
Process 0 holds RUN_DIR's lock; a signal to any process stops all of them at the same step.

`--check` validates the whole command without loading data or building arrays: the config and model
shape, keys without effect, RUN_DIR (not a file, not locked, resumable with this config), and that
`data.source` and `init_from` exist.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import NoReturn

from jaxmodels.config import ConfigError as ModelConfigError
from jaxmodels.convert.hf import CheckpointError
from training.checkpoint import CheckpointMismatchError
from training.config import ConfigError, TrainConfig, load_config, parse_overrides, preset_names, valid_keys
from training.corpus import DataError
from training.interrupt import EXIT_MESSAGE, Interrupted
from training.metrics import DivergenceError
from training.validation import get, ineffective_keys

USER_ERRORS = (ConfigError, DataError, CheckpointError, CheckpointMismatchError, ModelConfigError)
EXIT_USAGE, EXIT_DIVERGED, EXIT_SIGINT = 2, 3, 130
OUT_OF_MEMORY = "out of memory; lower run.batch_size, run.seq_len or the model size (or enable model.remat)"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage + error
        print(f"error: {message} (see python -m training.train --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    from training import train as train_module

    p = _Parser(prog="python -m training.train", description=train_module.__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog=f"presets: {', '.join(preset_names())}\n\n{__doc__.split(chr(10) * 2, 1)[1]}")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="a preset name from training/presets (default: 'default')")
    src.add_argument("--config", help="a YAML config file (same layout as the presets)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    mode.add_argument("--check", action="store_true", help="validate everything, load no data, train nothing")
    mode.add_argument("--help-keys", action="store_true", help="list every config key with its value")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. run.steps=100 model.remat=true")
    return p


def print_keys(cfg: TrainConfig) -> None:
    for key in valid_keys():
        print(f"{key} = {get(cfg, key)!r}")


def _exists(path: str) -> bool:
    try:
        return Path(path).expanduser().exists()
    except (OSError, RuntimeError) as err:  # e.g. a name too long, '~user' unknown
        raise ConfigError(f"cannot use the path '{path}': {err}") from None


def check(cfg: TrainConfig) -> None:
    """--check: what can be validated without reading data or building arrays (ConfigError/DataError)."""
    from training import parallel, train as train_module
    from training.runlock import LOCK_NAME, RunLock, read_holder

    parallel.check_batch(parallel.make_mesh(cfg.mesh), cfg.run.batch_size // cfg.optimizer.grad_accum)
    run_dir = Path(cfg.run.out_dir).expanduser()
    if _exists(cfg.run.out_dir) and not run_dir.is_dir():
        raise ConfigError(f"run.out_dir '{cfg.run.out_dir}' is a file, not a folder; choose another run.out_dir")
    if cfg.data.source != "stdlib" and not _exists(cfg.data.source):
        raise DataError(f"data path '{cfg.data.source}' does not exist")
    if cfg.init_from and cfg.init_from.lower() in ("smollm2", "smollm2-135m-instruct"):
        from jaxmodels.convert.gguf import smollm2_gguf_path
        smollm2_gguf_path()  # CheckpointError if the package is missing
    elif cfg.init_from and not _exists(cfg.init_from):
        raise ConfigError(f"init_from '{cfg.init_from}' does not exist")
    if cfg.run.sync_to:
        from training.mirror import open_filesystem
        open_filesystem(cfg.run.sync_to)  # ConfigError: no gcsfs, no credentials, unreadable
    if (run_dir / LOCK_NAME).exists():
        with RunLock(run_dir, note=lambda _: None) as lock:  # refused if a run holds it
            lock.release()
        if read_holder(run_dir / LOCK_NAME):
            print(f"note: {run_dir / LOCK_NAME} was left by a run that ended without releasing it")
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").glob("*") if p.name.isdigit())
    if steps and cfg.checkpoint.enabled:
        train_module.check_resumable(cfg, run_dir, steps[-1])
        print(f"{run_dir} has checkpoints up to step {steps[-1]}: this command resumes from there")
    print(f"ok: config valid; {cfg.run.steps} steps of {cfg.run.batch_size} x {cfg.run.seq_len} tokens "
          f"into {run_dir}")


def _env_int(name: str, default: str = "") -> int:
    """An integer environment variable of a multi-process run; ConfigError (exit 2) if it is not one."""
    value = os.environ.get(name, default)
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} must be an integer (multi-process runs set JAX_COORDINATOR_ADDRESS, "
                          f"JAX_NUM_PROCESSES and JAX_PROCESS_ID)") from None


def wait_for_coordinator(address: str, timeout: float, index: int, count: int) -> None:
    """Return once a TCP connection to the coordinator (process 0) succeeds; ConfigError naming the
    address after `timeout` seconds of refusals (process 0 may start a little later than the others)."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    deadline = time.time() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except (OSError, ValueError) as err:
            if time.time() >= deadline or isinstance(err, ValueError):
                raise ConfigError(f"process {index} of {count} could not reach the JAX coordinator at {address} "
                                  f"within {timeout} s ({err}); check that process 0 runs and that this address "
                                  f"and port are reachable from here, or raise JAX_DISTRIBUTED_TIMEOUT") from None
            time.sleep(0.5)


def init_distributed() -> None:
    """Join a multi-process JAX cluster when the environment asks for one (see the module docstring).

    Must run before anything initializes the JAX backend; a single-process run does nothing here."""
    import jax

    if os.environ.get("JAX_DISTRIBUTED", "").lower() == "auto":
        jax.distributed.initialize()
        return
    if "JAX_COORDINATOR_ADDRESS" not in os.environ and "JAX_NUM_PROCESSES" not in os.environ:
        return
    address = os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    count, index = _env_int("JAX_NUM_PROCESSES"), _env_int("JAX_PROCESS_ID")
    if not address or count < 1 or not 0 <= index < count:
        raise ConfigError(f"multi-process run: JAX_COORDINATOR_ADDRESS={address!r}, JAX_NUM_PROCESSES={count}, "
                          f"JAX_PROCESS_ID={index}: need host:port, N >= 1 and 0 <= id < N")
    timeout = _env_int("JAX_DISTRIBUTED_TIMEOUT", "300")
    if index != 0:  # XLA aborts the process when the coordinator never answers: check first
        wait_for_coordinator(address, timeout, index, count)
    try:
        jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index,
                                   initialization_timeout=timeout)
    except Exception as err:  # jax raises a runtime error (DEADLINE_EXCEEDED, UNAVAILABLE, ...) after the timeout
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise ConfigError(f"process {index} of {count} could not join the JAX cluster at {address} within "
                          f"{timeout} s ({first}); check that process 0 runs and that this address and port "
                          f"are reachable from here, or raise JAX_DISTRIBUTED_TIMEOUT") from None


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    from training.train import train

    cfg = load_config(args.preset, args.config, args.overrides)
    if args.help_keys:
        print_keys(cfg)
        return 0
    ignored = ineffective_keys(cfg, list(parse_overrides(args.overrides)), args.resume)
    if ignored:
        raise ConfigError("these settings have no effect here, remove them: " + "; ".join(ignored))
    if args.check:
        check(cfg)
        return 0
    init_distributed()
    try:
        train(cfg, resume=args.resume)
    except Interrupted as stop:
        print(f"{stop}", file=sys.stderr)
        if stop.saved:
            print(f"to resume: python -m training.train {shlex.join(argv)}", file=sys.stderr)
        return stop.exit_code
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse, validate, train; every expected failure is one `error: ...` line and an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_intermixed_args(argv)  # key=value before and after flags
    except SystemExit as exit_:  # --help (0) or a usage error (2, already printed)
        return int(exit_.code or 0)
    try:
        return _run(args, argv)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except DivergenceError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except OSError as err:  # the file system refused (permissions, disk full, a file where a folder goes)
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError:
        print(f"error: {OUT_OF_MEMORY}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as err:  # XLA's out-of-memory is a JaxRuntimeError (a RuntimeError)
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        print(f"error: {OUT_OF_MEMORY} ({str(err).splitlines()[0][:200]})", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write(EXIT_MESSAGE)
        return EXIT_SIGINT


def run_as_script() -> NoReturn:
    """`python -m training.train`: exit with main's code; after a second Ctrl-C without waiting for
    background threads (an unfinished checkpoint save is discarded on the next start)."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if code == EXIT_SIGINT:
        os._exit(code)
    sys.exit(code)

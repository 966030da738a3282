"""A local cluster launcher: N processes on this machine as one JAX cluster, optionally across a slow network.

Multi-process code (`training.cli.init_distributed`, pipeline benchmarks) needs processes that share a
coordinator, each with its own CPU devices, and that all end when one fails; by hand that is a free
port, per-process XLA flags, output mixed mid-line and peers left waiting forever for a dead process.

    python -m training.cluster --processes 2 --devices-per-process 4 -- python -m training.train --preset tiny
    python -m training.cluster --processes 2 --bandwidth 100mbit --latency 5 -- python bench.py   # as root
    python -m training.cluster --processes 2 --timeout 600 -- python -c "import jax; ..."

Each process runs the command after `--` as given (argv, no shell; `python` is looked up on PATH) in a
process group of its own with JAX_PLATFORMS=cpu, `--xla_force_host_platform_device_count=M` in place of
any device count in XLA_FLAGS (other flags kept), gloo collectives, and JAX_COORDINATOR_ADDRESS (process
0 hosts it), JAX_NUM_PROCESSES and JAX_PROCESS_ID for `training.cli.init_distributed`. Its lines are
forwarded whole behind `[p0] `, `[p1] ` ... (stdout to stdout, stderr to stderr).

Exit codes: 0 all succeeded; else the first failing process's code (128 + S if killed by signal S), after
SIGTERM to the others (SIGKILL `--grace` seconds later) and one line `cluster: process I failed ...`; 124
after `--timeout` seconds; 130 / 143 on SIGINT (Ctrl-C) / SIGTERM to the launcher, which sends SIGTERM to
all (a second signal: SIGKILL at once); 2 a bad argument or a network impossible here (`error: ...`).

`--bandwidth RATE` (tc units: 100mbit, 1gbit) and `--latency MS` need root, `ip` and `tc`: each process
runs in a network namespace of its own (`ip netns exec`), linked by a veth pair to a bridge in one more
namespace; process i is 10.77.0.(i+1)/24, the coordinator process 0's address. Each process's end of its
link gets netem (the delay, so a round trip between two processes takes 2 x MS) and tbf (the rate, so
each direction is limited). Gloo finds its address from the host name, which /etc/hosts maps to
127.0.0.1, so /etc/netns/NAME/hosts (which `ip netns exec` mounts over /etc/hosts) maps it to the
process's address. Names carry the launcher's pid and a counter (concurrent launches never collide), the
machine's own interfaces are never touched, and whatever a launch created is removed however it ends (a
launcher killed by SIGKILL leaves `jaxcluster<pid>-*` for `ip netns del`). A kernel without netem
(CONFIG_NET_SCH_NETEM) refuses `--latency` with a message; `--bandwidth` needs only tbf.

From Python: `launch(["python", "bench.py"], processes=2, bandwidth="100mbit")` returns the exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, NoReturn, TextIO

from training.config import ConfigError
from training.netns import MAX_NETWORK_PROCESSES, Network, parse_rate

EXIT_USAGE, EXIT_TIMEOUT = 2, 124
GRACE = 5.0  # seconds between SIGTERM and SIGKILL
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_SIGNAL_NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}


def child_env(base: dict[str, str], index: int, processes: int, devices: int, coordinator: str) -> dict[str, str]:
    """Process `index`'s environment: `base` plus the cluster's variables (see the module docstring)."""
    flags = [f for f in base.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    return {**base, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join([*flags, f"{DEVICE_COUNT_FLAG}={devices}"]),
            "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo", "JAX_COORDINATOR_ADDRESS": coordinator,
            "JAX_NUM_PROCESSES": str(processes), "JAX_PROCESS_ID": str(index)}


def _check(name: str, value: object, integer: bool = False, minimum: float = 0, above: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
    if isinstance(value, bool) or not ok or value < minimum or (above and value == minimum):
        raise ConfigError(f"{name}={value!r}: must be {'an integer' if integer else 'a finite number'} "
                          f"{'>' if above else '>='} {minimum:g}")


def _validate(command: list[str], processes: int, devices: int, latency_ms: float | None,
              timeout: float | None, grace: float, network: bool) -> None:
    if not command or not all(isinstance(arg, str) for arg in command):
        raise ConfigError("missing the command to run after '--', e.g. "
                          "python -m training.cluster --processes 2 -- python -m training.train ...")
    _check("processes", processes, integer=True, minimum=1)
    _check("devices_per_process", devices, integer=True, minimum=1)
    _check("grace", grace)
    if latency_ms is not None:
        _check("latency_ms", latency_ms)
    if timeout is not None:
        _check("timeout", timeout, above=True)
    if network and processes > MAX_NETWORK_PROCESSES:
        raise ConfigError(f"processes={processes}: at most {MAX_NETWORK_PROCESSES} with --bandwidth/--latency")


class _Output:
    """Writes whole lines from many threads: each process's lines behind its prefix, the launcher's own."""

    def __init__(self, output: TextIO | None):
        self.output, self.lock, self.threads = output, threading.Lock(), []

    def write(self, stream: TextIO, text: str) -> None:
        with self.lock:
            with contextlib.suppress(OSError, ValueError):  # a closed or broken stream: keep draining the pipes
                stream.write(text)
                stream.flush()

    def say(self, message: str) -> None:
        self.write(sys.stderr if self.output is None else self.output, f"cluster: {message}\n")

    def attach(self, index: int, proc: subprocess.Popen) -> None:
        for pipe, default in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
            stream = default if self.output is None else self.output
            thread = threading.Thread(target=self._pump, args=(pipe, stream, f"[p{index}] "), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _pump(self, pipe: IO[bytes], stream: TextIO, prefix: str) -> None:
        with pipe:
            for raw in iter(pipe.readline, b""):
                line = raw.decode("utf-8", "replace")
                self.write(stream, prefix + (line if line.endswith("\n") else line + "\n"))

    def join(self, timeout: float) -> None:
        for thread in self.threads:  # daemons: a grandchild holding a pipe open cannot hang the launcher
            thread.join(timeout)


class _Signals:
    """SIGINT/SIGTERM to the launcher are recorded for the supervisor (main thread only; restored after)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.event = threading.Event()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for signum in _SIGNAL_NAMES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.received.append(signum)
        self.event.set()

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    """`signum` to the process's group (it leads one: start_new_session), grandchildren included."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)


def _stop(procs: list[subprocess.Popen], grace: float, signals: _Signals) -> int:
    """SIGTERM to the running processes, SIGKILL after `grace` s or a further signal; returns how many ran."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        _signal_group(proc, signal.SIGTERM)
    deadline, seen = time.monotonic() + grace, len(signals.received)
    while time.monotonic() < deadline and len(signals.received) == seen and any(p.poll() is None for p in running):
        time.sleep(0.02)
    for proc in running:
        _signal_group(proc, signal.SIGKILL)  # the process if still there, and what it left in its group
        proc.wait()
    return len(running)


def _describe(code: int) -> tuple[str, int]:
    """A child's return code -> (words, the launcher's exit code)."""
    if code < 0:
        name = {s.value: s.name for s in signal.Signals}.get(-code, f"signal {-code}")
        return f"was killed by {name}", 128 - code
    return f"failed with exit code {code}", code


def _supervise(procs: list[subprocess.Popen], timeout: float | None, grace: float,
               signals: _Signals) -> tuple[int, str | None]:
    """Wait until every process succeeds, one fails, `timeout` passes or the launcher gets a signal;
    returns the exit code and the message to print (after the stopped processes' last lines)."""
    start = time.monotonic()
    deadline, ended = None if timeout is None else start + timeout, {}
    while True:
        codes = [p.poll() for p in procs]
        ended.update({i: time.monotonic() - start for i, code in enumerate(codes) if code == 0 and i not in ended})
        failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            words, exit_code = _describe(codes[failed[0]])
            stopped = _stop(procs, grace, signals)
            rest = f"; stopped the {stopped} other running process(es)" if stopped else ""
            return exit_code, f"process {failed[0]} {words}{rest}"
        if all(code == 0 for code in codes):
            return 0, None
        if signals.received:
            stopped = _stop(procs, grace, signals)
            return 128 + signals.received[0], f"{_SIGNAL_NAMES[signals.received[0]]}: stopped {stopped} process(es)"
        if deadline is not None and time.monotonic() >= deadline:
            running = [str(i) for i, code in enumerate(codes) if code is None]
            stopped = _stop(procs, grace, signals)
            done = "".join(f"; process {i} had exited 0 after {s:.0f} s" for i, s in sorted(ended.items()))
            return EXIT_TIMEOUT, (f"timed out after {timeout:g} s; stopped {stopped} running process(es) "
                                  f"({', '.join(running)}){done}")
        signals.event.wait(0.05)


def _start(commands: list[list[str]], envs: list[dict[str, str]], out: _Output,
           procs: list[subprocess.Popen]) -> None:
    """Start every process (appending to `procs` as it goes, so a failure midway stops those started)."""
    for i, (command, env) in enumerate(zip(commands, envs)):
        try:
            proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
        except OSError as err:
            raise ConfigError(f"cannot start process {i}: {err}") from None
        procs.append(proc)
        out.attach(i, proc)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: list[str], processes: int, devices_per_process: int = 1, bandwidth: str | None = None,
           latency_ms: float | None = None, timeout: float | None = None, env: dict[str, str] | None = None,
           output: TextIO | None = None, grace: float = GRACE) -> int:
    """Run `command` as `processes` processes forming one JAX cluster; returns the exit code (module docstring).

    `env`: the processes' base environment, as for subprocess (default: this process's); the cluster's
    variables are set on top. `output`: where every line goes (children's stdout and stderr and the
    launcher's messages); default: stdout lines to sys.stdout, the rest to sys.stderr. Raises ConfigError
    (`training.netns.NetworkError` when the network cannot be built) before anything starts."""
    command = list(command)
    shaped = bandwidth is not None or latency_ms is not None
    _validate(command, processes, devices_per_process, latency_ms, timeout, grace, shaped)
    rate = parse_rate(bandwidth) if bandwidth is not None else None
    base = dict(os.environ if env is None else env)
    if shutil.which(command[0], path=base.get("PATH", os.defpath)) is None:
        raise ConfigError(f"command not found or not executable: {command[0]!r}")
    out, procs = _Output(output), []
    with _Signals() as signals, contextlib.ExitStack() as stack:
        network = stack.enter_context(Network(processes, rate, latency_ms)) if shaped else None
        host = network.address(0) if network else "127.0.0.1"
        coordinator = f"{host}:{_free_port()}"  # a fresh namespace has every port free
        envs = [child_env(base, i, processes, devices_per_process, coordinator) for i in range(processes)]
        commands = [network.wrap(i, command) if network else command for i in range(processes)]
        message = None
        try:
            if signals.received:  # during the network setup
                message = f"{_SIGNAL_NAMES[signals.received[0]]}: stopped before starting any process"
                return 128 + signals.received[0]
            _start(commands, envs, out, procs)
            code, message = _supervise(procs, timeout, grace, signals)
            return code
        finally:
            _stop(procs, grace, signals)  # returns at once when they have all ended
            out.join(timeout=2.0)
            if message:
                out.say(message)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage + error
        print(f"error: {message} (see python -m training.cluster --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m training.cluster", description=__doc__.split("\n\n")[0],
                usage="python -m training.cluster --processes N [options] -- COMMAND [ARG ...]",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--processes", type=int, required=True, metavar="N", help="how many processes (>= 1)")
    p.add_argument("--devices-per-process", type=int, default=1, metavar="M", help="CPU devices per process")
    p.add_argument("--bandwidth", metavar="RATE", help="rate limit per link and direction, e.g. 100mbit, 1gbit")
    p.add_argument("--latency", type=float, metavar="MS", help="delay added to each process's outgoing packets")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="stop everything after this long (exit 124)")
    p.add_argument("--grace", type=float, default=GRACE, metavar="SECONDS", help="between SIGTERM and SIGKILL")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse, launch; every expected failure is one `error: ...` line and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    try:
        args = _parser().parse_args(argv[:split])
    except SystemExit as exit_:  # --help (0) or a usage error (2, already printed)
        return int(exit_.code or 0)
    try:
        return launch(argv[split + 1:], args.processes, args.devices_per_process, args.bandwidth, args.latency,
                      args.timeout, grace=args.grace)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # outside the launch's own handling (e.g. while parsing)
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

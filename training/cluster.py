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
import itertools
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, NoReturn, TextIO

from training.config import ConfigError

EXIT_USAGE, EXIT_TIMEOUT = 2, 124
GRACE = 5.0  # seconds between SIGTERM and SIGKILL
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
NAMESPACE_PREFIX = "jaxcluster"  # namespaces are jaxcluster<pid>-<n>-p<i> and jaxcluster<pid>-<n>-br
SUBNET = "10.77.0"  # process i is SUBNET.(i+1)/24, inside namespaces of our own only
MAX_NETWORK_PROCESSES = 250
ETC_NETNS = Path("/etc/netns")
NETEM_MISSING = ("--latency needs the kernel's netem queueing discipline (CONFIG_NET_SCH_NETEM), which this "
                 "kernel lacks; --bandwidth alone works")
_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
          "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9, "tbps": 8 * 10**12}
_RATE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)")
_SIGNAL_NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}
_launches = itertools.count()


class NetworkError(ConfigError):
    """The slow network cannot be built here: not root, no `ip`/`tc`, a kernel without netem, ..."""


def parse_rate(text: str) -> int:
    """A tc rate such as '100mbit', '1gbit' or '10mbps' (bytes) -> bits per second; ConfigError otherwise."""
    match = _RATE.fullmatch(str(text).strip().lower())
    if not match or match.group(2) not in _UNITS:
        raise ConfigError(f"bandwidth {text!r}: expected a number and a unit such as 100mbit, 1gbit or 500kbit "
                          f"(units: {', '.join(_UNITS)}; *bps are bytes per second)")
    bits = round(float(match.group(1)) * _UNITS[match.group(2)])
    if bits < 1000:
        raise ConfigError(f"bandwidth {text!r}: must be at least 1kbit")
    return bits


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


def _run(command: list[str]) -> None:
    """One `ip`/`tc` call of the network setup; NetworkError (with the tool's message) if it fails."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise NetworkError(f"building the cluster network: `{' '.join(command)}` failed: {err}") from None
    if done.returncode:
        message = done.stderr.strip() or done.stdout.strip() or f"exit code {done.returncode}"
        if "netem" in command and "qdisc kind is unknown" in message:
            raise NetworkError(NETEM_MISSING)
        raise NetworkError(f"building the cluster network: `{' '.join(command)}` failed: {message}")


def network_problem(latency: bool = False) -> str | None:
    """Why a slow network cannot be built here (None: it can); `latency`: also check for netem."""
    if os.geteuid() != 0:
        return "--bandwidth/--latency need root (they create network namespaces); run as root or without them"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"--bandwidth/--latency need the {' and '.join(missing)} tool(s) (iproute2), not found on PATH"
    if latency:
        probe = f"{NAMESPACE_PREFIX}{os.getpid()}-{next(_launches)}-probe"
        try:
            _run(["ip", "netns", "add", probe])
            _run(["tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"])
        except NetworkError as err:
            return str(err)
        finally:
            subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


class Network:
    """The namespaces, bridge and shaped links of one launch; `with Network(...)` always removes them."""

    def __init__(self, processes: int, rate_bps: int | None, latency_ms: float | None):
        self.processes, self.rate_bps, self.latency_ms = processes, rate_bps, latency_ms
        self.prefix = f"{NAMESPACE_PREFIX}{os.getpid()}-{next(_launches)}"
        self.bridge = f"{self.prefix}-br"
        self.namespaces = [f"{self.prefix}-p{i}" for i in range(processes)]
        self._created: list[str] = []  # namespaces, then /etc/netns folders, to remove
        self._etc: list[Path] = []
        self._made_etc = False  # /etc/netns itself

    def address(self, index: int) -> str:
        return f"{SUBNET}.{index + 1}"

    def wrap(self, index: int, command: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[index], *command]

    def __enter__(self) -> Network:
        problem = network_problem()
        if problem:
            raise NetworkError(problem)
        try:
            self._build()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for left in self.remove():
            print(f"cluster: warning: could not remove {left}", file=sys.stderr)

    def _add_namespace(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._created.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _build(self) -> None:
        self._add_namespace(self.bridge)
        _run(["ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.bridge, "link", "set", "br0", "up"])
        for i, ns in enumerate(self.namespaces):
            self._add_namespace(ns)
            _run(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}", "netns", self.bridge])
            _run(["ip", "-n", self.bridge, "link", "set", f"p{i}", "master", "br0", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            self._shape(ns)
            self._hosts(ns, i)

    def _shape(self, ns: str) -> None:
        """netem (delay) at the root of the process's end of its link, tbf (rate) below it."""
        qdisc = ["tc", "-n", ns, "qdisc", "add", "dev", "eth0"]
        parent = ["root"]
        if self.latency_ms:
            _run([*qdisc, "root", "handle", "1:", "netem", "delay", f"{self.latency_ms:g}ms", "limit", "100000"])
            parent = ["parent", "1:1"]
        if self.rate_bps:
            burst = max(self.rate_bps // 8 // 250, 16384)  # bytes: 4 ms at the rate, at least 16 KiB
            _run([*qdisc, *parent, "handle", "10:", "tbf", "rate", f"{self.rate_bps}bit", "burst", str(burst),
                  "latency", "100ms"])

    def _hosts(self, ns: str, index: int) -> None:
        """/etc/netns/NS/hosts (bind-mounted over /etc/hosts by `ip netns exec`): host name -> own address."""
        try:
            self._made_etc = self._made_etc or not ETC_NETNS.exists()
            folder = ETC_NETNS / ns
            folder.mkdir(parents=True, exist_ok=False)
            self._etc.append(folder)
            (folder / "hosts").write_text(f"{self.address(index)} {socket.gethostname()}\n"
                                          f"127.0.0.1 localhost\n::1 localhost\n")
        except OSError as err:
            raise NetworkError(f"building the cluster network: cannot write {ETC_NETNS / ns}/hosts: {err}") from None

    def remove(self) -> list[str]:
        """Delete every namespace and file this launch created; returns what could not be removed."""
        left = []
        for name in reversed(self._created):
            done = subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
            if done.returncode:
                left.append(f"network namespace {name}")
        self._created.clear()
        for folder in self._etc:
            shutil.rmtree(folder, ignore_errors=True)
        self._etc.clear()
        if self._made_etc:
            with contextlib.suppress(OSError):
                ETC_NETNS.rmdir()  # only if empty: another launch may be using it
        return left


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
    (NetworkError when the network cannot be built) before anything starts."""
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

"""The slow network of `training.cluster`: one network namespace per process, veth links to a bridge,
netem (delay) and tbf (rate) on each link, /etc/netns hosts files; needs root, `ip` and `tc`.

The launcher's docstring says what a launch builds and how it is removed; this module builds it.
`network_problem()` says why it cannot be built here (None: it can), for a message or a test skip.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from training.config import ConfigError

NAMESPACE_PREFIX = "jaxcluster"  # namespaces are jaxcluster<pid>-<n>-p<i> and jaxcluster<pid>-<n>-br
SUBNET = "10.77.0"  # process i is SUBNET.(i+1)/24, inside namespaces of our own only
MAX_NETWORK_PROCESSES = 250
ETC_NETNS = Path("/etc/netns")
NETEM_MISSING = ("--latency needs the kernel's netem queueing discipline (CONFIG_NET_SCH_NETEM), which this "
                 "kernel lacks; --bandwidth alone works")
_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
          "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9, "tbps": 8 * 10**12}
_RATE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)")
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


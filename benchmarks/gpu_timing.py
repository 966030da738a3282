"""Timing on an accelerator for the GPU suite: per-call device time from inside one compiled loop,
the device's measured read bandwidth, and a time budget that bounds every part of the suite.

A decode attention call reads a few MB in microseconds, less than one host dispatch costs, so a
call is never timed alone: `per_call_seconds` runs it `n` and `2n` times inside one `fori_loop` (each
iteration's input depends on the last output, so nothing is hoisted or overlapped) and takes the
difference, in which compilation, dispatch and the loop's own start cancel out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp

from benchmarks.report import best_seconds, median_seconds


def _chained(fn: Callable, count: int) -> Callable:
    """x, *rest -> x after `count` calls of fn(x, *rest), each feeding a trace of its output into x."""
    def body(_, x, rest):
        out = fn(x, *rest)
        return x + (jnp.mean(out.astype(jnp.float32)) * 1e-6).astype(x.dtype)

    return jax.jit(lambda x, *rest: jax.lax.fori_loop(0, count, lambda i, c: body(i, c, rest), x))


def per_call_seconds(fn: Callable, args: tuple, n: int, repeats: int = 3) -> float:
    """Device seconds per fn(*args) call: (t(2n) - t(n)) / n, each t the median of `repeats` runs
    of a compiled loop of that many calls. Falls back to t(2n) / 2n when noise makes the difference
    non-positive. args[0] is the carried input (a query), the rest are read-only (caches)."""
    timed = []
    for count in (n, 2 * n):
        loop = _chained(fn, count)
        timed.append(median_seconds(lambda: loop(*args).block_until_ready(), repeats))
    marginal = (timed[1] - timed[0]) / n
    return marginal if marginal > 0 else timed[1] / (2 * n)


def device_read_bandwidth(nbytes: int, repeats: int = 10) -> float:
    """Best-of-N bytes/s of a jitted sum over `nbytes` of float32 on the default device."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    return nbytes / best_seconds(lambda: total(x).block_until_ready(), repeats)


def device_name() -> str:
    dev = jax.devices()[0]
    return f"{dev.device_kind} ({dev.platform})"


@dataclass
class Budget:
    """Wall-time shares of the suite: `part(name, share)` opens a part that may run until its share
    of the total has passed since the suite began, plus whatever earlier parts left unused."""
    seconds: float
    start: float = field(default_factory=time.perf_counter)
    used_share: float = 0.0
    deadline: float = 0.0

    def part(self, share: float) -> None:
        self.used_share += share
        self.deadline = self.start + self.used_share * self.seconds

    def expired(self) -> bool:
        return time.perf_counter() > self.deadline

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

"""Bytes on the wire, read from a compiled program's HLO text (DESIGN.md §7).

`collective_bytes(jax.jit(f).lower(*args).compile().as_text())` finds every all-reduce, all-gather,
reduce-scatter, collective-permute and all-to-all (and their async `-start` forms; the matching
`-done` is not counted again), reads each one's result shape(s) and group size, and returns op counts,
payload bytes and per-device wire bytes per kind, with the usual ring formulas (B = the op's result
bytes, n = devices in its replica group):

    all-reduce          2 (n - 1) / n * B
    all-gather          (n - 1) / n * B        (B = the gathered output)
    reduce-scatter      (n - 1) * B            (B = the scattered output)
    all-to-all          (n - 1) / n * B
    collective-permute  B                      (every sending device sends its whole operand once)

Collectives inside a `while` body (a `lax.scan` or `fori_loop`) run once per iteration: their counts
and bytes are multiplied by the loop's `known_trip_count` when the compiler recorded one; otherwise
they count once and the op is listed under "unknown_trip_count". Both branches of a `conditional`
count (an upper bound). XLA:CPU may change collectives (a bf16 reduction run in f32, a reduce-scatter
as all-reduce + slice): the bytes are what *this* compiled program sends.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_WIRE_FACTOR = {  # per-device wire bytes = factor(n) * B
    "all-reduce": lambda n: 2 * (n - 1) / n,
    "all-gather": lambda n: (n - 1) / n,
    "reduce-scatter": lambda n: n - 1,
    "all-to-all": lambda n: (n - 1) / n,
    "collective-permute": lambda n: 1,
}

_COMMENT = re.compile(r"/\*.*?\*/", re.S)
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[^\s(={}]+)\s*(?:\(.*\)\s*->\s*.*)?\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[^\s=]+)\s*=\s*(?P<rest>.*)$")
_COLLECTIVE = re.compile(  # the result type holds no '=' or '"' (metadata strings after the opcode do)
    r"^(?P<type>[^=\"]*?)\s(?P<op>" + "|".join(KINDS) + r")(?P<suffix>-start|-done)?\((?P<args>.*)$")
_ARRAY = re.compile(r"\b(?P<dtype>pred|token|[a-z]+\d+[a-z0-9]*)\[(?P<dims>[0-9,]*)\]")
_CALLED = re.compile(r"\b(?P<attr>body|condition|to_apply|calls|true_computation|false_computation|"
                     r"branch_computations)=(?P<value>\{[^}]*\}|%?[\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)"?')
_NUM_PARTITIONS = re.compile(r"\bnum_partitions=(\d+)")
_REPLICA_COUNT = re.compile(r"\breplica_count=(\d+)")


def dtype_bytes(dtype: str) -> float:
    """Bytes per element of an HLO element type (pred 1, bf16 2, f8e4m3fn 1, s4 0.5, c64 8, ...)."""
    if dtype == "pred":
        return 1
    if dtype == "token":
        return 0
    bits = re.match(r"[a-z]+(\d+)", dtype)
    if not bits:
        raise ValueError(f"unknown HLO element type {dtype!r}")
    return int(bits.group(1)) / 8


def _shapes(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """The array shapes in an HLO type: 'f32[8,4]{1,0}' or a tuple '(u8[2]{0}, f32[4]{0})'."""
    return [(m["dtype"], tuple(int(d) for d in m["dims"].split(",") if d))
            for m in _ARRAY.finditer(type_text)]


def _nbytes(shapes: list[tuple[str, tuple[int, ...]]]) -> float:
    return sum(math.prod(dims) * dtype_bytes(dtype) for dtype, dims in shapes)


def _attribute(args: str, key: str) -> str | None:
    """The text of `key=...` in an instruction's attributes, up to its balanced end."""
    match = re.search(r"\b" + re.escape(key) + r"=", args)
    if not match:
        return None
    start = i = match.end()
    depth = 0
    while i < len(args):
        c = args[i]
        if c in "{[(":
            depth += 1
        elif c in "}])":
            depth -= 1
        elif c == "," and depth == 0:  # `mesh['a'=2,'b'=4] {'a'}`: its commas are all nested
            break
        if depth < 0:
            break
        i += 1
    return args[start:i].strip()


def group_size(args: str, default: int) -> int:
    """Devices per replica group from an instruction's attributes: `{{0,1},{2,3}}`, the iota form
    `[2,4]<=[8]` (2 groups of 4), the mesh form `mesh['x'=2,'y'=4] {'y'}` (the named axes' sizes
    multiplied), or `{}` / absent: `default` (every device)."""
    groups = _attribute(args, "replica_groups")
    if groups is None or groups in ("{}", ""):
        return default
    if groups.startswith("mesh["):
        sizes = {name: int(size) for name, size in re.findall(r"'([^']+)'\s*=\s*(\d+)", groups)}
        axes_text = groups[groups.index("]") + 1:]
        n = 1
        for axis in re.finditer(r"'([^']+)'(?::\((\d+)\)(\d+))?", axes_text):
            n *= int(axis.group(3)) if axis.group(3) else sizes[axis.group(1)]
        return n
    iota = re.match(r"\[(\d+),(\d+)\]<=", groups)
    if iota:
        return int(iota.group(2))
    first = re.match(r"\{\{([^}]*)\}", groups)
    if first:
        return len([d for d in first.group(1).split(",") if d.strip()])
    raise ValueError(f"cannot read replica_groups={groups}")


def _parse(hlo_text: str) -> tuple[dict, dict, str | None]:
    """(instructions: name -> (computation, rest of line), computations: name -> [names], entry)."""
    instructions: dict[str, tuple[str, str]] = {}
    computations: dict[str, list[str]] = {}
    current, entry = None, None
    for line in _COMMENT.sub("", hlo_text).splitlines():
        header = _COMPUTATION.match(line)
        if header and "=" not in line.split("(")[0]:
            current = header["name"]
            computations[current] = []
            if line.lstrip().startswith("ENTRY"):
                entry = current
            continue
        inst = _INSTRUCTION.match(line)
        if inst and current is not None:
            instructions[inst["name"]] = (current, inst["rest"])
            computations[current].append(inst["name"])
    return instructions, computations, entry


def _multipliers(instructions: dict, computations: dict, entry: str | None) -> tuple[dict, set]:
    """How many times each computation runs per program run (known while trip counts multiplied),
    and the computations under a while loop whose trip count is unknown."""
    callers: dict[str, list[tuple[str, int | None]]] = {c: [] for c in computations}
    for computation, rest in instructions.values():
        is_while = bool(re.search(r"\swhile\(", " " + rest))
        trip = _TRIP_COUNT.search(rest) if is_while else None
        for m in _CALLED.finditer(rest):
            for callee in re.findall(r"%?([\w.\-]+)", m["value"]):
                if callee in callers:
                    factor = (int(trip.group(1)) if trip else None) if is_while else 1
                    callers[callee].append((computation, factor))
    memo: dict[str, tuple[int, bool]] = {}

    def visit(c: str, stack: frozenset = frozenset()) -> tuple[int, bool]:
        if c in memo:
            return memo[c]
        if c == entry or not callers[c] or c in stack:
            memo[c] = (1, False)
            return memo[c]
        total, unknown = 0, False
        for parent, factor in callers[c]:
            n, u = visit(parent, stack | {c})
            total += n * (factor or 1)
            unknown |= u or factor is None
        memo[c] = (total, unknown)
        return memo[c]

    counts = {c: visit(c) for c in computations}
    return {c: n for c, (n, _) in counts.items()}, {c for c, (_, u) in counts.items() if u}


def _operands(args: str) -> str:
    """The operand list at the start of `args` (the text after the opcode's opening parenthesis)."""
    depth = 0
    for i, c in enumerate(args):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            if depth == 0:
                return args[:i]
            depth -= 1
    return args


def _done_shapes(instructions: dict) -> dict[str, list]:
    """Async collective start name -> the result shapes of the `-done` that completes it."""
    shapes = {}
    for _, rest in instructions.values():
        done = _COLLECTIVE.match(" " + rest)
        if done and done["suffix"] == "-done":
            for operand in re.findall(r"%?([\w.\-]+)", _operands(done["args"])):
                shapes[operand] = _shapes(done["type"])
    return shapes


def _start_fallback_shapes(kind: str, shapes: list) -> list:
    """Output shapes of an async start whose -done was not found: drop u32[] contexts; a
    (operand, output) pair keeps the output."""
    arrays = [s for s in shapes if s[1] or s[0] not in ("u32", "s32")]
    if kind in ("all-gather", "collective-permute", "reduce-scatter", "all-to-all") and len(arrays) == 2:
        return arrays[1:]
    return arrays


def collective_bytes(hlo_text: str) -> dict[str, Any]:
    """Collectives of a compiled HLO module: per kind the op count ("ops": static, "executions":
    with loop trip counts), "payload_bytes" (result bytes summed over executions) and "wire_bytes"
    (per-device bytes sent, formulas in the module docstring); "total_payload_bytes",
    "total_wire_bytes"; "collectives": one record per op (name, kind, shapes, bytes, group_size,
    executions, wire_bytes); "unknown_trip_count": ops under a loop of unknown trip count."""
    instructions, computations, entry = _parse(hlo_text)
    header = next((line for line in hlo_text.splitlines() if line.startswith("HloModule")), "")
    counts = [int(m.group(1)) for p in (_NUM_PARTITIONS, _REPLICA_COUNT) if (m := p.search(header))]
    default_n = max([1, *counts])  # replica_groups={} means every device
    multipliers, unknown = _multipliers(instructions, computations, entry)
    done_shapes = _done_shapes(instructions)
    records = []
    for name, (computation, rest) in instructions.items():
        m = _COLLECTIVE.match(" " + rest)
        if not m or m["suffix"] == "-done":
            continue
        kind, shapes = m["op"], _shapes(m["type"])
        if m["suffix"] == "-start":
            shapes = done_shapes.get(name) or _start_fallback_shapes(kind, shapes)
        n = None if kind == "collective-permute" else group_size(m["args"], default_n)
        runs = multipliers.get(computation, 1)
        payload = _nbytes(shapes)
        records.append({"name": name, "kind": kind, "async": m["suffix"] == "-start",
                        "shapes": [f"{d}[{','.join(map(str, s))}]" for d, s in shapes],
                        "bytes": payload, "group_size": n, "executions": runs,
                        "wire_bytes": _WIRE_FACTOR[kind](n) * payload * runs,
                        "unknown_trip_count": computation in unknown})
    out: dict[str, Any] = {"ops": {k: 0 for k in KINDS}, "executions": {k: 0 for k in KINDS},
                           "payload_bytes": {k: 0 for k in KINDS}, "wire_bytes": {k: 0.0 for k in KINDS}}
    for r in records:
        out["ops"][r["kind"]] += 1
        out["executions"][r["kind"]] += r["executions"]
        out["payload_bytes"][r["kind"]] += r["bytes"] * r["executions"]
        out["wire_bytes"][r["kind"]] += r["wire_bytes"]
    out["total_payload_bytes"] = sum(out["payload_bytes"].values())
    out["total_wire_bytes"] = sum(out["wire_bytes"].values())
    out["collectives"] = records
    out["unknown_trip_count"] = [r["name"] for r in records if r["unknown_trip_count"]]
    return out


def summary(result: dict[str, Any]) -> str:
    """One JSON line per kind that occurs, for logs and benchmark reports."""
    return "\n".join(json.dumps({"kind": k, "ops": result["ops"][k], "executions": result["executions"][k],
                                 "payload_bytes": result["payload_bytes"][k],
                                 "wire_bytes": result["wire_bytes"][k]})
                     for k in KINDS if result["ops"][k])

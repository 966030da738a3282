"""Where a decode step's time goes: a per-op profile of SmolLM2's greedy decode loop, against the
bytes each op reads, per weight format.

    python -m benchmarks.decode_profile [--batch 1,8] [--weights float32,bfloat16,int8] [--new-tokens 16]
        [--repeats 5] [--quick] [--no-append]

For each batch size and weight format (`quantize.convert_weights`, in the layout decoding uses,
`params.decode_layout`) the decode loop is compiled, timed untraced (median of --repeats), then run
once under `jax.profiler` with a Perfetto trace. XLA:CPU records one event per
executed HLO op (thunk); events are summed per op class and divided by the loop's steps. Each op's
bytes are its operands' and result's sizes, read from the compiled HLO, so GB/s per class sets
what the op moves against the machine's read bandwidth, measured in the same run. Tracing adds a
few microseconds per op: the traced step is slower than the untraced one (both are reported). The
op classes sum to the traced step minus the time during which no op ran, its own row ("between
ops"). Keep --new-tokens small: the profiler keeps a bounded number of events.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import statistics
import tempfile

import jax
import jax.numpy as jnp

from benchmarks.decode import PROMPTS, cpu_extensions
from benchmarks.report import (BANDWIDTH_METHOD, cpu_model, markdown_table, measure_read_bandwidth, parse_decode_flags,
                               publish_report)
from inference import engine, generate
from jaxmodels.cpu_matvec import ATTENTION, TAKE_ROWS
from jaxmodels.params import decode_layout
from jaxmodels.quantize import WEIGHT_FORMATS, convert_weights, weight_bytes
from jaxmodels.weights import LAYER_WEIGHTS

BETWEEN_OPS = "between ops (no op running)"
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "s64": 8}
_NAME = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ")
_OP = re.compile(r"\s*([\w\-]+)\((.*?)\)")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
_CONTAINERS = ("while", "call", "conditional")


def _shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (a tuple counts all its parts)."""
    total = 0
    for dtype, dims in _SHAPE.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES.get(dtype, 4)
    return total


def hlo_ops(hlo: str) -> dict[str, dict]:
    """name -> {op, shape, bytes (result), operands} for every instruction of an optimized HLO module."""
    ops = {}
    for line in hlo.splitlines():
        m = _NAME.match(line)
        if not m:
            continue
        rest, depth = line[m.end():], 0
        for end, ch in enumerate(rest):  # the result shape: one token, or a (nested) tuple
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0 and ch in ") ":
                break
        shape = rest[:end + 1].strip()
        op = _OP.match(rest[end + 1:])
        if op:
            target = re.search(r'custom_call_target="([^"]+)"', line)
            ops[m.group(1)] = {"op": op.group(1), "shape": shape, "bytes": _shape_bytes(shape),
                               "operands": re.findall(r"%([\w.\-]+)", op.group(2)),
                               "target": target.group(1) if target else ""}
    return ops


def classify(name: str, ops: dict[str, dict], weight_shapes: set[str], head_shapes: set[str], cache_shape: str) -> str:
    """The op class of one executed instruction, from its opcode and what it reads."""
    info = ops[name]
    if info.get("target") == TAKE_ROWS:
        return "embedding lookup"
    shapes = {ops[o]["shape"].split("{")[0] for o in info["operands"] if o in ops}
    is_matmul = info["op"] in ("dot", "custom-call") or "dot" in name or "ynn" in name or "xnn" in name
    if head_shapes & shapes and is_matmul:
        return "LM head matmul"
    if shapes & weight_shapes and is_matmul:
        return "weight matmuls"
    if cache_shape in shapes:
        return "cache write" if "dynamic-update-slice" in name or "dynamic_update_slice" in name else "attention"
    if info["op"] in ("copy", "transpose") or name.startswith("copy"):
        return "copies"
    if info["op"] == "fusion":
        return "other fusions (norms, RoPE, SwiGLU, sampling)"
    return f"other ({info['op']})"


def _op_events(trace_dir: str, ops: dict[str, dict]) -> list[tuple[float, float, str]]:
    """(start, end, name) in microseconds of every op the decode loop executed, from a Perfetto
    trace of one `generate` call: the events after the last program launch (the prefill blocks
    before the decode loop is launched; op names repeat across programs), container ops such as
    the while loop left out (their time is their body's)."""
    path = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)[0]
    with gzip.open(path) as f:
        data = json.load(f)
    events = [e for e in (data["traceEvents"] if isinstance(data, dict) else data) if e.get("ph") == "X" and "dur" in e]
    launch = max(e["ts"] for e in events if "ExecuteHelper" in e["name"])
    return [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
            if e["ts"] >= launch and e["name"] in ops and ops[e["name"]]["op"] not in _CONTAINERS]


def wall_time_by_class(events: list[tuple[float, float, str]]) -> dict[str, float]:
    """Microseconds of wall time per class. XLA:CPU runs independent ops on several threads at once;
    each moment is split evenly among the ops running then, so the classes add up to the time during
    which any op ran (never more than the wall time, unlike summed durations)."""
    bounds = sorted({t for start, end, _ in events for t in (start, end)})
    starts = sorted(events)
    out: dict[str, float] = collections.defaultdict(float)
    active: list[tuple[float, str]] = []  # (end, class) of the ops running in the current segment
    i = 0
    for left, right in zip(bounds, bounds[1:]):
        while i < len(starts) and starts[i][0] <= left:
            active.append((starts[i][1], starts[i][2]))
            i += 1
        active = [a for a in active if a[0] > left]
        for _, cls in active:
            out[cls] += (right - left) / len(active)
    return dict(out)


def must_read(config, params, batch: int, positions: float) -> dict[str, float]:
    """Bytes per decode step each op class has to read at least: every matmul weight once, the LM
    head's table, the K and V rows of the `positions` cache positions attention reads per step (all
    rows together), and the new K and V rows it writes."""
    layers = params["layers"]
    matmuls = sum(weight_bytes(lp[s.name]) for lp in layers for s in LAYER_WEIGHTS if s.matmul)
    head = weight_bytes(params["lm_head"] if "lm_head" in params else params["embed"])
    itemsize = jnp.dtype(engine.cache_dtype(params["embed"].dtype)).itemsize
    position = 2 * len(layers) * config.num_key_value_heads * config.head_dim * itemsize
    return {"weight matmuls": matmuls, "LM head matmul": head, "attention": position * positions,
            "cache write": position * batch}


def attended_positions(prompts: list[list[int]], steps: int, cache_len: int, kernel: bool) -> float:
    """Cache positions attention reads per decode step, all rows together, averaged over the loop:
    the CPU kernel (`jaxmodels.cpu_attention`) reads each row's length (prompt + i at step i), the
    jnp path the whole buffer."""
    if not kernel:
        return len(prompts) * cache_len
    return sum(len(p) + (steps + 1) / 2 for p in prompts)


def untraced_step_ms(variants: dict[str, dict], config, prompts: list[list[int]], new_tokens: int,
                     repeats: int) -> dict[str, float]:
    """Median ms per decode step of each variant (name -> parameters), untraced; the variants
    alternate run by run, so a slow spell of a shared machine hits all of them."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(repeats + 1):  # the first round compiles
        for name, params in variants.items():
            seconds = generate(params, config, prompts, new_tokens, eos_token_ids=()).decode_seconds
            if i:
                times[name].append(seconds * 1e3 / (new_tokens - 1))
    return {name: statistics.median(t) for name, t in times.items()}


def profile_decode(params, config, prompts: list[list[int]], new_tokens: int) -> dict:
    """One traced run of `generate` on these parameters: per op class, the wall time (ms per step,
    `wall_time_by_class`) and ops per step, the traced step time, and the bytes each class must
    read. The class BETWEEN_OPS is the traced step's time during which no op ran."""
    run = lambda: generate(params, config, prompts, new_tokens, eos_token_ids=())  # noqa: E731
    engine._COMPILED.clear()  # so that the last decode loop compiled is this one
    run()
    hlo = [exe for key, exe in engine._COMPILED.items() if key[0] == "decode_loop"][-1].as_text()
    ops = hlo_ops(hlo)
    with tempfile.TemporaryDirectory(prefix="decode_trace_") as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            traced = run().decode_seconds
        events = _op_events(trace_dir, ops)
    steps = new_tokens - 1  # the loop decodes every token but the first (picked from the prefill)
    d, f, hd, b = config.hidden_size, config.intermediate_size, config.head_dim, len(prompts)
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    dims = {(d, q), (d, kv), (q, d), (d, f), (f, d)}
    weight_shapes = {f"{dt}[{m},{n}]" for m, n in dims | {(n, m) for m, n in dims} for dt in ("f32", "bf16", "s8")}
    head = {f"{dt}[{m},{n}]" for dt in ("f32", "bf16", "s8")
            for m, n in ((config.vocab_size, d), (d, config.vocab_size))}
    cache = next((o["shape"].split("{")[0] for o in ops.values()
                  if re.fullmatch(rf"\w+\[{b * config.num_key_value_heads},\d+,{hd}\]", o["shape"].split("{")[0])), "")
    cls = {name: classify(name, ops, weight_shapes, head, cache) for name in {e[2] for e in events}}
    wall = wall_time_by_class([(start, end, cls[name]) for start, end, name in events])
    counts = collections.Counter(cls[name] for _, _, name in events)
    classes = {c: (wall[c] / 1e3 / steps, counts[c] / steps) for c in wall}
    traced_ms = traced * 1e3 / steps
    classes[BETWEEN_OPS] = (max(0.0, traced_ms - sum(ms for ms, _ in classes.values())), 0)
    cache_len = int(cache.split(",")[1]) if cache else 0
    positions = attended_positions(prompts, steps, cache_len, kernel=ATTENTION in hlo)
    return {"traced_ms": traced_ms, "classes": classes, "must_read": must_read(config, params, b, positions)}


def _rows(b: int, weights: str, res: dict, bandwidth: float) -> list[list]:
    rows = [[b, weights, "**whole step (untraced / traced)**", "",
             f"{res['untraced_ms']:.2f} / {res['traced_ms']:.2f}", "", "", "", ""]]
    for name, (ms, count) in sorted(res["classes"].items(), key=lambda kv: -kv[1][0]):
        nbytes = res["must_read"].get(name)
        gbs = nbytes / 1e6 / max(ms, 1e-9) if nbytes is not None else None
        rows.append([b, weights, name, "" if name == BETWEEN_OPS else f"{count:.0f}", f"{ms:.2f}",
                     f"{100 * ms / res['traced_ms']:.0f}", "" if nbytes is None else f"{nbytes / 1e6:.1f}",
                     "" if gbs is None else f"{gbs:.1f}", "" if gbs is None else f"{100 * gbs * 1e9 / bandwidth:.0f}"])
    return rows


def run(variants: dict[str, dict], config, prompts, batch_sizes: list[int], new_tokens: int,
        repeats: int) -> tuple[str, dict]:
    """Profile every (batch size, variant): variants maps a weight format to its parameters, in the
    decoding layout. Returns (markdown body, results by (batch, format))."""
    bandwidth = measure_read_bandwidth()
    rows, results = [], {}
    for b in batch_sizes:
        untraced = untraced_step_ms(variants, config, prompts[:b], new_tokens, repeats)
        for name, params in variants.items():
            res = profile_decode(params, config, prompts[:b], new_tokens)
            results[(b, name)] = res = {**res, "untraced_ms": untraced[name]}
            rows += _rows(b, name, res, bandwidth)
            print(*_rows(b, name, res, bandwidth), sep="\n", flush=True)
    header = ["batch", "weights", "op class", "ops per step", "wall ms per step", "% of traced step",
              "MB it must read per step", "GB/s", "% of measured bandwidth"]
    first = next(iter(variants))
    ratio = lambda b, name: results[(b, first)]["untraced_ms"] / results[(b, name)]["untraced_ms"]  # noqa: E731
    speed = "; ".join(f"batch {b}, {name}: {ratio(b, name):.2f}x"
                      for b in batch_sizes for name in variants if name != first)
    body = (markdown_table(header, rows) + f"\n\nSmolLM2-135M-Instruct, greedy, {new_tokens} new tokens per row, the "
            f"decode loop only (prefill excluded), weights in the decoding layout; untraced step = median of "
            f"{repeats} runs, the formats alternating. Wall ms: XLA:CPU runs independent ops on both cores at "
            f"once; each moment's time is split among the ops running then, so the classes add up to the "
            f"traced step (\"{BETWEEN_OPS}\" is the rest). MB it must read: each matmul weight once, the "
            f"head's table, the K/V rows of the positions attention reads (the CPU kernel: each row's length, "
            f"averaged over the loop; the jnp path: whole buffers), the new K/V rows. Measured read bandwidth ({BANDWIDTH_METHOD}): "
            f"{bandwidth / 1e9:.1f} GB/s. CPU: {cpu_model()} ({cpu_extensions()})."
            + (f" Untraced decode-step speed-up over {first}: {speed}." if speed else ""))
    return body, results


def main() -> None:
    from jaxmodels.convert import load_model, smollm2_gguf_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--weights", default="float32,bfloat16,int8",
                        help=f"comma-separated weight formats, of {', '.join(WEIGHT_FORMATS)}")
    args = parse_decode_flags(parser, new_tokens=16)
    formats = args.weights.split(",")
    if bad := [f for f in formats if f not in WEIGHT_FORMATS]:
        parser.error(f"unknown weight format(s) {bad}; choose from {', '.join(WEIGHT_FORMATS)}")
    config, params, tokenizer = load_model(smollm2_gguf_path())
    params = jax.tree_util.tree_map(jnp.asarray, params)
    variants = {f: decode_layout(convert_weights(params, f)) for f in formats}  # converted once, as a service would
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    batch_sizes = [int(b) for b in args.batch.split(",")]
    body, _ = run(variants, config, prompts, batch_sizes, args.new_tokens, args.repeats)
    print(body)
    if not args.no_append:
        command = (f"python -m benchmarks.decode_profile --batch {args.batch} --weights {args.weights} "
                   f"--new-tokens {args.new_tokens} --repeats {args.repeats}")
        publish_report("Decode step profile: SmolLM2-135M per op class (CPU)", command, body)


if __name__ == "__main__":
    main()

"""Weight matmuls of a decode step by weight format: does this CPU read bf16 / int8 weights faster?

    python -m benchmarks.matvec_dtypes [--rows 1,8] [--steps 16] [--repeats 5] [--quick] [--no-append]

A weight-only format pays off in decoding only if the matmul reads the smaller weights at about the
speed float32 is read; converting them to float32 first (in the loop, or hoisted out of it) costs
the bytes back. This isolates that question from the rest of the model: SmolLM2-135M's 210 layer
matmul weights (the GGUF's values), in each format as `convert_weights` + `decode_layout` store them
for decoding, multiplied through `layers.dense` (the model's one matmul) inside a `fori_loop` of
`--steps` iterations, as the decode loop runs them, once through XLA's dot and once through the CPU
decode kernel (`jaxmodels.cpu_matvec`) where it applies. Per row: ms per step, GB/s of the bytes the
format stores, time relative to float32 through XLA, and whether the compiled loop converts weights
inside its body or carries converted (float32) weights hoisted out of it. Variants alternate within
each repeat.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import time
from typing import Iterator

import jax
import jax.numpy as jnp

from benchmarks.decode import cpu_extensions
from benchmarks.report import (BANDWIDTH_METHOD, command_line, cpu_model, markdown_table, measure_read_bandwidth,
                               publish_report)
from jaxmodels import cpu_matvec
from jaxmodels.convert import load_model, smollm2_gguf_path
from jaxmodels.layers import dense
from jaxmodels.params import decode_layout
from jaxmodels.quantize import WEIGHT_FORMATS, Int8Weight, convert_weights, weight_bytes
from jaxmodels.weights import FACTORIZABLE

TITLE = "Decode-step weight matmuls by weight format (CPU)"


def layer_matmuls(params: dict, weights: str) -> list[dict]:
    """Each layer's matmul weights only, in `weights` format and the decoding layout."""
    out = decode_layout(convert_weights(params, weights))
    return [{k: v for k, v in layer.items() if k in FACTORIZABLE} for layer in out["layers"]]


def step_program(steps: int):
    """A jitted loop of `steps` passes through every layer's weight matmuls, chained as the model
    chains them (q, k, v from the residual; o from q; gate, up from the residual; down from up),
    each output normalized so no value drifts to zero or infinity over the loop."""
    def one_pass(layers, x):
        for layer in layers:
            acts = {x.shape[-1]: x}
            for w in _chain_order(layer):  # [m, n]: reads the latest activation of width m
                y = dense(w, acts[w.shape[0]])
                norm = jax.lax.rsqrt(jnp.mean(jnp.square(y.astype(jnp.float32))) + 1e-6)
                acts[w.shape[-1]] = y * norm.astype(y.dtype)
            x = acts[x.shape[-1]]
        return x
    return jax.jit(lambda layers, x: jax.lax.fori_loop(0, steps, lambda _, x: one_pass(layers, x), x))


def _chain_order(layer: dict) -> list:
    """The layer's weights in an order where each one's input width has been produced before."""
    pending, order, widths = list(layer), [], {layer[FACTORIZABLE[0]].shape[0]}
    while pending:
        name = next(k for k in pending if layer[k].shape[0] in widths)
        pending.remove(name)
        order.append(layer[name])
        widths.add(layer[name].shape[-1])
    return order


def _weight_arrays(layer: dict) -> list[jax.Array]:
    """The layer's weight matrices as stored, without int8 scales (2-D too: one row per group)."""
    return [w for v in layer.values() for w in jax.tree_util.tree_leaves(v.q if isinstance(v, Int8Weight) else v)]


def converts_in_loop(program, layers: list[dict], x: jax.Array) -> tuple[bool, bool]:
    """From the optimized HLO: (the loop body, or anything it calls, converts weight-sized
    arrays: paid every step; the loop carries float32 copies of narrower weights: the conversion
    was hoisted out of the loop, which then reads float32 bytes)."""
    hlo = program.lower(layers, x).compile().as_text()
    big = min(w.size for layer in layers for w in _weight_arrays(layer))
    weight_sized = lambda text, dtype: any(  # noqa: E731
        int(a) * int(b) >= big for a, b in re.findall(dtype + r"\[([0-9]+),([0-9]+)\]", text))
    computations, name = {}, None
    for line in hlo.splitlines():
        if line and not line.startswith(" "):
            name = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
        computations.setdefault(name, []).append(line)
    while_line = next((ln for ln in hlo.splitlines() if " while(" in ln), "")
    todo, seen = re.findall(r"body=%([\w.-]+)", while_line), set()
    while todo:  # the body and every computation it calls
        comp = todo.pop()
        if comp not in seen:
            seen.add(comp)
            callees = r"(?:calls|to_apply|body)=%([\w.-]+)"
            todo += [c for ln in computations.get(comp, []) for c in re.findall(callees, ln)]
    in_body = any(" convert(" in ln and weight_sized(ln.split(" convert(")[0], r"\w+")
                  for comp in seen for ln in computations.get(comp, []))
    narrow = any(w.dtype != jnp.float32 for layer in layers for w in jax.tree_util.tree_leaves(layer))
    return in_body, narrow and weight_sized(while_line.split(" while(")[0], "f32")


@contextlib.contextmanager
def matmul_path(path: str) -> Iterator[None]:
    """Trace `layers.dense` through the CPU decode kernel ("kernel", where it applies) or through
    XLA's dot only ("xla": the kernel's row limits emptied)."""
    limits = cpu_matvec.MAX_ROWS
    cpu_matvec.MAX_ROWS = limits if path == "kernel" else {}
    try:
        yield
    finally:
        cpu_matvec.MAX_ROWS = limits


def _timings(programs: dict, layers: dict, inputs: dict, variants: list[tuple[str, str]], repeats: int) -> dict:
    """{(format, path, steps): seconds per call}, every program traced under its path and warmed
    up first, variants and step counts alternating within each repeat (drift on a shared machine
    hits all alike)."""
    for f, path in variants:
        with matmul_path(path):
            for program in programs[path].values():
                jax.block_until_ready(program(layers[f], inputs[f]))
    times: dict = {}
    for _ in range(repeats):
        for n in programs["xla"]:
            for f, path in variants:
                t0 = time.perf_counter()
                jax.block_until_ready(programs[path][n](layers[f], inputs[f]))
                times.setdefault((f, path, n), []).append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def run(params: dict, formats: list[str], rows: list[int], steps: int, repeats: int) -> tuple[str, dict]:
    """Per (format, matmul path, rows): the marginal ms per step (a loop of 2 x steps less one of
    steps, over steps) and the fixed ms per call (whatever does not grow with steps: a conversion
    hoisted out of the loop). The markdown table and {(format, path, rows): (ms per step, fixed ms)}."""
    paths = ["xla", "kernel"] if cpu_matvec.available() else ["xla"]
    variants = [(f, path) for f in formats for path in paths]
    programs = {path: {n: step_program(n) for n in (steps, 2 * steps)} for path in paths}
    layers = {f: layer_matmuls(params, f) for f in formats}
    stored = {f: weight_bytes(layers[f]) for f in formats}
    per_rows = {r: _timings(programs, layers, {f: _input(layers[f], r, f) for f in formats}, variants, repeats)
                for r in rows}
    bandwidth = measure_read_bandwidth()
    table, result = [], {}
    for r in rows:
        t = per_rows[r]
        step = {v: max(t[(*v, 2 * steps)] - t[(*v, steps)], 1e-9) / steps for v in variants}
        for f, path in variants:
            v = (f, path)
            fixed = max(t[(*v, steps)] - steps * step[v], 0.0)
            result[(f, path, r)] = (step[v] * 1e3, fixed * 1e3)
            with matmul_path(path):
                in_body, hoisted = converts_in_loop(programs[path][steps], layers[f], _input(layers[f], r, f))
                kernel = cpu_matvec.applies(_first_weight(layers[f]), _input(layers[f], r, f))
            table.append([f, "CPU kernel" if kernel else "XLA dot", r, stored[f] / 1e6, step[v] * 1e3,
                          stored[f] / step[v] / 1e9, 100 * stored[f] / step[v] / bandwidth,
                          step[v] / step[variants[0]], fixed * 1e3,
                          "yes" if in_body else "no", "yes (the loop reads float32)" if hoisted else "no"])
            print(table[-1], flush=True)
    header = ["weights", "matmul", "rows", "stored MB", "ms per step", "GB/s of stored bytes", "% of measured bandwidth",
              f"step time / {formats[0]} XLA", "fixed ms per call", "converts weights in the loop",
              "float32 copies hoisted out of the loop"]
    body = (markdown_table(header, table) + f"\n\nSmolLM2-135M-Instruct's 210 layer matmul weights (LM head and "
            f"attention excluded) as `convert_weights` + `decode_layout` store them, through `layers.dense` in a "
            f"`fori_loop`: with XLA's dot only, and where it applies (`cpu_matvec.MAX_ROWS`) with the CPU decode "
            f"kernel (`jaxmodels.cpu_matvec`). ms per step: (time of {2 * steps} steps - time of {steps}) / {steps}; "
            f"fixed ms per call: the rest of a {steps}-step call. Median of {repeats}, variants and loop lengths "
            f"alternating. Measured read bandwidth ({BANDWIDTH_METHOD}): {bandwidth / 1e9:.1f} "
            f"GB/s. CPU: {cpu_model()} ({cpu_extensions()}). The last two columns are read from each loop's "
            f"compiled HLO.")
    return body, result


def _first_weight(layers: list[dict]) -> jax.Array:
    """The first layer's first matmul weight as `cpu_matvec` sees it (int8 values, output-major)."""
    w = layers[0][FACTORIZABLE[0]]
    w = getattr(w, "q", w)
    return getattr(w, "wt", w)


def _input(layers: list[dict], rows: int, weights: str) -> jax.Array:
    return jnp.full((rows, layers[0][FACTORIZABLE[0]].shape[0]), 0.01,
                    jnp.bfloat16 if weights == "bfloat16" else jnp.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=",".join(WEIGHT_FORMATS), help="formats, float32 first")
    parser.add_argument("--rows", default="1,8", help="rows per matmul (the decode batch)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 steps, 1 repeat, nothing appended")
    parser.add_argument("--no-append", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    formats, rows = args.weights.split(","), [int(r) for r in args.rows.split(",")]
    if formats[0] != "float32" or not set(formats) <= set(WEIGHT_FORMATS):
        parser.error(f"--weights: float32 first, then any of {WEIGHT_FORMATS}")
    steps, repeats = (2, 1) if args.quick else (args.steps, args.repeats)
    _, params, _ = load_model(smollm2_gguf_path())
    body, _ = run(jax.tree_util.tree_map(jnp.asarray, params), formats, rows, steps, repeats)
    print(body)
    if not (args.no_append or args.quick):
        publish_report(TITLE, command_line("benchmarks.matvec_dtypes"), body)


if __name__ == "__main__":
    main()

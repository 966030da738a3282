"""Decode rate against the machine's read bandwidth, round by round: which weight format stops scaling.

    python -m benchmarks.decode_scaling [--rounds 12] [--new-tokens 128] [--weights float32,bfloat16,int8]
        [--no-append]

A shared VM's read bandwidth moves (31-61 GB/s within minutes on a 2-core EPYC, 2026-12-04). Each
round reads it (`report.bandwidth_reader`, best of 3) and then times one greedy decode of SmolLM2
per weight format (batch 1, one prompt, the decode loop's rate). One row per round, sorted by
bandwidth: each format's tokens/s, its share of that round's bandwidth, and its rate over float32's
in the same round. A format whose rate stays flat while the bandwidth rises is bound by its compute
or its fixed costs per step, not by memory; its ratio to float32 then falls as the bandwidth rises.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp

from benchmarks.decode import PROMPTS, cpu_extensions
from benchmarks.report import BANDWIDTH_METHOD, bandwidth_reader, cpu_model, markdown_table, publish_report
from inference import generate
from jaxmodels.convert import load_model, smollm2_gguf_path
from jaxmodels.model import unstack_layers
from jaxmodels.params import decode_layout
from jaxmodels.quantize import WEIGHT_FORMATS, convert_weights, weight_bytes


def rounds(formats: list[str], n_rounds: int, new_tokens: int) -> list[dict]:
    """Per round: the bandwidth (bytes/s) read first, then each format's decode tokens/s."""
    config, params, tokenizer = load_model(smollm2_gguf_path())
    reference = unstack_layers(jax.tree_util.tree_map(jnp.asarray, params))
    prompt = [tokenizer.encode(PROMPTS[0])]
    ours = {w: decode_layout(convert_weights(reference, w)) for w in formats}
    read = bandwidth_reader()
    decode = lambda w: generate(ours[w], config, prompt, new_tokens, eos_token_ids=()).decode_tokens_per_second  # noqa: E731
    for w in formats:
        decode(w)  # compile
    out = []
    for _ in range(n_rounds):
        bandwidth = read(3)
        out.append({"bandwidth": bandwidth, **{w: decode(w) for w in formats}})
        print(f"{bandwidth / 1e9:.1f} GB/s: " + ", ".join(f"{w} {out[-1][w]:.1f} tok/s" for w in formats), flush=True)
    out.sort(key=lambda r: r["bandwidth"])
    return [{**r, "bytes": {w: weight_bytes(ours[w]) for w in formats}} for r in out]


def table(results: list[dict], formats: list[str]) -> str:
    """One row per round (by bandwidth), then the medians over the slower and faster halves of the rounds."""
    def row(label, rs):
        cells = [label, statistics.median(r["bandwidth"] for r in rs) / 1e9]
        for w in formats:
            cells += [statistics.median(r[w] for r in rs),
                      100 * statistics.median(r["bytes"][w] * r[w] / r["bandwidth"] for r in rs)]
            if w != formats[0]:
                cells.append(statistics.median(r[w] / r[formats[0]] for r in rs))
        return cells
    half = len(results) // 2
    rows = [row(f"round {i + 1}", [r]) for i, r in enumerate(results)]
    rows += [row("median, slower half", results[:half]), row("median, faster half", results[half:])]
    header = ["round (by bandwidth)", "bandwidth GB/s"]
    for w in formats:
        header += [f"{w} tok/s", f"{w} % of bandwidth"] + ([f"{w} / {formats[0]}"] if w != formats[0] else [])
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--weights", default="float32,bfloat16,int8",
                        help="comma-separated weight formats, float32 first (the others are compared with it)")
    parser.add_argument("--no-append", action="store_true", help="do not write BENCHMARKS.md")
    args = parser.parse_args()
    formats = args.weights.split(",")
    if formats[0] != "float32" or not set(formats) <= set(WEIGHT_FORMATS) or args.rounds < 2:
        parser.error(f"--weights: float32 first, then any of {WEIGHT_FORMATS}; --rounds at least 2")
    results = rounds(formats, args.rounds, args.new_tokens)
    body = (table(results, formats) + f"\n\nSmolLM2-135M-Instruct, batch 1, one prompt, {args.new_tokens} new tokens, "
            f"greedy; tokens/s of the decode loop. Each round reads the bandwidth ({BANDWIDTH_METHOD}) and then "
            f"decodes once per format; the % and ratios compare calls of the same round. CPU: {cpu_model()} "
            f"({cpu_extensions()}).")
    print(body)
    if not args.no_append:
        command = (f"python -m benchmarks.decode_scaling --rounds {args.rounds} --new-tokens {args.new_tokens} "
                   f"--weights {args.weights}")
        publish_report("Decode rate against bandwidth: SmolLM2-135M, round by round (CPU)", command, body)


if __name__ == "__main__":
    main()

"""Cached attention on CPU: SmolLM2's decode step with the CPU attention kernel against the jnp path.

    python -m benchmarks.cpu_attention [--batch 1,8] [--weights float32,bfloat16,int8] [--context 0,896]
        [--new-tokens 64] [--repeats 3] [--quick] [--no-append]

`generate(attention_impl="auto")` runs cached attention through `jaxmodels.cpu_attention` on CPU
(one call per layer, reading each row's keys and values up to its length); "reference" runs the jnp
path (`jaxmodels.attention.gqa_attention`: several ops over the whole buffer). Both run in one
process, alternating call by call, so a slow spell of a shared machine hits both. ms per decode
step = decode seconds / (new tokens - 1), median of --repeats; greedy tokens compared. --context
pads each prompt to that many tokens (0: the prompts as they are), since the jnp path's cost grows
with the buffer and the kernel's with the rows' lengths.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp

from benchmarks.decode import PROMPTS, cpu_extensions
from benchmarks.report import cpu_model, markdown_table, parse_decode_flags, publish_report
from inference import generate
from jaxmodels.params import decode_layout
from jaxmodels.quantize import WEIGHT_FORMATS, convert_weights

IMPLS = ("auto", "reference")


def step_ms(params, config, prompts: list[list[int]], new_tokens: int, repeats: int) -> tuple[dict, bool]:
    """Median ms per decode step of each attention impl, alternating; and whether their tokens agree."""
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    tokens = {}
    for i in range(repeats + 1):  # the first round compiles
        for impl in IMPLS:
            res = generate(params, config, prompts, new_tokens, eos_token_ids=(), attention_impl=impl)
            tokens[impl] = res.tokens
            if i:
                times[impl].append(res.decode_seconds * 1e3 / (new_tokens - 1))
    return {impl: statistics.median(t) for impl, t in times.items()}, tokens["auto"] == tokens["reference"]


def padded(prompts: list[list[int]], context: int) -> list[list[int]]:
    """Each prompt repeated to `context` tokens (unchanged when 0)."""
    return prompts if not context else [(p * (context // len(p) + 1))[:context] for p in prompts]


def run(variants: dict, config, prompts, batch_sizes: list[int], contexts: list[int], new_tokens: int,
        repeats: int) -> str:
    rows = []
    for context in contexts:
        for b in batch_sizes:
            for name, params in variants.items():
                ms, same = step_ms(params, config, padded(prompts[:b], context), new_tokens, repeats)
                rows.append([name, b, context or "prompts", f"{ms['reference']:.2f}", f"{ms['auto']:.2f}",
                             f"{ms['reference'] / ms['auto']:.2f}", "yes" if same else "NO"])
                print(rows[-1], flush=True)
    header = ["weights", "batch", "prompt tokens", "jnp path ms / step", "CPU kernel ms / step",
              "step speed-up", "same greedy tokens"]
    return (markdown_table(header, rows) + f"\n\nSmolLM2-135M-Instruct, greedy, {new_tokens} new tokens per row, "
            f"decode steps only (prefill excluded), weights in the decoding layout, median of {repeats}, the two "
            f"paths alternating call by call. CPU: {cpu_model()} ({cpu_extensions()}).")


def main() -> None:
    from jaxmodels.convert import load_model, smollm2_gguf_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--weights", default="float32,bfloat16,int8", help=f"of {', '.join(WEIGHT_FORMATS)}")
    parser.add_argument("--context", default="0,896", help="comma-separated prompt lengths (0: as they are)")
    args = parse_decode_flags(parser, new_tokens=64)
    formats = args.weights.split(",")
    if bad := [f for f in formats if f not in WEIGHT_FORMATS]:
        parser.error(f"unknown weight format(s) {bad}; choose from {', '.join(WEIGHT_FORMATS)}")
    config, params, tokenizer = load_model(smollm2_gguf_path())
    params = jax.tree_util.tree_map(jnp.asarray, params)
    variants = {f: decode_layout(convert_weights(params, f)) for f in formats}
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    body = run(variants, config, prompts, [int(b) for b in args.batch.split(",")],
               [int(c) for c in args.context.split(",")], args.new_tokens, args.repeats)
    print(body)
    if not args.no_append:
        command = (f"python -m benchmarks.cpu_attention --batch {args.batch} --weights {args.weights} "
                   f"--context {args.context} --new-tokens {args.new_tokens} --repeats {args.repeats}")
        publish_report("Cached attention on CPU: the kernel vs the jnp path (SmolLM2 decode step)", command, body)


if __name__ == "__main__":
    main()

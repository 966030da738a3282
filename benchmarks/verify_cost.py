"""What one verification pass costs: a decoder layer and the shared exit over T tokens per row.

    python -m benchmarks.verify_cost [--preset default] [--max-tokens 8] [--no-append]

Self-speculation pays only if running layers [E, L) over d + 1 tokens costs little more than over
one. Per batch size, this times a decoder layer (over a half-full KV cache) and the shared exit for
T = 1..max tokens per row with `inference.calibrate.measure_decode_costs`, two ways:

  streamed  every layer of the model in turn (distinct weights, read from memory as decoding does)
  cached    layer 0 again and again (its weights stay in the CPU caches; what calibration times)

and prints each cost relative to T = 1. Random weights of the preset's shape (costs do not depend on
the values). A ratio near 1 means the pass is memory-bound and verification is nearly free.
"""

from __future__ import annotations

import argparse

import jax

from benchmarks.report import publish_report, command_line, markdown_table
from benchmarks.train_step import model_config
from inference.calibrate import measure_decode_costs
from jaxmodels.model import init_params


def cost_rows(preset: str, max_tokens: int, batch_sizes=(1, 8)) -> list[list]:
    config = model_config(preset)
    params = init_params(config, jax.random.key(0))
    L, rows = config.num_hidden_layers, []
    for b in batch_sizes:
        streamed = measure_decode_costs(params, config, b, max_tokens, layers=L)
        cached = measure_decode_costs(params, config, b, max_tokens, layers=1)
        for t in range(1, max_tokens + 1):
            rows.append([b, t, round(streamed.layer[t - 1] * 1e6, 1), round(streamed.layer[t - 1] / streamed.layer[0], 2),
                         round(cached.layer[t - 1] / cached.layer[0], 2), round(streamed.head[t - 1] / streamed.head[0], 2)])
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="default", help="training preset whose model shape is timed")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    rows = cost_rows(args.preset, args.max_tokens)
    body = (f"Model shape of the `{args.preset}` preset. Costs relative to one token per row (T = 1); "
            "the absolute column is CPU time, for scale only.\n\n"
            + markdown_table(["batch", "tokens per row T", "layer us (streamed)", "layer vs T=1 (streamed)",
                              "layer vs T=1 (cached)", "exit vs T=1"], rows))
    print(body)
    if not args.no_append:
        publish_report("Verification cost: a decoder layer over T tokens per row (CPU)",
                      command_line("benchmarks.verify_cost"), body)


if __name__ == "__main__":
    main()

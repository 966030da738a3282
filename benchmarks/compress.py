"""Low-rank compression of SmolLM2-135M: parameters, held-out perplexity and batch-1 decode speed.

    python -m benchmarks.compress [--ratios 0.5,0.375,0.25,0.125] [--energies 0.95,0.9,0.8]
        [--whitened-ratios 0.5,0.375,0.25] [--calib-tokens 8192]
        [--full-rank-layers 0] [--eval-tokens 16384] [--new-tokens 128] [--repeats 3] [--quick] [--no-append]

Each setting factorizes every layer's matmul weights by truncated SVD (`training.compress`, ranks
rounded up to a multiple of 8; a weight whose rank would not save parameters stays dense), plain or
whitened by the Gram of each weight's inputs on stdlib train-split text (`training.whiten`), and is
measured without any healing fine-tune: parameters, float32 weight bytes, perplexity on the stdlib
held-out split under SmolLM2's tokenizer, and greedy decode tokens/s at batch 1 (decode-only rate of
`inference.generate`, median of --repeats after a compile warm-up). Decoding at batch 1 reads every
weight once per token, so fewer bytes should decode faster; the tied 49152 x 576 embedding / LM head
(28 M of the 135 M parameters) is never factorized and bounds the gain.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Sequence

import jax
import jax.numpy as jnp

from benchmarks.report import command_line, markdown_table, publish_report
from inference import generate
from jaxmodels.convert import load_model
from jaxmodels.model import unstack_layers
from training.compress import calibration_grams, choose_ranks, compress, heldout_perplexity, param_bytes

PROMPT = "def quicksort(items):\n    \"\"\"Sort a list with quicksort.\"\"\"\n"
TITLE = "Low-rank compression: SmolLM2-135M by SVD, no healing (CPU)"


def decode_rate(config, params, prompt: list[int], new_tokens: int, repeats: int) -> float:
    """Median decode-only tokens/s of greedy batch-1 generation (one warm-up call compiles)."""
    params = unstack_layers(jax.tree_util.tree_map(jnp.asarray, params))
    run = lambda: generate(params, config, [prompt], new_tokens, eos_token_ids=())  # noqa: E731
    run()
    return statistics.median(run().decode_tokens_per_second for _ in range(repeats))


def settings(ratios: Sequence[float], energies: Sequence[float],
             whitened: Sequence[float] = ()) -> list[tuple[str, str | None, float, bool]]:
    """(label, method, value, whitened) for the dense baseline and every requested setting."""
    return ([("dense", None, 0.0, False)] + [(f"rank ratio {r:g}", "rank_ratio", r, False) for r in ratios]
            + [(f"energy {e:g}", "energy", e, False) for e in energies]
            + [(f"whitened, rank ratio {r:g}", "rank_ratio", r, True) for r in whitened])


def run(model: str, ratios: list[float], energies: list[float], full_rank_layers: int, eval_tokens: int,
        new_tokens: int, repeats: int, whitened: Sequence[float] = (), calib_tokens: int = 8192
        ) -> tuple[str, list[dict]]:
    """Measure every setting; returns (markdown table + notes, one dict per row)."""
    config, params, tok = load_model(model, progress=True)
    prompt = tok.encode(PROMPT)
    grams = calibration_grams(config, params, tok, calib_tokens) if whitened else None
    results = []
    for label, method, value, whiten in settings(ratios, energies, whitened):
        g = grams if whiten else None
        variants, kept = (None, []) if method is None else choose_ranks(
            config, params, method, value, full_rank_layers=full_rank_layers, grams=g)
        c, p = compress(config, params, variants, grams=g) if method is not None else (config, params)
        row = dict(setting=label, params=c.num_params(), mb=param_bytes(p) / 1e6, kept_dense=len(kept),
                   perplexity=heldout_perplexity(c, p, tok, eval_tokens),
                   tok_s=decode_rate(c, p, prompt, new_tokens, repeats))
        row["speedup"] = row["tok_s"] / results[0]["tok_s"] if results else 1.0
        results.append(row)
        print(row, flush=True)
    header = ["setting", "parameters (M)", "weights (MB)", "weights left dense", "held-out perplexity",
              "decode tok/s (batch 1)", "vs dense"]
    rows = [[r["setting"], r["params"] / 1e6, r["mb"], r["kept_dense"], r["perplexity"], r["tok_s"],
             f"{r['speedup']:.2f}x"] for r in results]
    verdict = _verdict(results)
    body = (markdown_table(header, rows) + f"\n\n{model}, float32, layers [{full_rank_layers}, L) factorized, "
            f"ranks rounded up to multiples of 8; "
            + (f"whitened rows: Grams over {calib_tokens} stdlib train-split tokens; " if whitened else "")
            + f"perplexity over {eval_tokens} stdlib held-out tokens; "
            f"{new_tokens} new tokens from a {len(prompt)}-token prompt, median of {repeats}. No fine-tune "
            f"after compression (a healing run: `python -m training.train init_from=DIR`). {verdict}")
    return body, results


def _verdict(results: list[dict]) -> str:
    """The decode target (>= 1.3x) and what each setting that reaches it costs in perplexity."""
    dense = results[0]["perplexity"]
    fast = [r for r in results[1:] if r["speedup"] >= 1.3]
    if not fast:
        return "Target (>= 1.3x decode): not met by any setting."
    costs = ", ".join(f"{r['setting']} ({r['speedup']:.2f}x, perplexity {r['perplexity']:.3g} = "
                      f"{r['perplexity'] / dense:.3g}x dense)" for r in fast)
    broken = [r for r in fast if r["perplexity"] > 10 * dense]
    note = (" Every one of them leaves the model unusable without a healing fine-tune (perplexity over"
            " 10x dense)."
            if len(broken) == len(fast) else "")
    return f"Target (>= 1.3x decode): reached by {costs}.{note}"


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--ratios", default="0.5,0.375,0.25,0.125")
    p.add_argument("--energies", default="0.95,0.9,0.8")
    p.add_argument("--whitened-ratios", default="0.5,0.375,0.25")
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--full-rank-layers", type=int, default=0)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one setting, few tokens, nothing written (smoke test)")
    p.add_argument("--no-append", action="store_true", help="do not write BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.quick:
        args.ratios, args.energies, args.eval_tokens, args.new_tokens, args.repeats = "0.25", "", 256, 8, 1
        args.whitened_ratios, args.calib_tokens = "0.25", 256
        args.no_append = True
    body, _ = run(args.model, _floats(args.ratios), _floats(args.energies), args.full_rank_layers,
                  args.eval_tokens, args.new_tokens, args.repeats, _floats(args.whitened_ratios), args.calib_tokens)
    print(body)
    if not args.no_append:
        publish_report(TITLE, command_line("benchmarks.compress", argv), body)


if __name__ == "__main__":
    main()

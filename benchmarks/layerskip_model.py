"""LayerSkip self-speculative decoding vs transformers' early-exit assisted generation (CPU).

    python -m benchmarks.layerskip_model [--model smollm2] [--exit-layers 8,16,24] [--draft-len 4]
        [--new-tokens 64] [--repeats 3] [--quick] [--no-append]

Same float32 weights on both sides (ours exported to a Hugging Face folder for
`transformers.LlamaForCausalLM`), same prompt token ids (the first lines of four pure-Python stdlib
functions, read with `inspect.getsource`), batch 1 (transformers' assisted generation only supports
batch 1), greedy, EOS an ordinary token so every call makes exactly `new_tokens` tokens. Per exit
layer E it measures four decoders:

  1. ours plain greedy            `generate(params, config, [prompt], n)`
  2. ours self-speculative        `generate(..., speculative=SpecConfig(E, d, adaptive=False))`:
                                  draft with layers [0, E), verify with [E, L), one shared KV cache
  3. transformers plain greedy    `model.generate(ids, do_sample=False)`
  4. transformers early exit      `model.generate(ids, assistant_early_exit=E)` with the draft
                                  length fixed at d (see `_fix_hf_draft_length`)

tokens/s = generated tokens / wall time of the whole generate calls over all prompts (prefill +
decode), median of `repeats` after one warm-up pass (which also compiles, for JAX). Also reported:
our acceptance rate and whether each decoder's output is token-identical to its own plain greedy
output (and ours plain to transformers plain).
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp

from benchmarks.report import publish_report, markdown_table, parse_decode_flags
from inference import generate
from inference.speculative import SpecConfig
from jaxmodels.convert import load_model, save_hf_checkpoint
from jaxmodels.model import unstack_layers

PAD = 2  # any id works: batch 1 has no padding; it only silences transformers' pad warning


def code_prompts(lines: int = 8) -> list[str]:
    """The first `lines` lines of four pure-Python stdlib functions (fixed for one Python version;
    none of them is in the calibration text of `inference.calibrate`)."""
    import colorsys
    import fnmatch
    import heapq
    import shutil
    functions = [shutil.copyfileobj, heapq.nsmallest, colorsys.rgb_to_hsv, fnmatch.translate]
    return ["".join(inspect.getsource(f).splitlines(keepends=True)[:lines]) for f in functions]


def _timed(fn: Callable[[], list], repeats: int) -> tuple[float, list]:
    """(median seconds of `fn()` after one warm-up call, the outputs of the last call)."""
    out = fn()  # warm-up (and compile, for JAX)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds used so far by all processes, by this one); None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    t = os.times()
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK"), t.user + t.system


def _others_share(start: tuple[float, float] | None, wall: float) -> float:
    """Share of the machine's CPU time that other processes used since `start`."""
    end = _cpu_seconds()
    if start is None or end is None:
        return 0.0
    return max(0.0, (end[0] - start[0]) - (end[1] - start[1])) / (wall * (os.cpu_count() or 1))


def _fix_hf_draft_length(hf_model, draft_len: int) -> None:
    """Make transformers draft exactly `draft_len` tokens per round, like `adaptive=False` here.

    In transformers 5.x the candidate generator reads `num_assistant_tokens`,
    `num_assistant_tokens_schedule` and `assistant_confidence_threshold` from the *assistant's*
    stored `generation_config` (for early exit: the model itself); the same names passed to
    `generate()` are ignored. Left unset they default to 20 tokens cut short whenever the draft's
    probability falls below 0.4, which is not the (E, d) setting we compare against.
    """
    gc = hf_model.generation_config
    gc.num_assistant_tokens, gc.num_assistant_tokens_schedule = draft_len, "constant"
    gc.assistant_confidence_threshold = 0.0  # 0 disables the confidence stopping criterion


def _same(a: list[list[int]], b: list[list[int]]) -> tuple[bool, str]:
    hits = sum(x == y for x, y in zip(a, b))
    return hits == len(a), f"{hits}/{len(a)}"


def _span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}-{hi:.2f}"


def compare_with_transformers(model: str, exit_layers: list[int], draft_len: int, new_tokens: int,
                              repeats: int, prompts: list[str] | None = None) -> tuple[str, list[dict]]:
    """Markdown body (table + notes) and one raw dict per exit layer."""
    import torch
    import transformers
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    config, params, tokenizer = load_model(model)
    if tokenizer is None:
        raise ValueError(f"{model} carries no tokenizer; the prompts are text")
    texts = code_prompts() if prompts is None else prompts
    ids = [tokenizer.encode(t) for t in texts]
    with tempfile.TemporaryDirectory(prefix="layerskip_hf_") as hf_dir:  # ~0.5 GB: do not leave it
        save_hf_checkpoint(hf_dir, config, params)
        hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    # EOS is an ordinary token on both sides (not masked, not stopping): every call makes exactly
    # new_tokens tokens (min_new_tokens would mask EOS and change transformers' greedy choice).
    hf_model.generation_config.eos_token_id = None
    _fix_hf_draft_length(hf_model, draft_len)
    ours_params = unstack_layers(jax.tree_util.tree_map(jnp.asarray, params))

    def ours(spec: SpecConfig | None):
        return [generate(ours_params, config, [p], new_tokens, eos_token_ids=(), speculative=spec)
                for p in ids]

    def theirs(**kwargs):
        outs = []
        with torch.no_grad():
            for p in ids:
                x = torch.tensor([p])
                out = hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                        do_sample=False, pad_token_id=PAD, **kwargs)
                outs.append(out[0, len(p):].tolist())
        return outs

    n_tokens = len(ids) * new_tokens
    t_ours, ours_plain = _timed(lambda: ours(None), repeats)
    ours_plain = [r.tokens[0] for r in ours_plain]
    t_hf, hf_plain = _timed(theirs, repeats)
    plain_same, plain_frac = _same(ours_plain, hf_plain)
    tps_ours, tps_hf = n_tokens / t_ours, n_tokens / t_hf
    rows, table = [], []
    for e in exit_layers:
        t_spec, spec_res = _timed(lambda: ours(SpecConfig(e, draft_len, adaptive=False)), repeats)
        t_ee, hf_ee = _timed(lambda: theirs(assistant_early_exit=e), repeats)
        drafted, accepted = sum(r.drafted for r in spec_res), sum(r.accepted for r in spec_res)
        spec_same, spec_frac = _same([r.tokens[0] for r in spec_res], ours_plain)
        ee_same, ee_frac = _same(hf_ee, hf_plain)
        row = dict(exit_layer=e, draft_len=draft_len, ours_plain=tps_ours, ours_spec=n_tokens / t_spec,
                   hf_plain=tps_hf, hf_early_exit=n_tokens / t_ee, acceptance=accepted / max(drafted, 1),
                   spec_identical=spec_same, hf_early_exit_identical=ee_same, plain_matches_hf=plain_same)
        row["ratio"] = row["ours_spec"] / row["hf_early_exit"]
        rows.append(row)
        table.append([e, row["ours_plain"], row["ours_spec"], row["hf_plain"], row["hf_early_exit"],
                      row["ratio"], row["ours_spec"] / row["ours_plain"],
                      row["hf_early_exit"] / row["hf_plain"], f"{100 * row['acceptance']:.0f}%",
                      spec_frac, ee_frac, plain_frac])
        print(table[-1], flush=True)
    header = ["exit layer E", "ours plain tok/s", "ours spec tok/s", "transformers plain tok/s",
              "transformers early-exit tok/s", "ours spec / transformers early-exit",
              "ours spec / ours plain", "transformers early-exit / plain", "our acceptance",
              "ours spec == ours plain", "transformers early-exit == plain", "ours plain == transformers plain"]
    body = (markdown_table(header, table) +
            f"\n\n{model} ({config.num_hidden_layers} layers) float32, batch 1, greedy, draft length "
            f"{draft_len} fixed on both sides (ours `adaptive=False`; transformers "
            f"`num_assistant_tokens={draft_len}`, schedule `constant`, confidence threshold off), "
            f"{len(ids)} stdlib-code prompts x {new_tokens} new tokens, median of {repeats}. "
            f"Identity columns count prompts whose tokens match exactly. "
            f"This model is not LayerSkip-trained: its early exits rarely agree with the last layer, "
            f"so acceptance is low and both self-speculative decoders are expected to be slower than "
            f"plain decoding here (measured: ours {_span([t[6] for t in table])}x of our plain speed, "
            f"transformers {_span([t[7] for t in table])}x of theirs); the ours / transformers ratio "
            f"compares two implementations of the same algorithm, not a speed-up over plain decoding.")
    others = _others_share(cpu0, time.perf_counter() - wall0)
    if others > 0.1:  # torch's thread pool slows down 10x and more when it shares the cores
        body += (f" WARNING: other processes used {100 * others:.0f}% of the machine's CPU time during "
                 f"this run: these timings are not reliable.")
    return body, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--exit-layers", default="8,16,24", help="comma-separated exit layers E")
    parser.add_argument("--draft-len", type=int, default=4)
    args = parse_decode_flags(parser, new_tokens=64)
    exits = [int(e) for e in args.exit_layers.split(",") if e.strip()]
    body, _ = compare_with_transformers(args.model, exits, args.draft_len, args.new_tokens, args.repeats)
    print(body)
    if not args.no_append:
        command = (f"python -m benchmarks.layerskip_model --model {args.model} --exit-layers "
                   f"{args.exit_layers} --draft-len {args.draft_len} --new-tokens {args.new_tokens} "
                   f"--repeats {args.repeats}")
        publish_report(f"LayerSkip self-speculation: {args.model}, jaxmodels vs transformers early exit (CPU)",
                      command, body)


if __name__ == "__main__":
    main()

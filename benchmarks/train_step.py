"""Training throughput and model FLOP utilization: jaxmodels vs PyTorch + transformers, same CPU, one run.

    python -m benchmarks.train_step [--steps 5] [--shapes default,smollm2-135m] [--quick] [--no-torch]
        [--no-append]

For each model shape (the `default` training preset, and the SmolLM2-135M shape from the
`smollm2-135m` preset) both sides build the same Llama (random weights), take the same batch of
token ids and run full training steps: forward, next-token cross-entropy, backward, global-norm
clipping and AdamW, all float32. Ours is `training.step` jit-compiled (compilation excluded: one
warm-up step on both sides); theirs is `transformers.LlamaForCausalLM` with `torch.optim.AdamW`.

tokens/s = batch x seq_len / median step time. Model FLOPs per token, the usual convention (PaLM
appendix B, MaxText with the causal-attention halving): 6·N for the matmul parameters N (the
embedding lookup is free; a tied embedding counts once, as the LM head) plus 6·L·T·(H·hd) for causal
attention (QKᵀ and PV, forward + backward, half of the T×T scores needed). MFU = model FLOPs/s over
the machine's peak, measured in the same run as the best fp32 matmul rate (N×N @ N×N).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.report import publish_report, command_line, best_seconds, markdown_table, median_seconds
from jaxmodels.config import LlamaConfig
from jaxmodels.model import init_params
from jaxmodels.weights import matmul_param_count
from training.config import OptimizerSection, ScheduleSection, load_config
from training.step import build_steps

# per shape: (preset, batch, seq_len); SmolLM2 uses a CPU-sized batch, not its preset's 32 x 512
SHAPES = {"default": ("default", 16, 256), "smollm2-135m": ("smollm2-135m", 4, 256)}
QUICK = {"default": ("tiny", 8, 64), "smollm2-135m": ("tiny", 8, 64)}


def model_config(preset: str) -> LlamaConfig:
    cfg = load_config(preset)
    m = cfg.model
    return LlamaConfig(vocab_size=cfg.data.vocab_size, hidden_size=m.hidden_size,
                       intermediate_size=m.intermediate_size, num_hidden_layers=m.num_hidden_layers,
                       num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_key_value_heads,
                       head_dim=m.head_dim, max_position_embeddings=max(m.max_position_embeddings, 2048),
                       rms_norm_eps=m.rms_norm_eps, rope_theta=m.rope_theta,
                       tie_word_embeddings=m.tie_word_embeddings, bos_token_id=None, eos_token_id=0)


def flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """6·N (matmul parameters, from the weight table: factorized weights at their rank) +
    6·L·T·(H·hd) (causal attention), forward + backward."""
    n = matmul_param_count(config)
    attention = 6 * config.num_hidden_layers * seq_len * config.num_attention_heads * config.head_dim
    return 6.0 * n + attention


def peak_flops(n: int = 4096, repeats: int = 5) -> float:
    """Best fp32 matmul FLOP/s on this machine (all cores), the MFU denominator."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    return 2.0 * n**3 / best_seconds(lambda: mm(a).block_until_ready(), repeats)


def jax_step_time(config: LlamaConfig, tokens: np.ndarray, steps: int) -> float:
    """Median seconds per training step of `training.step` (one device, float32)."""
    fns = build_steps(config, OptimizerSection(lr=1e-3), ScheduleSection(warmup_steps=1), 1000)
    params = init_params(config, jax.random.PRNGKey(0))
    opt_state = fns.optimizer.init(params)
    step_fn = jax.jit(fns.train_step, donate_argnums=(0, 1))
    batch = {"inputs": jnp.asarray(tokens[None, :, :-1]), "targets": jnp.asarray(tokens[None, :, 1:])}
    rng = jax.random.PRNGKey(1)
    state = {"params": params, "opt": opt_state, "i": 0}

    def one() -> None:
        state["params"], state["opt"], m = step_fn(state["params"], state["opt"], batch, rng,
                                                   jnp.int32(state["i"]))
        m["loss"].block_until_ready()
        state["i"] += 1

    return median_seconds(one, steps)


def torch_step_time(config: LlamaConfig, tokens: np.ndarray, steps: int) -> float:
    """Median seconds per training step of transformers' LlamaForCausalLM + torch AdamW (float32)."""
    import torch
    import transformers

    hf = config.to_hf_dict()
    hf.pop("rope_parameters", None)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf)).float().train()
    n_torch = sum(p.numel() for p in model.parameters())
    if n_torch != config.num_params():  # same shape on both sides, or the comparison means nothing
        raise RuntimeError(f"transformers model has {n_torch} parameters, ours {config.num_params()}")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.from_numpy(tokens[:, :-1].astype(np.int64))
    labels = torch.from_numpy(tokens[:, 1:].astype(np.int64))

    def one() -> None:
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return median_seconds(one, steps)


def run(shapes: list[str], steps: int, quick: bool, with_torch: bool) -> str:
    peak = peak_flops(1024 if quick else 4096)
    print(f"peak fp32 matmul: {peak / 1e9:.1f} GFLOP/s", file=sys.stderr)
    rows = []
    for name in shapes:
        preset, batch, seq = (QUICK if quick else SHAPES)[name]
        config = model_config(preset)
        tokens = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq + 1)).astype(np.int32)
        fpt = flops_per_token(config, seq)
        sides = [("jaxmodels (JAX)", jax_step_time)] + ([("PyTorch + transformers", torch_step_time)]
                                                        if with_torch else [])
        for side, timer in sides:
            seconds = timer(config, tokens, steps)
            tok_s = batch * seq / seconds
            label = f"{name} (quick: tiny preset)" if quick else name
            rows.append([label, f"{config.num_params() / 1e6:.1f}M", f"{batch}x{seq}", side,
                         f"{seconds * 1e3:.0f}", f"{tok_s:,.0f}", f"{100 * fpt * tok_s / peak:.1f}%"])
            print(" | ".join(rows[-1]), file=sys.stderr)
    table = markdown_table(["shape", "params", "batch x seq", "framework", "step ms", "tokens/s", "MFU"], rows)
    return (f"{table}\n\nMFU denominator: {peak / 1e9:.1f} GFLOP/s (best fp32 {1024 if quick else 4096}² "
            f"matmul, same run). Steps: median of {steps} after one warm-up; float32, AdamW, clip 1.0.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per side (median reported)")
    p.add_argument("--shapes", default="default,smollm2-135m", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--quick", action="store_true", help="tiny shapes and 2 steps: checks that it runs")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch side")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = p.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        p.error(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}")
    steps = 2 if args.quick else args.steps
    body = run(shapes, steps, args.quick, not args.no_torch)
    print(body)
    if not args.no_append and not args.quick:
        publish_report("Training step: tokens/s and MFU, jaxmodels vs PyTorch",
                      command_line("benchmarks.train_step", argv), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

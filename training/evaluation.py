"""Held-out evaluation and the end of a run: final evaluation, export, sample, decode report.

The final evaluation covers `run.eval_batches` held-out batches like the ones during training
(0 = the whole held-out split) and shows a progress bar; every other end-of-run phase (export, sample,
decode report) prints what it is doing and how long it took (`training.metrics.phase`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np
from tqdm import tqdm

from jaxmodels.config import LlamaConfig
from jaxmodels.convert.hf import save_hf_checkpoint
from jaxmodels.convert.tokenizer import Tokenizer
from jaxmodels.model import Params
from training import layerskip, parallel
from training.config import TrainConfig
from training.data import DataSet
from training.metrics import DivergenceError, MetricsLog, phase, is_primary

EvalFn = Callable[[Params, int, str | None], dict[str, Any]]


def num_heldout_batches(data: DataSet, batch_size: int, max_batches: int) -> int:
    """How many batches `DataSet.heldout_batches(batch_size, max_batches)` yields."""
    n = -(-data.heldout.num_blocks // batch_size)
    return min(n, max_batches) if max_batches else n


def heldout_batches(data: DataSet, batch_size: int, max_batches: int, shardings: dict,
                    desc: str | None = None) -> Iterator[dict]:
    """Held-out {inputs, targets, weights} batches, placed with their shardings; with `desc`, a bar."""
    batches = data.heldout_batches(batch_size, max_batches)
    if desc:
        batches = tqdm(batches, total=num_heldout_batches(data, batch_size, max_batches), desc=desc,
                       unit="batch", leave=False, dynamic_ncols=True)
    for blocks, weights in batches:
        batch = {"inputs": blocks[:, :-1], "targets": blocks[:, 1:], "weights": weights}
        yield parallel.put(batch, shardings)


def evaluate(eval_step, params: Params, data: DataSet, batch_size: int, max_batches: int,
             shardings: dict, desc: str | None = None) -> dict[str, float]:
    """Held-out loss (mean per token), perplexity and next-token accuracy."""
    total = {"loss": 0.0, "correct": 0.0, "tokens": 0.0}
    for batch in heldout_batches(data, batch_size, max_batches, shardings, desc):
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


def log_final_eval(ev: dict[str, Any], step: int, log: MetricsLog) -> None:
    log.write({"split": "heldout", "step": step, "final": True, **ev})
    log.echo(f"held-out: loss {ev['loss']:.4f}, perplexity {ev['perplexity']:.2f}, accuracy "
             f"{ev['accuracy']:.4f} over {ev['tokens']:,} tokens")
    if "exit_agreement" in ev:
        log.echo("per exit (layer 1..L): held-out loss " + " ".join(f"{x:.2f}" for x in ev["exit_loss"])
                 + "; top-1 agreement with the last layer " + " ".join(f"{x:.2f}" for x in ev["exit_agreement"]))


def finish(cfg: TrainConfig, params: Params, model_config: LlamaConfig, data: DataSet, eval_fn: EvalFn,
           log: MetricsLog, to_model: Callable[[Params], Params] | None = None) -> dict[str, Any]:
    """Final held-out evaluation (`run.eval_batches`), export to RUN_DIR/model, a generated sample.
    `to_model` converts the training state's params to the model's layout (pipeline stages)."""
    run_dir, run = Path(cfg.run.out_dir), cfg.run
    ev = eval_fn(params, run.eval_batches, "final held-out evaluation" if run.progress else None)
    log_final_eval(ev, run.steps, log)
    host_params = jax.device_get(params if to_model is None else to_model(params))
    if not all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(host_params)):
        raise DivergenceError("the trained parameters hold NaN or Inf values; the model was not exported. "
                              "Lower optimizer.lr or raise schedule.warmup_steps")
    if not is_primary():  # process 0 exports, samples and reports; the others are done
        return ev
    with phase(f"exporting the model to {run_dir / 'model'}"):
        save_hf_checkpoint(run_dir / "model", model_config, host_params)
        data.tokenizer.save(run_dir / "model")
    if run.sample_tokens > 0:
        with phase(f"generating a {run.sample_tokens}-token sample"):
            sample = generate_sample(host_params, model_config, data.tokenizer, run.sample_prompt,
                                     run.sample_tokens, run.sample_temperature, run.sample_top_k, run.seed)
        if sample is not None:
            (run_dir / "sample.txt").write_text(sample)
            log.echo("sample:\n" + sample)
    if cfg.layerskip.enabled and run.decode_report:
        with phase("decode report: plain vs self-speculative decoding on held-out code (calibrates first)"):
            ev["decode"] = report_decoding(host_params, model_config, data, log)
    return ev


def report_decoding(params: Params, config: LlamaConfig, data: DataSet, log: MetricsLog) -> dict:
    """Plain vs self-speculative greedy decoding on held-out code (E and d from calibration)."""
    blocks = [b for b, _ in data.heldout_batches(8, 1)][0]
    calibration, prompts = [list(map(int, b[:64])) for b in blocks[4:]], [list(map(int, b[:64])) for b in blocks[:4]]
    report = layerskip.decode_report(params, config, calibration, prompts, note=log.echo)
    log.write({"split": "decode", **report})
    for name, r in report.items():
        note = " (calibration found plain decoding faster at this batch size)" if r["calibration_prefers_plain"] else ""
        log.echo(f"decoding held-out code, {name}: plain {r['plain_tokens_per_second']} tok/s, self-speculative "
                 f"(E={r['exit_layer']}, d={r['draft_len']}) {r['self_speculative_tokens_per_second']} "
                 f"tok/s = {r['speedup']}x, acceptance {r['acceptance_rate']}, identical tokens: {r['identical']}{note}")
    return report

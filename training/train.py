"""Train a Llama-family model: `python -m training.train [--preset NAME | --config FILE] [key=value ...]`.

    python -m training.train                                   # default preset: stdlib corpus, ~6 min on 2 CPU cores
    python -m training.train --preset tiny run.steps=20        # seconds
    python -m training.train init_from=PATH                    # fine-tune an imported checkpoint
    python -m training.train init_from=smollm2                 # ... e.g. SmolLM2-135M-Instruct (GGUF)
    python -m training.train --check run.steps=5000            # validate everything, train nothing
    python -m training.train --help-keys                       # every config key and its default

RUN_DIR (`run.out_dir`) receives `config.yaml`, `metrics.jsonl` (one JSON record per train step and
per evaluation), `checkpoints/` (Orbax), `model/` (the final model, Hugging Face format + tokenizer,
loadable by `jaxmodels.convert.load.load_model` and `python -m inference.generate --model RUN_DIR`),
`sample.txt` and `summary.json`; `run.sync_to=gs://...` keeps a copy of it there during the run and
starts from that copy on a machine that has none (training/mirror.py). If RUN_DIR has checkpoints the run resumes from the newest complete
one (`--resume` says so explicitly and fails if there is none); the metrics after that step are
dropped from `metrics.jsonl`, so the file always describes one continuous run. Raising `run.steps`
extends a run, also a finished one (the schedule rule: `training.resume.resume_config`).

Low rank (`lowrank.method=pufferfish|cuttlefish`, training/lowrank.py): the loop switches once to
the factorized model (SVD, step rebuilt and recompiled), records it in RUN_DIR/lowrank.json and the
metrics (`split: lowrank`), and a resume after the switch restores the low-rank tree.

Pipeline stages (`mesh.stage` > 1, training/pipeline_step.py) keep the state in stage layout;
with `pipeline.acsgd=true` the step is `training.acsgd_train.AcsgdStep`, which takes the batch's
example ids and keeps AC-SGD's per-example memory beside the checkpoints. Each process reads only
its own rows of every batch (`parallel.global_train_batch`).

Reliability: one run per RUN_DIR (`training.runlock`); a NaN/Inf loss or gradient norm stops the run
before anything is saved or exported (`training.metrics.check_finite`); SIGTERM and Ctrl-C save a
checkpoint at the next step boundary and exit (`training.interrupt`). Exit codes: 0 done, 2 a user
error (`error: ...` on one line), 3 diverged, 130 SIGINT, 143 SIGTERM.
"""

from __future__ import annotations

if __name__ == "__main__":  # Ctrl-C while JAX imports (seconds): exit 130 at once, no traceback
    import os, signal, sys  # noqa: E401
    signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write("\ninterrupted\n"), os._exit(130)))

import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxmodels.config import LlamaConfig
from jaxmodels.model import Params
from jaxmodels.weights import matmul_param_count
from training import acsgd_train, layerskip, lowrank, parallel, pipeline_step
from training.checkpoint import Checkpointer
from training.config import ConfigError, TrainConfig, dump_yaml
from training.resume import schedule_steps
from training.run_state import check_resumable, initial_state, load_init, model_config_for
from training.data import DataPosition, DataSet, prepare_data, split_batch
from training.evaluation import evaluate, finish, heldout_batches
from training.interrupt import Interrupted, StopSignals, quit_at_once_on_signal
from training.metrics import DivergenceError, MetricsLog, Progress, check_finite, is_primary, phase
from training.mirror import RunMirror
from training.runlock import RunLock, prepare_run_dir
from training.step import StepFns, build_steps, next_token_loss


# --------------------------------------------------------------------------- the run
def train(cfg: TrainConfig, *, resume: bool = False, devices: list | None = None) -> dict[str, Any]:
    """Run (or resume, or extend) one training run, holding RUN_DIR's lock throughout; returns the
    summary also written to RUN_DIR/summary.json. Raises ConfigError/DataError/CheckpointError for
    user mistakes, DivergenceError, and Interrupted on SIGINT/SIGTERM (after a checkpoint)."""
    parallel.check_batch(parallel.make_mesh(cfg.mesh, devices), cfg.run.batch_size // cfg.optimizer.grad_accum)
    run_dir = prepare_run_dir(cfg.run.out_dir)
    with RunLock(run_dir, enabled=jax.process_index() == 0, note=MetricsLog.echo):
        with RunMirror.open(cfg.run.sync_to, run_dir, MetricsLog.echo) as mirror:  # copied at the end
            return _train(cfg, run_dir, resume, devices, mirror.push)


def _open_checkpoints(cfg: TrainConfig, run_dir: Path, resume: bool,
                      on_complete: Callable[[], None]) -> tuple[TrainConfig, Checkpointer | None]:
    """The Checkpointer (None when disabled) and the config to train with, checked for resuming."""
    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save,
                        on_complete=on_complete) if cfg.checkpoint.enabled else None
    saved_steps = ckpt.steps() if ckpt is not None else []
    if saved_steps:  # before loading data or reading any arrays, so a changed config is named key by key
        cfg = check_resumable(cfg, run_dir, saved_steps[-1])
    elif resume:
        raise ConfigError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}")
    return cfg, ckpt


def _model_and_data(cfg: TrainConfig, log: MetricsLog) -> tuple[LlamaConfig, Params | None, DataSet]:
    imported, tok = None, None
    if cfg.init_from:
        with phase(f"loading init_from={cfg.init_from}"):
            model_config, imported, tok = load_init(cfg.init_from)
        if cfg.run.seq_len > model_config.max_position_embeddings:
            raise ConfigError(f"run.seq_len={cfg.run.seq_len} is longer than the context of init_from="
                              f"{cfg.init_from} ({model_config.max_position_embeddings} positions)")
        log.echo("init_from: the checkpoint defines the model shape and tokenizer")
    t0 = time.time()
    with phase(f"preparing the data ({cfg.data.source}: corpus, tokenizer, tokens; cached after the first run)"):
        data = prepare_data(cfg.data, cfg.run.seq_len, cfg.run.seed, tokenizer=tok)
    if not cfg.init_from:
        model_config = model_config_for(cfg, data.tokenizer)
    log.echo(f"data: {cfg.data.source}: {len(data.corpus.train)} train / {len(data.corpus.heldout)} held-out "
             f"documents, {len(data.train.stream):,} / {len(data.heldout.stream):,} tokens, vocab "
             f"{data.tokenizer.vocab_size} ({time.time() - t0:.1f}s)")
    return model_config, imported, data


def _train(cfg: TrainConfig, run_dir: Path, resume: bool, devices: list | None,
           on_checkpoint: Callable[[], None]) -> dict[str, Any]:
    t_start = time.time()
    log = MetricsLog(run_dir / "metrics.jsonl")
    cfg, ckpt = _open_checkpoints(cfg, run_dir, resume, on_checkpoint)
    try:
        model_config, imported, data = _model_and_data(cfg, log)
        model_config, imported, switched = _lowrank_resume(cfg, run_dir, ckpt, model_config, imported, log)
        setup = _setup(cfg, model_config, imported, devices, ckpt, log)
        setup.update(model_config=model_config, switched=switched)
        train_step, eval_fn = _compile(cfg, model_config, data, setup, log)
        params, seconds = _loop(cfg, data, train_step, eval_fn, setup, ckpt, log)
        model_config, eval_fn = setup["model_config"], setup.get("eval_fn", eval_fn)
    except KeyboardInterrupt:
        raise  # quit at once: an unfinished save leaves a tmp folder that the next start removes
    except BaseException:
        if ckpt is not None:
            with quit_at_once_on_signal():  # a second Ctrl-C while the stop's checkpoint is written
                ckpt.close()
        raise
    if ckpt is not None:
        ckpt.close()
    to_model = None  # pipeline stages: the model's layout, whole on every process, for the export
    if cfg.mesh.stage > 1:
        to_model = jax.jit(setup["layout"].to_model, out_shardings=parallel.replicated(setup["mesh"]))
    ev = finish(cfg, params, model_config, data, eval_fn, log, to_model)
    return _summary(cfg, ev, setup["start"], t_start, seconds, model_config, log)


def make_fns(cfg: TrainConfig, model_config: LlamaConfig, mesh: Mesh | None = None) -> StepFns:
    """The step functions for this model config: LayerSkip's loss or next-token loss, plus the
    Frobenius decay of factorized weights when `lowrank.frobenius_decay` > 0 (after the switch);
    with `mesh.stage` > 1 the pipelined step (training/pipeline.py)."""
    total, dtype, remat = schedule_steps(cfg), jnp.dtype(cfg.model.compute_dtype), cfg.model.remat
    if cfg.mesh.stage > 1:
        return pipeline_step.build_steps(cfg, model_config, mesh, total)
    if cfg.layerskip.enabled:
        base = layerskip.make_loss(model_config, cfg.layerskip, total, dtype, remat)
    else:
        def base(params, batch, rng, step):
            return next_token_loss(params, model_config, batch, rng, step, compute_dtype=dtype, remat=remat)
    decay = cfg.lowrank.frobenius_decay
    loss_fn = base
    if decay > 0 and model_config.layer_variants is not None:
        def loss_fn(params, batch, rng, step):
            loss, aux = base(params, batch, rng, step)
            return loss + 0.5 * decay * lowrank.frobenius_decay(params), aux
    return build_steps(model_config, cfg.optimizer, cfg.schedule, total, cfg.model.compute_dtype, remat, loss_fn)


def _lowrank_resume(cfg: TrainConfig, run_dir: Path, ckpt: Checkpointer | None, model_config: LlamaConfig,
                    imported: Params | None, log: MetricsLog) -> tuple[LlamaConfig, Params | None, bool]:
    """A resume from a checkpoint after the low-rank switch trains the low-rank model: the model
    config gets the recorded `layer_variants` before any state is built or restored."""
    steps = ckpt.steps() if ckpt is not None and cfg.lowrank.enabled else []
    found = lowrank.resume_variants(run_dir, steps[-1] if steps else None)
    if found is None:
        return model_config, imported, False
    log.echo(f"lowrank: the run switched to low rank at step {found[0]}; resuming low-rank")
    return model_config.replace(layer_variants=found[1]), None, True


def _setup(cfg: TrainConfig, model_config: LlamaConfig, imported: Params | None, devices: list | None,
           ckpt: Checkpointer | None, log: MetricsLog) -> dict[str, Any]:
    """Mesh, step functions and state: fresh, imported, or restored from the newest complete checkpoint."""
    run, opt = cfg.run, cfg.optimizer
    mesh = parallel.make_mesh(cfg.mesh, devices)
    parallel.check_batch(mesh, run.batch_size // opt.grad_accum)
    total = schedule_steps(cfg)
    fns = make_fns(cfg, model_config, mesh)
    layout = pipeline_step.StageLayout(pipeline_step.spec_for(cfg)) if cfg.mesh.stage > 1 else parallel.ModelLayout()
    state, param_sh, opt_sh = initial_state(cfg, model_config, fns, mesh, imported, layout)
    start, position, run_dir, history = 0, DataPosition(), Path(run.out_dir), []
    restored = ckpt.restore_latest(state) if ckpt is not None else None
    if restored is not None:
        start, state, meta = restored
        position = DataPosition.from_dict(meta["data_position"])
        history = meta.get("lowrank_history", [])
        log.echo(f"resumed from {run_dir / 'checkpoints' / str(start)} (step {start}, data {position})")
    if is_primary():
        dump_yaml(cfg, run_dir / "config.yaml")
    log.truncate_after(start)
    log.echo(f"model: {model_config.num_params() / 1e6:.2f}M parameters, {model_config.num_hidden_layers} "
             f"layers, d={model_config.hidden_size}; mesh {dict(mesh.shape)}; batch {run.batch_size} x "
             f"{run.seq_len} tokens ({opt.grad_accum} micro-batches); {run.steps} steps"
             + (f" (schedules over {total})" if total != run.steps else ""))
    return {"mesh": mesh, "fns": fns, "state": state, "param_sh": param_sh, "opt_sh": opt_sh, "layout": layout,
            "start": start, "position": position, "lowrank_history": history}


def _compile(cfg: TrainConfig, model_config: LlamaConfig, data: DataSet, setup: dict[str, Any],
             log: MetricsLog):
    """The train step compiled ahead of time, and `eval_fn(params, max_batches, desc)`."""
    run, opt, mesh, state = cfg.run, cfg.optimizer, setup["mesh"], setup["state"]
    bsh, micro = parallel.batch_sharding(mesh), run.batch_size // opt.grad_accum
    with phase("compiling the train step"):
        example = parallel.put(split_batch(np.zeros((run.batch_size, run.seq_len + 1), np.int32),
                                           opt.grad_accum), bsh)
        if cfg.pipeline.acsgd:  # two programs (exact first passes, compressed) and the host memory
            train_step = acsgd_train.build(cfg, setup, example, data.train.num_blocks, log.echo)
        else:
            train_step = parallel.jit_train_step(setup["fns"].train_step, mesh, setup["param_sh"], setup["opt_sh"]
                                                 ).lower(state["params"], state["opt_state"], example, state["rng"],
                                                         jnp.int32(0)).compile()
    eval_step = parallel.jit_eval_step(setup["fns"].eval_step, mesh, setup["param_sh"])
    eval_sh = parallel.eval_batch_shardings(mesh)
    eval_fn = lambda p, n, desc=None: evaluate(eval_step, p, data, micro, n, eval_sh, desc)  # noqa: E731
    if cfg.layerskip.enabled:  # held-out loss and agreement with the last layer at every exit
        exit_step = parallel.jit_eval_step(
            lambda p, b: layerskip.exit_eval_sums(setup["layout"].to_model(p), model_config, b["inputs"],
                                                  b["targets"], b["weights"]),
            mesh, setup["param_sh"])
        plain_eval = eval_fn
        eval_fn = lambda p, n, desc=None: {**plain_eval(p, n, desc), **layerskip.evaluate_exits(  # noqa: E731
            exit_step, p, heldout_batches(data, micro, n, eval_sh, desc and desc + " (per exit)"))}
    return train_step, eval_fn


def _flush(progress: Progress, pending: list, log: MetricsLog, last_saved: int | None) -> None:
    """Write the pending step records, then stop the run if any of them diverged."""
    records = [dict(step=s, **{k: float(v) for k, v in m.items()}) for s, m in jax.device_get(pending)]
    progress.update(records[-1]["step"], records, log)
    pending.clear()
    check_finite(records, last_saved)


def _rollback(ckpt: Checkpointer | None, target: dict[str, Any], err: DivergenceError, log: MetricsLog,
              progress: Progress) -> tuple[int, dict[str, Any], DataPosition]:
    """Restore the newest checkpoint after a divergence (re-raises `err` if there is none)."""
    restored = None
    if ckpt is not None:
        ckpt.wait()
        restored = ckpt.restore_latest(target)
    if restored is None:
        raise err
    step, state, meta = restored
    log.truncate_after(step)
    log.write({"split": "skipped", "step": err.step, "rolled_back_to": step})
    progress.rewind(step)
    log.echo(f"step {err.step} diverged: rolled back to the checkpoint at step {step}; the batch of step "
             f"{err.step} will be skipped")
    return step, state, DataPosition.from_dict(meta["data_position"])


def _lowrank_due(cfg: TrainConfig, setup: dict[str, Any], state: dict[str, Any], step: int,
                 log: MetricsLog) -> Any:
    """The variants to switch to before step `step` + 1 (or None); a Cuttlefish stable-rank
    measurement taken now is logged as `split: stable_rank` (plotted in colab/lowrank.ipynb)."""
    if setup["switched"] or not cfg.lowrank.enabled:
        return None
    history = setup["lowrank_history"]
    seen = len(history)
    variants = lowrank.due(cfg.lowrank, setup["model_config"], state["params"], step, setup)
    if len(history) > seen:
        log.write({"split": "stable_rank", **history[-1]})
    return variants


def _loop(cfg: TrainConfig, data: DataSet, train_step, eval_fn, setup: dict[str, Any],
          ckpt: Checkpointer | None, log: MetricsLog) -> tuple[Params, float]:
    """The training loop, from `setup['start']` to run.steps; returns (params, training seconds).
    A divergence rolls back to the last checkpoint and skips the bad batch, `run.divergence_retries` times."""
    run, opt, step, position = cfg.run, cfg.optimizer, setup["start"], setup["position"]
    bsh, state = parallel.batch_sharding(setup["mesh"]), dict(setup["state"])
    progress = Progress(run.steps, step, run.batch_size * run.seq_len, enabled=run.progress)
    pending: list[tuple[int, Any]] = []
    last_saved, skips, retries = step or None, {}, run.divergence_retries
    with StopSignals() as stop:
        while step < run.steps:
            variants = _lowrank_due(cfg, setup, state, step, log)
            if variants is not None:  # log what the full-rank steps did, then switch and recompile once
                if pending:
                    _flush(progress, pending, log, last_saved)
                train_step, eval_fn = _switch(cfg, data, state, step, variants, setup, log)
                setup["eval_fn"] = eval_fn
            for _ in range(skips.get(step + 1, 0)):  # batches that made this step diverge before
                _, position = data.train_ids(position, run.batch_size)
            ids, position = data.train_ids(position, run.batch_size)  # this process reads only its rows:
            batch = parallel.global_train_batch(ids, opt.grad_accum, run.seq_len, data.train_blocks, bsh)
            state["params"], state["opt_state"], metrics = train_step(
                state["params"], state["opt_state"], batch, state["rng"], jnp.int32(step),
                **({"ids": ids} if cfg.pipeline.acsgd else {}))
            done, stopping = step + 1, stop.agreed()
            pending.append((done, metrics))
            save_now = ckpt is not None and (done % cfg.checkpoint.every == 0 or done == run.steps or stopping)
            eval_now = run.eval_every and done % run.eval_every == 0 and done != run.steps and not stopping
            # flush before every checkpoint and evaluation: a diverged model is never saved or evaluated
            if done % run.log_every == 0 or done == run.steps or save_now or eval_now or stopping:
                try:
                    _flush(progress, pending, log, last_saved)
                except DivergenceError as err:
                    if retries == 0 or stopping:
                        raise
                    retries -= 1
                    pending.clear()
                    step, state, position = _rollback(ckpt, state, err, log, progress)
                    if cfg.pipeline.acsgd:
                        train_step.restore(Path(run.out_dir), step, log.echo)
                    setup["lowrank_history"][:] = [h for h in setup["lowrank_history"] if h["step"] < step]
                    skips[err.step] = skips.get(err.step, 0) + 1
                    continue
            if eval_now:
                ev = eval_fn(state["params"], run.eval_batches)
                log.write({"split": "heldout", "step": done, **ev})
                progress.note(f"held-out loss {ev['loss']:.3f} ppl {ev['perplexity']:.1f} acc {ev['accuracy']:.3f}")
            if save_now:
                ckpt.save(done, state, {"data_position": position.to_dict(),
                                        "lowrank_history": list(setup["lowrank_history"])})
                if cfg.pipeline.acsgd:
                    train_step.save(Path(run.out_dir), done, cfg.checkpoint.keep)
                last_saved = done
            if stopping:  # _train closes the checkpointer, which waits for this save
                progress.close()
                raise Interrupted(stopping, done, ckpt is not None, run.out_dir)
            step = done
    progress.close()
    return state["params"], progress.seconds


def _switch(cfg: TrainConfig, data: DataSet, state: dict[str, Any], step: int, variants: Any,
            setup: dict[str, Any], log: MetricsLog):
    """Replace the targeted weights by their SVD factors, their AdamW moments by zeros (the others'
    kept: `lowrank.switch_opt_state`), rebuild and recompile the step; record the switch."""
    old = setup["model_config"]
    new = old.replace(layer_variants=variants)
    with phase(f"low-rank switch at step {step} ({cfg.lowrank.method}): SVD of the targeted weights"):
        params = lowrank.switch_params(new, state["params"])  # one SVD program per weight kind, in turn
        opt_state = jax.jit(lambda p, o: lowrank.switch_opt_state(new, p, o))(state["params"], state["opt_state"])
        fns = make_fns(cfg, new)
        param_sh = parallel.state_shardings(params, setup["mesh"])
        opt_sh = parallel.state_shardings(opt_state, setup["mesh"])
        state["params"], state["opt_state"] = parallel.put(params, param_sh), parallel.put(opt_state, opt_sh)
    setup.update(model_config=new, switched=True, fns=fns, param_sh=param_sh, opt_sh=opt_sh, state=state)
    record = {"method": cfg.lowrank.method, "params_before": old.num_params(), "params_after": new.num_params(),
              "flops_per_token_before": 2 * matmul_param_count(old),
              "flops_per_token_after": 2 * matmul_param_count(new)}
    if is_primary():
        lowrank.write_record(Path(cfg.run.out_dir), step, variants, record)
    log.write({"split": "lowrank", "step": step + 1, "switch_step": step, **record,
               "ranks": variants.to_json()["layers"]})
    log.echo(f"lowrank: switched after step {step}: {record['params_before'] / 1e6:.2f}M -> "
             f"{record['params_after'] / 1e6:.2f}M parameters, matmul FLOPs/token "
             f"{record['flops_per_token_before']:,} -> {record['flops_per_token_after']:,}")
    return _compile(cfg, new, data, setup, log)


def _summary(cfg: TrainConfig, ev: dict[str, Any], start: int, t_start: float, seconds: float,
             model_config: LlamaConfig, log: MetricsLog) -> dict[str, Any]:
    run, run_dir = cfg.run, Path(cfg.run.out_dir)
    losses = log.train_losses()
    summary = {"steps": run.steps, "resumed_from": start, "wall_seconds": round(time.time() - t_start, 1),
               "train_seconds": round(seconds, 1),
               "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
               "heldout": ev, "params": model_config.num_params(),
               "tokens_per_step": run.batch_size * run.seq_len, "run_dir": str(run_dir)}
    if is_primary():
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if losses:
        log.echo(f"done in {summary['wall_seconds']}s: train loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
                 f"held-out loss {ev['loss']:.3f}")
    return summary


def main(argv: list[str] | None = None) -> int:
    """The CLI (`training.cli.main`): returns the exit code."""
    from training.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    from training.cli import run_as_script

    signal.signal(signal.SIGINT, signal.default_int_handler)  # the CLI handles Ctrl-C from here on
    run_as_script()

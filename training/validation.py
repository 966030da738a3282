"""Config checks that need more than one field's type: ranges, the model shape, keys without effect.

`validate(cfg)` runs inside `load_config`, so every config (preset, YAML file, overrides, Python
`replace`) is checked before any data is read or any array is built:

- **Ranges.** Every numeric key has one in `RANGES`; non-finite floats (nan, inf) are always refused.
  Integers are capped at 2**31 - 1 (they reach int32 device code); the seed at 2**32 - 1
  (`jax.random.PRNGKey` and NumPy's generators take a uint32).
- **The model shape** is built as a `LlamaConfig` (with `data.vocab_size` standing in for the
  tokenizer's vocabulary), so e.g. heads that do not divide are refused before the corpus is loaded.
- **Keys without effect.** `ineffective_keys` lists command-line overrides that the chosen mode
  ignores (a model shape with `init_from`, LayerSkip keys with LayerSkip off, ...); the CLI refuses
  them instead of silently dropping them.
"""

from __future__ import annotations

import math
from typing import Any

from training.config import ConfigError, TrainConfig

INT_MAX = 2**31 - 1
# key: (low, high, low inclusive, high inclusive); None = unbounded on that side
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "model.hidden_size": (1, INT_MAX, True, True), "model.intermediate_size": (1, INT_MAX, True, True),
    "model.num_hidden_layers": (1, 4096, True, True), "model.num_attention_heads": (1, 4096, True, True),
    "model.num_key_value_heads": (1, 4096, True, True), "model.head_dim": (2, 65536, True, True),
    "model.max_position_embeddings": (1, INT_MAX, True, True), "model.rope_theta": (0, None, False, True),
    "model.rms_norm_eps": (0, 1, False, True), "model.init_std": (0, None, False, True),
    "data.heldout_percent": (0, 100, False, False), "data.vocab_size": (257, INT_MAX, True, True),
    "optimizer.lr": (0, 1, False, True), "optimizer.b1": (0, 1, True, False), "optimizer.b2": (0, 1, True, False),
    "optimizer.eps": (0, None, False, True), "optimizer.weight_decay": (0, None, True, True),
    "optimizer.grad_clip": (0, None, True, True), "optimizer.grad_accum": (1, INT_MAX, True, True),
    "schedule.warmup_steps": (0, INT_MAX, True, True), "schedule.min_lr_ratio": (0, 1, True, True),
    "schedule.total_steps": (0, INT_MAX, True, True),
    "checkpoint.every": (1, INT_MAX, True, True), "checkpoint.keep": (1, INT_MAX, True, True),
    "mesh.data": (-1, INT_MAX, True, True), "mesh.fsdp": (1, INT_MAX, True, True), "mesh.stage": (1, INT_MAX, True, True),
    "run.steps": (1, INT_MAX, True, True), "run.batch_size": (1, INT_MAX, True, True),
    "run.seq_len": (1, INT_MAX, True, True), "run.log_every": (1, INT_MAX, True, True),
    "run.eval_every": (0, INT_MAX, True, True), "run.eval_batches": (0, INT_MAX, True, True),
    "run.seed": (0, 2**32 - 1, True, True), "run.sample_tokens": (0, INT_MAX, True, True),
    "run.sample_temperature": (0, None, True, True), "run.divergence_retries": (0, 1000, True, True), "run.sample_top_k": (0, INT_MAX, True, True),
    "layerskip.dropout_max": (0, 1, True, True), "layerskip.e_scale": (0, None, True, True),
    "layerskip.rotation": (1, INT_MAX, True, True),
    "lowrank.rank_ratio": (0, 1, False, True), "lowrank.full_rank_layers": (0, INT_MAX, True, True),
    "lowrank.warmup_steps": (0, INT_MAX, True, True), "lowrank.rank_multiple": (1, INT_MAX, True, True),
    "lowrank.track_every": (1, INT_MAX, True, True), "lowrank.window": (1, INT_MAX, True, True),
    "lowrank.threshold": (0, None, False, True), "lowrank.power_iters": (1, 1000, True, True),
    "lowrank.frobenius_decay": (0, None, True, True), "layerskip.exit_distill": (0, 1, True, True),
    "pipeline.repeats": (2, INT_MAX, True, True), "pipeline.acsgd_buffer_mb": (1, INT_MAX, True, True),
    "pipeline.acsgd_forward_bits": (2, 8, True, True), "pipeline.acsgd_backward_bits": (0, 8, True, True),
}
PATH_KEYS = ("run.out_dir", "data.source", "data.tokenizer", "data.cache_dir", "init_from")
MODEL_SHAPE_KEYS = ("model.hidden_size", "model.intermediate_size", "model.num_hidden_layers",
                    "model.num_attention_heads", "model.num_key_value_heads", "model.head_dim",
                    "model.max_position_embeddings", "model.rope_theta", "model.rms_norm_eps",
                    "model.tie_word_embeddings", "model.init_std", "data.vocab_size", "data.tokenizer")


def get(cfg: TrainConfig, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _range_text(low: float | None, high: float | None, lo_in: bool, hi_in: bool) -> str:
    if high is None:
        return f"{'>=' if lo_in else '>'} {low}"
    return f"in {'[' if lo_in else '('}{low}, {high}{']' if hi_in else ')'}"


def check_range(key: str, value: Any) -> None:
    """ConfigError unless `value` is finite and inside RANGES[key] (None passes: 'not set')."""
    if value is None or key not in RANGES:
        return
    low, high, lo_in, hi_in = RANGES[key]
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"'{key}' must be a finite number, got {value}")
    if key == "mesh.data" and value == 0:
        raise ConfigError("'mesh.data' must be -1 (every device not used by fsdp) or positive, got 0")
    too_low = low is not None and (value < low if lo_in else value <= low)
    too_high = high is not None and (value > high if hi_in else value >= high)
    if too_low or too_high:
        raise ConfigError(f"'{key}' must be {_range_text(low, high, lo_in, hi_in)}, got {value}")


def check_model_shape(cfg: TrainConfig) -> None:
    """Build the model's LlamaConfig (placeholder vocabulary) to refuse impossible shapes early."""
    from jaxmodels.config import ConfigError as ModelConfigError, LlamaConfig

    m = cfg.model
    try:
        LlamaConfig(vocab_size=cfg.data.vocab_size, hidden_size=m.hidden_size,
                    intermediate_size=m.intermediate_size, num_hidden_layers=m.num_hidden_layers,
                    num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_key_value_heads,
                    head_dim=m.head_dim, max_position_embeddings=max(m.max_position_embeddings, cfg.run.seq_len),
                    rms_norm_eps=m.rms_norm_eps, rope_theta=m.rope_theta)
    except ModelConfigError as err:
        raise ConfigError(f"the model section describes no valid model: {err}") from None


def check_path(key: str, value: str | None) -> None:
    """A path key: unset (None) or a non-empty string the OS can take (no NUL byte)."""
    if value is None:
        return
    if not value.strip():
        raise ConfigError(f"'{key}' is empty; give a path" + (" or 'stdlib'" if key == "data.source" else ""))
    if "\0" in value:
        raise ConfigError(f"'{key}' contains a NUL byte, which no path can hold: {value!r}")


def validate(cfg: TrainConfig) -> None:
    """Every range, the paths, the cross-field rules and (without `init_from`) the model shape."""
    for key in RANGES:
        check_range(key, get(cfg, key))
    for key in PATH_KEYS:
        check_path(key, get(cfg, key))
    r, o = cfg.run, cfg.optimizer
    if r.batch_size % o.grad_accum:
        raise ConfigError(f"run.batch_size ({r.batch_size}) must be a multiple of optimizer.grad_accum "
                          f"({o.grad_accum})")
    if cfg.model.compute_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.compute_dtype must be 'float32' or 'bfloat16', got '{cfg.model.compute_dtype}'")
    if cfg.schedule.decay not in ("cosine", "constant"):
        raise ConfigError(f"schedule.decay must be 'cosine' or 'constant', got '{cfg.schedule.decay}'")
    if r.batch_size * (r.seq_len + 1) > INT_MAX:
        raise ConfigError(f"run.batch_size x run.seq_len = {r.batch_size * r.seq_len:,} tokens per step is "
                          f"beyond what one step can index; lower one of them")
    if not cfg.init_from:
        check_model_shape(cfg)
    check_pipeline(cfg)
    lr = cfg.lowrank
    if lr.enabled and not cfg.init_from and lr.full_rank_layers >= cfg.model.num_hidden_layers:
        raise ConfigError(f"lowrank.full_rank_layers={lr.full_rank_layers} leaves no layer to factorize "
                          f"(model.num_hidden_layers={cfg.model.num_hidden_layers}); use 0 to "
                          f"{cfg.model.num_hidden_layers - 1}, or lowrank.method=none")


def check_pipeline(cfg: TrainConfig) -> None:
    """Pipeline stages that cannot split this model or batch, or features that do not combine with them."""
    if cfg.mesh.stage == 1:
        if cfg.pipeline.acsgd:
            raise ConfigError("pipeline.acsgd compresses the activations sent between pipeline stages, and "
                              "mesh.stage=1 has none; set mesh.stage >= 2 or pipeline.acsgd=false")
        return
    from training.pipeline import PipelineSpec, check_spec

    repeats = cfg.pipeline.repeats if cfg.pipeline.schedule == "circular" else 1
    if not cfg.init_from:
        check_spec(PipelineSpec(cfg.mesh.stage, cfg.optimizer.grad_accum, repeats), cfg.model.num_hidden_layers)
    if cfg.lowrank.enabled:
        raise ConfigError("lowrank.method switches to low rank during the run, which pipeline stages do not "
                          "support yet; train a factorized model (init_from a compressed model) or use mesh.stage=1")
    if cfg.layerskip.exit_loss and cfg.layerskip.exit_distill > 0:
        raise ConfigError("layerskip.exit_distill > 0 is not supported with pipeline stages (the final layer's "
                          "distribution lives on the last stage); set it to 0 or use mesh.stage=1")


def ineffective_keys(cfg: TrainConfig, given: list[str], resume: bool = False) -> list[str]:
    """'key: why' for each command-line key in `given` that the chosen mode ignores."""
    reasons: list[tuple[tuple[str, ...], bool, str]] = [
        (MODEL_SHAPE_KEYS, bool(cfg.init_from), "init_from is set, so the checkpoint defines the model "
                                                "shape and tokenizer"),
        (("data.vocab_size",), bool(cfg.data.tokenizer), "data.tokenizer is set and defines the vocabulary"),
        (("checkpoint.every", "checkpoint.keep", "checkpoint.async_save"), not cfg.checkpoint.enabled,
         "checkpoint.enabled is false"),
        (("run.sample_prompt", "run.sample_temperature", "run.sample_top_k"), cfg.run.sample_tokens == 0,
         "run.sample_tokens is 0"),
        (("run.sample_top_k",), cfg.run.sample_temperature == 0, "run.sample_temperature is 0 (greedy)"),
        (("schedule.min_lr_ratio",), cfg.schedule.decay == "constant", "schedule.decay is 'constant'"),
        (("lowrank.rank_ratio", "lowrank.full_rank_layers", "lowrank.warmup_steps", "lowrank.targets",
          "lowrank.rank_multiple", "lowrank.frobenius_decay"), not cfg.lowrank.enabled, "lowrank.method is 'none'"),
        (("lowrank.track_every", "lowrank.window", "lowrank.threshold", "lowrank.power_iters"),
         cfg.lowrank.method != "cuttlefish", "lowrank.method is not 'cuttlefish'"),
        (("lowrank.rank_ratio",), cfg.lowrank.method == "cuttlefish", "cuttlefish takes ranks from stable ranks"),
        (("data.include_tests",), cfg.data.source != "stdlib", "data.source is not 'stdlib'"),
        (("data.extensions",), cfg.data.source == "stdlib" or cfg.data.source.endswith(".jsonl"),
         "data.source is 'stdlib' or a .jsonl file"),
        (("layerskip.dropout_schedule",), not cfg.layerskip.dropout, "layerskip.dropout_max is 0"),
        (("layerskip.e_scale", "layerskip.exit_scale", "layerskip.curriculum", "layerskip.rotation",
          "layerskip.exit_distill"), not cfg.layerskip.exit_loss, "layerskip.exit_loss is false"),
        (("run.decode_report",), not cfg.layerskip.enabled, "LayerSkip is off"),
        (("pipeline.schedule", "pipeline.repeats"), cfg.mesh.stage == 1, "mesh.stage is 1 (no pipeline)"),
        (("pipeline.repeats",), cfg.pipeline.schedule != "circular", "pipeline.schedule is not 'circular'"),
        (("pipeline.acsgd_forward_bits", "pipeline.acsgd_backward_bits", "pipeline.acsgd_buffer_mb"),
         not cfg.pipeline.acsgd, "pipeline.acsgd is false"),
    ]
    out = [f"{key}: {why}" for keys, active, why in reasons if active for key in keys if key in given]
    if resume and not cfg.checkpoint.enabled:
        out.append("--resume: checkpoint.enabled is false, so there is nothing to resume from")
    return out


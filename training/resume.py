"""Resuming a run: which config changes a resumed run accepts, and the schedule it keeps.

`training_differences` lists the keys on which two configs would train differently (what a resume
refuses, and what decides whether a benchmark may reuse a saved run); `resume_config` pins the
schedule's length when a resume extends (or shortens) a run; `schedule_steps` is that length.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from training.config import LayerSkipSection, TrainConfig, apply_overrides, flatten, to_dict


# Keys that change how a run is watched or saved, not what it trains: a resumed run may change them.
RESUME_SAFE_KEYS = ("run.out_dir", "run.progress", "run.log_every", "run.eval_every", "run.eval_batches",
                    "run.sample_prompt", "run.sample_tokens", "run.sample_temperature", "run.sample_top_k",
                    "run.decode_report", "run.divergence_retries", "run.sync_to", "checkpoint.every", "checkpoint.keep", "checkpoint.async_save")


def schedule_steps(cfg: TrainConfig) -> int:
    """Length of the learning-rate decay and of LayerSkip's schedules: `schedule.total_steps`, else `run.steps`."""
    return cfg.schedule.total_steps or cfg.run.steps


def resume_config(saved: TrainConfig, cfg: TrainConfig) -> TrainConfig:
    """The config a run resumed from `saved` trains with. **Extending a run** (a larger `run.steps`,
    also after it finished) or stopping it earlier keeps the schedules of the run as it started:
    unless set explicitly, `schedule.total_steps` is pinned to the saved run's schedule length (and
    written to RUN_DIR/config.yaml), so the steps already trained keep their learning rates, the
    resumed run matches the saved one step for step, and steps beyond the old end train at the
    schedule's final value (`min_lr_ratio * lr` for cosine, `lr` for constant; LayerSkip's dropout and
    curricula stay at their end too). To re-plan the decay instead, start a new run."""
    if cfg.schedule.total_steps == 0 and schedule_steps(saved) != cfg.run.steps:
        return apply_overrides(cfg, {"schedule.total_steps": schedule_steps(saved)})
    return cfg


def training_differences(saved: TrainConfig, cfg: TrainConfig, *, extending: bool = False) -> list[str]:
    """'key: saved -> new' for every key where the configs would train differently: keys outside
    RESUME_SAFE_KEYS, and a LayerSkip section's fields only while it is switched on. With `extending`
    (a resume), `run.steps` may differ and the schedules' lengths (`schedule_steps`) are compared."""
    def trained_as(c: TrainConfig) -> dict[str, Any]:
        flat = flatten(to_dict(c if c.layerskip.enabled else dataclasses.replace(c, layerskip=LayerSkipSection())))
        if extending:
            flat["schedule.total_steps"] = schedule_steps(c)
            del flat["run.steps"]
        return flat

    old, new = trained_as(saved), trained_as(cfg)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in new
            if k not in RESUME_SAFE_KEYS and old.get(k) != new.get(k)]

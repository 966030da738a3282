"""CHAI clustered heads in generation: each request's per-row cluster maps, decided from the first
prompt tokens, then generation under them (`python -m inference.generate --chai FILE`).

The calibration file (`jaxmodels.chai_file`, written by `python -m inference.chai_calibrate`) gives
each layer's cluster count, what is clustered (its `granularity`) and a static grouping for prompts
too short to cluster on. Per request:

1. **Plan.** One compiled program (`prefix_plans`) runs the first `FIRST_TOKENS` (5) tokens of
   every row through the model with `jaxmodels.model.plans_from_prefix`. At each layer it clusters
   that row's heads on their causal 5x5 scores (`jaxmodels.chai.plan_from_prompt`: cosine distance,
   average linkage, lowest-index representative) and packs the maps into the layer's
   `AttentionPlan` (`jaxmodels.attention_plan.pack_plan`). Later layers are planned on the hidden
   states of the clustered earlier ones, as an inline prefill would. A layer whose count keeps every
   head gets None: the dense program, with no gathers.
2. **Generate.** `inference.engine.generate(attention_plan=plans)`: the prefill, decoding and both
   passes of self-speculation run with the same plans, and the KV cache is allocated with each
   layer's K slots (`GenerationResult.kv_cache_bytes` vs `dense_kv_cache_bytes`).

**Why planning is its own program, not part of the prefill.** The engine's prefill and decode
programs take plans as runtime arguments, so one compiled prefill serves every request and every
cluster map; the plan's static sizes (K slots, score heads per layer) come from the calibration
file, not from the prompt. Planning inline would make the prefill program depend on the calibration.
The price is recomputing the 5-token prefix (5 tokens through every layer, next to a prefill of the
whole prompt); its time is added to `prefill_seconds`, its compilation to `compile_seconds`.

**Granularity** is the file's: `kv` (the `chai_calibrate` default) clusters whole KV groups, so a
clustered layer's K cache really shrinks (Ck = k slots) and its score heads drop to k*G; `query`
clusters query heads, which keeps every K slot, and after packing each K slot is read by
M = min(G, k) score heads, so a GQA layer computes KV*min(G, k) score matrices, not k. On SmolLM2
(9 query heads over 3 KV heads) a query layer saves score FLOPs only when k <= 2, and never memory.
Measured side by side (`python -m benchmarks.chai --clusters auto,2@22`, BENCHMARKS.md, 2026-12-02):
SmolLM2's elbow at `query` granularity keeps 6-8 of 9 heads per layer, saves no memory and no score
FLOPs after packing (18.9% nominal), and costs 6.0 points of next-token accuracy (54.5% -> 48.5%);
at `kv` granularity the elbow keeps every KV group and the output is unchanged. Hence the `kv`
default; generation needs no granularity flag of its own.
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from inference.engine import GenerationResult, _compiled, generate, validate_request
from jaxmodels.attention_plan import AttentionPlan, pack_plan
from jaxmodels.chai import FIRST_TOKENS, plan_from_prompt
from jaxmodels.chai_file import ChaiCalibration
from jaxmodels.config import LlamaConfig
from jaxmodels.model import Params, plans_from_prefix

__all__ = ["PlanSpec", "layer_plan", "reps_per_slot", "prefix_plans", "prefix_batch", "chai_plans",
           "generate_clustered", "executed_score_heads"]

Progress = Callable[[str], None]


class PlanSpec(NamedTuple):
    """What of a calibration drives planning, hashable (a static argument of the compiled program)."""

    granularity: str
    clusters: tuple[int, ...]
    static_groups: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, calibration: ChaiCalibration) -> "PlanSpec":
        return cls(calibration.granularity, tuple(calibration.clusters), tuple(calibration.static_groups))


def _units(spec: PlanSpec, config: LlamaConfig) -> int:
    return config.num_attention_heads if spec.granularity == "query" else config.num_key_value_heads


def reps_per_slot(spec: PlanSpec, config: LlamaConfig, layer: int) -> int:
    """M, the score heads per K slot of a clustered layer: G for KV groups (each slot serves a whole
    group); min(G, k) for query clusters (a slot may hold up to that many of the k representatives)."""
    g = config.num_attention_heads // config.num_key_value_heads
    return g if spec.granularity == "kv" else min(g, spec.clusters[layer])


def layer_plan(spec: PlanSpec, config: LlamaConfig, layer: int, q: jax.Array, k: jax.Array,
               lengths: jax.Array) -> AttentionPlan | None:
    """One layer's plan from its prefix q [B, T, H, hd], k [B, KV, T, hd] (RoPE applied) and the rows'
    prompt lengths [B]; None where the calibration keeps every head. Traceable."""
    if spec.clusters[layer] == _units(spec, config):
        return None
    plan = plan_from_prompt(q, k, lengths, spec.clusters[layer], spec.granularity,
                            np.asarray(spec.static_groups[layer]))
    return pack_plan(plan.rep_heads, plan.rep_kslot, plan.head_cluster, plan.k_source,
                     reps_per_slot(spec, config, layer))


def prefix_plans(params: Params, tokens: jax.Array, lengths: jax.Array, *, config: LlamaConfig,
                 spec: PlanSpec) -> tuple[AttentionPlan | None, ...]:
    """Every layer's plan from the prompt prefixes tokens [B, t] (t <= FIRST_TOKENS, right-padded) and
    lengths [B] (each row's prompt length, or t when longer). Traceable; padding is never seen by a
    real position (causal attention) and the clustering masks it by `lengths`."""
    planner = lambda i, q, k: layer_plan(spec, config, i, q, k, lengths)  # noqa: E731
    return plans_from_prefix(params, config, tokens, planner)


def prefix_batch(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, FIRST_TOKENS] int32, zero-padded; lengths [B] = min(len, FIRST_TOKENS)). The width
    is fixed, so one compiled planning program serves every prompt length."""
    tokens = np.zeros((len(prompts), FIRST_TOKENS), np.int32)
    lengths = np.array([min(len(p), FIRST_TOKENS) for p in prompts], np.int32)
    for row, p in enumerate(prompts):
        tokens[row, :lengths[row]] = p[:FIRST_TOKENS]
    return tokens, lengths


def chai_plans(params: Params, config: LlamaConfig, calibration: ChaiCalibration,
               prompts: Sequence[Sequence[int]], progress: Progress | None = None
               ) -> tuple[tuple[AttentionPlan | None, ...], float, float]:
    """Per-layer plans for these prompts, one row each: (plans, compile seconds, run seconds).

    The planning program is compiled once per model, calibration and batch size (memoized with the
    engine's programs). The calibration must belong to this model (`check_model`, ConfigError)."""
    calibration.check_model(config, "CHAI_FILE")
    tokens, lengths = (jnp.asarray(x) for x in prefix_batch(prompts))
    static = {"config": config, "spec": PlanSpec.of(calibration)}
    program, compile_s = _compiled("chai plan", prefix_plans, static, (), params, tokens, lengths,
                                   progress=progress)
    t0 = time.perf_counter()
    plans = jax.block_until_ready(program(params, tokens, lengths))
    return plans, compile_s, time.perf_counter() - t0


def generate_clustered(params: Params, config: LlamaConfig, calibration: ChaiCalibration,
                       prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, *,
                       progress: Progress | None = None, **kwargs: Any) -> GenerationResult:
    """`inference.generate` with CHAI: each row's plans from its own first tokens, then generation
    (plain, sampled or self-speculative: `kwargs` are `generate`'s) under them.

    The prompts are checked before planning (InferenceError, as `generate` would raise). The
    planning pass's time and compilation are added to the result's prefill and compile seconds."""
    if "attention_plan" in kwargs:
        raise TypeError("generate_clustered makes the attention plans itself; do not pass attention_plan")
    prompts = validate_request(config, prompts, max_new_tokens)
    plans, compile_s, plan_s = chai_plans(params, config, calibration, prompts, progress)
    dense = all(p is None for p in plans)  # every layer keeps its heads: the plain programs
    result = generate(params, config, prompts, max_new_tokens, progress=progress,
                      attention_plan=None if dense else plans, **kwargs)
    result.prefill_seconds += plan_s
    result.compile_seconds += compile_s
    return result


def executed_score_heads(config: LlamaConfig, plans: Sequence[AttentionPlan | None]) -> tuple[int, ...]:
    """Score matrices each layer computes under these plans (H for a dense layer, Cq after packing):
    what the attention-score FLOPs scale with."""
    return tuple(config.num_attention_heads if p is None else p.num_reps for p in plans)

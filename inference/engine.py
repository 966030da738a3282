"""Batched generation: one jit-compiled prefill and one on-device decode loop per shape bucket.

Prompts of different lengths share a batch by right-padding: row b's prompt occupies cache positions
[0, len_b) and every later token is written at the row's own length, so RoPE positions are true
positions and padding is masked by position. The decode loop is a `lax.while_loop` that stops when
every row has produced EOS or `max_new_tokens` tokens; no host round-trip per token.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from inference.sampling import SamplingConfig, select_token
from inference.speculative import SpecConfig, speculative_loop
from inference.validate import (check_attention_impl, check_attention_plan, check_batch_size, check_context,
                                check_early_exit, check_eos_ids, check_max_new_tokens, check_params, check_prompts,
                                check_sampling, check_seed, check_spec)
from jaxmodels.attention import checked_attention_impl
from jaxmodels.attention_plan import LayerPlans, k_slots, take_plan_rows
from jaxmodels.config import LlamaConfig
from jaxmodels.kv_cache import KVCache
from jaxmodels.model import Params, decode_embedding, exit_logits, run_layers
from jaxmodels.params import decode_layout

MIN_PROMPT_BUCKET = 16
CACHE_ALIGN = 128


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per row, through the first EOS when one was produced
    prompt_tokens: list[int]  # prompt length per row
    prefill_seconds: float
    decode_seconds: float
    compile_seconds: float
    drafted: int = 0  # self-speculative decoding only: draft tokens proposed
    accepted: int = 0  # ... and accepted by the verifier
    rounds: int = 0  # ... and draft/verify rounds run
    spec_stats: Any = None  # ... and the raw per-row counters (inference.speculative.SpecStats)
    spec: SpecConfig | None = None  # the speculation settings used (None: plain decoding)
    kv_cache_bytes: int = 0  # bytes of the KV cache allocated (a clustered layer keeps fewer K slots)
    dense_kv_cache_bytes: int = 0  # bytes a dense cache of the same batch, length and dtype takes

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def num_generated(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens / (prefill + decode) wall time; compilation excluded."""
        return self.num_generated / max(self.prefill_seconds + self.decode_seconds, 1e-9)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.num_generated / max(self.decode_seconds, 1e-9)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def shape_bucket(max_prompt_len: int, max_new_tokens: int) -> tuple[int, int, int]:
    """(prompt bucket T, cache length S, output buffer length) for one compiled program."""
    prompt_bucket = max(MIN_PROMPT_BUCKET, _next_pow2(max_prompt_len))
    out_len = max(MIN_PROMPT_BUCKET, _next_pow2(max_new_tokens))
    cache_len = _round_up(max(prompt_bucket, max_prompt_len + out_len), CACHE_ALIGN)
    return prompt_bucket, cache_len, out_len


def validate_request(config: LlamaConfig, prompts: Any, max_new_tokens: Any) -> list[list[int]]:
    """The prompts as lists of ints, or InferenceError naming the problem and the fix (see
    `inference.validate`)."""
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    prompts = check_prompts(prompts, config.vocab_size)
    check_context(prompts, max_new_tokens, config)
    return prompts


@dataclasses.dataclass(frozen=True)
class Request:
    """One checked, normalized `generate` request (plain Python values only)."""

    prompts: list[list[int]]
    max_new_tokens: int
    sampling: SamplingConfig
    seed: int
    eos_ids: tuple[int, ...]
    speculative: SpecConfig | None
    early_exit: int | None
    attention_plan: LayerPlans | None = None  # per-layer plans (int32 device arrays), None = dense
    attention_impl: str = "auto"  # how cached attention runs (`KVCache.attention_impl`)
    interpret: bool = False  # the Pallas kernels in interpret mode (slow; checks on CPU)


def check_request(params: Params, config: LlamaConfig, prompts: Any, max_new_tokens: Any, *,
                  temperature: Any = 0.0, top_k: Any = 0, top_p: Any = 1.0, seed: Any = 0,
                  eos_token_ids: Any = None, speculative: Any = None, early_exit: Any = None,
                  attention_plan: Any = None, attention_impl: Any = "auto", interpret: Any = False) -> Request:
    """Every argument of `generate` checked and normalized, before any computation."""
    check_params(params, config)
    temperature, top_k, top_p = check_sampling(temperature, top_k, top_p, config.vocab_size)
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    prompts = validate_request(config, prompts, max_new_tokens)
    return Request(prompts, max_new_tokens, SamplingConfig(temperature, top_k, top_p), check_seed(seed),
                   check_eos_ids(eos_token_ids, config), check_spec(speculative, config),
                   check_early_exit(early_exit, config, speculative),
                   check_attention_plan(attention_plan, config, len(prompts)),
                   *check_attention_impl(attention_impl, interpret))


# ------------------------------------------------------------------------- compiled pieces
def prefill(params: Params, tokens: jax.Array, lengths: jax.Array, cache: KVCache,
            plan: LayerPlans | None = None, *, config: LlamaConfig, stop: int | None = None
            ) -> tuple[KVCache, jax.Array]:
    """Run right-padded prompts tokens [B, T] through layers [0, stop) and the shared exit;
    logits [B, V] at each row's end. `plan`: per-layer attention plans (None = dense)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1])[None], tokens.shape)
    h, cache, _ = run_layers(params, config, decode_embedding(params, tokens, cache.dtype), positions, cache,
                             stop=stop, plan=plan)
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
    return cache.replace(lengths=lengths), exit_logits(params, config, last)


def decode_step(params: Params, config: LlamaConfig, token: jax.Array, cache: KVCache,
                stop: int | None = None, plan: LayerPlans | None = None) -> tuple[KVCache, jax.Array]:
    """Append one token [B] per row at the row's length through layers [0, stop) and the shared
    exit; returns the next logits [B, V]."""
    h, cache, _ = run_layers(params, config, decode_embedding(params, token[:, None], cache.dtype),
                             cache.lengths[:, None], cache, stop=stop, plan=plan)
    return cache.replace(lengths=cache.lengths + 1), exit_logits(params, config, h[:, 0])


def decode_loop(params: Params, cache: KVCache, logits: jax.Array, key: jax.Array,
                max_new: jax.Array, temperature: jax.Array, top_p: jax.Array,
                plan: LayerPlans | None = None, *, config: LlamaConfig, sampling: SamplingConfig,
                eos_ids: tuple[int, ...], out_len: int, stop: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Sample up to `max_new` tokens per row on device (layers [0, stop) only when early-exiting;
    `plan`: the per-layer attention plans the prefill used). Returns (tokens [B, out_len],
    counts [B])."""
    batch = logits.shape[0]
    pad = eos_ids[0] if eos_ids else 0
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

    def pick(logits, done, key, step, out, count):
        token = jnp.where(done, pad, select_token(logits, key, sampling, temperature, top_p))
        return token, out.at[:, step].set(token), count + (~done).astype(jnp.int32), done | jnp.isin(token, eos)

    # Token i is picked from the logits of step i - 1; the loop runs a decode step and picks the
    # next token, so the step after the last token is never run (a `lax.cond` around it made
    # XLA:CPU copy every cache buffer twice per token).
    key, sub = jax.random.split(key)
    token, out, count, done = pick(logits, jnp.zeros((batch,), bool), sub, 0,
                                   jnp.full((batch, out_len), pad, jnp.int32), jnp.zeros((batch,), jnp.int32))

    def cond(carry):
        step, _, _, _, done, _, _ = carry
        return (step < max_new) & ~jnp.all(done)

    def body(carry):
        step, cache, token, out, done, count, key = carry
        key, sub = jax.random.split(key)
        cache, logits = decode_step(params, config, token, cache, stop, plan)
        token, out, count, done = pick(logits, done, sub, step, out, count)
        return step + 1, cache, token, out, done, count, key

    init = (jnp.int32(1), cache, token, out, done, count, key)
    _, _, _, out, _, count, _ = jax.lax.while_loop(cond, body, init)
    return out, count


# ------------------------------------------------------------------------- AOT compile cache
_COMPILED: dict[Any, Any] = {}
Progress = Callable[[str], None]


def _compiled(name: str, fn: Callable, static: dict, donate: tuple[int, ...], *args,
              progress: Progress | None = None) -> tuple[Any, float]:
    """Compile fn for these argument shapes once (memoized); returns (executable, compile seconds).
    `progress` hears about a compilation before it starts (it can take many seconds)."""
    shapes = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), args)
    key = (name, tuple(sorted(static.items())), str(shapes))
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    if progress is not None:
        progress(f"compiling the {name} program for this shape (first call only) ...")
    t0 = time.perf_counter()
    jitted = jax.jit(lambda *a: fn(*a, **static), donate_argnums=donate)
    exe = jitted.lower(*args).compile()
    _COMPILED[key] = exe
    return exe, time.perf_counter() - t0


def generate(params: Params, config: LlamaConfig, prompts: Sequence[Sequence[int]],
             max_new_tokens: int = 64, *, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, eos_token_ids: Sequence[int] | None = None,
             speculative: SpecConfig | None = None, early_exit: int | None = None,
             progress: Progress | None = None, attention_plan: LayerPlans | None = None,
             attention_impl: str = "auto", interpret: bool = False) -> GenerationResult:
    """Generate continuations for a batch of token-id prompts (greedy unless temperature > 0).

    With `speculative`, decode by LayerSkip self-speculation (same tokens as plain greedy decoding;
    the same distribution when sampling) and report acceptance in the result. With `early_exit=E`,
    run only layers [0, E) and the shared exit (lossy, no verification). Every argument is checked
    first (`check_request`; InferenceError, a ValueError, on a bad one); `seed` is in [0, 2**32).
    `progress(message)` is called before each compilation. `attention_plan`: one attention plan per
    layer (`jaxmodels.attention_plan`; None entries are dense layers), one row per prompt; prefill,
    decoding and both halves of self-speculation run with it, and the KV cache is built for it
    (a clustered layer keeps fewer K slots). `attention_impl` ("auto": a Pallas kernel on TPU and
    GPU once it passes a check there for these shapes, else jnp with a warning; jnp on CPU;
    "reference"; "pallas") picks how cached attention runs; `interpret` runs the
    Pallas kernels in interpret mode (slow; to check them on CPU).
    """
    req = check_request(params, config, prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, seed=seed, eos_token_ids=eos_token_ids, speculative=speculative,
                        early_exit=early_exit, attention_plan=attention_plan, attention_impl=attention_impl,
                        interpret=interpret)
    return _generate(params, config, req, progress)


def _generate(params: Params, config: LlamaConfig, req: Request, progress: Progress | None) -> GenerationResult:
    prompts, speculative, early_exit = req.prompts, req.speculative, req.early_exit
    lengths_np = np.array([len(p) for p in prompts], np.int32)
    # Self-speculation prefills all but the last prompt token (it is the first round's pending
    # token) and may write up to draft_len positions past the last committed one.
    held_back = 1 if speculative is not None else 0
    extra = speculative.draft_len + 1 if speculative is not None else 0
    prompt_bucket, _, out_len = shape_bucket(int(lengths_np.max()), req.max_new_tokens)
    _, cache_len, _ = shape_bucket(int(lengths_np.max()), req.max_new_tokens + extra)
    tokens_np = np.zeros((len(prompts), prompt_bucket), np.int32)
    for i, p in enumerate(prompts):
        tokens_np[i, : len(p)] = p

    # Decoding runs the layers unrolled on per-layer weights, output-major on CPU (see
    # `decode_layout`); pass params already in that layout to skip this one-off copy on every call.
    params = decode_layout(params)
    dtype = cache_dtype(params["embed"].dtype)
    plan = req.attention_plan
    planned = () if plan is None else (plan,)  # no plan: the dense programs, argument for argument
    slots = k_slots(config, plan)
    impl = _vetted_attention_impl(req, config, prompt_bucket, cache_len, dtype, slots)
    cache = KVCache.create(config, len(prompts), cache_len, dtype, slots, impl, req.interpret)
    cache_bytes = {"kv_cache_bytes": cache.nbytes(), "dense_kv_cache_bytes": cache.dense_nbytes()}
    tokens, lengths = jnp.asarray(tokens_np), jnp.asarray(lengths_np - held_back)
    run_prefill, c1 = _compiled("prefill", prefill, {"config": config, "stop": early_exit}, (3,),
                                params, tokens, lengths, cache, *planned, progress=progress)
    t0 = time.perf_counter()
    cache, logits = run_prefill(params, tokens, lengths, cache, *planned)
    logits.block_until_ready()
    t_prefill = time.perf_counter() - t0

    sampling = req.sampling
    runtime = (jax.random.key(req.seed), jnp.int32(req.max_new_tokens),
               jnp.float32(max(sampling.temperature, 1e-6)), jnp.float32(sampling.top_p))
    static = {"config": config, "sampling": sampling.program(), "eos_ids": req.eos_ids, "out_len": out_len}
    if speculative is None:
        loop, args, static = decode_loop, (params, cache, logits, *runtime, *planned), {**static, "stop": early_exit}
    else:
        pending = jnp.asarray(lengths_np - 1)  # index of each row's last prompt token
        pending = jnp.take_along_axis(tokens, pending[:, None], axis=1)[:, 0]
        loop, args = speculative_loop, (params, cache, pending, *runtime, *planned)
        static = {**static, "spec": speculative}
    run_decode, c2 = _compiled(loop.__name__, loop, static, (), *args, progress=progress)
    t0 = time.perf_counter()
    outputs = jax.device_get(run_decode(*args))
    t_decode = time.perf_counter() - t0
    out, count = outputs[0], outputs[1]
    rows = [out[i, : count[i]].tolist() for i in range(len(prompts))]
    result = GenerationResult(rows, lengths_np.tolist(), t_prefill, t_decode, c1 + c2, **cache_bytes)
    if speculative is not None:
        stats = outputs[2]
        result.drafted, result.accepted = int(stats.drafted.sum()), int(stats.accepted.sum())
        result.rounds, result.spec_stats, result.spec = int(stats.rounds), stats, speculative
    return result


def _vetted_attention_impl(req: Request, config: LlamaConfig, prompt_bucket: int, cache_len: int, dtype,
                           slots: Sequence[int] | None) -> str:
    """The request's attention_impl, or "reference" where "auto" would run a kernel that fails its
    check on this device for the prefill, decode or verification shapes (`checked_attention_impl`)."""
    counts = (prompt_bucket, 1) + ((req.speculative.draft_len + 1,) if req.speculative is not None else ())
    kv, impl = config.num_key_value_heads, req.attention_impl
    for c in sorted(set(slots or (kv,))):
        impl = checked_attention_impl(impl, len(req.prompts), counts, config.num_attention_heads, c, kv, cache_len,
                                      config.head_dim, dtype)
    return impl


def cache_dtype(weights_dtype: jnp.dtype) -> jnp.dtype:
    """The KV cache's dtype, which decoding's hidden states take too: the weights', except float32
    on CPU. XLA:CPU updates a bf16 buffer in float32 (a convert of the whole buffer, the row write, a
    convert back), so a bf16 cache was rewritten whole in every layer and step: SmolLM2 with bf16
    weights decoded at 0.37x the float32 weights' speed at batch 8, and at 0.92x with a float32
    cache (same tokens; AMD EPYC, 2026-12-03). With float32 hidden states, bf16 weights are read
    as stored by the CPU decode kernel and every other op runs in float32 (XLA:CPU computes bf16
    elementwise ops by converting to float32 and back)."""
    return jnp.dtype(jnp.float32) if jax.default_backend() == "cpu" else jnp.dtype(weights_dtype)


def generate_batches(params: Params, config: LlamaConfig, prompts: Sequence[Sequence[int]],
                     batch_size: int, max_new_tokens: int = 64, **kwargs) -> GenerationResult:
    """`generate` over consecutive groups of `batch_size` prompts (the last may be smaller), as one
    result: rows in prompt order, times and speculation counters summed. Batch-1 speed over many
    prompts is what a service sees; one prompt alone says more about that prompt than the decoder.
    Every argument is checked once, before any group runs."""
    batch_size = check_batch_size(batch_size)
    progress = kwargs.pop("progress", None)
    req = check_request(params, config, prompts, max_new_tokens, **kwargs)
    params = decode_layout(params)  # once, not per group
    groups = [dataclasses.replace(req, prompts=req.prompts[i: i + batch_size],
                                  attention_plan=take_plan_rows(req.attention_plan, i, i + batch_size))
              for i in range(0, len(req.prompts), batch_size)]
    parts = [_generate(params, config, group, progress) for group in groups]
    first = parts[0]
    total = lambda field: sum(getattr(r, field) for r in parts)  # noqa: E731
    return GenerationResult(
        [row for r in parts for row in r.tokens], [n for r in parts for n in r.prompt_tokens],
        total("prefill_seconds"), total("decode_seconds"), total("compile_seconds"),
        drafted=total("drafted"), accepted=total("accepted"), rounds=total("rounds"),
        spec_stats=[r.spec_stats for r in parts] if first.spec is not None else None, spec=first.spec,
        kv_cache_bytes=max(r.kv_cache_bytes for r in parts),  # groups run one after another
        dense_kv_cache_bytes=max(r.dense_kv_cache_bytes for r in parts))

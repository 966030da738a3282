"""LayerSkip self-speculative decoding: draft with layers [0, E), verify with [E, L), one cache.

Invariant at the start of every round, per row: all layers hold KV for positions < p, where p is the
position of the newest committed token (the *pending* token, not yet in the cache).

  draft   feed the pending token and then each draft at positions p, p+1, ..., p+d-1 through layers
          [0, E) + the shared exit; keep each hidden state at layer E (the exit buffer).
  verify  feed the last draft at p+d through [0, E) only, then run [E, L) once on the d+1 buffered
          hidden states (positions p..p+d) -> target logits for every draft plus a bonus.
  accept  greedy: the longest prefix where draft == target argmax, then the target's token;
          sampling: accept x if u < p(x)/q(x), else sample max(p - q, 0) (both filtered the same).
  commit  lengths become p + accepted + 1. KV written past that is stale and is overwritten later.

No layer ever processes the same token at the same position with the same prefix twice (the
`visits` counters in the test prove it), and the whole generation is one `lax.while_loop`.
Batches run rounds in lockstep with per-row acceptance. The draft length adapts between rounds
(`adaptive`): verification of d_max + 1 positions costs about as much as d + 1 when memory-bound,
so the draft loop runs a runtime-length `d <= d_max` and the verify pass keeps its static shape.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from inference.sampling import SamplingConfig, filter_logits, greedy_tokens
from jaxmodels.attention_plan import LayerPlans
from jaxmodels.config import LlamaConfig
from jaxmodels.kv_cache import KVCache
from jaxmodels.model import Params, decode_embedding, exit_logits, run_layers


@dataclasses.dataclass(frozen=True)
class SpecConfig:
    exit_layer: int  # E: draft with layers [0, E)
    draft_len: int  # d_max: the most tokens drafted per round
    adaptive: bool = True  # adapt the draft length to measured acceptance
    start_draft_len: int | None = None  # adaptive: the first round's d (None: draft_len)
    count_visits: bool = False  # record per-position layer visits in SpecStats (tests; costs time)
    draft_vocab: int | None = None  # draft over token ids [0, K) only: a K/V-sized draft head

    def validate(self, config: LlamaConfig) -> "SpecConfig":
        """This config checked against the model (InferenceError if out of range), with plain-int
        fields; `generate` calls it through `inference.validate.check_spec`."""
        from inference.validate import check_spec

        return check_spec(self, config)


class SpecStats(NamedTuple):
    rounds: jax.Array  # rounds run
    drafted: jax.Array  # [B] draft tokens proposed to each row while it was active
    accepted: jax.Array  # [B] draft tokens accepted
    visits_early: jax.Array  # [B, S] times layers [0, E) processed each position ([B, 0] unless
    #                          SpecConfig.count_visits; so are the three below)
    visits_deep: jax.Array  # [B, S] times layers [E, L) processed each position
    discarded_early: jax.Array  # [B, S] times an early-layer visit was rolled back
    discarded_deep: jax.Array  # [B, S] times a deep-layer visit was rolled back


def _layers(params, config, tokens_or_h, positions, cache, start, stop, *, embed: bool, plan=None):
    h = decode_embedding(params, tokens_or_h, cache.dtype) if embed else tokens_or_h
    h, cache, _ = run_layers(params, config, h, positions, cache, start=start, stop=stop, plan=plan)
    return h, cache


def _probs(logits, sampling: SamplingConfig, temperature, top_p):
    return jax.nn.softmax(filter_logits(logits, temperature, sampling.top_k, top_p,
                                        use_top_p=sampling.top_p < 1.0), axis=-1)


def draft_head(params: Params, config: LlamaConfig, draft_vocab: int | None) -> Params:
    """The shared exit restricted to token ids [0, K): final norm + the first K rows of the head.

    Drafting with it costs K/V of the head (for a byte-level BPE the low ids are the bytes and the
    earliest, most frequent merges). The verifier keeps the full head, so the output is unchanged;
    tokens outside [0, K) are simply never drafted (q = 0 there; sampling stays exact)."""
    if draft_vocab is None or draft_vocab == config.vocab_size:
        return params
    if config.tie_word_embeddings:
        return {"final_norm": params["final_norm"], "embed": params["embed"][:draft_vocab]}
    return {"final_norm": params["final_norm"], "lm_head": params["lm_head"][:, :draft_vocab]}


def _draft(params, config, spec, sampling, cache, pending, d_cur, key, temperature, top_p, head, plan):
    """Draft up to d_cur tokens per row. Returns (cache, exit buffer [B, d_max+1, D], drafts
    [B, d_max], draft probabilities [B, d_max, V] or None)."""
    b, d_max, E = pending.shape[0], spec.draft_len, spec.exit_layer
    pos0 = cache.lengths
    hbuf = jnp.zeros((b, d_max + 1, config.hidden_size), cache.dtype)  # the hidden states decoding runs in
    drafts = jnp.zeros((b, d_max), jnp.int32)
    qs = None if sampling.greedy else jnp.zeros((b, d_max, config.vocab_size), jnp.float32)
    k = spec.draft_vocab or config.vocab_size  # any draft distribution keeps sampling exact, so a
    draft_sampling = dataclasses.replace(sampling, top_k=min(sampling.top_k, k))  # top-k > K is cut

    def step(i, carry):
        cache, token, hbuf, drafts, qs, key = carry
        h, cache = _layers(params, config, token[:, None], (pos0 + i)[:, None], cache, 0, E,
                           embed=True, plan=plan)
        hbuf = hbuf.at[:, i].set(h[:, 0])
        logits = exit_logits(head, config, h[:, 0])  # [B, K]
        if sampling.greedy:
            token = greedy_tokens(logits)
        else:
            key, sub = jax.random.split(key)
            q = _probs(logits, draft_sampling, temperature, top_p)
            token = jax.random.categorical(sub, jnp.log(q), axis=-1).astype(jnp.int32)
            qs = qs.at[:, i, : q.shape[-1]].set(q)  # ids >= K keep q = 0
        return cache, token, hbuf, drafts.at[:, i].set(token), qs, key

    cache, last, hbuf, drafts, qs, key = jax.lax.fori_loop(
        0, d_cur, step, (cache, pending, hbuf, drafts, qs, key))
    return cache, hbuf, drafts, qs, last, key


def residual_weights(p: jax.Array, q: jax.Array) -> jax.Array:
    """Unnormalized distribution to sample after rejecting a draft: max(p - q, 0)."""
    return jnp.maximum(p - q, 0.0)


def draft_is_accepted(u: jax.Array, p_x: jax.Array, q_x: jax.Array) -> jax.Array:
    """Accept draft token x iff u < p(x) / q(x), written without the division."""
    return u * q_x < p_x


def _accept(target_logits, drafts, qs, d_cur, key, sampling, temperature, top_p):
    """Per row: number of accepted drafts a [B] and the token after them [B]."""
    d_max = drafts.shape[1]
    live = jnp.arange(d_max)[None] < d_cur  # [1, d_max]
    if sampling.greedy:
        target = greedy_tokens(target_logits)  # [B, d_max+1]
        ok = (drafts == target[:, :d_max]) & live
        a = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)
        return a, jnp.take_along_axis(target, a[:, None], axis=1)[:, 0]
    k_u, k_res = jax.random.split(key)
    p = jax.vmap(lambda lg: _probs(lg, sampling, temperature, top_p), in_axes=1, out_axes=1)(target_logits)
    p_d = jnp.take_along_axis(p[:, :d_max], drafts[..., None], axis=-1)[..., 0]  # [B, d_max]
    q_d = jnp.take_along_axis(qs, drafts[..., None], axis=-1)[..., 0]
    u = jax.random.uniform(k_u, p_d.shape)
    ok = draft_is_accepted(u, p_d, q_d) & live
    a = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)
    p_a = jnp.take_along_axis(p, a[:, None, None], axis=1)[:, 0]  # [B, V]
    q_a = jnp.take_along_axis(jnp.pad(qs, ((0, 0), (0, 1), (0, 0))), a[:, None, None], axis=1)[:, 0]
    rejected = (a < d_cur)[:, None]
    residual = jnp.where(rejected, residual_weights(p_a, q_a), p_a)  # bonus token: sample p itself
    # Sampling from unnormalized weights via categorical(log w) is the exponential race: no division.
    return a, jax.random.categorical(k_res, jnp.log(residual), axis=-1).astype(jnp.int32)


def speculative_loop(params: Params, cache: KVCache, pending: jax.Array, key: jax.Array,
                     max_new: jax.Array, temperature: jax.Array, top_p: jax.Array,
                     plan: LayerPlans | None = None, *, config: LlamaConfig, spec: SpecConfig,
                     sampling: SamplingConfig, eos_ids: tuple[int, ...], out_len: int):
    """Generate up to max_new tokens per row. cache.lengths[b] = position of row b's pending token.

    `plan` (per-layer attention plans, None = dense) applies to every pass: the draft and the
    verifier run the same layers with the same plans, so the output is plain decoding's under it.
    Returns (tokens [B, out_len], counts [B], SpecStats).
    """
    b, s = pending.shape[0], cache.max_len
    d_max, E, L = spec.draft_len, spec.exit_layer, config.num_hidden_layers
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)
    pad = eos_ids[0] if eos_ids else 0
    zeros_bs = jnp.zeros((b, s if spec.count_visits else 0), jnp.int32)
    head = draft_head(params, config, spec.draft_vocab)  # sliced once, outside the loop

    def count_range(counter, start, n, active):  # counter[b, start_b : start_b + n] += active_b
        if not spec.count_visits:
            return counter
        hit = (jnp.arange(s)[None] >= start[:, None]) & (jnp.arange(s)[None] < (start + n)[:, None])
        return counter + (hit & active[:, None]).astype(jnp.int32)

    def cond(c):
        return ~jnp.all(c["done"])

    def body(c):
        cache, active, pos0, d_cur = c["cache"], ~c["done"], c["cache"].lengths, c["d_cur"]
        key, k_draft, k_acc = jax.random.split(c["key"], 3)
        cache, hbuf, drafts, qs, last, _ = _draft(params, config, spec, sampling, cache,
                                                   c["pending"], d_cur, k_draft, temperature, top_p, head, plan)
        h, cache = _layers(params, config, last[:, None], (pos0 + d_cur)[:, None], cache, 0, E,
                           embed=True, plan=plan)
        hbuf = jax.lax.dynamic_update_slice(hbuf, h, (0, d_cur, 0))
        positions = pos0[:, None] + jnp.arange(d_max + 1)[None]
        h, cache = _layers(params, config, hbuf, positions, cache, E, L, embed=False, plan=plan)
        a, next_token = _accept(exit_logits(params, config, h), drafts, qs, d_cur, k_acc,
                                sampling, temperature, top_p)
        # emitted tokens this round: drafts[:a] then next_token; cut at EOS and at max_new
        j = jnp.arange(d_max + 1)[None]
        cand = jnp.where(j < a[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), next_token[:, None])
        is_eos = jnp.isin(cand, eos) & (j <= a[:, None])
        first_eos = jnp.where(jnp.any(is_eos, 1), jnp.argmax(is_eos, 1), d_max + 1)
        n_emit = jnp.minimum(jnp.minimum(a + 1, first_eos + 1), max_new - c["count"])
        n_emit = jnp.where(active, n_emit, 0)
        out = jax.vmap(lambda o, x, k: jax.lax.dynamic_update_slice(o, x, (k,)))(c["out"], cand, c["count"])
        count = c["count"] + n_emit
        done = c["done"] | (first_eos < a + 1) | (count >= max_new)
        new_len = jnp.where(active, pos0 + n_emit, pos0)
        stats = c["stats"]
        stats = SpecStats(
            rounds=stats.rounds + 1,
            drafted=stats.drafted + jnp.where(active, d_cur, 0),
            accepted=stats.accepted + jnp.where(active, jnp.minimum(a, n_emit), 0),
            visits_early=count_range(stats.visits_early, pos0, d_cur + 1, active),
            visits_deep=count_range(stats.visits_deep, pos0, d_max + 1, active),
            discarded_early=count_range(stats.discarded_early, new_len, pos0 + d_cur + 1 - new_len, active),
            discarded_deep=count_range(stats.discarded_deep, new_len, pos0 + d_max + 1 - new_len, active))
        if spec.adaptive:  # grow after a fully accepted round, shrink when under half accepted
            mean_frac = jnp.sum(jnp.where(active, a, 0)) / jnp.maximum(jnp.sum(active) * d_cur, 1)
            d_cur = jnp.where(mean_frac >= 1.0, d_cur + 1, jnp.where(mean_frac < 0.5, d_cur - 1, d_cur))
            d_cur = jnp.clip(d_cur, 1, d_max)
        return dict(cache=cache.replace(lengths=new_len), pending=jnp.where(active, next_token, c["pending"]),
                    out=out, count=count, done=done, key=key, d_cur=d_cur, stats=stats)

    init = dict(cache=cache, pending=pending, out=jnp.full((b, out_len + d_max + 1), pad, jnp.int32),
                count=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool), key=key,
                d_cur=jnp.int32(spec.start_draft_len or d_max),
                stats=SpecStats(jnp.int32(0), jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32),
                                zeros_bs, zeros_bs, zeros_bs, zeros_bs))
    final = jax.lax.while_loop(cond, body, init)
    return final["out"][:, :out_len], final["count"], final["stats"]

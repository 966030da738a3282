"""Token selection: greedy, temperature, top-k and top-p (nucleus), on device.

`filter_logits` turns raw logits into the distribution actually sampled from (temperature applied,
tokens outside top-k / top-p set to -inf). Speculative decoding needs that same filtered
distribution for both draft and target, so it is a function of its own.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. temperature == 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off

    def __post_init__(self) -> None:
        """Check and normalize (numpy scalars -> Python numbers; NaN, inf and bools rejected) so
        that the config hashes as a plain value when it keys a compiled program."""
        from inference.validate import check_sampling

        temperature, top_k, top_p = check_sampling(self.temperature, self.top_k, self.top_p)
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "top_k", top_k)
        object.__setattr__(self, "top_p", top_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def program(self) -> "SamplingConfig":
        """What a compiled decode program depends on: greedy or not, top-k, top-p on or off. The
        programs take temperature and top-p as data (`select_token`), so requests that differ only
        in their values share one program: this config keys it, with placeholder values."""
        if self.greedy:
            return SamplingConfig()
        return SamplingConfig(temperature=1.0, top_k=self.top_k, top_p=0.5 if self.top_p < 1.0 else 1.0)


def filter_logits(logits: jax.Array, temperature: jax.Array | float, top_k: int,
                  top_p: jax.Array | float, use_top_p: bool) -> jax.Array:
    """logits [B, V] -> float32 logits of the sampling distribution (-inf where excluded).

    `top_k` and `use_top_p` are static (they change the program); temperature and top_p are data.
    """
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    if use_top_p:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of strictly better tokens
        keep = mass_before < top_p  # always keeps the best token
        n_keep = jnp.sum(keep, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
        logits = jnp.where(logits < threshold, NEG_INF, logits)
    return logits


def greedy_tokens(logits: jax.Array) -> jax.Array:
    """argmax over the last axis as int32, exactly `jnp.argmax` (the first maximum; the first NaN if
    any), as two plain reductions: the largest value, then the least index holding it. XLA:CPU runs
    argmax as one reduction over (value, index) pairs, one element at a time: over SmolLM2's 49152
    logits, 227 us at batch 1 and 972 us at batch 8 against 45 and 216 us this way (2-core EPYC)."""
    best = jnp.max(logits, axis=-1, keepdims=True)
    hit = (logits == best) | jnp.isnan(logits)
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where(hit, index, logits.shape[-1]), axis=-1)


def select_token(logits: jax.Array, key: jax.Array, sampling: SamplingConfig,
                 temperature: jax.Array | None = None, top_p: jax.Array | None = None) -> jax.Array:
    """Next token ids [B] int32 from logits [B, V].

    The program depends only on `sampling.greedy`, `top_k` and whether top-p is on; pass
    `temperature` / `top_p` as traced scalars to reuse one compiled program across requests.
    """
    if sampling.greedy:
        return greedy_tokens(logits)
    temperature = sampling.temperature if temperature is None else temperature
    top_p = sampling.top_p if top_p is None else top_p
    filtered = filter_logits(logits, temperature, sampling.top_k, top_p,
                             use_top_p=sampling.top_p < 1.0)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

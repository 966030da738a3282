"""Choose the exit layer E and draft length d for self-speculation from a short calibration pass.

One teacher-forced forward over calibration tokens gives, for every exit E, the rate alpha_E at
which the early exit's argmax agrees with the final layer's (the greedy acceptance probability of
one draft). Timing one decoder layer and the shared exit for n = 1, 2, ... tokens per row, at the
batch size that will be decoded, gives the costs; the model (DESIGN.md section 4) then scores
every (E, d):

    tokens per round  = replayed along the greedy continuations (`replay_rounds`: exact for greedy
                        decoding; agreement comes in bursts), or (1 - alpha^(d+1)) / (1 - alpha)
                        for i.i.d. acceptance alpha (`expected_speedup`)
    cost per round    = d * (E * layer(1) + head(1)) + E * layer(1) + (L - E) * layer(d+1) + head(d+1)
    speed-up          = tokens per round * (L * layer(1) + head(1)) / cost per round

Measured, not counted: on a CPU a layer pass over d+1 tokens costs clearly more than over one (the
byte-count model assumed equal), and more so at batch 8, where no (E, d) may pay at all. Then the
choice is plain decoding.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from inference.engine import cache_dtype, generate, generate_batches
from inference.speculative import SpecConfig
from jaxmodels.attention import checked_attention_impl
from jaxmodels.config import LlamaConfig
from jaxmodels.kv_cache import KVCache
from jaxmodels.model import Params, embed_tokens, exit_logits, run_layers
from jaxmodels.params import decode_layout
from jaxmodels.weights import WEIGHTS, layer_param_count


@dataclasses.dataclass(frozen=True)
class DecodeCosts:
    """Seconds of one decoder layer pass and of one shared-exit pass (norm + head + argmax) for
    n = 1, 2, ... tokens per row: layer[n - 1], head[n - 1]."""
    layer: tuple[float, ...]
    head: tuple[float, ...]

    def plain_token(self, num_layers: int) -> float:
        return num_layers * self.layer[0] + self.head[0]

    def spec_round(self, exit_layer: int, draft_len: int, num_layers: int, draft_head: float = 1.0) -> float:
        """`draft_head`: the draft head's share of the full head (K / V with a draft vocabulary)."""
        E, d = exit_layer, draft_len
        draft = d * (E * self.layer[0] + draft_head * self.head[0]) + E * self.layer[0]  # + last draft's [0, E)
        return draft + (num_layers - E) * self.layer[d] + self.head[d]


def memory_bound_costs(config: LlamaConfig, max_tokens: int) -> DecodeCosts:
    """The byte-count model: a pass costs its weight bytes whatever the token count (the ideal
    memory-bound regime); units of one (mean) layer. Counts come from the weight table, so
    factorized layers weigh their rank; with hybrid layers the mean stands for every layer."""
    L = config.num_hidden_layers
    layer = sum(layer_param_count(config, i, matmul_only=True) for i in range(L)) / L
    head = math.prod(WEIGHTS["lm_head"].shape(config)) / layer
    return DecodeCosts(layer=(1.0,) * max_tokens, head=(head,) * max_tokens)


def measure_decode_costs(params: Params, config: LlamaConfig, batch_size: int, max_tokens: int,
                         cache_len: int = 256, iters: int = 16, repeats: int = 3, layers: int = 1) -> DecodeCosts:
    """Time one decoder layer (over a half-full KV cache) and the shared exit for 1..max_tokens
    tokens per row, `iters` passes inside one compiled loop (no dispatch in the numbers), best of
    `repeats`. Token counts between the measured ones (1, 2, 3, 4, 6, 8, 12, ...) are interpolated.

    With `layers` = n each pass runs layers [0, n) and a layer costs the pass time / n: with n = 1
    the layer's weights stay in the CPU caches between passes; n = L streams every layer's weights
    from memory, as decoding does. The weights are in the layout decoding runs (`decode_layout`)."""
    params = decode_layout(params)
    measured = sorted({n for n in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32) if n < max_tokens} | {max_tokens})
    dim, start = config.hidden_size, cache_len // 2

    def timed(fn, *args) -> float:
        fn(*args)[0].block_until_ready()  # compile and warm up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*args)[0].block_until_ready()
            best = min(best, time.perf_counter() - t0)
        return best / iters

    layer, head = [], []
    for n in measured:
        dtype = cache_dtype(params["embed"].dtype)
        impl = checked_attention_impl("auto", batch_size, (n,), config.num_attention_heads, config.num_key_value_heads,
                                      config.num_key_value_heads, cache_len, config.head_dim, dtype)
        cache = KVCache.create(config, batch_size, cache_len, dtype, attention_impl=impl)  # as decoding will run
        h = jax.random.normal(jax.random.key(n), (batch_size, n, dim), cache.dtype)  # as decoding runs
        positions = jnp.broadcast_to(start + jnp.arange(n), (batch_size, n))

        @jax.jit
        def layer_loop(params, h, cache):
            def body(_, carry):
                out, cache, _ = run_layers(params, config, carry[0], positions, carry[1], start=0, stop=layers)
                return out, cache
            return jax.lax.fori_loop(0, iters, body, (h, cache))

        @jax.jit
        def head_loop(params, h):
            def body(_, h):  # the argmax feeds the next pass so no pass can be skipped
                token = jnp.argmax(exit_logits(params, config, h), -1)
                return h + (token[..., None] == 0).astype(h.dtype)
            return (jax.lax.fori_loop(0, iters, body, h),)

        layer.append(timed(layer_loop, params, h, cache) / layers)
        head.append(timed(head_loop, params, h))
    grid = np.arange(1, max_tokens + 1)
    return DecodeCosts(layer=tuple(np.interp(grid, measured, layer)), head=tuple(np.interp(grid, measured, head)))


@dataclasses.dataclass(frozen=True)
class SpecChoice:
    exit_layer: int
    draft_len: int
    expected_speedup: float  # over plain decoding (modeled, or timed when `measured`); <= 1: plain
    agreement: tuple[float, ...]  # alpha_E for E = 1 .. L-1
    measured: bool = False
    draft_vocab: int | None = None

    def spec(self, adaptive: bool = True) -> SpecConfig | None:
        """None when plain decoding is modeled faster. Adaptive: start at the modeled best d and
        shrink it while acceptance is low (the verify pass keeps d + 1 positions, so growing past
        d would make every verify dearer)."""
        if self.expected_speedup <= 1.0:
            return None
        return SpecConfig(self.exit_layer, self.draft_len, adaptive=adaptive, draft_vocab=self.draft_vocab)


def exit_matches(params: Params, config: LlamaConfig, sequences: Sequence[Sequence[int]],
                 draft_vocab: int | None = None) -> np.ndarray:
    """[L-1, N, T] bool: at each position of each (right-padded) sequence, whether exit E's argmax
    (over ids [0, K) with a draft vocabulary K) equals the final layer's, for E = 1..L-1."""
    width = max(len(s) for s in sequences)
    tokens = np.zeros((len(sequences), width), np.int32)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)] = s
    k = draft_vocab or config.vocab_size

    @jax.jit
    def matches(params, tokens):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        _, _, hidden = run_layers(params, config, embed_tokens(params, tokens), positions,
                                  collect_hidden=True)  # [L, B, T, D]
        final = jnp.argmax(exit_logits(params, config, hidden[-1]), axis=-1)
        # one exit at a time: never materializes [L, B, T, V] logits
        return jax.lax.map(lambda h: jnp.argmax(exit_logits(params, config, h)[..., :k], -1) == final,
                           hidden[:-1])

    return np.asarray(matches(params, jnp.asarray(tokens)))


def agreement_rates(matches: np.ndarray, lengths: Sequence[int], starts: Sequence[int]) -> np.ndarray:
    """alpha[E-1] from exit_matches: the matching fraction of positions starts[i] .. lengths[i]-1."""
    valid = np.zeros(matches.shape[1:], bool)
    for i, (n, b) in enumerate(zip(lengths, starts)):
        valid[i, b:n] = True
    return (matches & valid).sum(axis=(1, 2)) / valid.sum()


def exit_agreement(params: Params, config: LlamaConfig, sequences: Sequence[Sequence[int]],
                   starts: Sequence[int] | None = None) -> np.ndarray:
    """alpha[E-1] = fraction of positions where exit-E argmax == final argmax, for E = 1..L-1,
    counting positions >= starts[i] of sequence i (all positions when starts is None)."""
    return agreement_rates(exit_matches(params, config, sequences), [len(s) for s in sequences],
                           starts or [0] * len(sequences))


def replay_rounds(matches: np.ndarray, start: int, end: int, draft_len: int) -> tuple[int, int]:
    """Greedy self-speculation replayed along one sequence whose tokens after `start` are the
    model's own greedy output: from position j, drafts are accepted while matches[j], matches[j+1],
    ... hold (at most d), then the verifier adds one token. Returns (tokens, rounds) for the
    positions start..end-1. Exact for greedy decoding: agreement comes in bursts (repetitive
    output), which the i.i.d. formula misses."""
    j, tokens, rounds = start, 0, 0
    while j < end:
        a = 0
        while a < draft_len and j + a < len(matches) and matches[j + a]:
            a += 1
        emitted = min(a + 1, end - j)  # the generation stops at `end`, as max_new_tokens does
        tokens, rounds, j = tokens + emitted, rounds + 1, j + emitted
    return tokens, rounds


def round_speedup(tokens_per_round: float, exit_layer: int, draft_len: int, num_layers: int,
                  costs: DecodeCosts, draft_head: float = 1.0) -> float:
    """Speed-up over plain decoding of rounds committing `tokens_per_round` on average (draft head
    cost scaled by `draft_head`)."""
    return tokens_per_round * costs.plain_token(num_layers) / costs.spec_round(exit_layer, draft_len, num_layers,
                                                                               draft_head)


def expected_speedup(alpha: float, exit_layer: int, draft_len: int, num_layers: int,
                     costs: DecodeCosts, draft_head: float = 1.0) -> float:
    """The model above with i.i.d. acceptance alpha: (1 - alpha^(d+1)) / (1 - alpha) tokens per round."""
    alpha = min(alpha, 0.999999)
    tokens = (1 - alpha ** (draft_len + 1)) / (1 - alpha)
    return round_speedup(tokens, exit_layer, draft_len, num_layers, costs, draft_head)


def builtin_calibration_text(chars: int = 2000) -> str:
    """A fixed sample of Python standard-library source, present on every machine."""
    import json.decoder
    return inspect.getsource(json.decoder)[:chars]


def greedy_continuations(params: Params, config: LlamaConfig, prompts: Sequence[Sequence[int]],
                         new_tokens: int = 48) -> list[list[int]]:
    """Each prompt followed by the model's own greedy continuation.

    Self-speculation drafts along the model's greedy output, where exit agreement can differ a lot
    from agreement on natural text (measured on a LayerSkip model: 0.45 at exit 1 on held-out code,
    under 0.01 along its greedy output), so calibration teacher-forces this text instead.
    """
    prompts = [list(p[: config.max_position_embeddings - new_tokens]) for p in prompts]
    out = generate(params, config, prompts, new_tokens, eos_token_ids=())
    return [p + t for p, t in zip(prompts, out.tokens)]


def time_settings(params: Params, config: LlamaConfig, prompts: Sequence[Sequence[int]], batch_size: int,
                  settings: Sequence[SpecConfig | None], new_tokens: int = 32, repeats: int = 2) -> list[float]:
    """Greedy tokens/s of each setting (None: plain) over these prompts in batches of `batch_size`
    (all tokens over all wall time, compilation excluded, best of `repeats`): the ground truth the
    model approximates."""
    speeds = []
    for spec in settings:
        run = lambda: generate_batches(params, config, prompts, batch_size, new_tokens,  # noqa: E731
                                       eos_token_ids=(), speculative=spec)
        run()  # compile
        speeds.append(max(run().tokens_per_second for _ in range(repeats)))
    return speeds


def choose_exit_and_draft(params: Params, config: LlamaConfig, sequences: Sequence[Sequence[int]],
                          max_draft: int = 8, new_tokens: int = 128, continue_greedy: bool = True,
                          batch_size: int = 1, trials: int = 0, costs: DecodeCosts | None = None,
                          draft_vocab: int | None = None) -> SpecChoice:
    """The (E, d) with the best modeled speed-up on these calibration sequences, with costs
    measured at `batch_size` unless given.

    Calibrate for the generation that will run: each sequence is extended by `new_tokens` of the
    model's own greedy output (the text drafts are checked on; `continue_greedy=False` takes the
    sequences as they are), and trials generate `new_tokens` too. Agreement drifts along a
    continuation (exit 3 of the 300-step benchmark model on its 8 calibration prompts: 0.70 over
    the first 48 greedy tokens, 0.59 over 128), so the length calibrated should be the one run.

    With `trials` > 0, the model's best `trials` settings and plain decoding are then timed on the
    calibration prompts (batch_size rows), and the fastest wins: the model misses per-round loop
    overheads and varies with the machine, timing does not (one compilation per trial).
    With `draft_vocab` K, drafts use ids [0, K) only (their head costs K / V; agreement is still
    measured with the full head, which is exact whenever the greedy tokens lie below K).
    """
    prompts = [list(s) for s in sequences]
    if continue_greedy:  # only the greedy part counts: that is the text drafts are checked on
        kept = config.max_position_embeddings - new_tokens  # prompts are cut to this length
        starts = [max(min(len(s), kept) - 1, 0) for s in sequences]  # predicts the 1st new token
        sequences = greedy_continuations(params, config, sequences, new_tokens)
    else:
        starts = [0] * len(sequences)
    matches = exit_matches(params, config, sequences, draft_vocab)  # [L-1, N, T]
    alpha = agreement_rates(matches, [len(s) for s in sequences], starts)
    if costs is None:
        costs = measure_decode_costs(params, config, batch_size, max_draft + 1)
    L = config.num_hidden_layers
    share = (draft_vocab or config.vocab_size) / config.vocab_size

    def replayed(E: int, d: int) -> float:  # tokens per round over all calibration sequences
        done = [replay_rounds(matches[E - 1, i], b, len(s) - 1, d)
                for i, (s, b) in enumerate(zip(sequences, starts))]
        return sum(t for t, _ in done) / sum(r for _, r in done)

    ranked = sorted(((round_speedup(replayed(E, d), E, d, L, costs, share), E, d)
                     for E in range(1, L) for d in range(1, max_draft + 1)), reverse=True)
    speedup, E, d = ranked[0]
    if trials:
        groups = max(len(prompts) // batch_size, 1)  # every prompt used, each batch full
        timed = [prompts[i % len(prompts)] for i in range(groups * batch_size)]
        settings = [None] + [SpecConfig(e, k, adaptive=False, draft_vocab=draft_vocab) for _, e, k in ranked[:trials]]
        speeds = time_settings(params, config, timed, batch_size, settings, new_tokens)
        best = 1 + int(np.argmax(speeds[1:]))  # the fastest self-speculation; plain wins if it is <= 1
        speedup = speeds[best] / speeds[0]
        E, d = settings[best].exit_layer, settings[best].draft_len
    return SpecChoice(exit_layer=E, draft_len=d, expected_speedup=float(speedup),
                      agreement=tuple(float(a) for a in alpha), measured=bool(trials), draft_vocab=draft_vocab)

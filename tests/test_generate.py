"""Batched generation: ragged batches, EOS, sampling filters, seeds and request validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from inference import SamplingConfig, filter_logits, generate, generate_batches
from inference.sampling import greedy_tokens
from inference.engine import shape_bucket
from jaxmodels import forward, init_params
from jaxmodels.testing import tiny_config

CONFIG = tiny_config(max_position_embeddings=128)
PARAMS = init_params(CONFIG, jax.random.key(0), std=0.2)  # peaky logits: greedy paths differ
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], list(range(100, 133))]


# The no-cache forward over one fixed-width buffer: one compile for every step of every prompt
# (a growing sequence would compile each op anew for each length). Causal attention: the trailing
# padding is unseen by the positions that are read.
_FORWARD = jax.jit(lambda params, tokens: forward(params, CONFIG, tokens)[0])
_WIDTH = 64


def _plain_greedy(prompt, n):
    """Reference: greedy decoding by re-running the full no-cache forward each step."""
    seq = list(prompt)
    assert len(seq) + n <= _WIDTH
    for _ in range(n):
        buf = np.zeros((1, _WIDTH), np.int32)
        buf[0, :len(seq)] = seq
        seq.append(int(jnp.argmax(_FORWARD(PARAMS, jnp.asarray(buf))[0, len(seq) - 1])))
    return seq[len(prompt):]


def test_batch_of_ragged_prompts_equals_each_prompt_alone_and_the_no_cache_reference():
    batch = generate(PARAMS, CONFIG, PROMPTS, 12, eos_token_ids=())
    for prompt, row in zip(PROMPTS, batch.tokens):
        assert row == generate(PARAMS, CONFIG, [prompt], 12, eos_token_ids=()).tokens[0]
        assert row == _plain_greedy(prompt, 12)


def test_generate_batches_keeps_prompt_order_and_sums_counters():
    from inference.speculative import SpecConfig
    spec = SpecConfig(exit_layer=1, draft_len=2, adaptive=False)
    whole = generate_batches(PARAMS, CONFIG, PROMPTS, 2, 10, eos_token_ids=(), speculative=spec)
    parts = [generate(PARAMS, CONFIG, PROMPTS[:2], 10, eos_token_ids=(), speculative=spec),
             generate(PARAMS, CONFIG, PROMPTS[2:], 10, eos_token_ids=(), speculative=spec)]
    assert whole.tokens == parts[0].tokens + parts[1].tokens
    assert whole.tokens == generate(PARAMS, CONFIG, PROMPTS, 10, eos_token_ids=()).tokens
    assert whole.prompt_tokens == [len(p) for p in PROMPTS]
    assert (whole.drafted, whole.accepted, whole.rounds) == tuple(
        sum(getattr(r, f) for r in parts) for f in ("drafted", "accepted", "rounds"))
    with pytest.raises(ValueError, match="batch_size"):
        generate_batches(PARAMS, CONFIG, PROMPTS, 0, 4)


def test_each_row_stops_at_its_own_eos():
    free = generate(PARAMS, CONFIG, PROMPTS, 12, eos_token_ids=())
    eos = free.tokens[0][3]  # make row 0's 4th token the EOS
    out = generate(PARAMS, CONFIG, PROMPTS, 12, eos_token_ids=(eos,))
    for free_row, row in zip(free.tokens, out.tokens):
        stop = free_row.index(eos) + 1 if eos in free_row else len(free_row)
        assert row == free_row[:stop]
    assert len(out.tokens[0]) == 4


def test_sampling_is_reproducible_per_seed_and_varies_across_seeds():
    kw = dict(temperature=1.0, top_k=50, top_p=0.95, eos_token_ids=())
    a = generate(PARAMS, CONFIG, PROMPTS, 16, seed=7, **kw).tokens
    assert a == generate(PARAMS, CONFIG, PROMPTS, 16, seed=7, **kw).tokens
    assert a != generate(PARAMS, CONFIG, PROMPTS, 16, seed=8, **kw).tokens


def test_top_k_and_top_p_keep_exactly_the_right_support():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda f: np.isfinite(np.asarray(f))[0].tolist()
    assert kept(filter_logits(logits, 1.0, 2, 1.0, use_top_p=False)) == [1, 1, 0, 0, 0]
    # top-p 0.8: 0.5 + 0.2 = 0.7 < 0.8, so the 0.15 token is needed too
    assert kept(filter_logits(logits, 1.0, 0, 0.8, use_top_p=True)) == [1, 1, 1, 0, 0]
    assert kept(filter_logits(logits, 1.0, 0, 0.7, use_top_p=True)) == [1, 1, 0, 0, 0]
    assert kept(filter_logits(logits, 1.0, 0, 0.01, use_top_p=True)) == [1, 0, 0, 0, 0]


@settings(max_examples=60, deadline=None)
@given(shape=st.sampled_from([(1, 7), (3, 5), (2, 3, 40), (1, 1)]), seed=st.integers(0, 2**16),
       levels=st.integers(1, 4), specials=st.lists(st.sampled_from([np.nan, np.inf, -np.inf]), max_size=3))
def test_greedy_tokens_is_argmax_with_ties_nan_and_infinities(shape, seed, levels, specials):
    """The first maximum wins a tie (few distinct values make ties common); a NaN anywhere in a row
    wins at its first position; all -inf gives 0; for every batch shape, under jit too."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, levels, shape).astype(np.float32)
    for value in specials:
        x[tuple(rng.integers(0, n) for n in shape)] = value
    if rng.random() < 0.2:
        x[...] = -np.inf
    want = np.asarray(jnp.argmax(jnp.asarray(x), axis=-1))
    for got in (greedy_tokens(jnp.asarray(x)), jax.jit(greedy_tokens)(jnp.asarray(x))):
        assert got.dtype == jnp.int32 and got.shape == shape[:-1]
        np.testing.assert_array_equal(np.asarray(got), want)


def test_temperature_sampling_matches_the_softmax_distribution():
    """Chi-square test of one decode step's samples against softmax(logits / T)."""
    prompt = [[5, 6, 7]]
    logits, _ = forward(PARAMS, CONFIG, jnp.array(prompt))
    probs = np.asarray(jax.nn.softmax(logits[0, -1] / 1.5))
    top = np.argsort(probs)[::-1][:8]
    n = 400
    counts = np.zeros(9)
    firsts = [generate(PARAMS, CONFIG, prompt * 50, 1, temperature=1.5, seed=s, eos_token_ids=()).tokens
              for s in range(n // 50)]
    for rows in firsts:
        for r in rows:
            counts[list(top).index(r[0]) if r[0] in top else 8] += 1
    expected = np.append(probs[top], 1 - probs[top].sum()) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 26.1  # 99.9% quantile of chi-square with 8 degrees of freedom


def test_shape_buckets_reuse_one_program():
    assert shape_bucket(7, 12) == shape_bucket(9, 16)
    t, s, out = shape_bucket(33, 100)
    assert t == 64 and out == 128 and s >= 33 + 128 and s % 128 == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_k=-3), "top_k must be an integer >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
])
def test_bad_sampling_values_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(PARAMS, CONFIG, PROMPTS, 4, **kwargs)
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_bad_requests_name_the_problem_and_fix():
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(PARAMS, CONFIG, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="exceeds the model's context of 128 tokens.*at most 28"):
        generate(PARAMS, CONFIG, [list(range(100))], 40)
    with pytest.raises(ValueError, match="outside \\[0, 256\\)"):
        generate(PARAMS, CONFIG, [[1, 999]], 4)
    with pytest.raises(ValueError, match="no prompts"):
        generate(PARAMS, CONFIG, [], 4)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        generate(PARAMS, CONFIG, [[1]], 0)

"""Per-layer attention plans through the model and the inference engine: scanned and unrolled
stacks agree, cached decoding equals the uncached forward, clustered greedy decoding equals the
step-by-step reference, self-speculation equals plain clustered decoding token for token, and
plans are checked before anything runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inference import InferenceError, generate, generate_batches
from inference.speculative import SpecConfig
from jaxmodels import (AttentionPlan, KVCache, cluster_plan, embed_tokens, forward, identity_plan, init_params,
                       run_layers)
from jaxmodels.attention_plan import k_slots, take_plan_rows
from jaxmodels.model import plans_from_prefix, unstack_layers
from jaxmodels.testing import tiny_config

CONFIG = tiny_config(num_hidden_layers=6, max_position_embeddings=256)  # H 4, KV 2 (G 2)
PARAMS = init_params(CONFIG, jax.random.key(0), std=0.2)  # peaky logits: greedy paths differ
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3], list(range(100, 133))]
TOKENS = jax.random.randint(jax.random.key(1), (3, 20), 0, CONFIG.vocab_size)


def make_plans(seed: int, batch: int) -> tuple[AttentionPlan | None, ...]:
    """Layers 0-1 dense; 2-3 one cluster (Ck 1, Cq 2); 4 two clusters from random per-row labels
    (Ck 2, Cq 4); 5 arbitrary maps (Ck 2, Cq 2). Four signatures: the stack scans in four runs."""
    rng = np.random.default_rng(seed)
    one = cluster_plan(jnp.zeros((batch, 2), jnp.int32), 1, 4)
    two = cluster_plan(jnp.asarray(rng.integers(0, 2, (batch, 2))), 2, 4)
    odd = AttentionPlan(jnp.asarray(rng.integers(0, 2, (batch, 2)), jnp.int32),
                        jnp.asarray(rng.integers(0, 4, (batch, 2)), jnp.int32),
                        jnp.asarray(rng.integers(0, 2, (batch, 4)), jnp.int32))
    return (None, None, one, one, two, odd)


PLANS = make_plans(0, len(PROMPTS))
PLAIN = generate(PARAMS, CONFIG, PROMPTS, 24, eos_token_ids=())
CLUSTERED = generate(PARAMS, CONFIG, PROMPTS, 24, eos_token_ids=(), attention_plan=PLANS)


def test_scanned_and_unrolled_stacks_agree_with_and_without_a_cache():
    unstacked = unstack_layers(PARAMS)
    logits, _ = forward(PARAMS, CONFIG, TOKENS, plan=PLANS)
    # std 0.2 weights: logits of a few units, so float32 reordering shows at 1e-5
    np.testing.assert_allclose(forward(unstacked, CONFIG, TOKENS, plan=PLANS)[0], logits, atol=1e-4)
    h0, positions = embed_tokens(PARAMS, TOKENS), jnp.broadcast_to(jnp.arange(20), TOKENS.shape)
    cache = KVCache.create(CONFIG, 3, 32, k_slots=k_slots(CONFIG, PLANS))
    h_a, cache_a, hidden = run_layers(PARAMS, CONFIG, h0, positions, cache, plan=PLANS, collect_hidden=True)
    h_b, cache_b, _ = run_layers(unstacked, CONFIG, h0, positions, cache, plan=PLANS)
    np.testing.assert_allclose(h_a, h_b, atol=1e-4)
    assert hidden.shape == (6, 3, 20, CONFIG.hidden_size)
    assert [k.shape[0] for k in cache_a.k] == [6, 6, 3, 3, 6, 6]
    for x, y in zip(cache_a.k + cache_a.v, cache_b.k + cache_b.v):
        np.testing.assert_allclose(x, y, atol=1e-4)


def test_cached_chunks_equal_the_uncached_forward_under_plans():
    full, _ = forward(PARAMS, CONFIG, TOKENS, plan=PLANS)
    cache = KVCache.create(CONFIG, 3, 64, k_slots=k_slots(CONFIG, PLANS))
    pieces = []
    for a, b in [(0, 7), (7, 8), (8, 15), (15, 16), (16, 20)]:
        logits, cache = forward(PARAMS, CONFIG, TOKENS[:, a:b], cache=cache, plan=PLANS)
        cache = cache.replace(lengths=cache.lengths + (b - a))
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-4)


def test_layer_ranges_take_their_own_layers_plans():
    positions = jnp.broadcast_to(jnp.arange(20), TOKENS.shape)
    h0 = embed_tokens(PARAMS, TOKENS)
    h_full, _, _ = run_layers(PARAMS, CONFIG, h0, positions, plan=PLANS)
    h_a, _, _ = run_layers(PARAMS, CONFIG, h0, positions, start=0, stop=3, plan=PLANS)
    h_b, _, _ = run_layers(PARAMS, CONFIG, h_a, positions, start=3, plan=PLANS)
    np.testing.assert_allclose(h_b, h_full, atol=1e-4)
    with pytest.raises(ValueError, match="one entry per layer"):
        run_layers(PARAMS, CONFIG, h0, positions, plan=PLANS[:3])


def test_identity_plans_as_data_are_dense_attention():
    identity = (identity_plan(CONFIG, 3),) * CONFIG.num_hidden_layers
    np.testing.assert_allclose(forward(PARAMS, CONFIG, TOKENS, plan=identity)[0], forward(PARAMS, CONFIG, TOKENS)[0],
                               atol=1e-6)
    assert generate(PARAMS, CONFIG, PROMPTS, 24, eos_token_ids=(), attention_plan=identity).tokens == PLAIN.tokens


def test_clustered_greedy_decoding_equals_the_step_by_step_reference():
    """Each row alone, its own plans, the whole sequence re-run without a cache at every step."""
    assert CLUSTERED.tokens != PLAIN.tokens  # the plans change the model
    pad = 64
    step = jax.jit(lambda tokens, plans: forward(PARAMS, CONFIG, tokens, plan=plans)[0])
    for row, (prompt, out) in enumerate(zip(PROMPTS, CLUSTERED.tokens)):
        plans, seq = take_plan_rows(PLANS, row, row + 1), list(prompt)
        for _ in range(len(out)):
            tokens = jnp.zeros((1, pad), jnp.int32).at[0, :len(seq)].set(jnp.array(seq))
            seq.append(int(jnp.argmax(step(tokens, plans)[0, len(seq) - 1])))  # causal: padding unseen
        assert seq[len(prompt):] == out


@pytest.mark.parametrize("exit_layer, draft_len, adaptive", [(1, 1, False), (3, 3, True), (5, 4, False)])
def test_self_speculation_equals_plain_clustered_greedy(exit_layer, draft_len, adaptive):
    spec = SpecConfig(exit_layer, draft_len, adaptive)
    out = generate(PARAMS, CONFIG, PROMPTS, 24, eos_token_ids=(), speculative=spec, attention_plan=PLANS)
    assert out.tokens == CLUSTERED.tokens
    assert 0 < out.drafted and 0 <= out.accepted <= out.drafted


def test_generate_batches_gives_each_group_its_rows_plans():
    whole = generate_batches(PARAMS, CONFIG, PROMPTS, 2, 24, eos_token_ids=(), attention_plan=PLANS)
    assert whole.tokens == CLUSTERED.tokens


def test_plans_from_a_prefix_are_the_plans_the_whole_prompt_decides():
    """A planner that reads the first 5 positions decides the same plans from the 5-token prefix as
    from the whole prompt (causal attention), layer by layer on the planned model; also under jit."""
    calls = []

    def planner(i, q, k):
        calls.append((i, q.shape, k.shape))
        if i < 2:
            return None
        return cluster_plan((k[:, :, :5].sum(axis=(2, 3)) > 0).astype(jnp.int32), 2, 4)  # labels [B, KV]

    short = plans_from_prefix(PARAMS, CONFIG, TOKENS[:, :5], planner)
    assert [c[0] for c in calls] == list(range(6)) and calls[0][1:] == ((3, 5, 4, 16), (3, 2, 5, 16))
    whole = plans_from_prefix(PARAMS, CONFIG, TOKENS, planner)
    jitted = jax.jit(lambda t: plans_from_prefix(PARAMS, CONFIG, t, planner))(TOKENS[:, :5])
    assert short[:2] == (None, None) == whole[:2] == jitted[:2]
    for a, b, c in zip(short[2:], whole[2:], jitted[2:]):
        for x, y, z in zip(*(jax.tree_util.tree_leaves(p) for p in (a, b, c))):
            np.testing.assert_array_equal(x, y)
            np.testing.assert_array_equal(x, z)


def test_bad_plans_are_rejected_before_anything_runs():
    with pytest.raises(InferenceError, match="one attention plan row per prompt"):
        generate(PARAMS, CONFIG, PROMPTS[:2], 4, attention_plan=PLANS)
    with pytest.raises(InferenceError, match="one entry per layer"):
        generate(PARAMS, CONFIG, PROMPTS, 4, attention_plan=PLANS[:5])
    bad = AttentionPlan(PLANS[2].k_source + 2, PLANS[2].rep_heads, PLANS[2].head_cluster)
    with pytest.raises(InferenceError, match="layer 2: k_source must lie in"):
        generate(PARAMS, CONFIG, PROMPTS, 4, attention_plan=(None, None, bad) + PLANS[3:])

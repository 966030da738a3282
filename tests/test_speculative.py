"""Self-speculative decoding: exactly plain greedy, exactly the target distribution, no recompute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inference import generate
from inference.speculative import SpecConfig, draft_is_accepted, residual_weights
from jaxmodels import forward, init_params
from jaxmodels.testing import tiny_config

CONFIG = tiny_config(num_hidden_layers=6, max_position_embeddings=256)
PARAMS = init_params(CONFIG, jax.random.key(0), std=0.2)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3], list(range(100, 133))]
PLAIN = generate(PARAMS, CONFIG, PROMPTS, 30, eos_token_ids=())


@pytest.mark.parametrize("exit_layer, draft_len, adaptive", [
    (1, 1, False), (2, 4, False), (3, 3, True), (5, 6, False), (5, 6, True), (4, 2, True)])
def test_greedy_self_speculation_equals_plain_greedy(exit_layer, draft_len, adaptive):
    spec = SpecConfig(exit_layer, draft_len, adaptive)
    out = generate(PARAMS, CONFIG, PROMPTS, 30, eos_token_ids=(), speculative=spec)
    assert out.tokens == PLAIN.tokens
    assert 0 < out.drafted and 0 <= out.accepted <= out.drafted


@pytest.mark.parametrize("draft_vocab", [1, 40, CONFIG.vocab_size])
def test_a_smaller_draft_vocabulary_keeps_the_tokens(draft_vocab):
    """Drafting over ids [0, K) only: drafts never leave [0, K), acceptance changes, tokens do not."""
    spec = SpecConfig(3, 3, adaptive=False, draft_vocab=draft_vocab)
    out = generate(PARAMS, CONFIG, PROMPTS, 30, eos_token_ids=(), speculative=spec)
    assert out.tokens == PLAIN.tokens
    in_vocab = sum(t < draft_vocab for row in PLAIN.tokens for t in row[1:])  # could be drafted at all
    assert out.accepted <= in_vocab
    with pytest.raises(ValueError, match="draft_vocab must be in"):
        generate(PARAMS, CONFIG, PROMPTS, 4, speculative=SpecConfig(2, 2, draft_vocab=CONFIG.vocab_size + 1))


def test_eos_inside_a_draft_stops_the_row_where_plain_decoding_stops():
    eos = PLAIN.tokens[0][9]  # row 0 ends at its 10th token; other rows may hit it too
    plain = generate(PARAMS, CONFIG, PROMPTS, 30, eos_token_ids=(eos,))
    for spec in (SpecConfig(5, 6, False), SpecConfig(3, 4, True)):
        out = generate(PARAMS, CONFIG, PROMPTS, 30, eos_token_ids=(eos,), speculative=spec)
        assert out.tokens == plain.tokens
    assert plain.tokens[0][-1] == eos and len(plain.tokens[0]) == 10


@pytest.mark.parametrize("spec", [SpecConfig(2, 5, False, count_visits=True),
                                  SpecConfig(4, 3, True, count_visits=True)])
def test_no_layer_processes_a_token_twice(spec):
    """Per position: every layer group processed it once plus once per rolled-back attempt."""
    out = generate(PARAMS, CONFIG, PROMPTS, 30, eos_token_ids=(), speculative=spec)
    st = jax.tree_util.tree_map(np.asarray, out.spec_stats)
    for row, prompt in enumerate(PROMPTS):
        first, final = len(prompt) - 1, len(prompt) - 1 + len(out.tokens[row])
        for visits, discarded in ((st.visits_early, st.discarded_early), (st.visits_deep, st.discarded_deep)):
            kept = visits[row] - discarded[row]
            np.testing.assert_array_equal(kept[first:final], 1)  # committed: computed exactly once
            np.testing.assert_array_equal(kept[final:], 0)  # never committed
            assert kept[:first].sum() == 0  # the prompt is prefilled, never re-run
        assert st.discarded_deep[row].sum() > 0  # rejections really happened


def test_first_token_marginal_is_exactly_the_target_on_a_small_vocabulary():
    """Enumerate draft x ~ q, accept with the code's rule over a fine grid of u, else sample the
    code's residual: the first emitted token's distribution must equal p."""
    rng = np.random.RandomState(0)
    grid = (np.arange(100_000) + 0.5) / 100_000
    for _ in range(5):
        p, q = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6))
        residual = np.asarray(residual_weights(jnp.asarray(p), jnp.asarray(q)))
        residual = residual / residual.sum()
        marginal = np.zeros(6)
        for x in range(6):
            accept = np.asarray(draft_is_accepted(grid, p[x], q[x])).mean()
            marginal[x] += q[x] * accept
            marginal += q[x] * (1 - accept) * residual
        np.testing.assert_allclose(marginal, p, atol=2e-5)


@pytest.mark.parametrize("draft_vocab", [None, 4])
def test_sampling_self_speculation_matches_the_target_distribution(draft_vocab):
    """Chi-square of the first sampled token (top-k 8, temperature 1) against the full model's p;
    with a draft vocabulary smaller than top-k, most of the target's support is never drafted."""
    prompt, n = [7, 8, 9], 600
    logits, _ = forward(PARAMS, CONFIG, jnp.array([prompt]))
    p = np.asarray(jax.nn.softmax(logits[0, -1]))
    top = np.argsort(p)[::-1][:8]
    expected = p[top] / p[top].sum() * n
    out = generate(PARAMS, CONFIG, [prompt] * n, 3, temperature=1.0, top_k=8, seed=0,
                   eos_token_ids=(), speculative=SpecConfig(1, 3, False, draft_vocab=draft_vocab))
    first = np.array([row[0] for row in out.tokens])
    counts = np.array([(first == t).sum() for t in top])
    assert counts.sum() == n  # every sample lies in the target's top-k support
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.3  # 99.9% quantile, 7 degrees of freedom
    assert out.accepted < out.drafted  # the draft differs from the target: rejections exercised


def test_bad_speculation_settings_are_rejected():
    with pytest.raises(ValueError, match=r"exit_layer must be in \[1, 5\]"):
        generate(PARAMS, CONFIG, PROMPTS, 4, speculative=SpecConfig(6, 2))
    with pytest.raises(ValueError, match="draft_len must be in"):
        generate(PARAMS, CONFIG, PROMPTS, 4, speculative=SpecConfig(2, 0))


def test_early_exit_decoding_is_greedy_on_the_exit_logits():
    """Lossy mode: each token is the argmax of the shared exit after layer E (no-cache reference)."""
    from jaxmodels import embed_tokens, exit_logits, run_layers
    out = generate(PARAMS, CONFIG, PROMPTS[:2], 8, eos_token_ids=(), early_exit=2)
    width = 16  # one fixed-width buffer, so one compile; causal attention: the padding is unseen

    @jax.jit
    def exit_2(params, tokens):
        h, _, _ = run_layers(params, CONFIG, embed_tokens(params, tokens), jnp.arange(width)[None], stop=2)
        return exit_logits(params, CONFIG, h[0])

    for prompt, row in zip(PROMPTS[:2], out.tokens):
        seq = list(prompt)
        for _ in range(8):
            tokens = np.zeros((1, width), np.int32)
            tokens[0, :len(seq)] = seq
            seq.append(int(jnp.argmax(exit_2(PARAMS, jnp.asarray(tokens))[len(seq) - 1])))
        assert row == seq[len(prompt):]
    assert out.tokens != PLAIN.tokens[:2]  # a different (lossy) model
    with pytest.raises(ValueError, match="early_exit must be in"):
        generate(PARAMS, CONFIG, PROMPTS, 4, early_exit=7)


def test_adaptive_draft_length_can_start_low_and_stays_exact():
    spec = SpecConfig(5, 8, adaptive=True, start_draft_len=2)
    out = generate(PARAMS, CONFIG, PROMPTS, 30, eos_token_ids=(), speculative=spec)
    assert out.tokens == PLAIN.tokens
    with pytest.raises(ValueError, match="start_draft_len must be in"):
        generate(PARAMS, CONFIG, PROMPTS, 4, speculative=SpecConfig(2, 3, start_draft_len=5))


@pytest.mark.parametrize("exit_layer, draft_len", [(1, 1), (3, 2), (5, 3), (4, 5)])
def test_acceptance_equals_the_prediction_from_teacher_forced_exit_agreement(exit_layer, draft_len):
    """Greedy drafts are determined by the exit's argmax along the final sequence, so the number
    accepted per round can be predicted exactly; a drafting bug that still yields the right tokens
    (a wrong position, a stale cache entry) would break this equality."""
    from jaxmodels import embed_tokens, exit_logits, run_layers
    prompt, n = PROMPTS[0], 30
    seq = np.array(prompt + PLAIN.tokens[0])
    h, _, _ = run_layers(PARAMS, CONFIG, embed_tokens(PARAMS, jnp.array([seq])),
                         jnp.arange(len(seq))[None], stop=exit_layer)
    early = np.asarray(jnp.argmax(exit_logits(PARAMS, CONFIG, h[0]), -1))  # early[j] drafts seq[j+1]
    j, committed, accepted, rounds = len(prompt) - 1, 0, 0, 0
    while committed < n:
        a = 0
        while a < draft_len and j + a + 1 < len(seq) and early[j + a] == seq[j + a + 1]:
            a += 1
        emit = min(a + 1, n - committed)
        accepted, committed, j, rounds = accepted + min(a, emit), committed + emit, j + emit, rounds + 1
    out = generate(PARAMS, CONFIG, [prompt], n, eos_token_ids=(),
                   speculative=SpecConfig(exit_layer, draft_len, adaptive=False))
    assert (out.accepted, out.rounds) == (accepted, rounds)

"""Calibration of exit layer and draft length, and the self-speculative CLI flags."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from inference.calibrate import (DecodeCosts, choose_exit_and_draft, exit_agreement, exit_matches,
                                expected_speedup, measure_decode_costs, memory_bound_costs, replay_rounds,
                                round_speedup)
from inference.cli import main
from jaxmodels import embed_tokens, exit_logits, init_params, run_layers
from jaxmodels.testing import tiny_config

CONFIG = tiny_config(num_hidden_layers=6)
PARAMS = init_params(CONFIG, jax.random.key(0), std=0.2)


def test_exit_agreement_counts_argmax_matches_per_exit():
    seqs = [list(range(3, 40)), [9, 8, 7, 6, 5]]
    alpha = exit_agreement(PARAMS, CONFIG, seqs)
    for E in (1, 4):  # recompute two exits directly, padding excluded
        matches = total = 0
        for s in seqs:
            tokens = jnp.array([s])
            pos = jnp.arange(len(s))[None]
            h_e, _, _ = run_layers(PARAMS, CONFIG, embed_tokens(PARAMS, tokens), pos, stop=E)
            h_l, _, _ = run_layers(PARAMS, CONFIG, h_e, pos, start=E)
            a = jnp.argmax(exit_logits(PARAMS, CONFIG, h_e), -1)
            b = jnp.argmax(exit_logits(PARAMS, CONFIG, h_l), -1)
            matches, total = matches + int((a == b).sum()), total + len(s)
        assert alpha[E - 1] == matches / total
    assert alpha.shape == (5,)
    suffix = exit_agreement(PARAMS, CONFIG, seqs, starts=[30, 0])  # positions 30.. of seq 0, all of seq 1
    whole = exit_agreement(PARAMS, CONFIG, [seqs[0][:30]])
    n_suffix, n_head = 7 + 5, 30
    np.testing.assert_allclose(alpha * 42, suffix * n_suffix + whole * n_head, atol=1e-9)


def test_cost_model_matches_its_formula_and_prefers_cheap_drafts_when_agreement_is_high():
    # alpha = 0.8, E = 4, d = 5, L = 32, no head: (1 - .8^6)/.2 tokens over 5*4 + 4 + 28 passes
    free_head = DecodeCosts(layer=(1.0,) * 8, head=(0.0,) * 8)
    assert np.isclose(expected_speedup(0.8, 4, 5, 32, free_head), (1 - 0.8 ** 6) / 0.2 * 32 / 52)
    head = DecodeCosts(layer=(1.0,) * 8, head=(1.0,) * 8)
    assert expected_speedup(0.0, 4, 5, 32, head) < 1.0  # no agreement: pure overhead
    assert expected_speedup(0.95, 4, 6, 32, head) > 2.0
    # verify passes that cost more per token (compute-bound) make the same drafts pay less
    compute_bound = DecodeCosts(layer=tuple(float(n) for n in range(1, 9)), head=(1.0,) * 8)
    assert expected_speedup(0.95, 4, 6, 32, compute_bound) < 1.0
    mb = memory_bound_costs(CONFIG, 4)
    assert mb.layer == (1.0,) * 4 and mb.head[0] > 0


def test_measured_costs_cover_every_token_count_and_are_positive():
    """The shape of the measurement only: how the costs compare is timing, which a loaded CI run
    distorts (a 1-token layer on the CPU kernel once measured 3x a 5-token one on XLA); the
    comparison is `benchmarks/verify_cost.py`'s."""
    costs = measure_decode_costs(PARAMS, CONFIG, batch_size=2, max_tokens=5, cache_len=64, iters=4)
    assert len(costs.layer) == len(costs.head) == 5 and min(costs.layer + costs.head) > 0
    assert all(np.isfinite(costs.layer + costs.head))
    streamed = measure_decode_costs(PARAMS, CONFIG, batch_size=1, max_tokens=2, cache_len=64, iters=2,
                                    layers=CONFIG.num_hidden_layers)  # every layer, reported per layer
    assert len(streamed.layer) == 2 and min(streamed.layer + streamed.head) > 0


def test_verify_cost_benchmark_reports_every_batch_and_token_count():
    from benchmarks.verify_cost import cost_rows
    rows = cost_rows("tiny", max_tokens=2, batch_sizes=(1, 2))
    assert [(r[0], r[1]) for r in rows] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(r[3] == 1.0 and r[4] == 1.0 for r in rows if r[1] == 1)  # T = 1 is the unit


def test_replayed_rounds_equal_the_rounds_of_real_self_speculation():
    """Replaying exit agreement along the greedy output predicts tokens and rounds exactly."""
    from inference import generate
    from inference.speculative import SpecConfig
    prompt, n = list(range(3, 20)), 24
    seq = prompt + generate(PARAMS, CONFIG, [prompt], n, eos_token_ids=()).tokens[0]
    matches = exit_matches(PARAMS, CONFIG, [seq])
    for E, d in ((1, 2), (3, 4), (5, 3)):
        out = generate(PARAMS, CONFIG, [prompt], n, eos_token_ids=(), speculative=SpecConfig(E, d, adaptive=False))
        assert replay_rounds(matches[E - 1, 0], len(prompt) - 1, len(seq) - 1, d) == (n, out.rounds)


def test_choice_is_the_argmax_of_the_model_over_the_grid():
    seqs = [list(range(3, 60))]
    costs = memory_bound_costs(CONFIG, 7)
    choice = choose_exit_and_draft(PARAMS, CONFIG, seqs, max_draft=6, costs=costs, continue_greedy=False)
    assert 1 <= choice.exit_layer < 6 and 1 <= choice.draft_len <= 6
    assert len(choice.agreement) == 5 and not choice.measured
    matches = exit_matches(PARAMS, CONFIG, seqs)

    def modeled(E, d):
        tokens, rounds = replay_rounds(matches[E - 1, 0], 0, len(seqs[0]) - 1, d)
        return round_speedup(tokens / rounds, E, d, 6, costs)
    best = max(modeled(E, d) for E in range(1, 6) for d in range(1, 7))
    assert np.isclose(choice.expected_speedup, best)
    assert np.isclose(modeled(choice.exit_layer, choice.draft_len), best)


def test_timed_choice_reports_the_timed_speedup_of_a_tried_setting():
    seqs = [list(range(3, 40)), list(range(50, 80))]
    choice = choose_exit_and_draft(PARAMS, CONFIG, seqs, max_draft=3, batch_size=2, trials=2,
                                   costs=memory_bound_costs(CONFIG, 4), new_tokens=8)
    assert choice.measured and choice.expected_speedup > 0
    assert (choice.spec() is None) == (choice.expected_speedup <= 1.0)


def test_cli_self_speculative_reports_acceptance_and_keeps_the_tokens(capsys, smollm2_loaded_once, monkeypatch):
    import inference.cli
    from inference.calibrate import builtin_calibration_text

    # The auto case calibrates on the prompt plus the built-in sample; a quarter of the sample (about
    # 150 instead of 625 tokens) makes its teacher-forced pass over all 29 exits, the bulk of this
    # test's time, 4x cheaper and still shows that SmolLM2's exits do not pay.
    monkeypatch.setattr(inference.cli, "builtin_calibration_text", lambda: builtin_calibration_text(500))
    base = ["--model", "smollm2", "--prompt", "def add(a, b):", "--max-new-tokens", "16", "--json"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr()[0].splitlines()[-1])
    assert main(base + ["--self-speculative", "--exit-layer", "24", "--draft-len", "2"]) == 0
    spec = json.loads(capsys.readouterr()[0].splitlines()[-1])
    assert spec["generated_tokens"] == plain["generated_tokens"]
    assert spec["self_speculative"] and spec["exit_layer"] == 24 and 0 <= spec["acceptance_rate"] <= 1
    assert main(base + ["--self-speculative", "--exit-layer", "24", "--draft-len", "2", "--draft-vocab", "8000"]) == 0
    small = json.loads(capsys.readouterr()[0].splitlines()[-1])
    assert small["generated_tokens"] == plain["generated_tokens"] and small["draft_vocab"] == 8000
    assert main(base + ["--self-speculative"]) == 0  # auto: calibrates, then decodes as it chose
    out, err = capsys.readouterr()
    auto = json.loads(out.splitlines()[-1])
    # The choice rests on timings measured now (usually "plain" for SmolLM2; a loaded CI run once
    # chose to speculate), so the test checks that either choice is reported and keeps the tokens.
    assert auto["generated_tokens"] == plain["generated_tokens"]
    assert ("decoding plainly" in err) == (auto["self_speculative"] is False)

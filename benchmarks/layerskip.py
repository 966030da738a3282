"""LayerSkip end to end: a LayerSkip-trained model against a baseline, then decoding speed.

    python -m benchmarks.layerskip [--steps N] [--new-tokens 128] [--quick] [--no-append]
    python -m benchmarks.layerskip --model smollm2 [...]   # ours vs transformers' assistant_early_exit

Training: the `layerskip` preset (the main job's recipe, LayerSkip from scratch) and the `baseline` preset (same model, data,
steps and batch; no layer dropout, no early-exit loss), trained one after the other in this run.
Quality: per-exit top-1 agreement with the last layer and held-out loss on the held-out stdlib
modules. Decoding: 8 prompts of held-out code (64 tokens each), greedy, EOS as an ordinary token;
plain decoding against self-speculation over a sweep of exit layer E and draft length d (fixed d)
and the automatic choice (calibrated on 8 other held-out blocks), at batch 1 (the 8 prompts one
after another) and batch 8 (all at once). tokens/s = generated tokens / wall time of the generate
calls, compilation excluded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.report import publish_report, command_line, markdown_table
from inference.calibrate import choose_exit_and_draft
from inference.engine import generate_batches
from inference.speculative import SpecConfig
from jaxmodels.convert import load_model
from jaxmodels.model import unstack_layers
from jaxmodels.weights import WEIGHTS
from training.config import TrainConfig, load_config
from training.resume import training_differences
from training.data import prepare_data
from training.layerskip import evaluate_exits, exit_eval_sums
from training.train import train


def train_pair(steps: int | None, out: str, reuse: bool = False) -> dict[str, dict]:
    """Train baseline and LayerSkip with the same budget; returns {name: summary}. With `reuse`,
    finished runs in `out` (summary.json + model/) are taken if their config trains the same."""
    runs = {}
    for name, preset in (("baseline", "baseline"), ("layerskip", "layerskip")):
        overrides = {"run.out_dir": f"{out}/{name}", "run.decode_report": False, "run.sample_tokens": 0,
                     "checkpoint.enabled": False, "run.progress": False}
        if steps:
            overrides["run.steps"] = steps
        cfg = load_config(preset, overrides=overrides)
        done = Path(out, name, "summary.json")
        if reuse and done.is_file():
            check_same_config(cfg, Path(out, name, "config.yaml"))
            summary = json.loads(done.read_text())
        else:
            summary = train(cfg)
        runs[name] = {"summary": summary, "dir": f"{out}/{name}", "cfg": cfg}
    return runs


def check_same_config(cfg: TrainConfig, saved: Path) -> None:
    """--reuse takes a finished run only if its saved config trains as this one would."""
    if not saved.is_file() or training_differences(load_config(config_file=saved), cfg):
        raise SystemExit(f"--reuse: {saved} differs from the config this benchmark would train with "
                         "(the preset changed since?); rerun without --reuse or with another --out")


def exit_quality(model_dir: str, cfg, batches: int = 16) -> dict[str, np.ndarray]:
    """Per-exit held-out loss and agreement of an exported model."""
    config, params, tok = load_model(model_dir)
    data = prepare_data(cfg.data, cfg.run.seq_len, cfg.run.seed, tokenizer=tok)
    step = jax.jit(lambda p, b: exit_eval_sums(p, config, b["inputs"], b["targets"], b["weights"]))
    held_out = ({"inputs": blocks[:, :-1], "targets": blocks[:, 1:], "weights": weights}
                for blocks, weights in data.heldout_batches(8, batches))
    per_exit = evaluate_exits(step, params, held_out)
    return {"loss": np.asarray(per_exit["exit_loss"]), "agree": np.asarray(per_exit["exit_agreement"])}, data


def heldout_prompts(data) -> tuple[list[list[int]], list[list[int]]]:
    """(8 benchmark prompts, 8 other calibration prompts): 64-token starts of held-out blocks."""
    blocks = [b for b, _ in data.heldout_batches(16, 1)][0]
    starts = [list(map(int, b[:64])) for b in blocks]
    return starts[:8], starts[8:16]


def decode_sweep(params, config, prompts: list[list[int]], calibration: list[list[int]], new_tokens: int,
                 exits: list[int], drafts: list[int], batch_sizes=(1, 8), repeats: int = 3,
                 draft_vocab: int | None = None) -> list[list]:
    """Plain vs self-speculation over the (E, d) sweep and the automatic choice (calibrated on
    `calibration` + the model's greedy continuations), per batch size."""
    rows = []
    for b in batch_sizes:
        choice = choose_exit_and_draft(params, config, calibration, new_tokens=new_tokens, batch_size=b, trials=3,
                                       draft_vocab=draft_vocab)
        auto = choice.spec(adaptive=False)
        vocab = f", K={draft_vocab}" if draft_vocab else ""
        auto_name = f"auto: E={choice.exit_layer}, d={choice.draft_len}{vocab}" if auto else "auto: plain"
        run = lambda spec=None: generate_batches(params, config, prompts, b, new_tokens,  # noqa: E731
                                                 eos_token_ids=(), speculative=spec)
        best = lambda spec=None: max((run(spec) for _ in range(repeats)), key=lambda r: r.tokens_per_second)  # noqa: E731
        run()
        plain = best()
        rows.append([b, "plain", "-", "-", round(plain.tokens_per_second, 1), 1.0, "-", "-"])
        settings = [(f"E={e}, d={d}", SpecConfig(e, d, adaptive=False)) for e in exits for d in drafts]
        if draft_vocab:  # the same points drafting over ids [0, K) only (E=1 never pays: skipped)
            settings += [(f"E={e}, d={d}, K={draft_vocab}", SpecConfig(e, d, adaptive=False, draft_vocab=draft_vocab))
                         for e in exits[1:] for d in drafts]
        settings.append((auto_name, auto))
        for name, spec in settings:
            run(spec)  # compile
            fast = best(spec)
            rows.append([b, "self-speculative" if spec else "plain", name,
                         round(fast.acceptance_rate, 3) if spec else "-", round(fast.tokens_per_second, 1),
                         round(fast.tokens_per_second / plain.tokens_per_second, 3),
                         fast.tokens == plain.tokens, f"{choice.expected_speedup:.2f}" if "auto" in name else "-"])
            print(rows[-1], flush=True)
        plain_again = best()  # the machine's speed drifts: plain once more, the best of both counts
        if plain_again.tokens_per_second > plain.tokens_per_second:
            base = plain_again.tokens_per_second
            rows[-len(settings) - 1][4] = round(base, 1)
            for row in rows[-len(settings):]:
                row[5] = round(row[4] / base, 3)
    return rows


def without_deep_layers(params, exit_layer: int):
    """A copy whose layers [E, L) add nothing to the residual stream (the weights the table marks
    `residual`, attention output and MLP down projections, zeroed): the exit-E draft then always
    equals the verifier's token (acceptance 1) while every layer still costs what it did. Timing it
    gives the decoding loop's ceiling."""
    zero = lambda lp: {k: jax.tree_util.tree_map(jnp.zeros_like, w) if WEIGHTS[k].residual else w  # noqa: E731
                       for k, w in lp.items()}
    layers = tuple(zero(lp) if i >= exit_layer else lp for i, lp in enumerate(unstack_layers(params)["layers"]))
    return {**params, "layers": layers}


def acceptance_ceiling(params, config, prompts: list[list[int]], new_tokens: int, exits: list[int],
                       drafts: list[int], batch_sizes=(1, 8), repeats: int = 3,
                       draft_vocab: int | None = None) -> list[list]:
    """Self-speculation speed-up when every draft is accepted, per (batch, E, d): what the loop and
    this machine allow, whatever the model's agreement."""
    rows = []
    for b in batch_sizes:
        for e in exits:
            ceiling = without_deep_layers(params, e)
            run = lambda spec=None: generate_batches(ceiling, config, prompts, b, new_tokens,  # noqa: E731
                                                     eos_token_ids=(), speculative=spec)
            best = lambda spec=None: max(run(spec).tokens_per_second for _ in range(repeats))  # noqa: E731
            run()
            plain = best()
            for d in drafts:
                for k in (None, draft_vocab) if draft_vocab else (None,):
                    spec = SpecConfig(e, d, adaptive=False, draft_vocab=k)
                    accepted = run(spec).acceptance_rate
                    rows.append([b, e, d, k or config.vocab_size, round(accepted, 3), round(best(spec) / plain, 3)])
                    print(rows[-1], flush=True)
    return rows


def run_models(steps: int | None, new_tokens: int, out: str, quick: bool, reuse: bool = False,
               draft_vocab: int | None = None, ceiling: bool = True) -> str:
    runs = train_pair(steps, out, reuse)
    quality, data = {}, None
    for name, r in runs.items():
        quality[name], data = exit_quality(r["dir"] + "/model", r["cfg"])
    L = len(quality["baseline"]["agree"])
    quarter = max(L // 4, 1)
    q_rows = [[f"exit {l + 1}", round(float(quality["baseline"]["agree"][l]), 3),
               round(float(quality["layerskip"]["agree"][l]), 3),
               round(float(quality["baseline"]["loss"][l]), 3), round(float(quality["layerskip"]["loss"][l]), 3)]
              for l in range(L)]
    ratio = quality["layerskip"]["agree"][quarter - 1] / max(quality["baseline"]["agree"][quarter - 1], 1e-9)
    loss_gap = quality["layerskip"]["loss"][-1] / quality["baseline"]["loss"][-1] - 1
    exits, drafts = ([1, 2], [2, 4]) if quick else ([1, 2, 3, 4], [2, 3, 4, 6])
    config, params, _ = load_model(runs["layerskip"]["dir"] + "/model")
    params = unstack_layers(jax.tree_util.tree_map(jnp.asarray, params))
    prompts, calibration = heldout_prompts(data)
    d_rows = decode_sweep(params, config, prompts, calibration, new_tokens, exits, drafts, draft_vocab=draft_vocab)
    c_rows = acceptance_ceiling(params, config, prompts, new_tokens, exits[1:], drafts,
                                draft_vocab=draft_vocab) if ceiling else []
    secs = {n: r["summary"]["train_seconds"] for n, r in runs.items()}
    body = (f"Training: {runs['layerskip']['cfg'].run.steps} steps each, baseline {secs['baseline']:.0f}s, "
            f"LayerSkip {secs['layerskip']:.0f}s of training.\n\n"
            + markdown_table(["exit", "baseline agreement", "LayerSkip agreement", "baseline held-out loss",
                              "LayerSkip held-out loss"], q_rows)
            + f"\n\nAgreement at a quarter of the depth (exit {quarter}): {ratio:.2f}x the baseline's. "
              f"Final held-out loss: LayerSkip {100 * loss_gap:+.2f}% vs baseline.\n\n"
            + "Automatic choice: the cost model (agreement along the model's greedy continuations of 8 "
              "calibration blocks, measured layer and head timings at the batch size) ranks every (E, d); "
              "its top 3 and plain decoding are then timed on the calibration prompts and the fastest is "
              "used ('auto: plain' when no self-speculation beat plain there). The last column is that "
              "calibration-time speed-up.\n\n"
            + markdown_table(["batch", "decoding", "setting", "acceptance", "tokens/s", "vs plain",
                              "identical to plain", "calibration speed-up"], d_rows)
            + ("\n\nCeiling: the same model with layers [E, L) made to add nothing (their attention-output "
               "and MLP-down weights zeroed), so every draft is accepted while every layer costs what it "
               "did; speed-up over plain decoding of that copy. No model can beat this row on this "
               "machine with this decoding loop.\n\n"
               + markdown_table(["batch", "E", "d", "draft vocabulary", "acceptance", "speed-up at acceptance 1"],
                                c_rows) if ceiling else ""))
    return body


def main() -> None:
    import sys
    if any(a == "--model" or a.startswith("--model=") for a in sys.argv[1:]):
        from benchmarks.layerskip_model import main as model_main  # its own flags: see its --help
        return model_main()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, help="training steps for both runs (default: the preset's)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", default="runs/bench_layerskip")
    parser.add_argument("--model", help="compare with transformers' assistant_early_exit on this model "
                                        "(flags of benchmarks.layerskip_model apply)")
    parser.add_argument("--quick", action="store_true", help="short smoke run (nothing appended)")
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="take finished training runs in --out if their config trains the same")
    parser.add_argument("--draft-vocab", type=int, help="also sweep drafting over token ids [0, K) only")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the acceptance-1 ceiling (it depends on "
                                                                  "the model's shape and the machine, not its training)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.new_tokens = args.steps or 20, 16
    body = run_models(args.steps, args.new_tokens, args.out, args.quick, args.reuse, args.draft_vocab,
                      ceiling=not args.no_ceiling)
    print(body)
    if not (args.quick or args.no_append):
        publish_report("LayerSkip: training quality and self-speculative decoding (CPU)",
                      command_line("benchmarks.layerskip"), body)


if __name__ == "__main__":
    main()

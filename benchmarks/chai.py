"""CHAI clustered heads against dense attention: KV memory, score FLOPs, long-context decode, accuracy.

    python -m benchmarks.chai [--models smollm2,trained] [--context 2048] [--new-tokens 32]
        [--repeats 3] [--eval-tokens 8192] [--mc-items 40] [--samples 32] [--train-steps 160]
        [--clusters auto[,N][,N@F]...] [--out runs/bench-chai] [--quick] [--no-append]

**Models** (`--models`, comma-separated): `smollm2` (SmolLM2-135M-Instruct, 9 query heads over 3 KV
heads); `trained`, the main job's model (`training.train`, preset `baseline`: d=256, 8 layers, the
stdlib corpus) given 8 query heads over 4 KV heads and a 4096-token context, trained here for
`--train-steps` steps (about 4 minutes on 2 CPU cores; a finished run under OUT/trained with the same
config is reused); or a model path.

**Per model**, calibrated here with `inference.chai_calibrate.calibrate` once per `--clusters`
setting (`auto`: the elbow rule, the default; N: N clusters in every layer, capped at the layer's n)
and granularity, `kv` and `query`, on `--samples` windows of 256 tokens: half of the held-out stdlib
modules plus the chat-template prose (`benchmarks.chai_tasks` says which half; the other half is the
evaluation text). The files are written to OUT/<model>-chai-<granularity>-<setting>.json. Then every
mode side by side in this run, dense and CHAI at each granularity and setting. On SmolLM2 the elbow
keeps all 3 KV groups in every layer (merging two leaves 22-49% of their disagreement unexplained,
above the 10% tolerance), so `--clusters auto,2,2@22` adds forced ones: 2 groups in every layer, and in
layers 22-29 only (`N@F`: N clusters from layer F on, every head kept below; clustering every layer
of SmolLM2 breaks its generation, colab/chai.ipynb):

- **KV cache bytes** allocated for decoding (`KVCache.nbytes`, batch 1; the share saved is the same
  at any batch), and the K slots kept of L*KV.
- **Attention-score FLOPs** (Q.K^T and softmax; P.V is unchanged): the score matrices each layer
  computes under the packed plans, against L*H ("run"), and the calibration's count k*G or k
  ("nominal"; they differ for query clusters, padded to min(G, k) per K slot).
- **Decode tokens/s at batch 1 and 8** with `--context` tokens (>= 2048) already in the cache: the
  engine's compiled decode loop (`inference.engine.decode_loop`) for `--new-tokens` greedy tokens,
  EOS ignored, the three modes timed in turn in every repeat (median of `--repeats` after a compile
  warm-up). The cache is zero-filled with each row's length set to the context: decode does the same
  work whatever the cached values (no early stop, masks by position), so no 2048-token prefill is
  run per repeat. Plans are each row's own, from held-out code. **Predicted** speed-up: decode
  reads every weight and the whole cache buffer each step, so (weights + dense cache bytes) /
  (weights + CHAI cache bytes); "share of predicted gain" = (measured - 1) / (predicted - 1).
- **Accuracy**: next-token accuracy and perplexity on `--eval-tokens` held-out tokens (windows of
  256), and the next-line multiple-choice task (`--mc-items` items, four lines each), each row under
  CHAI plans from its own first 5 tokens, planned inside the same jitted program.

Targets (issue 14): >= 20% KV memory saved with <= 1 percentage point accuracy change (next-token
and multiple choice), and a long-context decode speed-up reaching >= 70% of the predicted one. The
verdict lines under the tables say which were met. `--quick`: a tiny model trained for 4 steps,
one cluster per layer (so every clustered path runs), short contexts and texts, nothing written to
BENCHMARKS.md (a smoke run of about 40 seconds on 2 cores, half of it training).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from benchmarks.chai_tasks import next_line_items, score_items, score_windows, scorer, split_documents, text_windows
from benchmarks.report import command_line, markdown_table, publish_report
from inference.chai_generate import PlanSpec, chai_plans, executed_score_heads
from inference.engine import decode_loop
from inference.sampling import SamplingConfig
from jaxmodels.attention_plan import k_slots
from jaxmodels.chai_file import ChaiCalibration
from jaxmodels.convert import load_model
from jaxmodels.kv_cache import KVCache
from jaxmodels.model import unstack_layers

TITLE = "CHAI clustered heads: KV memory, score FLOPs, long-context decode and accuracy (CPU)"
GRANULARITIES = ("kv", "query")


@dataclasses.dataclass(frozen=True)
class Settings:
    context: int = 2048
    new_tokens: int = 32
    batches: tuple[int, ...] = (1, 8)
    repeats: int = 3
    eval_tokens: int = 8192
    mc_items: int = 40
    seq_len: int = 256
    samples: int = 32  # calibration windows
    calib_tokens: int = 256
    eval_batch: int = 4
    train_steps: int = 160
    clusters: tuple[str | int, ...] = ("auto",)  # chai_calibrate --clusters settings: the elbow, or N per layer


QUICK = Settings(context=48, new_tokens=4, batches=(1, 2), repeats=1, eval_tokens=128, mc_items=4, seq_len=64,
                 samples=2, calib_tokens=32, eval_batch=4, train_steps=4, clusters=(1,))  # every path clusters


# --------------------------------------------------------------------------- models and calibration
def trained_model(out: Path, steps: int, quick: bool) -> Path:
    """Train (or reuse) the main job's model with 8 query heads over 4 KV heads; its run folder."""
    from training.config import load_config
    from training.resume import training_differences
    from training.train import train

    folder = out / "trained"
    o = {"run.out_dir": str(folder), "run.steps": steps, "run.sample_tokens": 0, "run.progress": False,
         "run.eval_every": 0, "checkpoint.enabled": False, "run.decode_report": False,
         "model.num_attention_heads": 8, "model.num_key_value_heads": 4, "model.max_position_embeddings": 4096}
    if quick:
        from training.testing import small_corpus
        o.update({"data.source": str(small_corpus(out / "corpus")), "data.vocab_size": 512, "run.batch_size": 4,
                  "run.seq_len": 32, "run.eval_batches": 1, "run.log_every": 1, "mesh.data": 1, "schedule.warmup_steps": 1,
                  "model.hidden_size": 64, "model.intermediate_size": 128, "model.num_hidden_layers": 2,
                  "model.num_attention_heads": 4, "model.num_key_value_heads": 2,
                  "model.max_position_embeddings": 512})
    cfg = load_config("baseline", overrides=o)
    if (folder / "summary.json").is_file() and (folder / "model").is_dir():
        if not training_differences(load_config(config_file=folder / "config.yaml"), cfg):
            print(f"reusing the trained model in {folder}", flush=True)
            return folder
        raise SystemExit(f"{folder} holds a run with another config; delete it or pass another --out")
    train(cfg)
    return folder


def calibrate_model(config, params, tokenizer, source: str, granularity: str, clusters: str | int,
                    code_file: Path, s: Settings, path: Path) -> ChaiCalibration:
    """`inference.chai_calibrate --clusters CLUSTERS` on the calibration half of the code plus the
    chat prose (a fixed count above a granularity's n is capped at n). "N@F": N clusters in layers
    [F, L) only, every head kept below F."""
    n = config.num_attention_heads if granularity == "query" else config.num_key_value_heads
    count, _, first = str(clusters).partition("@")
    clusters = "auto" if count == "auto" else min(int(count), n)
    from inference.chai_calibrate import calibrate

    args = argparse.Namespace(model=source, out=str(path), clusters=clusters, granularity=granularity,
                              texts=[str(code_file), "chat"], samples=s.samples,
                              max_tokens=min(s.calib_tokens, config.max_position_embeddings), tolerance=None,
                              batch_size=4, plot=None)
    calibration = calibrate(args, config, params, tokenizer, progress=False)
    if first:
        keep = range(int(first))
        calibration = dataclasses.replace(
            calibration, clusters=tuple(n if i in keep else k for i, k in enumerate(calibration.clusters)),
            static_groups=tuple(tuple(range(n)) if i in keep else g for i, g in enumerate(calibration.static_groups)))
    calibration.save(path)
    return calibration


# --------------------------------------------------------------------------- decode speed
def _decode_runner(params, config, calibration: ChaiCalibration | None, prompts: list[list[int]],
                   s: Settings) -> tuple[Callable[[], float], dict[str, Any]]:
    """(a call that times one greedy decode of s.new_tokens from a cache holding s.context
    positions per row, facts about the mode: cache bytes, K slots, score heads)."""
    b = len(prompts)
    plans = None if calibration is None else chai_plans(params, config, calibration, prompts)[0]
    length = -(-(s.context + s.new_tokens) // 128) * 128
    slots, dtype = k_slots(config, plans), params["embed"].dtype
    probe = KVCache.create(config, b, length, dtype, slots)
    info = {"kv_bytes": probe.nbytes(), "dense_kv_bytes": probe.dense_nbytes(), "k_slots": sum(slots),
            "score_heads": sum(executed_score_heads(config, plans or (None,) * config.num_hidden_layers))}
    del probe
    loop = jax.jit(functools.partial(decode_loop, config=config, sampling=SamplingConfig(), eos_ids=(),
                                     out_len=s.new_tokens))  # not donated: as the engine runs it
    logits = jnp.zeros((b, config.vocab_size), jnp.float32)
    runtime = (jax.random.key(0), jnp.int32(s.new_tokens), jnp.float32(1e-6), jnp.float32(1.0))
    planned = () if plans is None else (plans,)

    def run() -> float:
        cache = KVCache.create(config, b, length, dtype, slots)
        cache = jax.block_until_ready(cache.replace(lengths=jnp.full((b,), s.context, jnp.int32)))
        t0 = time.perf_counter()
        jax.device_get(loop(params, cache, logits, *runtime, *planned))
        return time.perf_counter() - t0
    return run, info


def decode_speeds(params, config, calibrations: dict[str, ChaiCalibration | None], prompts: list[list[int]],
                  b: int, s: Settings) -> dict[str, dict[str, Any]]:
    """Per mode at batch b: tokens/s (median; the modes timed in turn in every repeat) and facts."""
    runners = {m: _decode_runner(params, config, cal, prompts[:b], s) for m, cal in calibrations.items()}
    for run, _ in runners.values():
        run()  # compile and warm up
    times: dict[str, list[float]] = {m: [] for m in runners}
    for _ in range(s.repeats):
        for m, (run, _) in runners.items():
            times[m].append(run())
    return {m: {**info, "tok_s": b * s.new_tokens / statistics.median(times[m])}
            for m, (_, info) in runners.items()}


# --------------------------------------------------------------------------- one model
def measure_model(name: str, source: str, s: Settings, out: Path) -> list[dict[str, Any]]:
    """Every measurement of one model; one dict per mode."""
    config, params, tok = load_model(source)
    params = jax.tree_util.tree_map(jnp.asarray, params)  # on device once, not on every call
    calib_docs, eval_docs = split_documents()
    code_file = out / "calibration-code.txt"
    code_file.write_text("\n\n".join(calib_docs), encoding="utf-8")
    cals: dict[str, ChaiCalibration | None] = {"dense": None}
    for c in s.clusters:
        for g in GRANULARITIES:
            mode = g if len(s.clusters) == 1 else f"{g} {c}"
            cals[mode] = calibrate_model(config, params, tok, source, g, c, code_file, s,
                                         out / f"{name}-chai-{g}-{c}.json")
            print(f"{name} {mode}: clusters {cals[mode].clusters}", flush=True)
    seq_len = min(s.seq_len, config.max_position_embeddings)
    windows = text_windows(tok, eval_docs, s.eval_tokens, seq_len)
    items = next_line_items(tok, eval_docs, s.mc_items, seq_len)
    rows = []
    for mode, cal in cals.items():
        score = scorer(config, None if cal is None else PlanSpec.of(cal))
        quality = score_windows(score, params, windows, s.eval_batch)
        quality["mc"] = score_items(score, params, items, seq_len, s.eval_batch)
        rows.append({"model": name, "mode": mode, "calibration": cal, **quality, "mc_items": len(items)})
        print(f"{name} {mode}: {quality}", flush=True)
    context = min(s.context, config.max_position_embeddings - s.new_tokens)
    s = dataclasses.replace(s, context=context)
    prompts = [list(map(int, windows[i % len(windows)])) for i in range(max(s.batches))]
    dec_params = unstack_layers(params)
    weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(dec_params))
    for b in s.batches:
        speeds = decode_speeds(dec_params, config, cals, prompts, b, s)
        for row in rows:
            row[b] = speeds[row["mode"]]
        print({m: round(v["tok_s"], 2) for m, v in speeds.items()}, flush=True)
    for row in rows:
        row.update(weight_bytes=weight_bytes, context=context, layers=config.num_hidden_layers,
                   heads=config.num_attention_heads, kv_heads=config.num_key_value_heads)
    return rows


# --------------------------------------------------------------------------- report
def _counts(clusters: tuple[int, ...]) -> str:
    """Per-layer counts, run-length encoded: '3 x12, 2 x18' (in layer order)."""
    runs: list[list[int]] = []
    for k in clusters:
        if runs and runs[-1][0] == k:
            runs[-1][1] += 1
        else:
            runs.append([k, 1])
    return ", ".join(f"{k} x{n}" for k, n in runs)


def _speed_cells(row: dict, dense: dict, b: int) -> list:
    r, d = row[b], dense[b]
    measured = r["tok_s"] / d["tok_s"]
    predicted = (row["weight_bytes"] + d["kv_bytes"]) / (row["weight_bytes"] + r["kv_bytes"])
    share = f"{100 * (measured - 1) / (predicted - 1):.0f}%" if predicted > 1.001 else "-"
    return [f"{r['tok_s']:.1f} ({measured:.2f}x)", f"{predicted:.3f}x", share]


def speed_table(rows: list[dict], batches: tuple[int, ...]) -> str:
    header = ["model", "attention", "clusters per layer", "K slots kept", "KV cache MB (batch 1)", "KV saved",
              "score FLOPs saved (run / nominal)"]
    for b in batches:
        header += [f"decode tok/s, batch {b} (x dense)", f"predicted (batch {b})", f"share of predicted gain (batch {b})"]
    body = []
    for row in rows:
        dense = next(r for r in rows if r["model"] == row["model"] and r["mode"] == "dense")
        cal, one = row["calibration"], row[batches[0]]
        lh = row["layers"] * row["heads"]
        nominal = f"{100 * cal.savings()['score_flops']:.1f}%" if cal else "-"
        cells = [row["model"], "dense" if cal is None else f"CHAI {row['mode']}",
                 "-" if cal is None else _counts(cal.clusters), f"{one['k_slots']} of {row['layers'] * row['kv_heads']}",
                 f"{one['kv_bytes'] / 1e6:.1f}", f"{100 * (1 - one['kv_bytes'] / one['dense_kv_bytes']):.1f}%",
                 f"{100 * (1 - one['score_heads'] / lh):.1f}% / {nominal}"]
        for b in batches:
            cells += _speed_cells(row, dense, b) if cal is not None else [f"{row[b]['tok_s']:.1f}", "-", "-"]
        body.append(cells)
    return markdown_table(header, body)


def accuracy_table(rows: list[dict]) -> str:
    header = ["model", "attention", "next-token accuracy", "change (points)", "perplexity", "change",
              "multiple choice accuracy", "change (points)"]
    body = []
    for row in rows:
        dense = next(r for r in rows if r["model"] == row["model"] and r["mode"] == "dense")
        same = row is dense
        body.append([row["model"], "dense" if same else f"CHAI {row['mode']}", f"{100 * row['accuracy']:.2f}%",
                     "-" if same else f"{100 * (row['accuracy'] - dense['accuracy']):+.2f}",
                     f"{row['perplexity']:.3f}",
                     "-" if same else f"{100 * (row['perplexity'] / dense['perplexity'] - 1):+.2f}%",
                     f"{100 * row['mc']:.1f}% of {row['mc_items']}",
                     "-" if same else f"{100 * (row['mc'] - dense['mc']):+.1f}"])
    return markdown_table(header, body)


def verdicts(rows: list[dict], batches: tuple[int, ...]) -> list[str]:
    """One line per model and CHAI mode: which targets were met."""
    lines = []
    for row in rows:
        if row["mode"] == "dense":
            continue
        dense = next(r for r in rows if r["model"] == row["model"] and r["mode"] == "dense")
        one = row[batches[0]]
        saved = 1 - one["kv_bytes"] / one["dense_kv_bytes"]
        change = max(abs(row["accuracy"] - dense["accuracy"]), abs(row["mc"] - dense["mc"]))
        memory = "met" if saved >= 0.2 and change <= 0.01 else "not met"
        speed = []
        for b in batches:
            measured = row[b]["tok_s"] / dense[b]["tok_s"]
            predicted = (row["weight_bytes"] + dense[b]["kv_bytes"]) / (row["weight_bytes"] + row[b]["kv_bytes"])
            ok = (measured - 1) >= 0.7 * (predicted - 1)
            speed.append(f"batch {b} {'met' if ok else 'not met'}" if predicted > 1.001 else
                         f"batch {b} n/a (no bytes saved)")
        lines.append(f"- {row['model']}, CHAI {row['mode']}: memory target (>= 20% KV saved, <= 1 point accuracy "
                     f"change) {memory}: {100 * saved:.1f}% saved, largest change {100 * change:.2f} points; "
                     f"speed target (>= 70% of the predicted gain) {', '.join(speed)}.")
    return lines


def report(rows: list[dict], s: Settings) -> str:
    contexts = sorted({r["context"] for r in rows})
    return (speed_table(rows, s.batches) + "\n\n" + accuracy_table(rows) + "\n\n" + "\n".join(verdicts(rows, s.batches))
            + f"\n\nDecode: {s.new_tokens} greedy tokens after {', '.join(map(str, contexts))} cached positions "
            f"per row, float32, median of {s.repeats}; tokens/s = batch x new tokens / decode time. Accuracy: "
            f"{rows[0]['mc_items']} multiple-choice items, next-token scores over about {s.eval_tokens} held-out "
            f"tokens in windows of {s.seq_len}. Calibration: {s.samples} windows of {s.calib_tokens} tokens, "
            f"`--clusters {','.join(map(str, s.clusters))}`.")


def _model_sources(names: str, out: Path, s: Settings, quick: bool) -> list[tuple[str, str]]:
    sources = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name == "trained":
            sources.append(("trained", str(trained_model(out, s.train_steps, quick))))
        else:
            sources.append((Path(name).name or name, name))
    return sources


def run(names: str, s: Settings, out: Path, quick: bool = False) -> list[dict[str, Any]]:
    """Measure every model of `names` (see --models); one dict per model and mode."""
    out.mkdir(parents=True, exist_ok=True)
    return [row for name, source in _model_sources(names, out, s, quick) for row in measure_model(name, source, s, out)]


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="comma-separated: smollm2, trained, or paths "
                                                   "(default smollm2,trained; --quick: trained)")
    d = Settings()
    for flag, default in (("context", d.context), ("new-tokens", d.new_tokens), ("repeats", d.repeats),
                          ("eval-tokens", d.eval_tokens), ("mc-items", d.mc_items), ("samples", d.samples),
                          ("train-steps", d.train_steps)):
        ap.add_argument(f"--{flag}", type=int, default=default)
    ap.add_argument("--clusters", default="auto", help="calibrations, comma-separated: auto (the elbow, default), "
                                                       "N per layer, N@F (N in layers F.. only); each at both granularities")
    ap.add_argument("--out", default="runs/bench-chai")
    ap.add_argument("--quick", action="store_true", help="a seconds-long smoke run; writes nothing to BENCHMARKS.md")
    ap.add_argument("--no-append", action="store_true", help="print only; do not write BENCHMARKS.md")
    args = ap.parse_args(argv)
    s = QUICK if args.quick else Settings(context=args.context, new_tokens=args.new_tokens, repeats=args.repeats,
                                          eval_tokens=args.eval_tokens, mc_items=args.mc_items,
                                          samples=args.samples, train_steps=args.train_steps,
                                          clusters=tuple(c.strip() for c in args.clusters.split(",") if c.strip()))
    names = args.models or ("trained" if args.quick else "smollm2,trained")
    body = report(run(names, s, Path(args.out), args.quick), s)
    print(body)
    if not (args.no_append or args.quick):
        publish_report(TITLE, command_line("benchmarks.chai", argv), body)
    return body


if __name__ == "__main__":
    main()

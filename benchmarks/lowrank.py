"""Low-rank training: full rank vs Pufferfish vs Cuttlefish, same model, data, steps and batch.

    python -m benchmarks.lowrank [--steps 300] [--width 512] [--quick] [--no-append] [--report-only]

Each method trains from the same init (the `baseline` preset without LayerSkip, resized below) for
the same number of steps; Pufferfish switches after 20% of them at rank_ratio 0.25 (first layer
dense), Cuttlefish when its scaled stable ranks settle (at the earliest after 10%). Reported: the
parameters of the factorizable layer matmuls and matmul FLOPs/token after the switch, training
tokens/s after the switch (median of the logged steps, compilation excluded), wall-clock of the whole
run, held-out loss, and Cuttlefish's switch step and mean rank per weight kind.

Default width d=512 (4 layers, mlp 1536, vocab 4096, tied): on a 2-core CPU a step is dominated by
the layer matmuls (~3.1M matmul weights per layer, 12.6M in all, against a 2.1M head), so cutting
their rank cuts the step time; at d=256 with a 4096 vocabulary the head and the attention's
softmax take a larger share and per-op overheads hide most of the saving.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.report import command_line, markdown_table, publish_report
from jaxmodels.config import LlamaConfig
from jaxmodels.convert.hf import read_hf_config
from jaxmodels.weights import FACTORIZABLE, WEIGHTS, layer_ranks
from training.config import load_config
from training.train import train

METHODS = ("none", "pufferfish", "cuttlefish")


def overrides(method: str, steps: int, width: int, out: str, quick: bool, source: str | None = None) -> dict:
    """The shared budget and model, and the method's switch settings."""
    o = {"run.out_dir": f"{out}/{method}", "run.steps": steps, "run.sample_tokens": 0, "run.progress": False,
         "run.eval_every": 0, "checkpoint.enabled": False, "run.decode_report": False,
         "model.hidden_size": width, "model.intermediate_size": 3 * width, "model.num_hidden_layers": 4,
         "model.num_attention_heads": max(width // 64, 1), "model.num_key_value_heads": max(width // 128, 1),
         "lowrank.method": method}
    if source:
        o["data.source"] = source
    if quick:
        o.update({"data.vocab_size": 512, "run.batch_size": 4, "run.seq_len": 32, "run.eval_batches": 1, "mesh.data": 1,
                  "run.log_every": 1,
                  "schedule.warmup_steps": 1})
    if method != "none":
        o.update({"lowrank.warmup_steps": max(steps // 5, 1), "lowrank.full_rank_layers": 1})
    if method == "cuttlefish":
        o.update({"lowrank.warmup_steps": max(steps // 10, 1), "lowrank.track_every": max(steps // 30, 1)})
    return o


def run_one(method: str, steps: int, width: int, out: str, quick: bool, source: str | None = None) -> dict:
    """Train one method; its row of the table as a dict."""
    train(load_config("baseline", overrides=overrides(method, steps, width, out, quick, source)))
    return collect(method, out)


def factorized_counts(config: LlamaConfig) -> tuple[int, int]:
    """(dense, stored) parameters of the weights `config` factorizes: sum of m*n and of (m + n)*r."""
    dense = stored = 0
    for layer in range(config.num_hidden_layers):
        for name, rank in layer_ranks(config, layer).items():
            m, n = WEIGHTS[name].shape(config)
            dense, stored = dense + m * n, stored + (m + n) * rank
    return dense, stored


def collect(method: str, out: str) -> dict:
    """A finished run's row, read back from its folder (metrics.jsonl, summary.json, model/)."""
    run = Path(out, method)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    switch = next((r for r in records if r["split"] == "lowrank"), None)
    after = switch["step"] if switch else 2
    speeds = [r["tokens_per_s"] for r in records if r["split"] == "train" and r["step"] > after
              and "tokens_per_s" in r]  # logged with the progress bar's timing
    config = read_hf_config(run / "model")
    ranks = {k: statistics.mean(v[k] for v in switch["ranks"] if k in v) for k in FACTORIZABLE
             if switch and any(k in v for v in switch["ranks"])}
    return {"method": method, "params": summary["params"], "factorized": factorized_counts(config),
            "flops_per_token": switch["flops_per_token_after"] if switch else None,
            "flops_before": switch["flops_per_token_before"] if switch else None,
            "tokens_per_s": statistics.median(speeds) if speeds else 0.0, "wall_s": summary["wall_seconds"],
            "heldout_loss": summary["heldout"]["loss"], "switch_step": switch["switch_step"] if switch else "-",
            "ranks": ", ".join(f"{k} {v:.0f}" for k, v in ranks.items()) or "-"}


def report(rows: list[dict]) -> str:
    """The markdown table; ratios against the full-rank row (its FLOPs/token are the others' before-switch value)."""
    full = rows[0]
    flops_full = next((r["flops_before"] for r in rows if r["flops_before"]), None)
    header = ["method", "params", "factorized weights: dense -> stored", "matmul FLOPs/token",
              "train tokens/s after switch (x full)", "wall s (x full)", "held-out loss (vs full)",
              "switch step", "ranks (mean per kind)"]
    body = []
    for r in rows:
        dense, stored = r["factorized"]
        body.append([r["method"], f"{r['params']:,}", f"{dense:,} -> {stored:,} ({dense / stored:.2f}x fewer)"
                     if stored else "-", f"{r['flops_per_token'] or flops_full or 0:,}",
                     f"{r['tokens_per_s']:.0f} ({r['tokens_per_s'] / max(full['tokens_per_s'], 1e-9):.2f}x)",
                     f"{r['wall_s']:.0f} ({full['wall_s'] / r['wall_s']:.2f}x)",
                     f"{r['heldout_loss']:.4f} ({100 * (r['heldout_loss'] / full['heldout_loss'] - 1):+.1f}%)",
                     r["switch_step"], r["ranks"]])
    return markdown_table(header, body)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--out", default="runs/bench-lowrank")
    ap.add_argument("--source", default=None, help="data.source (default: the preset's stdlib corpus)")
    ap.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny data, 6 steps, d=64)")
    ap.add_argument("--no-append", action="store_true", help="print only; do not write BENCHMARKS.md")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="which runs to train now (the table reads every method's folder under --out)")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild the table from the run folders under --out of a finished run (no training)")
    args = ap.parse_args(argv)
    steps, width = (6, 64) if args.quick else (args.steps, args.width)
    todo = [] if args.report_only else [m.strip() for m in args.methods.split(",")]
    rows = [run_one(m, steps, width, args.out, args.quick, args.source) if m in todo else collect(m, args.out)
            for m in METHODS]
    table = report(rows)
    print(table)
    if not args.no_append:
        publish_report("Low-rank training: full rank vs Pufferfish vs Cuttlefish (CPU)", command_line("benchmarks.lowrank", argv), table)
    return table


if __name__ == "__main__":
    main()

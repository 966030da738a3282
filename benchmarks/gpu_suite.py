"""The GPU suite: one command that measures what the kernels are for, on one H100 / H200.

    python -m benchmarks.gpu_suite [--minutes 8] [--no-append] [--json PATH]
    python -m benchmarks.gpu_suite --tiny     # tiny shapes on CPU, kernels interpreted (a test runs it)

Parts, each bounded by a share of `--minutes` (rows past it are listed as skipped):
1. decode attention, contexts 1k-32k x batch 1-64 on a Llama-3-8B layer's shape (32 query / 8 KV
   heads, hd 128, bf16): our Pallas kernel (the one "auto" picks: Mosaic GPU on Hopper, with the
   Triton one timed beside it) against the model's jnp path, the jnp reference, jax's
   bundled Pallas decode kernel, XLA's and cuDNN's `dot_product_attention`; our kernel's GB/s
   against the read bandwidth measured in the same run; verify(5) / decode time;
2. CHAI clusters and head-sparse tables against dense on a multi-head shape (32 heads, hd 128);
3. SmolLM2-135M-shaped bf16 decoding, batch 1 / 8 / 64, jnp attention and the kernel, against the
   roofline (batch x measured bandwidth / bytes per step);
4. LayerSkip self-speculation against plain decoding on the main job's model trained in this run.
Writes one section to BENCHMARKS.md, the device named in it (not in --tiny mode).
"""

from __future__ import annotations

import argparse
import json
import traceback
from dataclasses import dataclass, field

import jax

from benchmarks.gpu_attention import AttentionShape, kernel_rows, plan_rows
from benchmarks.gpu_decode import decode_rows, layerskip_rows
from benchmarks.gpu_timing import Budget, device_name, device_read_bandwidth
from benchmarks.report import command_line, markdown_table, publish_report

TITLE = "GPU suite: attention kernels, SmolLM2 decoding and self-speculation"
PARTS = (("decode attention", 0.4), ("CHAI and head-sparse tables", 0.1), ("SmolLM2 decoding", 0.2),
         ("LayerSkip self-speculation", 0.3))


@dataclass(frozen=True)
class SuiteSettings:
    shape: AttentionShape = AttentionShape(32, 8, 128, "bfloat16")
    contexts: tuple[int, ...] = (1024, 4096, 16384, 32768)
    batches: tuple[int, ...] = (1, 8, 64)
    verify_tokens: int = 5
    mha_shape: AttentionShape = AttentionShape(32, 32, 128, "bfloat16")
    plan_batch: int = 8
    plan_context: int = 16384
    plan_clusters: tuple[int, ...] = (4, 8, 16)
    plan_active: tuple[int, ...] = (16, 8)
    decode_batches: tuple[int, ...] = (1, 8, 64)
    decode_impls: tuple[str, ...] = ("reference", "pallas")
    decode_prompt: int = 32
    decode_tokens: int = 128
    decode_preset: str | None = "smollm2-135m"  # None: jaxmodels.testing.tiny_config
    layerskip_overrides: dict = field(default_factory=dict)
    layerskip_batches: tuple[int, ...] = (1, 8)
    layerskip_settings: tuple[tuple[int, int], ...] = ((2, 4), (4, 4))
    layerskip_tokens: int = 128
    interpret: bool = False
    repeats: int = 3
    loop_bytes: float = 20e9  # each timed loop reads about this much (2-512 calls)
    bandwidth_bytes: int = 4 << 30
    reference_limit_bytes: float = 24e9  # skip the jnp reference where its gathered copies exceed this

    def decode_config(self):
        if self.decode_preset is None:
            from jaxmodels.testing import tiny_config
            return tiny_config(vocab_size=512, max_position_embeddings=64)
        from training.aot_programs import model_config
        from training.config import load_config
        return model_config(load_config(self.decode_preset))


def tiny_settings(corpus: str | None) -> SuiteSettings:
    """Every part at toy size, kernels in interpret mode: checks the suite runs end to end on CPU."""
    overrides = {"run.steps": 3, "run.batch_size": 8, "run.seq_len": 80, "run.eval_every": 0,
                 "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_hidden_layers": 4,
                 "data.vocab_size": 300}
    if corpus:
        overrides["data.source"] = corpus
    return SuiteSettings(
        shape=AttentionShape(4, 2, 64, "bfloat16"), contexts=(128,), batches=(1, 2),  # the Hopper kernel's
        mha_shape=AttentionShape(4, 4, 16, "float32"), plan_batch=2, plan_context=32, plan_clusters=(2,),
        plan_active=(2,), decode_batches=(1, 2), decode_prompt=5, decode_tokens=4, decode_preset=None,
        layerskip_overrides=overrides, layerskip_batches=(2,), layerskip_settings=((2, 2),), layerskip_tokens=4,
        interpret=True, repeats=1, loop_bytes=0, bandwidth_bytes=16 << 20)


def run_part(name: str, fn, tables: dict, notes: dict) -> None:
    """Run one part; a failure is reported in its place and the suite goes on."""
    try:
        tables[name], notes[name] = fn()
    except Exception as e:  # one broken part must not lose the others' numbers
        traceback.print_exc()
        tables[name], notes[name] = None, [f"failed: {type(e).__name__}: {e}"]


def run_suite(s: SuiteSettings, minutes: float) -> tuple[dict, dict, float]:
    """({part: [header, *rows] or None}, {part: [notes]}, measured read bandwidth in bytes/s)."""
    budget = Budget(minutes * 60)
    on_gpu = jax.default_backend() == "gpu"
    bandwidth = device_read_bandwidth(s.bandwidth_bytes)
    print(f"{device_name()}: measured read bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    work = {"decode attention": lambda: kernel_rows(s, budget, bandwidth, on_gpu),
            "CHAI and head-sparse tables": lambda: plan_rows(s, budget),
            "SmolLM2 decoding": lambda: decode_rows(s, budget, bandwidth),
            "LayerSkip self-speculation": lambda: layerskip_rows(s, budget)}
    tables, notes = {}, {}
    for name, share in PARTS:
        budget.part(share)
        print(f"== {name} (until {budget.deadline - budget.start:.0f} s)", flush=True)
        run_part(name, work[name], tables, notes)
    notes["total"] = [f"{budget.elapsed():.0f} s in all"]
    return tables, notes, bandwidth


def report(s: SuiteSettings, tables: dict, notes: dict, bandwidth: float) -> str:
    """The BENCHMARKS.md body: one table per part, with its notes."""
    parts = [f"Device: {device_name()}. Measured read bandwidth (jitted sum over "
             f"{s.bandwidth_bytes >> 20} MiB): {bandwidth / 1e9:.0f} GB/s. Attention shape: "
             f"{s.shape.heads} query / {s.shape.kv_heads} KV heads, hd {s.shape.head_dim}, {s.shape.dtype}; "
             f"every key visible; µs are device time per call inside a compiled loop."]
    for name, _ in PARTS:
        table = tables.get(name)
        parts.append(f"### {name}\n\n" + (markdown_table(table[0], table[1:]) if table else "(no rows)")
                     + "".join(f"\n\n- {n}" for n in notes.get(name, [])))
    parts.append(" ".join(notes.get("total", [])))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes on CPU, kernels interpreted (nothing written)")
    parser.add_argument("--minutes", type=float, default=8.0, help="the whole suite's time budget")
    parser.add_argument("--corpus", help="training corpus for the LayerSkip part (default: the preset's)")
    parser.add_argument("--no-append", action="store_true", help="do not write BENCHMARKS.md")
    parser.add_argument("--json", help="also write the tables here")
    args = parser.parse_args(argv)
    if not args.tiny and jax.default_backend() != "gpu":
        raise SystemExit("benchmarks.gpu_suite needs a GPU (JAX sees none); --tiny runs it on CPU at toy sizes")
    settings = tiny_settings(args.corpus) if args.tiny else SuiteSettings()
    if args.corpus and not args.tiny:
        settings = SuiteSettings(layerskip_overrides={"data.source": args.corpus})
    tables, notes, bandwidth = run_suite(settings, args.minutes)
    body = report(settings, tables, notes, bandwidth)
    print(body)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tables": tables, "notes": notes, "bandwidth": bandwidth}, f, indent=1, default=str)
    if not (args.tiny or args.no_append):
        publish_report(TITLE, command_line("benchmarks.gpu_suite", argv), body)
    return body


if __name__ == "__main__":
    main()

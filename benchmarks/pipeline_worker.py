"""One process of `benchmarks.pipeline` (started by `training.cluster.launch`; not a user command).

    python -m benchmarks.pipeline_worker timing --out FILE [--steps N] [--quick]
    python -m benchmarks.pipeline_worker convergence --out FILE [--epochs E] [--quick]

`timing`: two processes x one CPU device, one pipeline stage each (mesh data=1, stage=2), time the
pipelined train step (AdamW included) for GPipe and circular, plain and AC-SGD (4-bit forward deltas,
8-bit gradients), and read the bytes each device sends to the other stage per step from the compiled
program. AC-SGD's step time includes its host work (building the memory arrays, storing them back).
`convergence`: one process x two devices, the same model trained on a fixed set of stdlib blocks for
several epochs, plain vs AC-SGD (first epoch exact), held-out loss at the end. Process 0 writes FILE.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.config import LlamaConfig
from jaxmodels.model import init_params
from training import handoff, parallel
from training.activation_memory import PipelineMemory
from training.cli import init_distributed
from training.config import MeshSection, OptimizerSection, ScheduleSection
from training.hlo_bytes import collective_bytes
from training.pipeline import PipelineSpec, from_stage_layout, state_shardings, to_stage_layout
from training.pipeline_step import make_pipeline_train_step, stage_loss_setup
from training.step import make_eval_step, make_optimizer

MODES = [("gpipe", 1, False), ("gpipe", 1, True), ("circular", 2, False), ("circular", 2, True)]


def model(vocab: int, quick: bool) -> LlamaConfig:
    """Activations wide against the work per stage (d=128, one layer per stage for GPipe), so the
    link matters: the regime AC-SGD is for."""
    return LlamaConfig(vocab_size=vocab, hidden_size=64 if quick else 128, intermediate_size=128 if quick else 256,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16 if quick else 32, max_position_embeddings=512, tie_word_embeddings=False)


class Trainer:
    """One pipelined training setup: params, AdamW, the compiled step(s) and, for AC-SGD, memory."""

    def __init__(self, config, mesh, spec, compressed, seq_len, rows, total_steps, lr=3e-3):
        self.spec, self.compressed, self.mesh = spec, compressed, mesh
        opt, sched = OptimizerSection(lr=lr, grad_accum=spec.microbatches), ScheduleSection(warmup_steps=2)
        optimizer = make_optimizer(opt, sched, total_steps)
        params = to_stage_layout(init_params(config, jax.random.key(0)), spec)
        self.params = jax.device_put(params, state_shardings(params, mesh))
        self.opt_state = jax.jit(optimizer.init)(self.params)
        setup = stage_loss_setup(config)
        self.steps = {}
        for exact in ((False, True) if compressed else (None,)):
            hand = handoff.ring(spec.stages) if exact is None else handoff.acsgd(spec.stages, exact=exact)
            fn = make_pipeline_train_step(setup, mesh, spec, optimizer, None, self.params, total_steps, handoff=hand)
            self.steps[exact] = jax.jit(fn, donate_argnums=(0, 1))
        self.memory = (PipelineMemory(spec, mesh, seq_len, config.hidden_size, max_buffer_bytes=2**34)
                       if compressed else None)
        self.batch_sharding = parallel.batch_sharding(mesh)

    def put(self, blocks: np.ndarray) -> dict:
        """blocks [M*b, T+1] (the same on every process) -> the global batch."""
        m = self.spec.microbatches
        b = blocks.reshape(m, -1, blocks.shape[-1])
        arrays = {"inputs": b[..., :-1], "targets": b[..., 1:]}
        return {k: jax.make_array_from_callback(v.shape, self.batch_sharding, lambda i, v=v: v[i])
                for k, v in arrays.items()}

    def step(self, blocks: np.ndarray, ids: np.ndarray, step: int) -> float:
        batch, rng = self.put(blocks), jax.random.key(1)
        ids = ids.reshape(self.spec.microbatches, -1)
        if self.memory is None:
            self.params, self.opt_state, metrics = self.steps[None](self.params, self.opt_state, batch, rng,
                                                                   jnp.int32(step))
        else:
            exact = self.memory.first_pass(ids)
            self.params, self.opt_state, metrics, memory = self.steps[exact](
                self.params, self.opt_state, batch, rng, jnp.int32(step), self.memory.arrays(ids))
            self.memory.update(ids, memory)
        return float(metrics["loss"])

    def sent_bytes(self, blocks: np.ndarray, ids: np.ndarray) -> int:
        """collective-permute bytes one device sends per step, from the compiled (compressed) step."""
        fn = self.steps[False if self.compressed else None]
        args = [self.params, self.opt_state, self.put(blocks), jax.random.key(1), jnp.int32(0)]
        if self.compressed:
            args.append(self.memory.arrays(ids.reshape(self.spec.microbatches, -1)))
        return int(collective_bytes(fn.lower(*args).compile().as_text())["payload_bytes"]["collective-permute"])


def timing(args) -> list[dict]:
    """Median step time and bytes sent per step, per mode; the same random batch every step."""
    mesh = parallel.make_mesh(MeshSection(data=1, stage=2))
    seq, rows, micro = (64, 2, 2) if args.quick else (256, 4, 4)
    config = model(512, args.quick)
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, config.vocab_size, (micro * rows, seq + 1)).astype(np.int32)
    ids = np.arange(micro * rows)
    out = []
    for schedule, repeats, compressed in MODES:
        spec = PipelineSpec(2, micro, repeats)
        trainer = Trainer(config, mesh, spec, compressed, seq, rows, args.steps + 2)
        trainer.step(blocks, ids, 0)  # compiles; AC-SGD's exact first pass fills the memory
        trainer.step(blocks, ids, 1)  # compiles AC-SGD's compressed program
        times = []
        for i in range(args.steps):
            t0 = time.perf_counter()
            trainer.step(blocks, ids, 2 + i)
            times.append(time.perf_counter() - t0)
        out.append({"schedule": schedule, "acsgd": compressed, "step_s": statistics.median(times),
                    "bubble": spec.bubble(), "bytes_sent": trainer.sent_bytes(blocks, ids),
                    "tokens_per_step": micro * rows * seq})
        print(json.dumps(out[-1]), flush=True)
    return out


def convergence(args) -> list[dict]:
    """Plain vs AC-SGD GPipe training on the same fixed blocks for `epochs`: held-out loss."""
    from training.config import DataSection
    from training.data import prepare_data
    from training.testing import small_corpus
    import tempfile

    folder = tempfile.mkdtemp(prefix="bench-pipeline-")
    seq, rows, micro, examples = (32, 2, 2, 16) if args.quick else (128, 4, 2, 128)
    data = prepare_data(DataSection(source=str(small_corpus(folder + "/corpus")), cache_dir=folder + "/cache",
                                    vocab_size=512), seq, 0)
    config = model(data.tokenizer.vocab_size, args.quick)
    mesh = parallel.make_mesh(MeshSection(data=1, stage=2))
    per_epoch = examples // (rows * micro)
    heldout = [{"inputs": b[:, :-1], "targets": b[:, 1:], "weights": w} for b, w in data.heldout_batches(8, 8)]
    eval_step = jax.jit(make_eval_step(config))
    out = []
    for compressed in (False, True):
        trainer = Trainer(config, mesh, PipelineSpec(2, micro, 1), compressed, seq, rows, per_epoch * args.epochs)
        losses = []
        for epoch in range(args.epochs):
            order = np.random.default_rng([0, epoch]).permutation(examples)
            for i in range(per_epoch):
                ids = order[i * rows * micro:(i + 1) * rows * micro]
                losses.append(trainer.step(data.train.blocks(ids), ids, epoch * per_epoch + i))
        params = jax.device_get(from_stage_layout(jax.device_get(trainer.params)))
        sums = [jax.device_get(eval_step(params, b)) for b in heldout]
        loss = sum(float(s["loss"]) for s in sums) / sum(float(s["tokens"]) for s in sums)
        out.append({"acsgd": compressed, "epochs": args.epochs, "steps": len(losses), "examples": examples,
                    "last_train_loss": losses[-1], "heldout_loss": loss})
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("task", choices=("timing", "convergence"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    init_distributed()
    rows = timing(args) if args.task == "timing" else convergence(args)
    if jax.process_index() == 0:
        with open(args.out, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()

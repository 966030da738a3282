"""AC-SGD in `training.train` (`mesh.stage` >= 2, `pipeline.acsgd=true`): two programs and the memory.

Every step the loop gives `AcsgdStep` the batch's example ids: the block ids of
`DataSet.train_ids`, an index into the train split, the same for an example in every epoch and
after a resume. Then:

- a batch holding any example that has never been through the pipeline runs the **exact** program:
  it sends the activations themselves and fills that example's memory (AC-SGD's first pass);
- every other batch runs the **compressed** program: 2-8-bit changes against the memory forward,
  8-bit (by default) gradients back (`training.handoff.acsgd`).

The memory (`training.activation_memory.PipelineMemory`: float16, in host memory, each process
holding its own stages' rows) is checked against `pipeline.acsgd_buffer_mb` before training starts,
saved beside every checkpoint (RUN_DIR/acsgd/STEP/, one set of files per process) and restored with
it, so a resumed run continues exactly as an uninterrupted one. A checkpoint whose memory is missing
resumes with empty memory: each example's next pass is exact again, and the log says so.

Each step copies the memory between host and devices (it is per example, not per step): a cost on
top of the pipelined step that `benchmarks.pipeline` includes in its times.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from training import handoff, parallel, pipeline_step
from training.activation_memory import PipelineMemory
from training.config import ConfigError, TrainConfig
from training.pipeline import BATCH_AXES, PipelineSpec
from training.resume import schedule_steps

MEMORY_DTYPE = np.float16  # as the reference keeps it; both sides round alike, so they stay equal
MIB = 2**20


def check_rows_stay_on_their_process(mesh: Mesh, process_of: Callable[[Any], int] = lambda d: d.process_index
                                     ) -> None:
    """AC-SGD's memory of an example lives on the processes that last ran it. With the batch split
    over processes, an example's row moves between processes from epoch to epoch (the order is a
    fresh permutation) and its memory would be elsewhere: refused, naming the fix."""
    stages, shards = mesh.shape["stage"], parallel.batch_size_per_step(mesh)
    sharding = NamedSharding(mesh, P("stage", BATCH_AXES))
    held: dict[tuple[int, int], set[int]] = {}
    for device, (stage, rows) in sharding.devices_indices_map((stages, shards)).items():
        held.setdefault((process_of(device), stage.indices(stages)[0]), set()).update(
            range(*rows.indices(shards)))
    if any(len(rows) != shards for rows in held.values()):
        raise ConfigError(f"pipeline.acsgd needs every process to hold all batch rows of its stages (each "
                          f"example's activation memory stays on one process), but mesh data x fsdp = {shards} "
                          f"splits the rows over processes; put the processes on the stage axis (mesh.stage = "
                          f"processes, mesh.data x mesh.fsdp = devices per process) or set pipeline.acsgd=false")


def buffer_bytes(mesh: Mesh, spec: PipelineSpec, examples: int, seq_len: int, hidden: int) -> int:
    """Host bytes this process's memory reaches once `examples` examples have passed: per example and
    per stage it holds, a sender and a receiver copy of [repeats, T, D] in MEMORY_DTYPE."""
    stage_axis = mesh.axis_names.index("stage")
    stages = sum(1 for s in range(spec.stages)
                 if any(d.process_index == jax.process_index() for d in np.take(mesh.devices, s, stage_axis).flat))
    row = spec.repeats * seq_len * hidden * np.dtype(MEMORY_DTYPE).itemsize
    return 2 * examples * stages * row


def memory_structs(memory: PipelineMemory, rows: int) -> tuple:
    """The (send, recv) memory arguments' shapes and shardings, for compiling ahead of time."""
    spec = memory.spec
    shape = handoff.memory_shape(spec.stages, spec.repeats, spec.microbatches, rows, memory.seq_len, memory.hidden)
    return tuple(jax.ShapeDtypeStruct(shape, MEMORY_DTYPE, sharding=memory.sharding) for _ in range(2))


class AcsgdStep:
    """`(params, opt_state, batch, rng, step, ids) -> (params, opt_state, metrics)`: the exact or the
    compressed program (see the module docstring), with the memory moved in and out around it."""

    def __init__(self, programs: dict[bool, Callable], memory: PipelineMemory, microbatches: int):
        self.programs, self.memory, self.microbatches = programs, memory, microbatches

    def __call__(self, params, opt_state, batch, rng, step, ids: np.ndarray | None = None):
        if ids is None:
            raise ConfigError("an AC-SGD step needs the batch's example ids (stable ids that name the same "
                              "training example in every epoch: `DataSet.train_ids`), because its memory "
                              "is kept per example")
        grid = np.asarray(ids).reshape(self.microbatches, -1)
        program = self.programs[self.memory.first_pass(grid)]
        params, opt_state, metrics, memory = program(params, opt_state, batch, rng, step, self.memory.arrays(grid))
        self.memory.update(grid, memory)
        return params, opt_state, metrics

    def save(self, run_dir: Path, step: int, keep: int) -> None:
        """This process's memory as of `step` into RUN_DIR/acsgd/STEP; only the newest `keep` kept."""
        root = Path(run_dir) / "acsgd"
        self.memory.save(root / str(step))
        saved = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True)
        for old in saved[keep:]:  # each process removes its own files; the last one the folder
            for f in (root / str(old)).glob(f"activations-p{jax.process_index()}-*"):
                f.unlink(missing_ok=True)
            try:
                (root / str(old)).rmdir()
            except OSError:  # another process's files are still there
                pass

    def restore(self, run_dir: Path, step: int, note: Callable[[str], None]) -> None:
        """The memory saved with the checkpoint of `step` (none: empty memory, said through `note`)."""
        folder = Path(run_dir) / "acsgd" / str(step)
        self.memory = PipelineMemory(self.memory.spec, self.memory.mesh, self.memory.seq_len,
                                     self.memory.hidden, self.memory.max_buffer_bytes, MEMORY_DTYPE)
        if (folder / f"activations-p{jax.process_index()}-seen.npy").is_file():
            self.memory.load(folder)
        elif step > 0:
            note(f"AC-SGD: no activation memory saved with step {step} ({folder}); starting with empty "
                 f"memory, so each example's next pass is exact again")


def build(cfg: TrainConfig, setup: dict[str, Any], example_batch: dict, examples: int,
          note: Callable[[str], None]) -> AcsgdStep:
    """Check the placement and the buffer size, compile both programs ahead of time, and restore the
    memory of the step the run starts from."""
    mesh, model_config, run = setup["mesh"], setup["model_config"], cfg.run
    spec, pl = pipeline_step.spec_for(cfg), cfg.pipeline
    check_rows_stay_on_their_process(mesh)
    hidden, limit = model_config.hidden_size, pl.acsgd_buffer_mb * MIB
    examples = min(examples, run.steps * run.batch_size)  # the most this run can show the pipeline
    needed = buffer_bytes(mesh, spec, examples, run.seq_len, hidden)
    if needed > limit:
        raise ConfigError(f"pipeline.acsgd keeps two float16 copies of each example's activations per stage "
                          f"boundary: {examples} examples need {needed / MIB:,.0f} MiB of host memory on this "
                          f"process, over pipeline.acsgd_buffer_mb={pl.acsgd_buffer_mb}; raise it to at least "
                          f"{math.ceil(needed / MIB)} (if the host has it), or use fewer examples / a shorter "
                          f"run.seq_len")
    rep, bsh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    memory = PipelineMemory(spec, mesh, run.seq_len, hidden, limit, MEMORY_DTYPE)
    structs = memory_structs(memory, run.batch_size // spec.microbatches)
    mem_sh = tuple(s.sharding for s in structs)
    state, programs = setup["state"], {}
    for exact in (True, False):
        hand = handoff.acsgd(spec.stages, pl.acsgd_forward_bits, pl.acsgd_backward_bits or None, exact=exact)
        fns = pipeline_step.build_steps(cfg, model_config, mesh, schedule_steps(cfg), hand)
        jitted = jax.jit(fns.train_step, donate_argnums=(0, 1, 5),
                         in_shardings=(setup["param_sh"], setup["opt_sh"], {"inputs": bsh, "targets": bsh},
                                       rep, rep, mem_sh),
                         out_shardings=(setup["param_sh"], setup["opt_sh"], rep, mem_sh))
        programs[exact] = jitted.lower(state["params"], state["opt_state"], example_batch, state["rng"],
                                       jnp.int32(0), structs).compile()
    step = AcsgdStep(programs, memory, spec.microbatches)
    step.restore(Path(run.out_dir), setup["start"], note)
    return step

"""AC-SGD's per-example memory on the host, for a pipelined step (`training.handoff.acsgd`).

Every stage keeps, per training example and per boundary it touches, the last reconstructed
activation: the sender-side copy (after its chunk) and the receiver-side copy (before its chunk),
[V, T, D] each (V = repeats). They live in host memory (`training.acsgd.ActivationStore`, float16
by default, as the reference keeps them), keyed by (example id, stage), and each process holds only
the stages of its own devices. Per step:

    memory = store.arrays(ids)          # (send, recv) global arrays [S, V, M, b, T, D], built from
                                        #   this process's rows only (`jax.make_array_from_callback`)
    exact = store.first_pass(ids)       # any example never seen: the exact (uncompressed) program
    ... step(..., memory) -> new memory
    store.update(ids, new_memory)       # this process's shards back into host memory

The size limit (`max_buffer_bytes`, split between the two copies) fails with a clear message when
the data would not fit; `save`/`load` keep the memory across a resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from training.acsgd import ActivationStore
from training.pipeline import BATCH_AXES, PipelineSpec


class PipelineMemory:
    """Host-side AC-SGD memory of one pipelined run (see the module docstring)."""

    def __init__(self, spec: PipelineSpec, mesh: Mesh, seq_len: int, hidden: int, max_buffer_bytes: int,
                 dtype: Any = np.float16):
        self.spec, self.mesh, self.seq_len, self.hidden = spec, mesh, seq_len, hidden
        self.max_buffer_bytes = max_buffer_bytes
        shape = (spec.repeats, seq_len, hidden)
        self.stores = tuple(ActivationStore(shape, max_buffer_bytes=max_buffer_bytes // 2, dtype=dtype)
                            for _ in range(2))
        self.sharding = NamedSharding(mesh, P("stage", None, None, BATCH_AXES))
        self.seen: set[int] = set()

    def _keys(self, ids: np.ndarray, stage: int) -> np.ndarray:
        """ids [...] -> keys [...]: one row per (example, stage)."""
        return np.asarray(ids, np.int64) * self.spec.stages + stage

    def first_pass(self, ids: np.ndarray) -> bool:
        """Whether any example of the batch has never been through the pipeline (the same answer on
        every process: it depends only on the ids)."""
        return any(int(i) not in self.seen for i in np.ravel(ids))

    def arrays(self, ids: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """ids [M, b] -> (send, recv) [S, V, M, b, T, D] global arrays (unseen examples: zeros)."""
        m, b = ids.shape
        shape = (self.spec.stages, self.spec.repeats, m, b, self.seq_len, self.hidden)

        def piece(store: ActivationStore, index: tuple) -> np.ndarray:
            stages = range(*index[0].indices(shape[0]))
            rows = ids[:, index[3]]  # [M, b_local]
            out = [store.gather(self._keys(rows, s).ravel())[0].reshape(*rows.shape, *store.value_shape)
                   for s in stages]  # [M, b_local, V, T, D] each
            return np.stack(out).transpose(0, 3, 1, 2, 4, 5)  # [s_local, V, M, b_local, T, D]

        return tuple(jax.make_array_from_callback(shape, self.sharding, lambda idx, st=st: piece(st, idx))
                     for st in self.stores)

    def update(self, ids: np.ndarray, memory: tuple[jax.Array, jax.Array]) -> None:
        """Store this process's shards of the step's new memory; mark the batch's examples seen."""
        for store, array in zip(self.stores, memory):
            done = set()
            for shard in array.addressable_shards:
                key = (shard.index[0].indices(array.shape[0]), shard.index[3].indices(array.shape[3]))
                if key in done:  # a replica of a shard already stored
                    continue
                done.add(key)
                values = np.asarray(shard.data).transpose(0, 2, 3, 1, 4, 5)  # [s_local, M, b_local, V, T, D]
                rows = ids[:, shard.index[3]]
                for values_s, s in zip(values, range(*key[0])):
                    store.scatter(self._keys(rows, s).ravel(), values_s.reshape(-1, *store.value_shape))
        self.seen.update(int(i) for i in np.ravel(ids))

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.stores)

    def save(self, folder: str | Path) -> None:
        """This process's memory into FOLDER/activations-p{process}-{send,recv}.npz (+ seen ids)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        p = jax.process_index()
        for name, store in zip(("send", "recv"), self.stores):
            store.save(folder / f"activations-p{p}-{name}.npz")
        np.save(folder / f"activations-p{p}-seen.npy", np.asarray(sorted(self.seen), np.int64))

    def load(self, folder: str | Path) -> None:
        folder, p = Path(folder), jax.process_index()
        for name, store in zip(("send", "recv"), self.stores):
            store.load(folder / f"activations-p{p}-{name}.npz")
        self.seen = set(int(i) for i in np.load(folder / f"activations-p{p}-seen.npy"))

"""Device mesh and shardings for data parallelism and FSDP, applied through `jax.jit`.

Mesh axes: `data` and `fsdp` (Auto axis types: XLA's partitioner inserts the collectives).
- The batch [A, b, T] is split over both axes along b: every device sees different sequences.
- Parameters (and the optimizer moments, which mirror them) are replicated over `data` and, when
  `fsdp > 1`, sharded over `fsdp` along their largest axis divisible by the fsdp size (a factorized
  weight's u and v each on their own; axes named by the weight table's logical axes). The stacked
  layer axis is never the one sharded: `lax.scan` reads one layer at a time, and a layer living on a
  single device would serialize the scan. XLA all-gathers each weight for use and reduce-scatters its
  gradient (ZeRO-3 style).

The same code runs on 1 device (a 1x1 mesh) or many; only the shardings change, never the math.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxmodels.weights import logical_axes
from training.config import ConfigError, MeshSection

BATCH_AXES = ("data", "fsdp")
UNSHARDED_AXES = ("layers",)  # `lax.scan` reads one layer at a time: never split the stack


def make_mesh(cfg: MeshSection, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, stage) mesh over `devices` (default: all); `data=-1` takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    n, fsdp, stage = len(devices), cfg.fsdp, cfg.stage
    for key, size in (("fsdp", fsdp), ("stage", stage)):
        if size <= 0 or n % size:
            raise ConfigError(f"mesh.{key}={size} must be positive and divide the {n} devices")
    data = n // (fsdp * stage) if cfg.data == -1 else cfg.data
    if data <= 0 or data * fsdp * stage > n:
        raise ConfigError(f"mesh.data={cfg.data} x mesh.fsdp={fsdp} x mesh.stage={stage} needs "
                          f"{max(data, 1) * fsdp * stage} devices, but {n} are available")
    # stage varies slowest over the device order, so pipeline stages span hosts (the hand-offs are
    # few and small) while data and fsdp reductions stay within a host's devices
    grid = np.asarray(devices[:data * fsdp * stage], dtype=object).reshape(stage, data, fsdp).transpose(1, 2, 0)
    return Mesh(grid, ("data", "fsdp", "stage"), axis_types=(AxisType.Auto,) * 3)


def batch_size_per_step(mesh: Mesh) -> int:
    """The number of batch shards: the global batch (per micro-batch) must be a multiple of it."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def fsdp_spec(path: tuple, shape: tuple[int, ...], fsdp: int) -> P:
    """Shard the largest axis divisible by `fsdp` that is not a stacked layer axis; else replicate.

    Axes are told apart by their logical names from the weight table (`jaxmodels.weights`); a leaf
    that is no weight (a step count, ...) is replicated.
    """
    axes = logical_axes(path, len(shape))
    if fsdp == 1 or not shape or axes is None:
        return P()
    candidates = [i for i, name in enumerate(axes) if name not in UNSHARDED_AXES and shape[i] % fsdp == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda i: (shape[i], -i))
    return P(*[("fsdp" if i == axis else None) for i in range(len(shape))])


def state_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for params or optimizer state (a tree of arrays or ShapeDtypeStructs).

    The rule depends only on a leaf's path and shape, so AdamW's moments get their parameter's
    sharding and scalars (step counts) are replicated.
    """
    fsdp = mesh.shape["fsdp"]

    def spec(path, leaf):
        return NamedSharding(mesh, fsdp_spec(path, tuple(getattr(leaf, "shape", ())), fsdp))

    return jax.tree_util.tree_map_with_path(spec, tree)


class ModelLayout:
    """The training state is the model's own params tree (the pipelined layout is
    `training.pipeline.StageLayout`, with the same three methods)."""

    def to_train(self, params: Any) -> Any:
        return params

    def to_model(self, params: Any) -> Any:
        return params

    def shardings(self, tree: Any, mesh: Mesh) -> Any:
        return state_shardings(tree, mesh)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """For [A, b, T] train batches: b split over (data, fsdp)."""
    return NamedSharding(mesh, P(None, BATCH_AXES, None))


def eval_batch_shardings(mesh: Mesh) -> dict[str, NamedSharding]:
    """For eval batches: inputs/targets [B, T] and weights [B], B split over (data, fsdp)."""
    return {"inputs": NamedSharding(mesh, P(BATCH_AXES, None)),
            "targets": NamedSharding(mesh, P(BATCH_AXES, None)),
            "weights": NamedSharding(mesh, P(BATCH_AXES))}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch(mesh: Mesh, micro_batch: int, what: str = "run.batch_size / optimizer.grad_accum") -> None:
    shards = batch_size_per_step(mesh)
    if micro_batch % shards:
        raise ConfigError(f"{what} = {micro_batch} sequences must be a multiple of the {shards} batch "
                          f"shards (mesh data x fsdp); change run.batch_size or the mesh")


def jit_train_step(train_step: Callable, mesh: Mesh, param_sh: Any, opt_sh: Any) -> Callable:
    """jit with explicit shardings; params and optimizer state are donated (updated in place)."""
    rep = replicated(mesh)
    bsh = batch_sharding(mesh)
    return jax.jit(train_step,
                   in_shardings=(param_sh, opt_sh, {"inputs": bsh, "targets": bsh}, rep, rep),
                   out_shardings=(param_sh, opt_sh, rep),
                   donate_argnums=(0, 1))


def jit_eval_step(eval_step: Callable, mesh: Mesh, param_sh: Any) -> Callable:
    return jax.jit(eval_step, in_shardings=(param_sh, eval_batch_shardings(mesh)),
                   out_shardings=replicated(mesh))


def put(tree: Any, shardings: Any) -> Any:
    """Place host arrays (or re-place device arrays) with the given shardings."""
    return jax.device_put(tree, shardings)


def global_train_batch(ids: np.ndarray, grad_accum: int, seq_len: int, read: Callable[[np.ndarray], np.ndarray],
                       sharding: NamedSharding) -> dict[str, jax.Array]:
    """The global batch {inputs, targets} [A, B/A, T] of block ids [B], of which this process reads
    only its own rows (`read(ids) -> blocks [n, T+1]`, once per distinct row range of its devices)
    and assembles them with `jax.make_array_from_callback`. Equal to `put(split_batch(read(ids)))`."""
    grid = np.asarray(ids).reshape(grad_accum, -1)  # [A, b]: the rows `split_batch` makes
    read_rows: dict[tuple, np.ndarray] = {}

    def rows(index: tuple) -> np.ndarray:  # this device's [a, b_local, T+1]
        key = (index[0].indices(grid.shape[0]), index[1].indices(grid.shape[1]))
        if key not in read_rows:
            chosen = grid[index[0], index[1]]
            read_rows[key] = read(chosen.ravel()).reshape(*chosen.shape, -1)
        return read_rows[key]

    shape = (*grid.shape, seq_len)
    return {"inputs": jax.make_array_from_callback(shape, sharding, lambda i: rows(i)[..., :-1][..., i[2]]),
            "targets": jax.make_array_from_callback(shape, sharding, lambda i: rows(i)[..., 1:][..., i[2]])}

"""Training checkpoints with Orbax, behind one small class so Orbax API changes touch only this file.

A checkpoint holds the training state pytree (params, optimizer state, step, RNG key) and a JSON
record (step, data position, anything else the trainer adds). Layout: `DIR/<step>/{state,meta}`.

Guarantees, and how they are met:
- **Atomic saves.** Orbax writes each step into `DIR/<step>.orbax-checkpoint-tmp-<time>/` and renames
  it to `DIR/<step>/` only after every file is written (on local and POSIX file systems; object stores
  use a `commit_success.txt` marker instead). A process killed mid-save leaves only the tmp folder;
  `steps()` never lists it and the manager deletes it on the next start (`cleanup_tmp_directories`).
  `tests/test_checkpoint.py` checks this by killing a process while it saves.
- **Guarded restores.** Orbax keeps no checksums (a flipped byte inside an array file restores
  silently), so once a step is complete we record every file's size and sha256 in
  `DIR/integrity/<step>.json`. `restore_latest` tries the newest step first; if a recorded file is
  missing or differs, reading fails (a file deleted or truncated, unreadable metadata), or the
  contents do not match the expected tree, shapes and dtypes, it warns, moves the step aside to `DIR/damaged-<step>-<time>/` (so keep-last-K and the
  next save of that step are not confused by it) and tries the next older one.
- **Async saves.** With `async_save`, `save` returns once the arrays are copied off the training
  buffers, and the files are written in a background thread while training continues. `wait()` blocks
  until the last save is complete.
- **Keep last K** complete checkpoints (Orbax `LatestN`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

State = dict[str, Any]


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped because it is damaged."""


class CheckpointMismatchError(ValueError):
    """A readable checkpoint whose arrays do not fit the target (a different model or optimizer)."""


def _copy_off_device(state: State) -> State:
    """Fresh device buffers for the save, so donating the live ones to the next step cannot race it."""
    return jax.tree_util.tree_map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)


class Checkpointer:
    """Save and restore `(state pytree, meta dict)` per step in `directory`."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True,
                 on_complete: Callable[[], None] = lambda: None):
        """`on_complete` is called whenever completed steps may have been recorded (training/mirror.py)."""
        self.directory = Path(directory).absolute()
        self._on_complete = on_complete
        self.directory.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for item, save, restore in (("state", ocp.args.StandardSave, ocp.args.StandardRestore),
                                    ("meta", ocp.args.JsonSave, ocp.args.JsonRestore)):
            registry.add(item, save)
            registry.add(item, restore)
        self._manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: State, meta: dict[str, Any]) -> None:
        """Start saving `state` and `meta` as `step` (returns early when async)."""
        meta = dict(meta, step=int(step))
        args = ocp.args.Composite(state=ocp.args.StandardSave(_copy_off_device(state)),
                                  meta=ocp.args.JsonSave(meta))
        self._record_integrity()
        self._on_complete()
        self._manager.save(int(step), args=args, force=True)

    def wait(self) -> None:
        """Block until every started save is complete on disk (and its integrity record written)."""
        self._manager.wait_until_finished()
        self._record_integrity()
        self._on_complete()

    def close(self) -> None:
        self.wait()
        self._manager.close()

    # ------------------------------------------------------------------ integrity records
    def _integrity_path(self, step: int) -> Path:
        return self.directory / "integrity" / f"{step}.json"

    def _record_integrity(self) -> None:
        """Write `integrity/<step>.json` for complete steps that lack one; drop records of deleted steps."""
        steps = set(self._manager.all_steps())
        folder = self.directory / "integrity"
        folder.mkdir(exist_ok=True)
        for record in folder.glob("*.json"):
            if record.stem.isdigit() and int(record.stem) not in steps:
                record.unlink(missing_ok=True)
        for step in steps:
            path = self._integrity_path(step)
            if path.exists():
                continue
            try:
                files = _file_digests(self.directory / str(step))
            except FileNotFoundError:  # deleted by keep-last-K meanwhile
                continue
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps({"step": step, "files": files}))
            os.replace(tmp, path)

    def _verify_integrity(self, step: int) -> None:
        path = self._integrity_path(step)
        if not path.exists():  # killed between finalizing and recording: rely on Orbax's own checks
            return
        expected = json.loads(path.read_text())["files"]
        actual = _file_digests(self.directory / str(step))
        bad = [name for name, digest in expected.items() if actual.get(name) != digest]
        if bad:
            raise ValueError(f"files changed or missing since the save: {bad[:5]}")

    # ------------------------------------------------------------------ restore
    def steps(self) -> list[int]:
        """Complete (finalized) checkpoint steps, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def restore(self, step: int, target: State) -> tuple[State, dict[str, Any]]:
        """Read one step into `target`'s structure; `target` leaves are arrays or ShapeDtypeStructs
        (with `.sharding` to restore straight into sharded device arrays). Raises on any mismatch."""
        self._verify_integrity(step)
        abstract = jax.tree_util.tree_map(_abstract, target)
        self._check_compatible(step, abstract)
        out = self._manager.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        state, meta = out["state"], out["meta"]
        _check_matches(abstract, state)
        if not isinstance(meta, dict) or int(meta.get("step", -1)) != int(step):
            raise ValueError(f"meta record does not belong to step {step}: {meta!r}")
        return state, meta

    def restore_latest(self, target: State) -> tuple[int, State, dict[str, Any]] | None:
        """The newest checkpoint that restores cleanly, as (step, state, meta); None if there is none."""
        for step in reversed(self.steps()):
            try:
                state, meta = self.restore(step, target)
            except CheckpointMismatchError:
                raise
            except Exception as err:  # Orbax/TensorStore raise many types for damaged files
                moved = self._set_aside(step)
                warnings.warn(f"checkpoint step {step} in {self.directory} is damaged and was skipped "
                              f"({type(err).__name__}: {str(err)[:300]}); moved to {moved.name}; "
                              f"trying the previous checkpoint", CheckpointWarning, stacklevel=2)
                continue
            return step, state, meta
        return None

    def _check_compatible(self, step: int, abstract: State) -> None:
        """Compare the saved arrays' shapes/dtypes (from Orbax metadata) with the target's.

        A mismatch means the run's config changed, not that the files are damaged: raise, so the
        checkpoint is neither used nor set aside. Unreadable metadata counts as damage.
        """
        saved = self._manager.item_metadata(step)["state"]
        saved = getattr(saved, "tree", saved)
        if saved is None:
            raise ValueError("the checkpoint's array metadata is missing")
        have = sorted((tuple(x.shape), np.dtype(x.dtype).name) for x in jax.tree_util.tree_leaves(saved))
        want = sorted((tuple(x.shape), np.dtype(x.dtype).name) for x in jax.tree_util.tree_leaves(abstract))
        if have != want:
            missing = [w for w in want if w not in have][:3]
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} holds {len(have)} arrays that do not match "
                f"the {len(want)} this run needs (e.g. no saved array of shape/dtype {missing}): the model "
                f"or optimizer config changed since it was saved. Use a new run.out_dir, or restore the "
                f"config in {self.directory.parent / 'config.yaml'}")

    def _set_aside(self, step: int) -> Path:
        src = self.directory / str(step)
        dst = self.directory / f"damaged-{step}-{int(time.time())}"
        if src.exists():
            src.rename(dst)
        self._manager.reload()
        return dst


def _file_digests(folder: Path) -> dict[str, list]:
    """{relative path: [size, sha256]} of every file under `folder`."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            out[path.relative_to(folder).as_posix()] = [len(data), hashlib.sha256(data).hexdigest()]
    return out


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, np.ndarray):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return x


def _check_matches(abstract: State, restored: State) -> None:
    """Same tree structure, shapes and dtypes as the target, and every float finite."""
    a_leaves, a_def = jax.tree_util.tree_flatten(abstract)
    r_leaves, r_def = jax.tree_util.tree_flatten(restored)
    if a_def != r_def:
        raise ValueError(f"restored tree structure differs from the target:\n{r_def}\nvs\n{a_def}")
    for i, (a, r) in enumerate(zip(a_leaves, r_leaves)):
        if tuple(a.shape) != tuple(r.shape) or np.dtype(a.dtype) != np.dtype(r.dtype):
            raise ValueError(f"leaf {i}: restored {r.shape} {r.dtype}, expected {a.shape} {a.dtype}")
        if np.issubdtype(np.dtype(r.dtype), np.floating) and not bool(jax.numpy.isfinite(r).all()):
            raise ValueError(f"leaf {i} holds NaN or Inf values")

"""Checkpoints: round trip, keep-last-K, sharded restore, kill during a save, damaged checkpoints."""

import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from training.checkpoint import CheckpointMismatchError, Checkpointer, CheckpointWarning

ROOT = Path(__file__).resolve().parents[1]


def _state(shift=0.0):
    params = {"w": jnp.arange(64.0).reshape(8, 8) + shift, "layers": {"n": jnp.ones((2, 8)) * shift}}
    return {"params": params, "opt_state": optax.adamw(1e-3).init(params),
            "rng": jax.random.PRNGKey(int(shift))}


def _assert_tree_equal(a, b):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_round_trip_and_keep_last(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        ck.save(step, _state(step), {"data_position": {"epoch": 0, "index": step}})
    ck.close()
    ck = Checkpointer(tmp_path, keep=2)
    assert ck.steps() == [2, 3]
    step, state, meta = ck.restore_latest(_state())
    assert step == 3 and meta["data_position"] == {"epoch": 0, "index": 3}
    _assert_tree_equal(state, _state(3))
    assert Checkpointer(tmp_path / "empty").restore_latest(_state()) is None


def test_restore_into_sharded_target(tmp_path):
    ck = Checkpointer(tmp_path)
    ck.save(5, _state(5), {})
    ck.wait()
    mesh = jax.make_mesh((8,), ("fsdp",), devices=jax.devices()[:8])
    sharded = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
            mesh, P("fsdp") if x.ndim and x.shape[0] % 8 == 0 else P())), _state())
    _, state, _ = ck.restore_latest(sharded)
    assert state["params"]["w"].sharding.spec == P("fsdp")
    _assert_tree_equal(state, _state(5))


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from training.checkpoint import Checkpointer
    ck = Checkpointer(sys.argv[1])
    ck.save(1, {"w": jnp.ones((256, 256))}, {"data_position": {"epoch": 0, "index": 1}})
    ck.wait()
    async def die(self):  # every file of step 2 is written; the commit (rename) never happens
        os.kill(os.getpid(), signal.SIGKILL)
    atomicity.AtomicRenameTemporaryPath.finalize = die
    ck.save(2, {"w": jnp.full((256, 256), 2.0)}, {"data_position": {"epoch": 0, "index": 2}})
    ck.wait()
    print("not killed")
""")


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    leftovers = [p.name for p in tmp_path.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    assert leftovers and leftovers[0].startswith("2.")  # the killed save left only a tmp folder
    ck = Checkpointer(tmp_path)
    assert ck.steps() == [1]
    step, state, meta = ck.restore_latest({"w": jnp.zeros((256, 256))})
    assert step == 1 and float(state["w"][0, 0]) == 1.0 and meta["data_position"]["index"] == 1
    assert not [p for p in tmp_path.iterdir() if ".orbax-checkpoint-tmp" in p.name]  # cleaned up
    ck.save(2, {"w": jnp.full((256, 256), 2.0)}, {"data_position": {"epoch": 0, "index": 2}})
    ck.wait()  # the step number is free again
    assert ck.steps() == [1, 2]


def _damage(folder: Path, how: str):
    files = sorted((folder / "state").rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else -1)
    biggest = files[-1]
    if how == "truncate":
        biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    elif how == "delete":
        biggest.unlink()
    elif how == "flip":
        data = bytearray(biggest.read_bytes())
        data[len(data) // 2] ^= 0xFF
        biggest.write_bytes(bytes(data))
    elif how == "metadata":
        (folder / "state" / "_METADATA").unlink()


@pytest.mark.parametrize("how", ["truncate", "delete", "flip", "metadata"])
def test_damaged_newest_falls_back_to_previous(tmp_path, how):
    ck = Checkpointer(tmp_path, keep=3)
    for step in (1, 2):
        ck.save(step, _state(step), {"data_position": {"epoch": 0, "index": step}})
    ck.close()
    _damage(tmp_path / "2", how)
    # plus an incomplete save of step 3 (as a kill mid-save leaves it)
    tmp = tmp_path / "3.orbax-checkpoint-tmp-123"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "partial").write_bytes(b"\0" * 10)
    ck = Checkpointer(tmp_path, keep=3)
    assert ck.steps() == [1, 2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step, state, meta = ck.restore_latest(_state())
    assert step == 1 and meta["data_position"]["index"] == 1
    _assert_tree_equal(state, _state(1))
    messages = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    assert len(messages) == 1 and "step 2" in messages[0] and "damaged" in messages[0]
    assert ck.steps() == [1]  # set aside, so step 2 can be saved again
    assert any(p.name.startswith("damaged-2-") for p in tmp_path.iterdir())
    ck.save(2, _state(2), {"data_position": {"epoch": 0, "index": 2}})
    ck.wait()
    assert ck.restore_latest(_state())[0] == 2


def test_changed_config_is_an_error_not_damage(tmp_path):
    ck = Checkpointer(tmp_path)
    ck.save(1, {"w": jnp.ones((4, 4))}, {})
    ck.wait()
    with pytest.raises(CheckpointMismatchError, match="config changed"):
        ck.restore_latest({"w": jnp.ones((4, 5))})
    assert ck.steps() == [1]  # left in place

"""`python -m training.train mesh.stage=2 pipeline.acsgd=true`: AC-SGD inside the training loop.

A corpus of a few hundred tokens (`few_blocks_corpus`) makes an epoch 3 steps long, so a 6-step run has its first epoch
on the exact program (every example's first pass) and its second on the compressed one."""

import jax
import numpy as np
import pytest

from training import acsgd_train, parallel
from training.config import ConfigError, MeshSection
from training.data import prepare_data
from training.testing import few_blocks_corpus, metrics_records, tiny_train_config
from training.train import train
from training.validation import ineffective_keys, validate

STEPS = 6
COMMON = {"model.num_hidden_layers": 4, "run.steps": STEPS, "schedule.total_steps": STEPS,
          "optimizer.grad_accum": 2, "run.eval_every": 0, "run.eval_batches": 1, "checkpoint.every": 2,
          "mesh.data": 2, "mesh.stage": 2, "run.seq_len": 32, "data.heldout_percent": 50.0,
          "data.vocab_size": 300}


@pytest.fixture(scope="module")
def few_blocks(tmp_path_factory):
    return few_blocks_corpus(tmp_path_factory.mktemp("few"))


def _losses(run_dir):
    return np.asarray([r["loss"] for r in metrics_records(run_dir)])


@pytest.fixture(scope="module")
def runs(few_blocks, cache, tmp_path_factory):
    """The plain pipelined run and the AC-SGD run, 6 steps each, and the steps per epoch."""
    plain, compressed = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("acsgd")
    train(tiny_train_config(plain, few_blocks, cache, **COMMON))
    summary = train(tiny_train_config(compressed, few_blocks, cache, **COMMON, **{"pipeline.acsgd": True}))
    cfg = tiny_train_config(compressed, few_blocks, cache, **COMMON)
    blocks = prepare_data(cfg.data, cfg.run.seq_len, cfg.run.seed).train.num_blocks
    return plain, compressed, summary, -(-blocks // cfg.run.batch_size)


def test_the_first_epoch_is_exact_and_the_rest_compressed_stays_close(runs):
    plain, compressed, summary, exact_steps = runs
    assert 1 <= exact_steps <= STEPS - 2  # the corpus gives both kinds of step
    a, b = _losses(compressed), _losses(plain)
    assert a[0] == b[0]  # the first forward pass sends the activations themselves
    # the rest of the first epoch: exact forward passes, only the gradients sent back are 8-bit
    np.testing.assert_allclose(a[:exact_steps], b[:exact_steps], rtol=1e-3)
    # then 4-bit changes forward: other numbers, still close (the held-out bound: benchmarks.pipeline)
    assert np.abs(a[exact_steps:] - b[exact_steps:]).min() > 0
    np.testing.assert_allclose(a[exact_steps:], b[exact_steps:], rtol=0.02)
    assert np.isfinite(summary["heldout"]["loss"])
    saved = sorted(int(p.name) for p in (compressed / "acsgd").iterdir())
    assert saved == [2, 4, 6]  # beside every checkpoint (checkpoint.keep = 3)
    assert (compressed / "acsgd" / "6" / "activations-p0-send.npz").is_file()


def test_a_resumed_run_continues_bitwise_with_its_memory(few_blocks, cache, tmp_path, runs, capsys):
    cfg = tiny_train_config(tmp_path, few_blocks, cache, **{**COMMON, "pipeline.acsgd": True, "run.steps": 4})
    train(cfg)
    assert train(cfg.replace(**{"run.steps": STEPS}))["resumed_from"] == 4
    np.testing.assert_array_equal(_losses(tmp_path), _losses(runs[1]))
    # without the saved memory the run still resumes (every example's next pass exact again), and says so
    lost = tmp_path / "lost"
    train(cfg.replace(**{"run.out_dir": str(lost)}))
    for f in (lost / "acsgd" / "4").iterdir():
        f.unlink()
    capsys.readouterr()
    train(cfg.replace(**{"run.out_dir": str(lost), "run.steps": STEPS}))
    assert "no activation memory saved with step 4" in capsys.readouterr().out


def test_a_buffer_too_small_is_refused_before_training(few_blocks, cache, tmp_path):
    cfg = tiny_train_config(tmp_path, few_blocks, cache, **{  # ~5 examples x 2 stages x 2 copies x 64 KiB
        **COMMON, "pipeline.acsgd": True, "pipeline.acsgd_buffer_mb": 1, "run.seq_len": 128, "model.hidden_size": 256})
    with pytest.raises(ConfigError, match=r"over pipeline.acsgd_buffer_mb=1; raise it to at least \d+"):
        train(cfg)
    assert not [p for p in (tmp_path / "checkpoints").glob("*") if p.name.isdigit()]  # nothing trained


@pytest.mark.parametrize("overrides,message", [
    ({"mesh.stage": 1, "pipeline.acsgd": True}, "mesh.stage=1 has none"),
    ({"pipeline.acsgd": True, "pipeline.acsgd_forward_bits": 3}, "acsgd_forward_bits must be 2, 4 or 8"),
    ({"pipeline.acsgd": True, "pipeline.acsgd_backward_bits": 16}, "0 \\(uncompressed\\), 2, 4 or 8"),
    ({"pipeline.acsgd": True, "pipeline.acsgd_buffer_mb": 0}, "pipeline.acsgd_buffer_mb"),
])
def test_bad_acsgd_configs_are_refused(few_blocks, cache, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(tiny_train_config(tmp_path, few_blocks, cache, **{**COMMON, **overrides}))


def test_acsgd_keys_without_acsgd_are_named(few_blocks, cache, tmp_path):
    cfg = tiny_train_config(tmp_path, few_blocks, cache, **COMMON)
    assert ineffective_keys(cfg, ["pipeline.acsgd_forward_bits"]) == [
        "pipeline.acsgd_forward_bits: pipeline.acsgd is false"]


def test_rows_split_over_processes_are_refused():
    devices = jax.devices()[:8]
    two_hosts = lambda d: devices.index(d) // 4  # noqa: E731  (as 2 processes x 4 devices)
    # stages across the two processes, the batch within each: every process holds all its stages' rows
    acsgd_train.check_rows_stay_on_their_process(parallel.make_mesh(MeshSection(data=4, stage=2), devices), two_hosts)
    # the batch split over the two processes: an example's row moves between them from epoch to epoch
    with pytest.raises(ConfigError, match="splits the rows over processes"):
        acsgd_train.check_rows_stay_on_their_process(
            parallel.make_mesh(MeshSection(data=2, fsdp=2, stage=2), devices[:4] + devices[4:]),
            lambda d: devices.index(d) % 2)


def test_a_step_without_example_ids_is_refused():
    step = acsgd_train.AcsgdStep({}, memory=None, microbatches=2)
    with pytest.raises(ConfigError, match="example ids"):
        step(None, None, None, None, 0)

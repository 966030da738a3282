"""`python -m training.train mesh.stage=2`: a pipelined run trains the same model as the unpipelined
one (losses, held-out loss, the exported model), and resumes from its stage-layout checkpoints."""

import numpy as np
import pytest

from jaxmodels.convert.load import load_model
from training.config import ConfigError
from training.testing import metrics_records, tiny_train_config
from training.train import train

COMMON = {"model.num_hidden_layers": 4, "run.steps": 6, "schedule.total_steps": 6, "optimizer.grad_accum": 2,
          "run.eval_every": 0, "run.eval_batches": 1, "checkpoint.every": 3, "mesh.data": 1}


def _losses(run_dir):
    return np.asarray([r["loss"] for r in metrics_records(run_dir)])


@pytest.fixture(scope="module")
def unpipelined(corpus, cache, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("plain")
    return run_dir, train(tiny_train_config(run_dir, corpus, cache, **COMMON))


@pytest.mark.parametrize("schedule", ["gpipe", "circular"])
def test_pipelined_run_trains_the_same_model(corpus, cache, tmp_path, unpipelined, schedule):
    plain_dir, plain = unpipelined
    cfg = tiny_train_config(tmp_path, corpus, cache, **COMMON, **{"mesh.stage": 2, "pipeline.schedule": schedule})
    summary = train(cfg)
    np.testing.assert_allclose(_losses(tmp_path), _losses(plain_dir), rtol=2e-4)
    assert summary["heldout"]["loss"] == pytest.approx(plain["heldout"]["loss"], rel=2e-4)
    _, params, _ = load_model(tmp_path / "model")  # exported in the model's layout
    _, expected, _ = load_model(plain_dir / "model")
    np.testing.assert_allclose(params["layers"]["wq"], expected["layers"]["wq"], atol=2e-4)


def test_pipelined_run_resumes(corpus, cache, tmp_path, unpipelined):
    first = tiny_train_config(tmp_path, corpus, cache, **{**COMMON, "run.steps": 3, "mesh.stage": 2})
    train(first)
    summary = train(first.replace(**{"run.steps": 6}))  # continues from the checkpoint at step 3
    assert summary["resumed_from"] == 3
    np.testing.assert_allclose(_losses(tmp_path), _losses(unpipelined[0]), rtol=2e-4)


@pytest.mark.parametrize("overrides,message", [
    ({"mesh.stage": 3}, "do not split into mesh.stage=3"),
    ({"mesh.stage": 8, "model.num_hidden_layers": 4}, "more than the model's 4 layers"),
    ({"mesh.stage": 2, "pipeline.schedule": "circular", "optimizer.grad_accum": 1}, "at least as many micro-batches"),
    ({"mesh.stage": 2, "lowrank.method": "pufferfish"}, "pipeline stages do not support yet"),
    ({"pipeline.schedule": "1f1b"}, "pipeline.schedule must be one of"),
])
def test_bad_pipeline_configs_are_refused(corpus, cache, tmp_path, overrides, message):
    from training.validation import validate
    with pytest.raises(ConfigError, match=message):
        validate(tiny_train_config(tmp_path, corpus, cache, **{**COMMON, **overrides}))

"""`python -m training.launch_tpu`: the gcloud commands of a TPU job (dry run), and their execution
against a stand-in `gcloud` that records its calls (the slice is deleted also when training fails)."""

import os
import stat
import sys

from training import launch_tpu

ARGS = ["--name", "r1", "--zone", "us-west4-a", "--accelerator", "v6e-8", "--project", "p1", "--"]
TRAIN = ["--preset", "smollm2-135m", "run.steps=10"]
TPU = "gcloud compute tpus tpu-vm"
WHERE = "--zone us-west4-a --project p1"


def test_dry_run_prints_the_whole_job(capsys):
    assert launch_tpu.main(["--dry-run", "--bucket", "gs://b/runs", *ARGS, *TRAIN]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert lines == [
        f"{TPU} create r1 --accelerator-type v6e-8 --version v2-alpha-tpuv6e {WHERE}",
        "git archive --format=tar.gz -o /tmp/jaxmodels-src.tar.gz HEAD",
        f"{TPU} scp /tmp/jaxmodels-src.tar.gz 'r1:~/' --worker=all {WHERE}",
        f"{TPU} ssh r1 --worker=all '--command=mkdir -p jaxmodels && tar xzf ~/jaxmodels-src.tar.gz -C jaxmodels "
        f"&& cd jaxmodels && pip install -q -e \".[tpu]\"' {WHERE}",
        f"{TPU} ssh r1 --worker=all '--command=cd jaxmodels && JAX_DISTRIBUTED=auto python -m training.train "
        f"--preset smollm2-135m run.steps=10 run.out_dir=runs/r1 run.sync_to=gs://b/runs/r1' {WHERE}",
        f"{TPU} scp --recurse 'r1:~/jaxmodels/runs/r1' runs/r1 --worker=0 {WHERE}",
        f"{TPU} delete r1 --quiet {WHERE}",
    ]


def test_spot_keep_and_an_explicit_run_folder(capsys):
    assert launch_tpu.main(["--dry-run", "--spot", "--keep", *ARGS, "run.out_dir=runs/x"]) == 0
    out = capsys.readouterr().out
    assert "--spot" in out and "delete" not in out and "run.out_dir=runs/x'" in out
    assert "'r1:~/jaxmodels/runs/x' runs/r1" in out and out.count("run.out_dir") == 1


def test_bad_arguments_are_named(capsys):
    assert launch_tpu.main(["--name", "r", "--zone", "z", "--accelerator", "v7x-8", "--dry-run"]) == 2
    assert "unknown accelerator 'v7x-8'" in capsys.readouterr().err
    assert launch_tpu.main(["--name", "r", "--zone", "z", "--accelerator", "v5e-8", "--bucket", "s3://b"]) == 2
    assert "--bucket must be a gs:// path" in capsys.readouterr().err


FAKE = """#!{python}
import sys
with open({log!r}, "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
sys.exit(3 if any("training.train" in a for a in sys.argv) else 0)
"""


def test_a_failed_training_step_still_deletes_the_slice(tmp_path, monkeypatch, capsys):
    log = tmp_path / "calls.log"
    for tool in ("gcloud", "git"):
        path = tmp_path / tool
        path.write_text(FAKE.format(python=sys.executable, log=str(log)))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert launch_tpu.main([*ARGS, *TRAIN]) == 3
    calls = log.read_text().splitlines()
    assert [c.split()[3] if c.startswith("compute") else c.split()[0] for c in calls] == [
        "create", "archive", "scp", "ssh", "ssh", "delete"]  # no fetch after the failure; delete anyway
    assert "'train on every worker' failed (exit 3)" in capsys.readouterr().err

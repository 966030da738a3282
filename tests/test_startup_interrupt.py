"""Ctrl-C while a CLI is still importing JAX (its first seconds) exits 130 with one line, no traceback.

A KeyboardInterrupt inside JAX's C extension surfaces as an ImportError traceback or is swallowed, so
each entry module takes SIGINT before importing JAX and hands it to the CLI once loaded.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("argv", [
    ["-m", "training.train", "--preset", "tiny", "run.out_dir=runs/never"],
    ["-m", "inference.generate", "--model", "smollm2", "--prompt", "hi"],
], ids=["train", "generate"])
def test_ctrl_c_during_startup_exits_130_without_a_traceback(argv, tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}  # this checkout, whatever the installed copy is
    proc = subprocess.Popen([sys.executable, *argv], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # still importing: JAX alone takes longer than this
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip() == "interrupted"

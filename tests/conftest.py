"""Test setup: 8 fake CPU devices (set before JAX starts) so distributed code runs anywhere, and one
persistent compilation cache for the whole run (set before JAX starts, so the CLI subprocesses that
tests launch inherit it too)."""

import os
import shutil
import sys
import tempfile

# Tests check results, not speed, and most of their time is XLA compiling. LLVM at -O0 compiles
# XLA:CPU's programs faster (test_train_step + test_lowrank_model: 83 -> 60 s); the matmuls are
# library calls either way. Tests that set XLA_FLAGS for a child process pass this on.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # with libtpu installed (the test extra), JAX would try a TPU first
# Tests compile for TPU topologies through libtpu both in this process (the Pallas kernels) and in
# CLI subprocesses (`training.aot`); libtpu's one-process lockfile would make the later ones fail.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Many tests compile the same programs again: every `train()` call jits its steps afresh, resumed runs
# repeat their reference run, and each CLI subprocess starts with an empty in-memory cache. A
# persistent cache (a fresh folder per test run, so the suite's time is a fresh clone's) turns every
# repeat into a load from disk. Programs that compile in under 0.2 s are not worth a file.
_OWN_JIT_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_JIT_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxmodels-tests-jit-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

from training.testing import small_corpus  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop every in-memory compiled program after each test module: one pytest process compiles
    hundreds of programs (unrolled pipeline loops among them), and holding all of them for the whole
    run only grows its memory. Later modules reload from the persistent cache when they need one."""
    yield
    jax.clear_caches()


def pytest_unconfigure(config):
    if _OWN_JIT_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small stdlib corpus folder (a `data.source`) shared by a test module's training runs."""
    return small_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A tokenizer + token cache folder shared by a test module's training runs."""
    return tmp_path_factory.mktemp("cache")


_SMOLLM2: dict = {}


@pytest.fixture
def smollm2_loaded_once(monkeypatch):
    """`jaxmodels.convert.load.load_model` with SmolLM2 (by name or GGUF path) dequantized once per
    test run: the first load is the real one, later loads in tests that use this fixture get copies of
    its weights. For the tests that start the CLIs on SmolLM2 (loading itself is tested in
    test_gguf.py); other paths load as usual."""
    import numpy as np

    from jaxmodels.convert import load as load_module
    from jaxmodels.convert.gguf import smollm2_gguf_path

    try:
        target = smollm2_gguf_path().resolve()
    except Exception:  # not installed: nothing to share (tests that need it skip or fail on their own)
        return
    real = load_module.load_model

    def load_model(path, dtype=np.float32, progress=False):
        name = str(path).lower()
        resolved = load_module.ALIASES[name]() if name in load_module.ALIASES else path
        if not os.path.isfile(resolved) or os.path.realpath(resolved) != str(target):
            return real(path, dtype, progress)
        key = np.dtype(dtype).name
        if key not in _SMOLLM2:
            _SMOLLM2[key] = real(path, dtype, progress)
        config, params, tokenizer = _SMOLLM2[key]
        return config, jax.tree_util.tree_map(np.copy, params), tokenizer

    for name, module in list(sys.modules.items()):  # and wherever the library imported it by name
        if name.split(".")[0] in ("jaxmodels", "training", "inference", "benchmarks") and \
                getattr(module, "load_model", None) is real:
            monkeypatch.setattr(module, "load_model", load_model)

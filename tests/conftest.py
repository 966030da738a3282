"""Test setup: 8 fake CPU devices (set before JAX starts) so distributed code runs anywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

from training.testing import small_corpus  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small stdlib corpus folder (a `data.source`) shared by a test module's training runs."""
    return small_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A tokenizer + token cache folder shared by a test module's training runs."""
    return tmp_path_factory.mktemp("cache")

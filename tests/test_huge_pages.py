"""Decoding weights in huge-page memory (`jaxmodels.huge_pages`): same values and tree, only large
CPU arrays moved, advised MADV_HUGEPAGE, alive as long as their arrays, and decoding unchanged."""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inference import generate
from jaxmodels import huge_pages, init_params
from jaxmodels.params import decode_layout
from jaxmodels.quantize import convert_weights, quantize_int8
from jaxmodels.testing import tiny_config
from jaxmodels.weights import OutputMajor

needs_support = pytest.mark.skipif(not huge_pages.supported(), reason="no transparent huge pages here")


def _tree():
    rng = np.random.default_rng(0)
    big = jnp.asarray(rng.standard_normal((256, 128)), jnp.float32)  # 128 KiB
    return {"big": big, "small": jnp.ones(16), "out": OutputMajor(big.T.copy()),
            "int8": quantize_int8(jnp.asarray(rng.standard_normal((256, 512)), jnp.float32)),
            "bf16": big.astype(jnp.bfloat16), "host": np.ones((512, 512), np.float32)}


def _vma_flags(address: int) -> str:
    """The VmFlags line of the mapping holding `address` (/proc/self/smaps)."""
    current = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                current = lo <= address < hi
            elif current and line.startswith("VmFlags:"):
                return line
    return ""


@needs_support
def test_place_moves_large_cpu_arrays_and_keeps_values_and_tree():
    tree = _tree()
    moved = huge_pages.place(tree)
    assert jax.tree_util.tree_structure(moved) == jax.tree_util.tree_structure(tree)
    for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(moved)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert huge_pages.placed(moved["big"]) and huge_pages.placed(moved["out"].wt)
    assert huge_pages.placed(moved["int8"].q) and huge_pages.placed(moved["bf16"])
    assert moved["small"] is tree["small"] and moved["host"] is tree["host"]  # too small; not a JAX array
    assert not moved["big"].committed  # as the original: no device pinned that was not
    pointer = moved["big"].unsafe_buffer_pointer()
    assert pointer % huge_pages.ALIGN == 0
    assert " hg" in _vma_flags(pointer)  # advised MADV_HUGEPAGE (whether the kernel backs it is its call)


@needs_support
def test_place_is_idempotent_and_arrays_outlive_everything_else():
    moved = huge_pages.place(_tree())
    again = huge_pages.place(moved)
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(moved), jax.tree_util.tree_leaves(again)))
    expected = np.arange(1 << 18, dtype=np.float32)
    kept = huge_pages.place([jnp.asarray(expected)])[0]
    del moved, again
    gc.collect()
    churn = [np.random.default_rng(i).standard_normal(1 << 18) for i in range(20)]  # reuse freed memory
    np.testing.assert_array_equal(np.asarray(kept), expected)
    assert len(churn) == 20


def test_place_leaves_the_tree_alone_where_unsupported(monkeypatch, tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(huge_pages, "THP_SETTING", str(setting))
    tree = _tree()
    assert not huge_pages.supported()
    assert huge_pages.place(tree) is tree


@needs_support
@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
def test_decoding_from_huge_pages_gives_the_same_tokens(monkeypatch, weights):
    config = tiny_config()
    params = convert_weights(init_params(config, jax.random.key(1), std=0.2), weights)
    plain = decode_layout(params)
    monkeypatch.setattr(huge_pages, "MIN_BYTES", 1)  # the tiny model's arrays are all small
    moved = decode_layout(params)
    assert huge_pages.placed(moved["layers"][0]["wq"].wt if weights != "int8" else moved["layers"][0]["wq"].q.wt)
    again = jax.tree_util.tree_leaves(decode_layout(moved))
    assert all(a is b for a, b in zip(again, jax.tree_util.tree_leaves(moved)))  # idempotent: no copy
    prompts = [[1, 5, 9, 2], [3, 4]]
    want = generate(plain, config, prompts, 8, eos_token_ids=()).tokens
    assert generate(moved, config, prompts, 8, eos_token_ids=()).tokens == want

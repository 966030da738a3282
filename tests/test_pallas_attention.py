"""Index-mapped attention (`pallas_kernels.attention`): the TPU and GPU kernels in interpret mode
against the jnp reference over many shapes and tables, the reference against the model's own
attention (dense GQA and a CHAI plan), the errors, the TPU kernel compiled for real TPUs (v5e, v6e)
through libtpu, and the GPU kernels (Triton; Mosaic GPU for Hopper) lowered for cuda."""

import dataclasses
import importlib.util
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxmodels.attention import clustered_attention, gqa_attention
from jaxmodels.attention_plan import cluster_plan
from pallas_kernels import KernelError
from pallas_kernels.attention import attention, attention_reference, gqa_tables, head_sparse_tables, plan_tables

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e '.[test]' brings it)")


def _qkv(rng, b, num_q, hq, ck, kv, s, hd, dtype):
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)  # noqa: E731
    return normal(b, num_q, hq, hd), normal(b, ck, s, hd), normal(b, kv, s, hd)


@st.composite
def cases(draw):
    kv, groups = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 3, 8]))
    kernel = draw(st.sampled_from(["tpu", "gpu", "hopper"]))
    b, num_q = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 5]))
    blocks = {"tpu": [8, 16], "gpu": [16, 32], "hopper": [64]}  # Triton: powers of two >= 16; wgmma: 64
    block_k = draw(st.sampled_from(blocks[kernel]))
    s = block_k * draw(st.integers(3, 4))  # at least 3 key blocks (interpret-mode regressions hid there)
    h, ck = kv * groups, draw(st.integers(1, 3))
    lengths = draw(st.lists(st.sampled_from([0, 1, s - num_q + 1, s // 2, 7]), min_size=b, max_size=b))
    seed = draw(st.integers(0, 2 ** 16))
    return dict(b=b, num_q=num_q, h=h, kv=kv, ck=ck, s=s, block_k=block_k, lengths=lengths, seed=seed, kernel=kernel,
                dtype=draw(st.sampled_from([jnp.float16, jnp.bfloat16] if kernel == "hopper" else
                                           [jnp.float32, jnp.bfloat16])), identity=draw(st.booleans()))


@settings(max_examples=32, deadline=None)
@given(cases())
def test_the_kernels_match_the_reference(case):
    rng = np.random.default_rng(case["seed"])
    b, h, kv, ck = case["b"], case["h"], case["kv"], case["ck"]
    q, k, v = _qkv(rng, b, case["num_q"], h, ck if not case["identity"] else kv, kv, case["s"], 64, case["dtype"])
    if case["identity"]:
        tables = gqa_tables(b, h, kv)
    else:  # different random tables per row
        tables = tuple(jnp.asarray(rng.integers(0, n, (b, h)), jnp.int32) for n in (h, ck, kv))
    lengths = jnp.asarray(case["lengths"], jnp.int32)
    want = attention_reference(q, k, v, lengths, *tables)
    got = jax.block_until_ready(attention(q, k, v, lengths, *tables, impl="pallas", interpret=True,
                                          block_k=case["block_k"], kernel=case["kernel"]))
    tol = 1e-5 if case["dtype"] == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)


def _decode_positions(lengths, num_q):
    return lengths[:, None] - 1 + jnp.arange(num_q)[None, :]  # query j sits at position lengths - 1 + j


@pytest.mark.parametrize("num_q", [1, 3])
def test_gqa_tables_give_the_models_attention(num_q):
    rng = np.random.default_rng(1)
    b, h, kv, s, hd = 2, 6, 2, 32, 16
    q, k, v = _qkv(rng, b, num_q, h, kv, kv, s, hd, jnp.float32)
    lengths = jnp.asarray([5, 30], jnp.int32)
    want = gqa_attention(q, k.reshape(b * kv, s, hd), v.reshape(b * kv, s, hd),
                         _decode_positions(lengths, num_q), jnp.arange(s))
    got = attention(q, k, v, lengths, *gqa_tables(b, h, kv), impl="reference")
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_plan_tables_give_the_models_clustered_attention():
    rng = np.random.default_rng(2)
    b, h, kv, s, hd, clusters = 2, 8, 4, 32, 16, 2
    plan = cluster_plan(jnp.asarray([[0, 1, 0, 1], [1, 1, 0, 0]]), clusters, h)
    q, k, v = _qkv(rng, b, 1, h, clusters, kv, s, hd, jnp.float32)
    lengths = jnp.asarray([9, 32], jnp.int32)
    want = clustered_attention(q, k.reshape(b * clusters, s, hd), v.reshape(b * kv, s, hd),
                               _decode_positions(lengths, 1), jnp.arange(s), plan)
    tables = plan_tables(plan, h, kv)
    np.testing.assert_allclose(attention(q, k, v, lengths, *tables, impl="reference"), want, atol=1e-5)
    got = jax.block_until_ready(attention(q, k, v, lengths, *tables, impl="pallas", interpret=True, block_k=8))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_the_errors_name_the_fix():
    q, k, v = _qkv(np.random.default_rng(0), 1, 1, 2, 1, 1, 24, 8, jnp.float32)
    args = (q, k, v, jnp.asarray([3]), *gqa_tables(1, 2, 1))
    with pytest.raises(Exception, match="interpret mode"):  # Pallas's own refusal on CPU
        attention(*args, impl="pallas", block_k=8)
    with pytest.raises(KernelError, match="impl must be one of"):
        attention(*args, impl="triton")
    with pytest.raises(KernelError, match="block_k=16 must divide the cache length 24"):
        attention(*args, impl="pallas", interpret=True, block_k=16)
    with pytest.raises(KernelError, match="multiple of 8"):
        attention(*args, impl="pallas", interpret=True, block_k=12)
    with pytest.raises(KernelError, match="block_k=24: the Triton kernel needs a power of two"):
        attention(*args, impl="pallas", interpret=True, block_k=24, kernel="gpu")
    with pytest.raises(KernelError, match="kernel must be one of"):
        attention(*args, impl="pallas", interpret=True, kernel="metal")


@needs_libtpu
@pytest.mark.parametrize("chip", ["v5e-1", "v6e-1"])
@pytest.mark.parametrize("num_q,dtype", [(1, jnp.bfloat16), (5, jnp.bfloat16), (1, jnp.float32)])
def test_the_kernel_compiles_for_tpu(chip, num_q, dtype):
    """The real TPU compiler (libtpu) on this CPU: SmolLM2's attention shapes, a 2048-key cache."""
    from jax.sharding import NamedSharding, PartitionSpec

    from pallas_kernels.attention.tpu import attention_tpu
    from training.aot import topology, tpu_devices

    mesh = jax.sharding.Mesh(np.asarray(tpu_devices(topology(chip))[:1]), ("x",))
    replicated = NamedSharding(mesh, PartitionSpec())
    spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=replicated)  # noqa: E731
    b, h, kv, s, hd = 4, 9, 3, 2048, 64
    args = [spec((b, num_q, h, hd), dtype), spec((b, kv, s, hd), dtype), spec((b, kv, s, hd), dtype),
            spec((b,), jnp.int32)] + [spec((b, h), jnp.int32)] * 3
    with jax.set_mesh(mesh):
        compiled = jax.jit(lambda *a: attention_tpu(*a, block_k=512)).trace(*args).lower().compile()
    assert "tpu_custom_call" in compiled.as_text()  # the Mosaic kernel, compiled by libtpu
    assert compiled.memory_analysis().argument_size_in_bytes >= 2 * b * kv * s * hd * jnp.dtype(dtype).itemsize


@needs_libtpu
@pytest.mark.parametrize("chip", ["v5e-1", "v6e-1"])
def test_smollm2_decode_and_verify_steps_compile_for_tpu_with_the_kernel(chip):
    """`training.aot`'s decode step and verification pass (5 tokens per row) of SmolLM2, batch 8,
    2048 cached positions: cached attention is the Mosaic kernel, and the programs fit one chip."""
    from training.aot import compile_report, topology, tpu_devices
    from training.aot_programs import _checkpoint_config, lower_decode_step

    config, topo = _checkpoint_config("smollm2"), topology(chip)
    device = tpu_devices(topo)[0]
    for new_tokens in (1, 5):
        lowered = lower_decode_step(config, device, 8, 2048, new_tokens)
        assert "tpu_custom_call" in lowered.as_text()
        assert compile_report(lowered, topo.hbm_bytes)["fits"] is True


@pytest.mark.parametrize("num_q,dtype", [(1, jnp.bfloat16), (5, jnp.bfloat16), (1, jnp.float32)])
def test_the_gpu_kernel_lowers_for_cuda(num_q, dtype):
    """The Triton kernel lowered for cuda on this CPU (Triton's block rules; PTX needs a GPU):
    SmolLM2's attention shapes (9 query heads, 3 KV heads), a 2048-key cache."""
    from pallas_kernels.attention.gpu import attention_gpu

    b, h, kv, s, hd = 4, 9, 3, 2048, 64
    args = [jax.ShapeDtypeStruct((b, num_q, h, hd), dtype), jax.ShapeDtypeStruct((b, kv, s, hd), dtype),
            jax.ShapeDtypeStruct((b, kv, s, hd), dtype), jax.ShapeDtypeStruct((b,), jnp.int32)]
    args += [jax.ShapeDtypeStruct((b, h), jnp.int32)] * 3
    lowered = jax.jit(lambda *a: attention_gpu(*a, block_k=128)).trace(*args).lower(lowering_platforms=("cuda",))
    assert "__gpu$xla.gpu.triton" in lowered.as_text()


@pytest.mark.parametrize("kernel,dtype,hd,block_k,tol", [("tpu", jnp.float32, 32, 16, 1e-5),
                                                         ("gpu", jnp.float32, 32, 16, 1e-5),
                                                         ("hopper", jnp.bfloat16, 64, 64, 2e-2)])
def test_head_sparse_tables_compute_only_the_active_heads(kernel, dtype, hd, block_k, tol):
    """Deja Vu's head sparsity as tables: the output for K active heads per row equals those
    heads of dense attention, in every kernel (interpret mode)."""
    rng = np.random.default_rng(4)
    b, h, kv, s = 2, 8, 2, 48 if kernel != "hopper" else 128
    q, k, v = _qkv(rng, b, 2, h, kv, kv, s, hd, dtype)
    lengths = jnp.asarray([17, 40], jnp.int32)
    active = jnp.asarray([[0, 5, 7], [2, 3, 6]], jnp.int32)  # different heads per row
    dense = attention_reference(q, k, v, lengths, *gqa_tables(b, h, kv))  # [B, S_q, H, hd]
    want = jnp.take_along_axis(dense, active[:, None, :, None], axis=2)
    tables = head_sparse_tables(active, h, kv)
    got = jax.block_until_ready(attention(q, k, v, lengths, *tables, impl="pallas", interpret=True, block_k=block_k,
                                          kernel=kernel))
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)


def _needed_blocks(lengths, num_q, block_k):
    """Key blocks a row must read: through its last query's last visible key, at least one."""
    return [max(-(-(n + num_q - 1) // block_k), 1) for n in lengths]


@pytest.mark.parametrize("num_q", [1, 5])
def test_the_tpu_kernel_fetches_each_needed_block_once(num_q):
    """Replaying the TPU kernel's index maps as Pallas's pipeline copies (a copy whenever a block
    index changes between consecutive grid steps): GQA groups and CHAI clusters read each K / V
    block their tables need exactly once per row, nothing past a row's length, nothing twice."""
    from pallas_kernels.attention.tpu import fetched_blocks

    b, h, kv, block_k, num_blocks = 3, 9, 3, 16, 8
    lengths = [0, 37, 128 - num_q + 1]
    needed = sum(_needed_blocks(lengths, num_q, block_k))
    k_blocks, v_blocks = fetched_blocks(*gqa_tables(b, h, kv)[1:], lengths, num_q, block_k, num_blocks)
    assert (k_blocks, v_blocks) == (kv * needed, kv * needed)  # per query head, it was 3x this
    labels = jnp.asarray([[0, 1, 0, 2, 1, 3, 2, 3, 3]] * b)  # CHAI on 9 MHA heads: 4 clusters
    _, k_head, v_head = plan_tables(cluster_plan(labels, 4, h), h, h)
    k_blocks, v_blocks = fetched_blocks(k_head, v_head, lengths, num_q, block_k, num_blocks)
    assert (k_blocks, v_blocks) == (4 * needed, h * needed)  # the 2H / (H + C) ceiling's bytes


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_the_gpu_kernels_key_splits_merge_to_the_reference(splits):
    """Flash-decoding splits: 8 key blocks over 1, 2 or 4 programs per (row, head), rows whose keys
    end in the first split (the others see nothing), in the middle, and fill the cache."""
    from pallas_kernels.attention.gpu import attention_gpu, default_splits

    rng = np.random.default_rng(splits)
    b, h, kv, s, num_q = 4, 4, 2, 128, 2
    q, k, v = _qkv(rng, b, num_q, h, kv, kv, s, 16, jnp.float32)
    lengths = jnp.asarray([0, 5, 70, s - num_q + 1], jnp.int32)
    tables = gqa_tables(b, h, kv)
    got = attention_gpu(q, k, v, lengths, *tables, block_k=16, splits=splits, interpret=True)
    np.testing.assert_allclose(got, attention_reference(q, k, v, lengths, *tables), atol=1e-5)
    assert default_splits(1, 32, 256) == 8 and default_splits(64, 32, 256) == 1 and default_splits(1, 9, 6) == 6
    with pytest.raises(KernelError, match="splits=3 must divide the 8 key blocks"):
        attention_gpu(q, k, v, lengths, *tables, block_k=16, splits=3, interpret=True)


@pytest.mark.parametrize("num_q,dtype,hd,block_k", [(1, jnp.bfloat16, 64, 128), (5, jnp.bfloat16, 64, 128),
                                                    (1, jnp.float16, 128, 128), (16, jnp.bfloat16, 128, 64)])
def test_the_hopper_kernel_lowers_for_cuda(num_q, dtype, hd, block_k):
    """The Mosaic GPU kernel lowered for sm_90a on this CPU (layout inference, TMA's and wgmma's
    tiling, the shared-memory limit; PTX needs a GPU): SmolLM2's heads and a 2048-key cache."""
    from pallas_kernels.attention.hopper import attention_hopper

    b, h, kv, s = 4, 9, 3, 2048
    args = [jax.ShapeDtypeStruct((b, num_q, h, hd), dtype), jax.ShapeDtypeStruct((b, kv, s, hd), dtype),
            jax.ShapeDtypeStruct((b, kv, s, hd), dtype), jax.ShapeDtypeStruct((b,), jnp.int32)]
    args += [jax.ShapeDtypeStruct((b, h), jnp.int32)] * 3
    lowered = jax.jit(lambda *a: attention_hopper(*a, block_k=block_k)).trace(*args).lower(
        lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


def test_the_hopper_kernels_double_buffered_blocks_have_no_races():
    """One program streams 4 key blocks through its two shared-memory slots (splits=1, the next
    block's copy in flight while this one is used). The interpreter checks the barrier protocol
    (a missing wait fails: "Barrier arrival was completed again ...") and its race detector finds
    no race; the result is the reference's."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    from pallas_kernels.attention.gpu_interpret import interpret_params
    from pallas_kernels.attention.hopper import attention_hopper

    rng = np.random.default_rng(7)
    q, k, v = _qkv(rng, 2, 5, 4, 2, 2, 256, 128, jnp.float16)
    lengths, tables = jnp.asarray([252, 70], jnp.int32), gqa_tables(2, 4, 2)
    params = dataclasses.replace(interpret_params(), detect_races=True)
    got = attention_hopper(q, k, v, lengths, *tables, block_k=64, splits=1, interpret=params)
    assert not interpret_pallas_call.get_races().races_found
    want = attention_reference(q, k, v, lengths, *tables)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-3, rtol=2e-3)


def test_the_hopper_kernels_rules_and_the_default_kernel(monkeypatch):
    """bf16 / float16 with head_dim a multiple of 64 take the Hopper kernel on an sm_90 GPU; float32,
    other head sizes and other GPUs take Triton; off GPUs, the TPU kernel. Each rule's error names it."""
    from pallas_kernels.attention import default_block_k, default_kernel

    args = lambda dtype, hd: _qkv(np.random.default_rng(0), 1, 1, 2, 1, 1, 128, hd, dtype)  # noqa: E731
    assert default_kernel(*args(jnp.bfloat16, 64)) == "tpu"  # this CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    for capability, dtype, hd, want in [("9.0", jnp.bfloat16, 64, "hopper"), ("9.0", jnp.float16, 128, "hopper"),
                                        ("9.0", jnp.float32, 64, "gpu"), ("9.0", jnp.bfloat16, 32, "gpu"),
                                        ("8.0", jnp.bfloat16, 64, "gpu")]:
        monkeypatch.setattr(jax, "devices", lambda c=capability: [SimpleNamespace(compute_capability=c)])
        assert default_kernel(*args(dtype, hd)) == want, (capability, dtype, hd)
    lengths, tables = jnp.asarray([3]), gqa_tables(1, 2, 1)
    with pytest.raises(KernelError, match="bf16 or float16"):
        attention(*args(jnp.float32, 64), lengths, *tables, impl="pallas", interpret=True, kernel="hopper")
    with pytest.raises(KernelError, match="multiples of 64"):
        attention(*args(jnp.bfloat16, 32), lengths, *tables, impl="pallas", interpret=True, kernel="hopper")
    with pytest.raises(KernelError, match="divisible by 64"):
        default_block_k(96, "hopper")

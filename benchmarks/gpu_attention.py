"""The GPU suite's attention parts: our Pallas kernel against the other ways to attend on a GPU,
verification against decoding, and CHAI / head-sparse tables against dense.

Every implementation reads the same KV cache, kept in our layout [B, KV, S, hd] (jax's bundled
decode kernel takes [B, S, KV, hd] and swaps it back inside, so it is given our buffer swapped:
XLA cancels the two transposes). XLA's and cuDNN's `dot_product_attention` get the cache in their
own layout [B, S, KV, hd], made once outside the timed loop. Each output is checked against
`attention_reference` on the batch's first row before it is timed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.gpu_timing import Budget, per_call_seconds
from jaxmodels.attention import gqa_attention
from pallas_kernels.attention import attention, attention_reference, default_kernel, gqa_tables, hopper_takes


@dataclass(frozen=True)
class AttentionShape:
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str

    def kv_bytes(self, batch: int, keys: int, k_slots: int | None = None) -> int:
        """Bytes of K and V that `keys` positions per row need, each buffer read once."""
        rows = (k_slots if k_slots is not None else self.kv_heads) + self.kv_heads
        return batch * rows * keys * self.head_dim * jnp.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Case:
    """One timed configuration: a query block against a full cache."""
    q: jax.Array  # [B, S_q, H, hd]
    k: jax.Array  # [B, Ck, S, hd]
    v: jax.Array  # [B, KV, S, hd]
    lengths: jax.Array  # [B]: keys the first query sees

    @staticmethod
    def random(shape: AttentionShape, batch: int, context: int, num_q: int = 1, k_slots: int | None = None) -> "Case":
        kq, kk, kv = jax.random.split(jax.random.key(context * 131 + batch), 3)
        dt, hd = jnp.dtype(shape.dtype), shape.head_dim
        ck = k_slots if k_slots is not None else shape.kv_heads
        return Case(jax.random.normal(kq, (batch, num_q, shape.heads, hd), dt),
                    jax.random.normal(kk, (batch, ck, context, hd), dt),
                    jax.random.normal(kv, (batch, shape.kv_heads, context, hd), dt),
                    jnp.full((batch,), context - num_q + 1, jnp.int32))  # the last query sees the whole cache


def suite_kernel(shape: AttentionShape, interpret: bool) -> str:
    """The Pallas GPU kernel "auto" would pick for this shape: "hopper" (Mosaic GPU) on an sm_90 GPU
    (or interpreted) for the dtypes and head sizes it takes, else "gpu" (Triton)."""
    probe = jnp.zeros((1, 1, shape.heads, shape.head_dim), shape.dtype)
    cache = jnp.zeros((1, shape.kv_heads, 64, shape.head_dim), shape.dtype)
    if not interpret:
        return default_kernel(probe, cache, cache)
    return "hopper" if hopper_takes(probe, cache, cache) else "gpu"


def _jnp_path(q, k, v, lengths):
    """The model's own cached attention (`jaxmodels.attention.gqa_attention`, the reference path)."""
    b, t, _, hd = q.shape
    positions = lengths[:, None] - 1 + jnp.arange(t)[None, :]
    return gqa_attention(q, k.reshape(-1, k.shape[2], hd), v.reshape(-1, v.shape[2], hd), positions,
                         jnp.arange(k.shape[2]))


def implementations(interpret: bool, on_gpu: bool, kernel: str = "gpu") -> dict[str, tuple[str, Callable]]:
    """name -> (cache layout "ours" | "seq", fn(q, k, v, lengths) -> [B, S_q, H, hd]) for decoding.
    "ours (Pallas)" is `kernel`; when that is the Hopper kernel, "ours (Triton)" is timed too."""
    from jax.experimental.pallas.ops.gpu import decode_attention

    def pallas(name):
        return lambda q, k, v, lengths: attention(q, k, v, lengths, *gqa_tables(q.shape[0], q.shape[2], v.shape[1]),
                                                  impl="pallas", kernel=name, interpret=interpret)

    def reference(q, k, v, lengths):
        return attention_reference(q, k, v, lengths, *gqa_tables(q.shape[0], q.shape[2], v.shape[1]))

    def jax_decode_kernel(q, k, v, lengths):
        splits = max(1, min(16, k.shape[2] // 16))  # its default 16, and >= 16 keys per split
        out = decode_attention.gqa(q[:, 0], k.swapaxes(1, 2), v.swapaxes(1, 2), kv_seq_len=lengths,
                                   k_splits=splits, interpret=interpret)
        return out[:, None]

    def dot_product(impl):
        return lambda q, k, v, lengths: jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths,
                                                                     implementation=impl)

    impls = {"ours (Pallas)": ("ours", pallas(kernel))}
    if kernel == "hopper":
        impls["ours (Triton)"] = ("ours", pallas("gpu"))
    impls |= {"model jnp path": ("ours", _jnp_path),
             "reference": ("ours", reference), "jax decode kernel": ("ours", jax_decode_kernel),
             "XLA dot_product_attention": ("seq", dot_product("xla"))}
    if on_gpu:
        impls["cuDNN dot_product_attention"] = ("seq", dot_product("cudnn"))
    return impls


def max_error(fn: Callable, case: Case, k, v) -> float:
    """Max |fn - reference| over the first row, relative to the reference's largest entry."""
    row = lambda x: x[:1]  # noqa: E731
    got = fn(row(case.q), row(k), row(v), row(case.lengths)).astype(jnp.float32)
    want = attention_reference(row(case.q), row(case.k), row(case.v), row(case.lengths),
                               *gqa_tables(1, case.q.shape[2], case.v.shape[1])).astype(jnp.float32)
    return float(jnp.max(jnp.abs(got - want)) / jnp.maximum(jnp.max(jnp.abs(want)), 1e-6))


def time_case(fn: Callable, args: tuple, kv_bytes: int, loop_bytes: float, repeats: int) -> float:
    """Seconds per call, looping enough calls to read about `loop_bytes` (2 to 512 calls)."""
    n = int(min(max(loop_bytes // max(kv_bytes, 1), 2), 512))
    return per_call_seconds(fn, args, n, repeats)


def _reference_fits(case: Case, limit_bytes: float) -> bool:
    b, _, h, hd = case.q.shape
    return 2 * b * h * case.k.shape[2] * hd * 4 <= limit_bytes  # its gathered float32 K and V


def _timed_cell(name: str, fn: Callable, case: Case, layout: str, kv_bytes: int, s) -> tuple[object, float]:
    """(µs per call or why not, relative error on row 0) for one implementation on one case."""
    if name == "reference" and not _reference_fits(case, s.reference_limit_bytes):
        return "skipped: memory", float("nan")
    k, v = (case.k, case.v) if layout == "ours" else (case.k.swapaxes(1, 2), case.v.swapaxes(1, 2))
    try:
        err = max_error(fn, case, k, v)
        secs = time_case(fn, (case.q, k, v, case.lengths), kv_bytes, s.loop_bytes, s.repeats)
    except Exception as e:  # an implementation that does not run here is a cell, not the end of the suite
        return f"failed: {type(e).__name__}", float("nan")
    return secs * 1e6, err


def kernel_rows(s, budget: Budget, bandwidth: float, on_gpu: bool) -> tuple[list[list], list[str]]:
    """One row per (context, batch): each implementation's µs per decode call, our kernel's GB/s and
    share of the measured bandwidth, verify(d+1) / decode for our kernel, and the worst error."""
    impls = implementations(s.interpret, on_gpu, suite_kernel(s.shape, s.interpret))
    rows, notes = [], []
    for context in s.contexts:
        for batch in s.batches:
            if budget.expired():
                notes.append(f"context {context}, batch {batch}: skipped (time budget)")
                continue
            case = Case.random(s.shape, batch, context)
            kv_bytes = s.shape.kv_bytes(batch, context)
            cells, errors = {}, []
            for name, (layout, fn) in impls.items():
                cells[name], err = _timed_cell(name, fn, case, layout, kv_bytes, s)
                errors.append(err)
            ours = cells["ours (Pallas)"]
            verify = _verify_ratio(s, batch, context, ours)
            others = [c for n, c in cells.items() if not n.startswith("ours") and n != "reference"
                      and isinstance(c, float)]
            gbs = kv_bytes / (ours * 1e-6) / 1e9 if isinstance(ours, float) else float("nan")
            best_other = ours / min(others) if others and isinstance(ours, float) else float("nan")
            rows.append([context, batch, kv_bytes / 1e6, *cells.values(), gbs, 100 * gbs * 1e9 / bandwidth,
                         best_other, verify, float(np.nanmax(errors))])
            print(rows[-1], flush=True)
    header = ["context", "batch", "K/V MB", *(f"{n} µs" for n in impls), "ours GB/s", "ours % of measured bandwidth",
              "ours / fastest other (time)", f"verify({s.verify_tokens}) / decode", "max rel. error vs reference"]
    return [header, *rows], notes


def _verify_ratio(s, batch: int, context: int, decode_us) -> float:
    """Our kernel's time for verify_tokens queries per row over its time for one."""
    if not isinstance(decode_us, float):
        return float("nan")
    case = Case.random(s.shape, batch, context, num_q=s.verify_tokens)
    fn = implementations(s.interpret, False, suite_kernel(s.shape, s.interpret))["ours (Pallas)"][1]
    secs = time_case(fn, (case.q, case.k, case.v, case.lengths), s.shape.kv_bytes(batch, context), s.loop_bytes,
                     s.repeats)
    return secs * 1e6 / decode_us


def chai_tables(batch: int, heads: int, clusters: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """CHAI on multi-head attention: heads in `clusters` equal contiguous groups, each scored by its
    first head's query against its own K slot (the cache keeps `clusters` K slots), each head
    mixing its own values."""
    h = jnp.arange(heads, dtype=jnp.int32)
    cluster = h * clusters // heads
    first = jnp.searchsorted(cluster, jnp.arange(clusters), side="left").astype(jnp.int32)
    rows = lambda x: jnp.broadcast_to(x, (batch, heads))  # noqa: E731
    return rows(first[cluster]), rows(cluster), rows(h)


def sparse_tables(batch: int, heads: int, active: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Head sparsity on multi-head attention: `active` heads per row, spread over the heads, a
    different set per row (as Deja Vu's predictor would choose)."""
    chosen = (jnp.arange(batch)[:, None] + jnp.arange(active)[None, :] * (heads // active)) % heads
    chosen = chosen.astype(jnp.int32)
    return chosen, chosen, chosen


def plan_rows(s, budget: Budget) -> tuple[list[list], list[str]]:
    """Dense vs CHAI clusters vs active heads for our kernel on a multi-head shape: µs per decode
    call, speed-up over dense, the bytes ceiling of that speed-up and the share of it reached."""
    shape, batch, context = s.mha_shape, s.plan_batch, s.plan_context
    h = shape.heads

    which = suite_kernel(shape, s.interpret)

    def kernel(tables):
        return lambda q, k, v, lengths: attention(q, k, v, lengths, *tables, impl="pallas", kernel=which,
                                                  interpret=s.interpret)

    kinds = [("dense", None, gqa_tables(batch, h, h), 1.0)]
    kinds += [(f"CHAI, {c} clusters", c, chai_tables(batch, h, c), 2 * h / (h + c)) for c in s.plan_clusters]
    kinds += [(f"head-sparse, {a} of {h} heads", None, sparse_tables(batch, h, a), h / a) for a in s.plan_active]
    rows, notes, dense_us = [], [], None
    for name, k_slots, tables, ceiling in kinds:
        if budget.expired():
            notes.append(f"{name}: skipped (time budget)")
            continue
        case = Case.random(shape, batch, context, k_slots=k_slots)
        want = attention_reference(case.q, case.k, case.v, case.lengths, *tables)
        fn = kernel(tables)
        err = float(jnp.max(jnp.abs(fn(case.q, case.k, case.v, case.lengths).astype(jnp.float32) - want))
                    / jnp.max(jnp.abs(want.astype(jnp.float32))))
        us = 1e6 * time_case(fn, (case.q, case.k, case.v, case.lengths), shape.kv_bytes(batch, context),
                             s.loop_bytes, s.repeats)
        dense_us = dense_us or us
        speedup = dense_us / us
        rows.append([name, us, speedup, ceiling, 100 * speedup / ceiling, err])
        print(rows[-1], flush=True)
    header = ["tables", "µs per decode call", "speed-up over dense", "bytes ceiling", "% of ceiling",
              "max rel. error vs reference"]
    return [header, *rows], notes

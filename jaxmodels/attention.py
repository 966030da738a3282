"""Attention over keys addressed by absolute position. The layer's attention owns its KV cache
and follows a plan.

`attend` is the one entry point a decoder layer calls. It writes the chunk's new keys and values
into this layer's cache buffers (when there is a cache) and attends. Its `plan` is per-row index
maps given as runtime data: which query heads compute scores, which KV heads' keys are cached, and
whose probabilities each head applies to its own values. `jaxmodels.attention_plan` documents the
layout. Dense and grouped-query attention are the identity plan. `plan=None` stands for it and
compiles to the plain GQA program, with no gathers. CHAI's clustered heads are another plan. So
are, later, head sparsity. The Pallas kernels (`pallas_kernels.attention`) take the same tables
behind this same call, chosen by the KV cache (`KVCache.attention_impl`). On CPU, "auto" runs cached
dense attention for a few new tokens through `jaxmodels.cpu_attention` (one call per layer).

Masking is by position: a query at position p sees keys at positions <= p. That one rule covers
causality, right-padded ragged batches and stale cache slots.

Keys and values come in the KV cache's layout, [B*C, S, hd]: batch and head (or K slot) merged
into one axis. Both matmuls then have a single batch dimension. XLA:CPU runs that about 4x faster
than the same einsum with two batch dimensions (measured on decode shapes). A cache buffer also
reaches its matmul without a reshape. With a reshape in between, XLA:CPU duplicated the in-place
cache write into the attention's fusion and copied every layer's K and V buffers 2-3 times per
decode step. The clustered path keeps both properties. Its representatives are grouped by K slot,
so the score matmul is the GQA one with KV -> Ck and G -> M. Only the small [B, Cq, T, S]
probabilities are gathered.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from jaxmodels import cpu_attention
from jaxmodels.attention_plan import AttentionPlan

KVState = tuple[jax.Array, jax.Array]  # one layer's cache: K [B*Ck, S, hd], V [B*KV, S, hd]


def merge_kv_heads(x: jax.Array) -> jax.Array:
    """[B, KV, T, hd] -> [B*KV, T, hd], the layout attention and the KV cache use."""
    b, kv, t, hd = x.shape
    return x.reshape(b * kv, t, hd)


def write_rows(layer_cache: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    """Write new [B, C, T, hd] into one layer's cache buffer [B*C, S, hd], row b at starts[b].

    One `dynamic_update_slice` per row (in place on a donated buffer); a vmapped update lowers to
    a scatter that is several times slower on CPU. Very large batches use the vmapped form to
    bound program size.
    """
    b, kv, t, hd = new.shape
    new = new.astype(layer_cache.dtype)
    if b > 32:
        put = lambda buf, x, s: jax.lax.dynamic_update_slice(buf, x, (0, s, 0))
        return jax.vmap(put)(layer_cache.reshape(b, kv, -1, hd), new, starts).reshape(b * kv, -1, hd)
    for row in range(b):
        layer_cache = jax.lax.dynamic_update_slice(layer_cache, new[row], (row * kv, starts[row], 0))
    return layer_cache


def _take_rows(x: jax.Array, index: jax.Array, axis: int) -> jax.Array:
    """Per batch row b: x[b] indexed by index[b] along `axis` (counted without the batch axis)."""
    return jax.vmap(lambda xb, ib: jnp.take(xb, ib, axis=axis, mode="clip"))(x, index)


def _probabilities(q: jax.Array, k: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                   k_valid: jax.Array | None, dtype: jnp.dtype) -> jax.Array:
    """Masked softmax of q [B, T, X*Y, hd] against k [B*X, S, hd] (query head x*Y + y reads key
    row x) -> probabilities [B, X, T, Y, S] in `dtype`."""
    b, t, h, hd = q.shape
    s = k.shape[1]
    kv = k.shape[0] // b
    g = h // kv
    qm = q.reshape(b, t, kv, g, hd).transpose(0, 2, 1, 3, 4).reshape(b * kv, t * g, hd)
    scores = jnp.matmul(qm, k.swapaxes(1, 2), preferred_element_type=jnp.float32)  # [B*KV, T*G, S]
    scores = scores.reshape(b, kv, t, g, s) * (hd ** -0.5)
    k_pos = jnp.broadcast_to(k_pos, (b, s))
    mask = k_pos[:, None, :] <= q_pos[:, :, None]  # [B, T, S]
    if k_valid is not None:
        mask = mask & k_valid[:, None, :]
    scores = jnp.where(mask[:, None, :, None, :], scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


def _mix_values(probs: jax.Array, v: jax.Array) -> jax.Array:
    """probs [B, KV, T, G, S] applied to v [B*KV, S, hd] -> out [B, T, KV*G, hd]."""
    b, kv, t, g, s = probs.shape
    out = jnp.matmul(probs.reshape(b * kv, t * g, s), v)  # [B*KV, T*G, hd]
    return out.reshape(b, kv, t, g, -1).transpose(0, 2, 1, 3, 4).reshape(b, t, kv * g, -1)


def gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
                  k_pos: jax.Array, k_valid: jax.Array | None = None) -> jax.Array:
    """Causal grouped-query attention.

    q: [B, T, H, hd]; k, v: [B*KV, S, hd]; q_pos: [B, T]; k_pos: [B, S] or [S];
    k_valid: optional [B, S] bool. Returns [B, T, H, hd].
    """
    return _mix_values(_probabilities(q, k, q_pos, k_pos, k_valid, v.dtype), v)


def clustered_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                        plan: AttentionPlan, k_valid: jax.Array | None = None) -> jax.Array:
    """Attention under a plan: only representatives compute scores, and every head applies its
    representative's probabilities to its own values.

    q: [B, T, H, hd]; k: [B*Ck, S, hd] (K slots); v: [B*KV, S, hd]; q_pos: [B, T];
    k_pos: [B, S] or [S]; plan maps [B, Ck], [B, Cq], [B, H]. Returns [B, T, H, hd].
    """
    b, t, h, _ = q.shape
    s, kv = k.shape[1], v.shape[0] // b
    q_rep = _take_rows(q, plan.rep_heads, axis=1)  # [B, T, Cq, hd]
    probs = _probabilities(q_rep, k, q_pos, k_pos, k_valid, v.dtype)  # [B, Ck, T, M, S]
    probs = probs.transpose(0, 1, 3, 2, 4).reshape(b, plan.num_reps, t, s)  # [B, Cq, T, S]
    probs = _take_rows(probs, plan.head_cluster, axis=0)  # [B, H, T, S]
    probs = probs.reshape(b, kv, h // kv, t, s).transpose(0, 1, 3, 2, 4)  # [B, KV, T, G, S]
    return _mix_values(probs, v)


def _check_cache(state: KVState, k_new: jax.Array, v_new: jax.Array, plan: AttentionPlan | None) -> None:
    """The layer's buffers must have the rows its plan writes (static shapes; raises at trace time)."""
    b, c = k_new.shape[:2]
    if state[0].shape[0] != b * c or state[1].shape[0] != b * v_new.shape[1]:
        kind = "dense attention" if plan is None else f"its attention plan ({c} K slots)"
        raise ValueError(
            f"this layer's cache holds {state[0].shape[0] // b} K slots and {state[1].shape[0] // b} V "
            f"heads per row, but {kind} needs {c} and {v_new.shape[1]}; build the cache with "
            f"KVCache.create(..., k_slots=attention_plan.k_slots(config, plans)) for the same plans")


KERNEL_MAX_QUERIES = 16  # the kernels serve decoding and verification; a prefill takes the jnp path


def _uses_kernel(impl: str, num_queries: int) -> bool:
    """Whether cached attention runs the Pallas kernel: asked for, or "auto" on TPU or GPU, for up
    to KERNEL_MAX_QUERIES new tokens per row (`checked_attention_impl` vets "auto" first)."""
    wanted = impl == "pallas" or (impl == "auto" and jax.default_backend() in ("tpu", "gpu"))
    return wanted and num_queries <= KERNEL_MAX_QUERIES


def checked_attention_impl(impl: str, batch: int, query_counts: tuple[int, ...], heads: int, k_slots: int,
                           kv_heads: int, cache_len: int, head_dim: int, dtype) -> str:
    """`impl`, or "reference" where "auto" would run a kernel that fails its check on this device
    for one of these shapes (`pallas_kernels.attention.kernel_problem`: compiled, run on random
    data, compared with the reference), with a warning that says why and how to choose."""
    counts = [n for n in query_counts if _uses_kernel(impl, n)]
    if impl != "auto" or not counts:
        return impl
    from pallas_kernels.attention import kernel_problem  # it builds on this package

    for n in counts:
        problem = kernel_problem(batch, n, heads, k_slots, kv_heads, cache_len, head_dim, jnp.dtype(dtype).name)
        if problem is not None:
            warnings.warn(f"the Pallas attention kernel did not pass its check on this {jax.default_backend()} "
                          f"for {n} queries per row against a {cache_len}-position cache ({problem}); cached "
                          "attention takes the jnp path. attention_impl='reference' (--attention-impl reference) "
                          "silences this; attention_impl='pallas' runs the kernel anyway", RuntimeWarning,
                          stacklevel=3)
            return "reference"
    return impl


def kernel_attention(q: jax.Array, state: KVState, positions: jax.Array, plan: AttentionPlan | None,
                     interpret: bool = False) -> jax.Array:
    """Cached attention through `pallas_kernels.attention` (same meaning as the jnp path): the
    buffers as [B, C, S, hd] views, query j of a row seeing positions <= positions[:, 0] + j."""
    from pallas_kernels.attention import attention, gqa_tables, plan_tables  # it builds on this package

    b, _, h, hd = q.shape
    kv = state[1].shape[0] // b
    keys, values = state[0].reshape(b, -1, state[0].shape[1], hd), state[1].reshape(b, kv, -1, hd)
    tables = gqa_tables(b, h, kv) if plan is None else plan_tables(plan, h, kv)
    return attention(q, keys, values, positions[:, 0] + 1, *tables, impl="pallas", interpret=interpret)


def attend(q: jax.Array, k_new: jax.Array, v_new: jax.Array, state: KVState | None, positions: jax.Array,
           write_at: jax.Array, plan: AttentionPlan | None = None, *, impl: str = "auto",
           interpret: bool = False) -> tuple[jax.Array, KVState | None]:
    """One layer's attention: write this chunk's keys/values into the layer's cache and attend.

    q [B, T, H, hd] and k_new, v_new [B, KV, T, hd] at positions [B, T] (contiguous per row).
    Without a cache (state None), the chunk attends to itself (training). With one, state =
    (K [B*Ck, S, hd], V [B*KV, S, hd]) gets the chunk at write_at [B] (= positions[:, 0]), and the
    chunk attends to every buffered position <= its own. `plan` None is dense / GQA. With a plan,
    K slot c receives the keys of KV head k_source[b, c]. `impl` / `interpret`: whether cached
    attention runs the Pallas kernel (`KVCache.attention_impl`). Returns (out [B, T, H, hd], state).
    """
    if plan is not None:
        k_new = _take_rows(k_new, plan.k_source, axis=0)  # [B, Ck, T, hd]
    if state is None:
        keys, values, k_pos = merge_kv_heads(k_new), merge_kv_heads(v_new), positions
    else:
        _check_cache(state, k_new, v_new, plan)
        state = (write_rows(state[0], k_new, write_at), write_rows(state[1], v_new, write_at))
        if _uses_kernel(impl, q.shape[1]):
            return kernel_attention(q, state, positions, plan, interpret), state
        keys, values = state  # attended in the cache's dtype: a cast would copy every buffer each step
        k_pos = jnp.arange(keys.shape[1])
    qc = q.astype(keys.dtype)
    if plan is None:
        jnp_path = lambda: gqa_attention(qc, keys, values, positions, k_pos).astype(q.dtype)  # noqa: E731
        if state is not None and impl == "auto" and cpu_attention.applies(q, keys):
            # platform_dependent: a program lowered from a CPU host for TPU (`training.aot`) keeps jnp
            return jax.lax.platform_dependent(
                cpu=lambda: cpu_attention.decode_attention(q, keys, values, positions), default=jnp_path), state
        return jnp_path(), state
    return clustered_attention(qc, keys, values, positions, k_pos, plan).astype(q.dtype), state

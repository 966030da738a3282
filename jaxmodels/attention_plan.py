"""Attention plans: per-row index maps saying which heads compute scores and which keys are cached.

A plan is runtime data: int32 arrays with a leading batch axis, so each row of a batch has its own
maps and a new request reuses the compiled program. Its sizes (the arrays' widths) are static. For
one layer with H query heads, KV key/value heads and G = H / KV query heads per KV head:

    k_source      [B, Ck]  K slot c of row b stores the keys of KV head k_source[b, c]. The layer's
                           K cache is [B*Ck, S, hd]; the V cache stays [B*KV, S, hd].
    rep_heads     [B, Cq]  Representative i (Cq = Ck * M) scores query head rep_heads[b, i] against
                           K slot i // M: softmax(q_rep . K_slot^T / sqrt(hd)), masked by position.
    head_cluster  [B, H]   Query head h applies the probabilities of representative
                           head_cluster[b, h] to the values of its own KV head, h // G.

Dense multi-head and grouped-query attention are the identity plan: Ck = KV, M = G,
k_source = arange(KV), rep_heads = arange(H), head_cluster = arange(H) (`identity_plan`). `None`
stands for it. It runs the plain GQA program with no gathers. Given as data, the identity plan
gives the same numbers as dense attention. CHAI (clustered heads, research notes A.1) is the plan
`cluster_plan` builds from per-row cluster labels of the KV heads. Decode is memory-bound, so what
CHAI saves is K cache memory and K reads, Ck / KV of them. That needs clusters of KV heads (whole
GQA groups). Clustering query heads inside groups keeps every K slot; it saves only score FLOPs,
and after padding (below) at most G - M of every G.

**Why a representative's K slot is the static i // M, not a data index.** The score matmul then
takes the K cache buffer as stored, [B*Ck, S, hd] with a single batch axis. That is the GQA matmul
with KV -> Ck and G -> M, and XLA:CPU runs it at memory bandwidth (see `jaxmodels.attention`). With
a per-representative slot index, every step would gather a [B, Cq, S, hd] copy of K. That moves more
bytes than CHAI saves. A plan whose slots are read by unequal numbers of representatives still fits:
pad every slot to M = the largest count. A padding entry may name any head; no head reads its
scores. `pack_plan` does this for maps with an explicit rep_kslot [B, Cq], the form
`jaxmodels.chai` builds. `AttentionPlan.rep_kslot` gives the implied slots back.

**Per layer.** Functions that run several layers take `plans`, a tuple with one entry per layer of
the model (None = a dense layer). A stacked segment is scanned in runs of layers with equal plan
sizes (see `plan_signature`); each run's plans are stacked over the layer axis as scan inputs. The
parameter layout does not change. CHAI has no weights of its own, so a dense checkpoint runs
clustered as it is. The cache gets each layer's K slot count from `k_slots(config, plans)`.
Plans decided online from the prompt (CHAI: its first five tokens) come from
`jaxmodels.model.plans_from_prefix`. It runs the prefix through the layers in turn and asks a
planner for each layer's plan, given that layer's q and k.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.config import LlamaConfig

__all__ = ["AttentionPlan", "LayerPlans", "identity_plan", "cluster_plan", "pack_plan", "plan_signature",
           "stack_plans", "k_slots", "plan_problems", "check_plans", "take_plan_rows"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """One layer's index maps (see the module docstring). Leading axes past the batch are allowed
    only as the layer axis of plans stacked for `lax.scan`."""

    k_source: Any  # [B, Ck] int32: KV head whose keys K slot c stores
    rep_heads: Any  # [B, Cq] int32: query head of representative i (reads K slot i // M)
    head_cluster: Any  # [B, H] int32: representative whose probabilities query head h uses

    @property
    def num_k_slots(self) -> int:
        """Ck, the K cache slots per row."""
        return self.k_source.shape[-1]

    @property
    def num_reps(self) -> int:
        """Cq, the heads that compute scores."""
        return self.rep_heads.shape[-1]

    @property
    def reps_per_slot(self) -> int:
        """M = Cq / Ck: representatives i with i // M == c read K slot c."""
        return self.num_reps // self.num_k_slots

    @property
    def rep_kslot(self) -> jax.Array:
        """[..., Cq] the K slot each representative reads (i // M), in the explicit form."""
        slots = jnp.arange(self.num_reps, dtype=jnp.int32) // self.reps_per_slot
        return jnp.broadcast_to(slots, self.rep_heads.shape)


LayerPlans = Sequence[AttentionPlan | None]  # one entry per layer of the model; None = dense


def identity_plan(config: LlamaConfig, batch_size: int) -> AttentionPlan:
    """Dense / grouped-query attention as explicit data (what `None` stands for)."""
    h, kv = config.num_attention_heads, config.num_key_value_heads
    rows = lambda n: jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch_size, n))  # noqa: E731
    return AttentionPlan(k_source=rows(kv), rep_heads=rows(h), head_cluster=rows(h))


def cluster_plan(labels: jax.Array, num_clusters: int, num_heads: int) -> AttentionPlan:
    """CHAI at KV-head granularity: labels [B, KV] in [0, C) put each KV head (its whole group of G
    query heads) in a cluster. Traceable, so it can run inside jit.

    Cluster c's representative is its lowest-index member r (CHAI's rule). K slot c stores the keys
    of r, and query head r*G + j computes the scores that the j-th query head of every member group
    uses. So Ck = C, M = G and Cq = C * G. For a multi-head model (G = 1) this is CHAI's
    head clustering. An empty cluster's slot stores KV head 0, and nothing reads it.
    """
    labels = jnp.asarray(labels, jnp.int32)
    b, kv = labels.shape
    g = num_heads // kv
    member = labels[:, None, :] == jnp.arange(num_clusters)[None, :, None]  # [B, C, KV]
    first = jnp.min(jnp.where(member, jnp.arange(kv)[None, None], kv), axis=-1)  # [B, C]
    k_source = jnp.where(first < kv, first, 0).astype(jnp.int32)
    rep_heads = (k_source[:, :, None] * g + jnp.arange(g)[None, None]).reshape(b, num_clusters * g)
    heads = jnp.arange(num_heads)
    head_cluster = labels[:, heads // g] * g + (heads % g)[None]  # [B, H]
    return AttentionPlan(k_source, rep_heads.astype(jnp.int32), head_cluster.astype(jnp.int32))


def pack_plan(rep_heads: jax.Array, rep_kslot: jax.Array, head_cluster: jax.Array, k_source: jax.Array,
              reps_per_slot: int) -> AttentionPlan:
    """An `AttentionPlan` from maps that name each representative's K slot explicitly:
    rep_kslot [B, Cq] in [0, Ck), the form `jaxmodels.chai.HeadPlan` uses. Traceable.

    Each slot's representatives keep their order and are padded to M = `reps_per_slot`, which is
    static. M must be at least the number of representatives any slot has in any row. min(G, Cq)
    always suffices when a slot's representatives are distinct query heads of one KV group. Padding
    entries name head 0, and no head reads them. head_cluster is renumbered to the packed order. When
    slots are read by equally many representatives, in slot order (KV-group clustering, M = G), the
    maps come back unchanged.
    """
    rep_heads, rep_kslot, head_cluster, k_source = (
        jnp.asarray(x, jnp.int32) for x in (rep_heads, rep_kslot, head_cluster, k_source))
    b, ck, m = rep_heads.shape[0], k_source.shape[1], reps_per_slot
    same = (rep_kslot[:, :, None] == jnp.arange(ck)[None, None]).astype(jnp.int32)  # [B, Cq, Ck]
    rank = jnp.take_along_axis(jnp.cumsum(same, axis=1), rep_kslot[:, :, None], axis=2)[..., 0] - 1
    packed = rep_kslot * m + rank  # [B, Cq]: where representative i goes
    heads = jnp.zeros((b, ck * m), jnp.int32).at[jnp.arange(b)[:, None], packed].set(rep_heads, mode="drop")
    return AttentionPlan(k_source, heads, jnp.take_along_axis(packed, head_cluster, axis=1))


def plan_signature(plan: AttentionPlan | None) -> tuple[int, int] | None:
    """The static sizes (Ck, Cq) of a layer's plan (None for dense). Layers with equal signatures
    can share a `lax.scan`; a change of signature splits a stacked segment."""
    return None if plan is None else (plan.num_k_slots, plan.num_reps)


def stack_plans(plans: Sequence[AttentionPlan]) -> AttentionPlan:
    """Plans of equal signature stacked over a leading layer axis (scan inputs)."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *plans)


def k_slots(config: LlamaConfig, plans: LayerPlans | None) -> tuple[int, ...]:
    """K cache slots per row for each layer: Ck for a planned layer, KV for a dense one."""
    kv = config.num_key_value_heads
    if plans is None:
        return (kv,) * config.num_hidden_layers
    return tuple(kv if p is None else p.num_k_slots for p in plans)


def take_plan_rows(plans: LayerPlans | None, lo: int, hi: int) -> LayerPlans | None:
    """The plans of batch rows [lo, hi) (to run a batch in groups)."""
    if plans is None:
        return None
    return tuple(None if p is None else jax.tree_util.tree_map(lambda x: x[lo:hi], p) for p in plans)


# --------------------------------------------------------------------------- checks
def _map_problems(where: str, name: str, x: np.ndarray, batch: int, width: int | None, high: int) -> list[str]:
    """Shape, dtype and range problems of one index map (host-side values)."""
    if x.ndim != 2 or x.shape[0] != batch or (width is not None and x.shape[1] != width):
        want = f"[{batch}, {width if width is not None else 'n'}]"
        return [f"{where}: {name} must have shape {want} (batch, ...), got {list(x.shape)}"]
    if not np.issubdtype(x.dtype, np.integer):
        return [f"{where}: {name} must hold integers, got dtype {x.dtype}"]
    if x.size and not (0 <= x.min() and x.max() < high):
        return [f"{where}: {name} must lie in [0, {high}), got values in [{x.min()}, {x.max()}]"]
    return []


def _layer_problems(config: LlamaConfig, where: str, plan: Any, batch: int) -> list[str]:
    h, kv = config.num_attention_heads, config.num_key_value_heads
    if not isinstance(plan, AttentionPlan):
        return [f"{where}: expected an AttentionPlan or None (dense), got {type(plan).__name__}"]
    ks, rh, hc = (np.asarray(x) for x in (plan.k_source, plan.rep_heads, plan.head_cluster))
    problems = _map_problems(where, "k_source", ks, batch, None, kv)
    problems += _map_problems(where, "rep_heads", rh, batch, None, h)
    if problems:
        return problems
    ck, cq = ks.shape[1], rh.shape[1]
    if not 1 <= ck <= kv:
        problems.append(f"{where}: {ck} K slots; a layer has 1 to {kv} (num_key_value_heads)")
    elif cq % ck:
        problems.append(f"{where}: {cq} representatives do not split evenly over {ck} K slots; pad "
                        f"rep_heads to a multiple of {ck} (padding entries may name any head)")
    return problems + _map_problems(where, "head_cluster", hc, batch, h, cq)


def plan_problems(config: LlamaConfig, plans: Any, batch_size: int) -> list[str]:
    """Everything wrong with per-layer `plans` for this config and batch, each naming the layer and
    the fix. Reads the index values, so call it on concrete arrays (host-side), not under jit."""
    n = config.num_hidden_layers
    if not isinstance(plans, (tuple, list)) or len(plans) != n:
        got = f"{type(plans).__name__} of {len(plans)}" if isinstance(plans, (tuple, list)) else type(plans).__name__
        return [f"attention plans: expected a tuple with one entry per layer ({n}; None for a dense "
                f"layer), got {got}"]
    return [p for i, plan in enumerate(plans) if plan is not None
            for p in _layer_problems(config, f"attention plan of layer {i}", plan, batch_size)]


def check_plans(config: LlamaConfig, plans: Any, batch_size: int) -> tuple[AttentionPlan | None, ...]:
    """`plans` checked (ValueError listing every problem) and normalized to int32 device arrays."""
    problems = plan_problems(config, plans, batch_size)
    if problems:
        raise ValueError("; ".join(problems))
    as_int32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    return tuple(None if p is None else jax.tree_util.tree_map(as_int32, p) for p in plans)

"""Stateless building blocks of a Llama layer: dense (matmul) weights, RMSNorm, rotary embeddings, SwiGLU.

All are pure functions of arrays so that the scanned layer stack, the early-exit paths and the
pipeline stages share one implementation. Numerics follow Hugging Face's Llama (norm in float32,
rotate-half RoPE) so imported checkpoints give the same logits.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels import cpu_matvec
from jaxmodels.config import LlamaConfig
from jaxmodels.quantize import Int8Weight
from jaxmodels.weights import GramTap, LowRank, OutputMajor

FEW_ROWS = 64  # up to this many rows, an output-major weight multiplies as y^T = W^T x^T on CPU


def dense(w: jax.Array | LowRank | Int8Weight | OutputMajor, x: jax.Array) -> jax.Array:
    """x [..., m] @ w [m, n] -> [..., n]: the one place a matmul weight is applied.

    A factorized weight goes through its rank: (x @ u) @ v costs (m + n) r per row instead of m n.
    A `GramTap` applies its weight and records X^T X for activation-aware compression. An
    `OutputMajor` weight (the CPU decoding layout) goes through `output_major_matmul`.
    """
    if isinstance(w, GramTap):
        return dense(w.w, _gram_tap(x, w.gram))
    if isinstance(w, LowRank):
        return dense(w.v, dense(w.u, x))
    stored = _output_major_parts(w)
    if stored is not None:
        return output_major_matmuls([stored], x)[0]
    if isinstance(w, Int8Weight):  # weight-only int8: dequantized inside the matmul (`_grouped_int8`)
        return _grouped_int8(x, w.q.astype(x.dtype), w.scale.astype(x.dtype), "...Gg,Ggn->...Gn", 0)
    return x @ w


def _grouped_int8(x: jax.Array, w: jax.Array, scale: jax.Array, spec: str, in_axis: int) -> jax.Array:
    """sum_g (x_g @ w_g) * scale[g] over the G groups of scale [G, n] (`quantize.Int8Weight`): w is
    [m, n] (in_axis 0) or output-major [n, m] (in_axis 1, G > 1 only) and `spec` the einsum of one
    group's product. One group: the plain product times the scale. Over FEW_ROWS rows, one product
    with the dequantized weight: G products of m / G inputs write G partial outputs each, and
    SmolLM2's int8 prefill on CPU (8 rows x 32 tokens) took 1.56 s that way against 0.55 s."""
    groups, m = scale.shape[0], x.shape[-1]
    if groups == 1:
        return (x @ w) * scale[0]
    if math.prod(x.shape[:-1]) > FEW_ROWS:  # many rows: one product with the dequantized weight
        if in_axis == 0:
            return x @ (w.reshape(groups, m // groups, -1) * scale[:, None, :]).reshape(m, -1)
        dequantized = (w.reshape(w.shape[0], groups, m // groups) * scale.T[:, :, None]).reshape(w.shape)
        return jnp.einsum("...m,nm->...n", x, dequantized)
    xg = x.reshape(*x.shape[:-1], groups, m // groups)
    wg = w.reshape(groups, m // groups, -1) if in_axis == 0 else w.reshape(w.shape[0], groups, m // groups)
    return jnp.sum(jnp.einsum(spec, xg, wg) * scale, axis=-2)


def dense_many(ws: Sequence[Any], x: jax.Array) -> list[jax.Array]:
    """[dense(w, x) for w in ws], with the output-major ones (a layer's q, k, v; gate and up in the
    CPU decoding layout) in one `output_major_matmuls` call: on the CPU decode kernel one call
    shares its threads' work among the weights. The same numbers as one `dense` per weight."""
    stored = [_output_major_parts(w) for w in ws]
    if all(part is not None for part in stored):
        return output_major_matmuls(stored, x)
    return [dense(w, x) for w in ws]


def _output_major_parts(w: Any) -> tuple[jax.Array, jax.Array | None] | None:
    """(wt [n, m], scale [G, n] or None) of an output-major weight (`OutputMajor`, or int8 over
    one); None for any other weight."""
    if isinstance(w, OutputMajor):
        return w.wt, None
    if isinstance(w, Int8Weight) and isinstance(w.q, OutputMajor):
        return w.q.wt, w.scale
    return None


def output_major_matmul(wt: jax.Array, x: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """x [..., m] @ wt.T -> [..., n] for a weight stored [n, m] (an embedding table as LM head, or
    `OutputMajor`), each output column times scale [n] if given, or each group of m / G inputs
    times its row of scale [G, n] (int8 weights)."""
    return output_major_matmuls([(wt, scale)], x)[0]


def output_major_matmuls(weights: Sequence[tuple[jax.Array, jax.Array | None]], x: jax.Array) -> list[jax.Array]:
    """`output_major_matmul(wt, x, scale)` for each (wt, scale) of `weights`.

    On CPU, up to `cpu_matvec.MAX_ROWS` rows run the CPU decode kernel where it is built, all the
    weights in one call when they share a dtype: it reads float32, bf16 or int8 weights as stored.
    `platform_dependent` keeps it out of programs lowered for another platform from a CPU host
    (`training.aot`'s TPU decode step). Otherwise `_xla_matmul` per weight."""
    xla = lambda: [_xla_matmul(wt, x, scale) for wt, scale in weights]  # noqa: E731
    if (all(cpu_matvec.applies(wt, x, scale) for wt, scale in weights)
            and len({jnp.dtype(wt.dtype) for wt, _ in weights}) == 1):
        wts, scales = [wt for wt, _ in weights], [scale for _, scale in weights]
        return jax.lax.platform_dependent(cpu=lambda: cpu_matvec.matvecs(x, wts, scales), default=xla)
    return xla()


def _xla_matmul(wt: jax.Array, x: jax.Array, scale: jax.Array | None) -> jax.Array:
    """`output_major_matmul` through XLA's dot. On CPU, up to FEW_ROWS rows run as y^T = wt @ x^T
    with the weight as the dot's left operand, the form XLA:CPU runs 1.5-4x faster for 2-32 rows
    (measured; same speed at 1 row); the optimization barrier keeps XLA from folding the small
    transpose back into the dot. More rows (prefill, training) and other backends: the plain product."""
    wt = wt.astype(x.dtype)
    rows = math.prod(x.shape[:-1])
    if scale is not None and scale.ndim == 2:  # int8: a scale per group of inputs, or [1, n]
        if scale.shape[0] > 1:
            return _grouped_int8(x, wt, scale.astype(x.dtype), "...Gg,nGg->...Gn", 1)
        scale = scale[0]
    if rows > FEW_ROWS or jax.default_backend() != "cpu":
        y = jnp.einsum("...m,nm->...n", x, wt)
    else:
        yt = jax.lax.optimization_barrier(jnp.matmul(wt, x.reshape(rows, x.shape[-1]).T))  # [n, rows]
        y = yt.T.reshape(*x.shape[:-1], wt.shape[0])
    return y if scale is None else y * scale.astype(x.dtype)


@jax.custom_vjp
def _gram_tap(x: jax.Array, gram: jax.Array) -> jax.Array:
    """The identity on x [..., m]; its gradient with respect to gram [m, m] is X^T X over x's rows."""
    return x


def _gram_tap_fwd(x: jax.Array, gram: jax.Array) -> tuple[jax.Array, jax.Array]:
    return x, x


def _gram_tap_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    return g, jnp.matmul(rows.T, rows, precision=jax.lax.Precision.HIGHEST)


_gram_tap.defvjp(_gram_tap_fwd, _gram_tap_bwd)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, computed in float32 and cast back (as HF does)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """Per-pair rotary frequencies [head_dim // 2], with linear or Llama-3 scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling_dict
    if config.rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif config.rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables for integer positions [...] -> [..., head_dim] (rotate-half layout)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [..., hd]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, heads, hd] by cos/sin [B, T, hd] (HF's rotate_half convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def swiglu(x: jax.Array, w_gate: jax.Array | LowRank, w_up: jax.Array | LowRank,
           w_down: jax.Array | LowRank) -> jax.Array:
    """Llama MLP: down(silu(x @ gate) * (x @ up)). x [..., D]; w_gate/w_up [D, F]; w_down [F, D]."""
    gate, up = dense_many([w_gate, w_up], x)
    return dense(w_down, jax.nn.silu(gate) * up)

"""Weights for decoding in fewer bytes: bfloat16, or int8 matmul weights (weight-only).

Decoding a few rows reads every weight once per generated token, so its speed is bounded by the
weight bytes over the memory bandwidth (`benchmarks/decode.py` reports the fraction achieved).

- `bfloat16`: every parameter cast to bf16: half the bytes of float32. Decoding's hidden states
  and KV cache take `inference.engine.cache_dtype`: bf16 on GPU / TPU (RMSNorm and softmax
  statistics still in float32), float32 on CPU, where bf16 is then weight-only.
- `int8`: every matmul weight stored as int8 with one scale per output column and group of
  GROUP_SIZE consecutive inputs (symmetric, absmax), multiplied group by group as
  `sum_g (x_g @ q_g) * scale_g` (`layers.dense`); the embedding table as int8 with one scale per
  token row and group of GROUP_SIZE features (`Int8Rows`), which serves both the lookup and the
  tied head's logit for that token.
  Norms and activations keep their dtype: a quarter of the float32 bytes, plus the scales (1/16 of
  the int8 bytes in float32). Groups of 64 against one scale per column / row, SmolLM2 on the
  decode benchmark's 8 prompts: logit error 3.6% against 6.1% of the largest float32 logit, top-1
  agreement with float32 0.989 against 0.904 (2026-12-03).

On CPU both decode through `jaxmodels.cpu_matvec`, which reads the stored bytes (XLA:CPU alone
converts them to float32 first; `cpu_decoding_note` says when that applies).
Both are lossy; `tests/test_quantize.py` bounds the error and measures greedy agreement with float32.
Float32 stays the default. `int8` refuses a factorized (`LowRank`) model; bfloat16 takes it.
In bfloat16, self-speculation matches bf16 greedy decoding only up to rounding: the verifier's
multi-token pass rounds differently from one-token steps, so a near-tie can flip (int8 computes in
float32 and stays lossless).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxmodels.weights import LAYER_WEIGHTS, LowRank

WEIGHT_FORMATS = ("float32", "bfloat16", "int8")
GROUP_SIZE = 64  # inputs per int8 scale; a weight whose input size it does not divide gets one scale per column


@dataclasses.dataclass(frozen=True)
class _Int8:
    """int8 values `q` and float scales `scale`; shaped like q, computing in the scales' dtype."""

    q: Any
    scale: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    @property
    def dtype(self) -> Any:
        return self.scale.dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight(_Int8):
    """A matmul weight W [..., m, n] ~ q * scale: q int8 [..., m, n], scale [..., G, n], one per
    output column and group of m / G consecutive inputs (G = 1: one per column)."""

    def __getitem__(self, index: Any) -> "Int8Weight":  # w[:, :K]: an untied draft head's first K columns
        index = index if isinstance(index, tuple) else (index,)
        if len(index) != self.q.ndim or any(i != slice(None) for i in index[:-1]):
            raise IndexError(f"an Int8Weight is sliced along its output axis only (w[:, :K]), got {index}")
        return Int8Weight(q=self.q[index], scale=self.scale[..., index[-1]])

    def dequantize(self) -> jax.Array:
        *lead, m, n = self.q.shape
        groups = self.scale.shape[-2]
        q = self.q.astype(self.scale.dtype).reshape(*lead, groups, m // groups, n)
        return (q * self.scale[..., :, None, :]).reshape(self.q.shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Rows(_Int8):
    """An embedding table E [V, d] ~ q * scale: q int8 [V, d], scale [G, V], one per token and group
    of d / G consecutive features (G = 1: one per token). As the tied LM head, output-major with
    `Int8Weight`'s grouped scales: logit v = sum_g scale[g, v] * (h_g . q[v, g])."""

    def __getitem__(self, rows: Any) -> "Int8Rows":  # the first K rows: a draft head (draft_vocab)
        return Int8Rows(q=self.q[rows], scale=self.scale[:, rows])

    def row_scales(self, tokens: jax.Array) -> jax.Array:
        """[..., d]: each feature's scale in the rows of `tokens` [...]."""
        per_group = jnp.moveaxis(jnp.take(self.scale, tokens, axis=1), 0, -1)  # [..., G]
        return jnp.repeat(per_group, self.q.shape[1] // self.scale.shape[0], axis=-1)

    def dequantize(self) -> jax.Array:
        return self.q.astype(self.scale.dtype) * self.row_scales(jnp.arange(self.q.shape[0]))


def quantize_rows(e: jax.Array, group_size: int | None = GROUP_SIZE) -> Int8Rows:
    """Symmetric int8 of an embedding table [V, d], per row and group of `group_size` features."""
    t = quantize_int8(jnp.asarray(e).T, group_size)  # rows of E are the columns of E^T
    return Int8Rows(q=t.q.T, scale=t.scale)


def quantize_int8(w: jax.Array, group_size: int | None = GROUP_SIZE) -> Int8Weight:
    """Symmetric int8 of w [..., m, n], one scale per output column and group of `group_size`
    inputs (None, or a size that does not divide m into several groups: one per column):
    scale = max |w| over the group / 127 (all-zero groups stay 0)."""
    w = jnp.asarray(w)
    *lead, m, n = w.shape
    groups = m // group_size if group_size and m % group_size == 0 else 1
    wg = w.astype(jnp.float32).reshape(*lead, groups, m // groups, n)
    absmax = jnp.max(jnp.abs(wg), axis=-2)  # [..., G, n]
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    q = jnp.clip(jnp.round(wg / scale[..., :, None, :]), -127, 127).astype(jnp.int8).reshape(w.shape)
    return Int8Weight(q=q, scale=scale.astype(w.dtype))


def _layer_matmuls() -> set[str]:
    return {spec.name for spec in LAYER_WEIGHTS if spec.matmul}


def _quantize_layer(layer: dict[str, Any]) -> dict[str, Any]:
    names = _layer_matmuls()
    if any(isinstance(v, LowRank) for v in layer.values()):
        raise ValueError("int8 weights of a factorized (low-rank) model are not supported; use bfloat16, "
                         "or merge u @ v first")
    return {k: quantize_int8(v) if k in names and not isinstance(v, Int8Weight) else v for k, v in layer.items()}


def convert_weights(params: dict[str, Any], weights: str) -> dict[str, Any]:
    """The parameters in `weights` format ('float32' | 'bfloat16' | 'int8'), any layer layout;
    convert once after loading and pass the result to `generate`. ValueError for another name or
    an unsupported model. 'float32' returns the parameters unchanged."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got '{weights}'")
    if weights == "float32":
        return params
    if weights == "bfloat16":
        return jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                      jax.tree_util.tree_map(jnp.asarray, params))
    layers = params["layers"]
    if isinstance(layers, dict):
        layers = _quantize_layer(layers)
    else:
        layers = tuple(_quantize_layer(seg) for seg in layers)
    out = {**params, "layers": layers, "embed": quantize_rows(params["embed"])}
    if "lm_head" in params:
        out["lm_head"] = quantize_int8(params["lm_head"])
    return out


def cpu_flags() -> set[str]:
    """The instruction-set flags this CPU reports in /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def cpu_decoding_note(weights: str) -> str | None:
    """Why `weights` will not decode faster than float32 on this machine, or None. With the CPU
    decode kernel (`jaxmodels.cpu_matvec`) bf16 and int8 weights are read as stored: SmolLM2 at
    batch 1 decoded 2.3x (bf16) and 3.6x (int8) faster than through XLA on a 2-core AVX-512 EPYC
    (`benchmarks/decode.py`). Without it, XLA:CPU multiplies them in float32 and hoists the
    conversion out of the decode loop, which then reads float32 copies (`benchmarks/matvec_dtypes.py`)."""
    from jaxmodels import cpu_matvec  # cpu_matvec imports this module

    if weights == "float32" or jax.default_backend() != "cpu" or cpu_matvec.available():
        return None
    return (f"{weights} weights on this CPU are converted to float32 inside the compiled decode program, "
            f"once per call, because the CPU decode kernel is not available (jaxmodels.cpu_matvec: switched off "
            f"by {cpu_matvec.ENV_SWITCH}=0, or no C++ compiler): decoding reads float32 copies, so it saves "
            f"neither time nor memory; float32 is as fast and exact")


def weight_bytes(params: dict[str, Any]) -> int:
    """Bytes of every parameter array (what one decode step reads, the KV cache aside)."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(params))

"""The model's weights, described once.

`LAYER_WEIGHTS` and `MODEL_WEIGHTS` are the single table of every weight: its name in the parameter
tree, its shape from the config, its init, its Hugging Face and GGUF tensor names, its logical axes
(what sharding rules key on) and whether it is a matmul weight (applied by `layers.dense`, stored
`[in, out]` where HF and GGUF store `[out, in]`, and - inside a layer - factorizable). Shapes, init,
shape checks, the NNX shell, HF/GGUF conversion, parameter / FLOP / byte counts and FSDP sharding
are derived from it, so adding a weight kind is one line here.

A factorized matmul weight is a `LowRank(u, v)`: ordinary pytree data with u [..., m, r] and
v [..., r, n] (leading axes: layers), so it stacks, shards, checkpoints and goes through `jit`,
`grad` and optax unchanged. Which weights of which layers are factorized, and at what rank, is
`LayerVariants`, carried by `LlamaConfig.layer_variants` (None: every layer dense).

This module imports nothing else from jaxmodels, so `config.py` can use it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import jax

if TYPE_CHECKING:
    from jaxmodels.config import LlamaConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowRank:
    """A factorized matmul weight W = u @ v: u [..., m, r], v [..., r, n] (leading axes: layers)."""

    u: Any
    v: Any

    @property
    def rank(self) -> int:
        return self.u.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the dense weight it stands for: [..., m, n]."""
        return (*self.u.shape[:-1], self.v.shape[-1])

    def merge(self) -> Any:
        """The dense weight u @ v [..., m, n]."""
        return self.u @ self.v


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GramTap:
    """A matmul weight `w` (dense or `LowRank`) that records what it is applied to: the gradient of
    any output with respect to `gram` (zeros [..., m, m]) is X^T X, summed over every row x [m] the
    weight multiplied (`jaxmodels.layers.dense`). Calibration data for activation-aware compression
    (`training.whiten`); a tapped model computes exactly what the untapped one does."""

    w: Any
    gram: Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OutputMajor:
    """A matmul weight W [m, n] stored transposed, wt = W^T [n, m]: the decoding layout on CPU.

    XLA:CPU multiplies a few rows x [k, m] by a weight 1.5-4x faster as y^T = W^T x^T, with the
    weight as the dot's left operand, than as x @ W (SmolLM2's shapes, k = 2..32 rows, 2-core AMD
    EPYC; `layers.dense`, `params.decode_layout`). Also the layout HF and GGUF store."""

    wt: Any

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the weight it stands for: [m, n]."""
        return (self.wt.shape[1], self.wt.shape[0])

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> Any:
        return self.wt.dtype

    def __getitem__(self, index: Any) -> "OutputMajor":  # w[:, :K]: an untied draft head's first K columns
        if not isinstance(index, tuple) or len(index) != 2 or index[0] != slice(None):
            raise IndexError(f"an OutputMajor weight is sliced along its output axis only (w[:, :K]), got {index}")
        return OutputMajor(self.wt[index[1]])


def _always(config: LlamaConfig) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One weight kind. Layer weights' shapes and names are per layer (no layer axis; "{i}" = index)."""

    name: str
    shape: Callable[[LlamaConfig], tuple[int, ...]]
    axes: tuple[str, ...]  # logical axis names, one per dimension of `shape`
    hf: str  # Hugging Face tensor name
    gguf: str  # llama.cpp tensor name
    init: str = "normal"  # "normal" (std) or "ones"
    matmul: bool = False  # applied by `dense(w, x)`; [in, out] here, [out, in] in HF / GGUF
    residual: bool = False  # its output is added to the residual stream
    rope_heads: Callable[[LlamaConfig], int] | None = None  # GGUF permutes its rows per head
    present: Callable[[LlamaConfig], bool] = _always


def _q(c: LlamaConfig) -> int:
    return c.num_attention_heads * c.head_dim


def _kv(c: LlamaConfig) -> int:
    return c.num_key_value_heads * c.head_dim


_LAYER = "model.layers.{i}."
LAYER_WEIGHTS: tuple[WeightSpec, ...] = (
    WeightSpec("attn_norm", lambda c: (c.hidden_size,), ("embed",), _LAYER + "input_layernorm.weight",
               "blk.{i}.attn_norm.weight", init="ones"),
    WeightSpec("wq", lambda c: (c.hidden_size, _q(c)), ("embed", "q_heads"), _LAYER + "self_attn.q_proj.weight",
               "blk.{i}.attn_q.weight", matmul=True, rope_heads=lambda c: c.num_attention_heads),
    WeightSpec("wk", lambda c: (c.hidden_size, _kv(c)), ("embed", "kv_heads"), _LAYER + "self_attn.k_proj.weight",
               "blk.{i}.attn_k.weight", matmul=True, rope_heads=lambda c: c.num_key_value_heads),
    WeightSpec("wv", lambda c: (c.hidden_size, _kv(c)), ("embed", "kv_heads"), _LAYER + "self_attn.v_proj.weight",
               "blk.{i}.attn_v.weight", matmul=True),
    WeightSpec("wo", lambda c: (_q(c), c.hidden_size), ("q_heads", "embed"), _LAYER + "self_attn.o_proj.weight",
               "blk.{i}.attn_output.weight", matmul=True, residual=True),
    WeightSpec("mlp_norm", lambda c: (c.hidden_size,), ("embed",), _LAYER + "post_attention_layernorm.weight",
               "blk.{i}.ffn_norm.weight", init="ones"),
    WeightSpec("w_gate", lambda c: (c.hidden_size, c.intermediate_size), ("embed", "mlp"),
               _LAYER + "mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight", matmul=True),
    WeightSpec("w_up", lambda c: (c.hidden_size, c.intermediate_size), ("embed", "mlp"),
               _LAYER + "mlp.up_proj.weight", "blk.{i}.ffn_up.weight", matmul=True),
    WeightSpec("w_down", lambda c: (c.intermediate_size, c.hidden_size), ("mlp", "embed"),
               _LAYER + "mlp.down_proj.weight", "blk.{i}.ffn_down.weight", matmul=True, residual=True),
)
MODEL_WEIGHTS: tuple[WeightSpec, ...] = (
    WeightSpec("embed", lambda c: (c.vocab_size, c.hidden_size), ("vocab", "embed"), "model.embed_tokens.weight",
               "token_embd.weight"),
    WeightSpec("final_norm", lambda c: (c.hidden_size,), ("embed",), "model.norm.weight", "output_norm.weight",
               init="ones"),
    WeightSpec("lm_head", lambda c: (c.hidden_size, c.vocab_size), ("embed", "vocab"), "lm_head.weight",
               "output.weight", matmul=True, present=lambda c: not c.tie_word_embeddings),
)
LAYER_KEYS = tuple(s.name for s in LAYER_WEIGHTS)
WEIGHTS: dict[str, WeightSpec] = {s.name: s for s in LAYER_WEIGHTS + MODEL_WEIGHTS}
FACTORIZABLE = tuple(s.name for s in LAYER_WEIGHTS if s.matmul)
FACTORS = ("u", "v")


def factor_shapes(shape: tuple[int, int], rank: int) -> LowRank:
    """The shapes of u [m, r] and v [r, n] for an [m, n] weight at `rank`."""
    m, n = shape
    return LowRank(u=(m, rank), v=(rank, n))


def hf_name(spec: WeightSpec, layer: int | None = None, factor: str | None = None) -> str:
    """The HF tensor name. A factor is stored HF-style transposed under `<name>_u` [r, m] and
    `<name>_v` [n, r], so the HF-layout dense weight is `<name>_v @ <name>_u`."""
    name = spec.hf.format(i=layer)
    return name if factor is None else f"{name}_{factor}"


# --------------------------------------------------------------------------- per-layer variants
@dataclasses.dataclass(frozen=True)
class LayerVariants:
    """Which matmul weights of each layer are factorized, and at what rank.

    `layers[i]` holds layer i's sorted ((weight name, rank), ...); () means the layer is dense.
    Consecutive layers with equal entries form one segment, stacked and scanned together.
    """

    layers: tuple[tuple[tuple[str, int], ...], ...]

    @classmethod
    def from_ranks(cls, per_layer: Sequence[Mapping[str, int]]) -> LayerVariants:
        """From one {weight name: rank} mapping per layer ({} = dense)."""
        return cls(tuple(tuple(sorted((str(k), v) for k, v in ranks.items())) for ranks in per_layer))

    @classmethod
    def hybrid(cls, num_layers: int, ranks: Mapping[str, int], full_rank_layers: int = 0) -> LayerVariants:
        """Pufferfish's hybrid: layers [0, full_rank_layers) dense, the rest factorized at `ranks`."""
        return cls.from_ranks([{} if i < full_rank_layers else dict(ranks) for i in range(num_layers)])

    def ranks(self, layer: int) -> dict[str, int]:
        return dict(self.layers[layer])

    @property
    def is_dense(self) -> bool:
        return not any(self.layers)

    def segments(self) -> tuple[tuple[int, int], ...]:
        """Maximal runs [start, stop) of layers with the same variant."""
        bounds = [0] + [i for i in range(1, len(self.layers)) if self.layers[i] != self.layers[i - 1]]
        return tuple(zip(bounds, bounds[1:] + [len(self.layers)]))

    def to_json(self) -> dict[str, Any]:
        return {"format": "jaxmodels.layer_variants", "version": 1,
                "layers": [dict(ranks) for ranks in self.layers]}

    @classmethod
    def from_json(cls, raw: Any) -> LayerVariants:
        """Parse `to_json`'s output; a ValueError says what is malformed."""
        if not isinstance(raw, dict) or not isinstance(raw.get("layers"), list):
            raise ValueError("expected an object with a 'layers' list (one {weight: rank} object per layer)")
        if any(not isinstance(r, dict) or not all(isinstance(v, int) for v in r.values()) for r in raw["layers"]):
            raise ValueError("every entry of 'layers' must be an object of integer ranks, e.g. {\"wq\": 32}")
        return cls.from_ranks(raw["layers"])


def variant_problems(config: LlamaConfig) -> list[str]:
    """Everything wrong with `config.layer_variants` for this config, each naming the key and the fix."""
    variants = config.layer_variants
    if variants is None:
        return []
    if len(variants.layers) != config.num_hidden_layers:
        return [f"layer_variants lists {len(variants.layers)} layers but num_hidden_layers is "
                f"{config.num_hidden_layers}; give one entry per layer ({{}} for a dense layer)"]
    problems = []
    for i, ranks in enumerate(variants.layers):
        for name, rank in ranks:
            if name not in FACTORIZABLE:
                problems.append(f"layer_variants layer {i}: '{name}' is not a factorizable weight; "
                                f"choose from {', '.join(FACTORIZABLE)}")
                continue
            m, n = WEIGHTS[name].shape(config)
            if not isinstance(rank, int) or not 1 <= rank <= min(m, n):
                problems.append(f"layer_variants layer {i} '{name}': rank {rank!r} is outside [1, {min(m, n)}] "
                                f"for its [{m}, {n}] weight; use a rank from 1 to min(m, n) = {min(m, n)}")
    return problems


def layer_ranks(config: LlamaConfig, layer: int) -> dict[str, int]:
    """{weight name: rank} of layer `layer`'s factorized weights ({} when dense)."""
    return {} if config.layer_variants is None else config.layer_variants.ranks(layer)


def segments(config: LlamaConfig) -> tuple[tuple[int, int], ...]:
    """The layer stack's homogeneous segments [start, stop): one for a model without variants."""
    if config.layer_variants is None:
        return ((0, config.num_hidden_layers),)
    return config.layer_variants.segments()


# --------------------------------------------------------------------------- counts
def _size(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def layer_param_count(config: LlamaConfig, layer: int, matmul_only: bool = False) -> int:
    """Parameters of one layer (a factorized [m, n] weight at rank r counts (m + n) r)."""
    ranks = layer_ranks(config, layer)
    total = 0
    for spec in LAYER_WEIGHTS:
        if matmul_only and not spec.matmul:
            continue
        shape = spec.shape(config)
        total += sum(shape) * ranks[spec.name] if spec.name in ranks else _size(shape)
    return total


def count_params(config: LlamaConfig) -> int:
    """Every parameter of the model, as stored (a tied head is the embedding, counted once)."""
    top = sum(_size(s.shape(config)) for s in MODEL_WEIGHTS if s.present(config))
    return top + sum(layer_param_count(config, i) for i in range(config.num_hidden_layers))


def matmul_param_count(config: LlamaConfig) -> int:
    """Parameters that take part in a matmul per token: every layer's matmul weights and the LM
    head (tied or not); the embedding lookup and the norms are free. 2x this is forward FLOPs/token."""
    layers = sum(layer_param_count(config, i, matmul_only=True) for i in range(config.num_hidden_layers))
    return layers + _size(WEIGHTS["lm_head"].shape(config))


# --------------------------------------------------------------------------- logical axes
def logical_axes(path: Sequence[Any], ndim: int) -> tuple[str, ...] | None:
    """Logical axis names of the leaf at `path` (a params or optimizer-state path) with `ndim` dims:
    the spec's axes, "rank" for a factor's inner axis, "layers" for leading stacked axes. None for
    a leaf that is no weight (step counts, ...)."""
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    found = [j for j, k in enumerate(keys) if isinstance(k, str) and k in WEIGHTS]
    if not found:
        return None
    j = found[-1]
    axes = WEIGHTS[keys[j]].axes
    factor = keys[j + 1] if j + 1 < len(keys) else None
    if factor in FACTORS and len(axes) == 2:
        axes = (axes[0], "rank") if factor == "u" else ("rank", axes[1])
    extra = ndim - len(axes)
    return ("layers",) * extra + axes if extra >= 0 else None

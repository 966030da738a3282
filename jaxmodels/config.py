"""Model configuration: a frozen dataclass whose field names follow Hugging Face's `LlamaConfig`.

Keeping HF's names makes conversion a rename, not a translation: `LlamaConfig.from_hf_dict(json)`
reads a `config.json`, `to_hf_dict()` writes one. Unknown or unsupported settings raise errors that
name the field and the fix instead of being silently ignored.

Per-layer variants (which matmul weights of which layers are factorized, at what rank) are
`layer_variants`, a `weights.LayerVariants`; they are not an HF field, so `to_hf_dict` leaves them
out and checkpoints keep them in `layer_variants.json` beside `config.json`.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from jaxmodels.weights import LayerVariants, count_params, variant_problems

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """A model config that this library cannot run, with the reason and the fix."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Shape and numerics of a Llama-family decoder (Llama 2/3, SmolLM, TinyLlama)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None = num_attention_heads (plain multi-head)
    head_dim: int | None = None  # None = hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # stored as sorted items to stay hashable
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    # Per-layer variants (factorized weights and their ranks); None = every layer dense. Not part
    # of config.json: `save_hf_checkpoint` writes it to layer_variants.json beside it.
    layer_variants: LayerVariants | None = None

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.layer_variants is not None and self.layer_variants.is_dense:
            object.__setattr__(self, "layer_variants", None)  # one spelling of "all dense"
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act not in ("silu", "swish"):
            raise ConfigError(f"hidden_act '{self.hidden_act}' is not supported; Llama models use 'silu'")
        if self.attention_bias or self.mlp_bias:
            raise ConfigError("attention_bias / mlp_bias = true is not supported (Llama models have no biases)")
        rope_type = self.rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"rope_scaling type '{rope_type}' is not supported; "
                              f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        problems = variant_problems(self)
        if problems:
            raise ConfigError("; ".join(problems))

    # --------------------------------------------------------------- derived
    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @property
    def rope_type(self) -> str:
        scaling = self.rope_scaling_dict
        return scaling.get("rope_type", scaling.get("type", "default"))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def num_params(self) -> int:
        """Every parameter as stored, factorized weights at their rank (`weights.count_params`)."""
        return count_params(self)

    def replace(self, **changes: Any) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------ HF interop
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "LlamaConfig":
        """Build from a Hugging Face `config.json` dict; unknown HF-only keys are ignored."""
        archs = raw.get("architectures") or []
        model_type = raw.get("model_type")
        if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ConfigError(f"unsupported architecture {archs}: this library loads "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)} checkpoints")
        if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"unsupported model_type '{model_type}': only Llama-family models "
                              f"(model_type 'llama') are supported")
        fields = {f.name for f in dataclasses.fields(cls)} - {"layer_variants"}  # read from its own file
        kwargs = {k: v for k, v in raw.items() if k in fields}
        # transformers >= 5 writes `rope_parameters` (theta and scaling together) instead of
        # `rope_theta` + `rope_scaling`; read either, so theta never silently falls back to 10000.
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        theta = raw.get("rope_theta", rope.pop("rope_theta", None))
        if theta is not None:
            kwargs["rope_theta"] = float(theta)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        kwargs["rope_scaling"] = None if rope_type == "default" else rope
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "layer_variants"}
        out["rope_scaling"] = self.rope_scaling_dict or None
        out["rope_parameters"] = {"rope_type": "default", **self.rope_scaling_dict,
                                  "rope_theta": self.rope_theta}
        if isinstance(out["eos_token_id"], tuple):
            out["eos_token_id"] = list(out["eos_token_id"])
        out.update(architectures=list(SUPPORTED_ARCHITECTURES), model_type="llama")
        return out

    @classmethod
    def from_overrides(cls, base: "LlamaConfig", overrides: dict[str, Any]) -> "LlamaConfig":
        """`base` with `overrides` applied; an unknown key is an error naming the closest field."""
        fields = [f.name for f in dataclasses.fields(cls)]
        for key in overrides:
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"unknown model config key '{key}'{hint}")
        return dataclasses.replace(base, **overrides)

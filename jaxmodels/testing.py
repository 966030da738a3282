"""Tiny model configs for tests and examples (no downloads, compile in seconds)."""

from __future__ import annotations

from jaxmodels.config import LlamaConfig


def tiny_config(**overrides) -> LlamaConfig:
    """A 4-layer GQA Llama (4 query heads, 2 KV heads) with a 256-token vocabulary."""
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2)
    base.update(overrides)
    return LlamaConfig(**base)

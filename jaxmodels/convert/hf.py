"""Hugging Face Llama checkpoints: a folder with `config.json` and `*.safetensors` (sharded or not).

HF stores each projection as `[out, in]` and one tensor per layer; we store `[in, out]` stacked over
layers. Import transposes and stacks; export undoes it, so a round trip is exact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxmodels.config import ConfigError, LlamaConfig
from jaxmodels.model import Params, check_param_shapes, param_shapes

# our layer key -> (HF name inside model.layers.{i}., transpose?)
_LAYER_NAMES = {
    "attn_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
}
SHARD_BYTES = 2 * 1024**3


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, with what is wrong and how to fix it."""


def read_hf_config(folder: str | os.PathLike) -> LlamaConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json; pass a Hugging Face model folder "
                              f"(config.json + *.safetensors), a .gguf file, or a jaxmodels run folder")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}; the file is damaged, re-download it") from err
    return LlamaConfig.from_hf_dict(raw)


def _tensor_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index} is damaged ({err}); re-download the checkpoint") from err
        files = [folder / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"shards listed in {index.name} are missing: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        hint = " (found PyTorch .bin files: convert them to safetensors first)" if list(folder.glob("*.bin")) else ""
        raise CheckpointError(f"no *.safetensors weights in {folder}{hint}")
    return files


def _read_tensors(files: list[Path]) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="np") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
        except Exception as err:  # safetensors raises several private error types
            raise CheckpointError(f"cannot read {file}: {err}; the file is damaged or truncated") from err
    return tensors


def params_from_hf_tensors(config: LlamaConfig, tensors: dict[str, np.ndarray],
                           dtype=np.float32) -> Params:
    """Map HF tensor names/layouts to our stacked parameter tree (numpy arrays)."""
    shapes = param_shapes(config)

    def take(name: str, shape: tuple[int, ...], transpose: bool) -> np.ndarray:
        if name not in tensors:
            raise CheckpointError(f"tensor '{name}' is missing from the checkpoint")
        x = tensors[name]
        x = x.T if transpose else x
        if tuple(x.shape) != tuple(shape):
            raise CheckpointError(f"tensor '{name}' has shape {tuple(tensors[name].shape)}, but the config "
                                  f"implies {shape if not transpose else tuple(reversed(shape))}; "
                                  f"config.json and the weights are from different models")
        return np.asarray(x, dtype=dtype)

    layers = {}
    for key, (suffix, transpose) in _LAYER_NAMES.items():
        per_layer_shape = shapes["layers"][key][1:]
        layers[key] = np.stack([take(f"model.layers.{i}.{suffix}", per_layer_shape, transpose)
                                for i in range(config.num_hidden_layers)])
    params: Params = {
        "embed": take("model.embed_tokens.weight", shapes["embed"], False),
        "layers": layers,
        "final_norm": take("model.norm.weight", shapes["final_norm"], False),
    }
    if not config.tie_word_embeddings:
        if "lm_head.weight" not in tensors:
            raise CheckpointError("config says tie_word_embeddings=false but 'lm_head.weight' is missing; "
                                  "set tie_word_embeddings=true in config.json if the head is tied")
        params["lm_head"] = take("lm_head.weight", shapes["lm_head"], True)
    return params


def load_hf_checkpoint(folder: str | os.PathLike, dtype=np.float32) -> tuple[LlamaConfig, Params]:
    """Read a Hugging Face Llama folder -> (config, params as numpy arrays)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist")
    config = read_hf_config(folder)
    params = params_from_hf_tensors(config, _read_tensors(_tensor_files(folder)), dtype)
    return config, params


def hf_tensors_from_params(config: LlamaConfig, params: Params) -> dict[str, np.ndarray]:
    """Our parameter tree -> HF tensor names and `[out, in]` layouts."""
    check_param_shapes(config, params)
    out = {"model.embed_tokens.weight": np.asarray(params["embed"]),
           "model.norm.weight": np.asarray(params["final_norm"])}
    for key, (suffix, transpose) in _LAYER_NAMES.items():
        stacked = np.asarray(params["layers"][key])
        for i in range(config.num_hidden_layers):
            x = stacked[i]
            out[f"model.layers.{i}.{suffix}"] = np.ascontiguousarray(x.T if transpose else x)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["lm_head"]).T)
    return out


def save_hf_checkpoint(folder: str | os.PathLike, config: LlamaConfig, params: Params,
                       shard_bytes: int = SHARD_BYTES) -> Path:
    """Write config.json + safetensors (sharded with an index above `shard_bytes`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors_from_params(config, params)
    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = str(next(iter(tensors.values())).dtype)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, x in tensors.items():
        if shards[-1] and size + x.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(x.nbytes for x in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder


__all__ = ["CheckpointError", "ConfigError", "load_hf_checkpoint", "save_hf_checkpoint",
           "read_hf_config", "params_from_hf_tensors", "hf_tensors_from_params"]

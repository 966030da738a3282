"""Hugging Face Llama checkpoints: a folder with `config.json` and `*.safetensors` (sharded or not).

HF stores each projection as `[out, in]` and one tensor per layer; we store `[in, out]` stacked over
layers. Import transposes and stacks; export undoes it, so a round trip is exact. Names and layouts
come from the weight table (`jaxmodels.weights`).

A model with per-layer variants (factorized weights) also gets `layer_variants.json` beside
`config.json`, and config.json names it under `jaxmodels_layer_variants`; a factorized weight is
stored as `<hf name>_u` [r, in] and `<hf name>_v` [out, r] (HF-style transposed), so the folder
reloads as the same low-rank model.

transformers cannot run factorized weights, and given a Llama config.json it would load such a folder
with those weights missing and randomly initialised (a warning only). So a low-rank folder is marked
to make transformers refuse it: config.json says `model_type: jaxmodels_lowrank_llama` (AutoModel
raises "does not recognize this architecture") and the weights are `lowrank*.safetensors`, not
`model*.safetensors` (`LlamaForCausalLM.from_pretrained` raises "no file named model.safetensors").
Our loaders read both layouts. `save_hf_checkpoint(..., merge=True)` writes a plain HF folder with
every `u @ v` merged into a dense weight. A dense model writes no variants file and stays plain.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from jaxmodels.config import ConfigError, LlamaConfig
from jaxmodels.params import Params, build_params, iter_weights, with_variants
from jaxmodels.weights import LayerVariants, WeightSpec, hf_name, layer_ranks

VARIANTS_FILE = "layer_variants.json"
VARIANTS_KEY = "jaxmodels_layer_variants"  # in config.json: the variants file's name
SHARD_BYTES = 2 * 1024**3
LOWRANK_MODEL_TYPE = "jaxmodels_lowrank_llama"  # config.json model_type of a low-rank folder
LOWRANK_ARCHITECTURE = "JaxmodelsLowRankLlamaForCausalLM"
LOWRANK_NOTE = ("factorized (low-rank) weights that transformers cannot load; export a merged copy with "
                "`python -m training.compress --merge --model THIS_FOLDER --out HF_FOLDER`")
WEIGHT_PREFIXES = {False: "model", True: "lowrank"}  # weight file names: dense / low-rank folders


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
    named = raw.get(VARIANTS_KEY)
    if raw.get("model_type") == LOWRANK_MODEL_TYPE:  # our marked low-rank folder: Llama inside
        if not isinstance(named, str):
            raise CheckpointError(f"{path} marks a low-rank model (model_type {LOWRANK_MODEL_TYPE}) but names "
                                  f"no variants file under '{VARIANTS_KEY}'; add '\"{VARIANTS_KEY}\": "
                                  f"\"{VARIANTS_FILE}\"' to it")
        raw = {**raw, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    config = LlamaConfig.from_hf_dict(raw)
    variants = read_layer_variants(folder, named if isinstance(named, str) else None)
    if variants is None:
        return config
    try:
        return config.replace(layer_variants=variants)
    except ConfigError as err:
        raise CheckpointError(f"{Path(folder) / VARIANTS_FILE} does not fit config.json: {err}") from err


def read_layer_variants(folder: str | os.PathLike, named: str | None = None) -> LayerVariants | None:
    """The folder's per-layer variants (None: a dense model). `named` is config.json's pointer to the
    file: if it names a file that is missing, the weights cannot be read, so that is an error."""
    path = Path(folder) / (named or VARIANTS_FILE)
    if not path.is_file():
        if named:
            raise CheckpointError(f"config.json says the weights are factorized per {named} "
                                  f"('{VARIANTS_KEY}'), but {path} is missing; copy it from where the "
                                  f"checkpoint was saved")
        return None
    try:
        return LayerVariants.from_json(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: {err}; restore the {VARIANTS_FILE} saved with "
                              f"these weights") from err


def _tensor_files(folder: Path) -> list[Path]:
    indexes = [folder / f"{p}.safetensors.index.json" for p in WEIGHT_PREFIXES.values()]
    index = next((i for i in indexes if i.is_file()), None)
    if index is not None:
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


def _open(file: Path, read: Any) -> Any:
    """read(safe_open handle) for one file, its errors as a CheckpointError."""
    try:
        with safe_open(str(file), framework="np") as f:
            return read(f)
    except Exception as err:  # safetensors raises several private error types
        raise CheckpointError(f"cannot read {file}: {err}; the file is damaged or truncated") from err


def _read_tensors(files: list[Path], progress: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of the safetensors files; with `progress`, a bar (stderr) counting tensors."""
    total = sum(_open(file, lambda f: len(list(f.keys()))) for file in files) if progress else 0
    tensors: dict[str, np.ndarray] = {}
    with tqdm(total=total, desc="loading weights", unit="tensor", disable=not progress, leave=False,
              dynamic_ncols=True) as bar:

        def read(f: Any) -> None:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
                bar.update()

        for file in files:
            _open(file, read)
    return tensors


def _missing(tensors: dict[str, np.ndarray], config: LlamaConfig, spec: WeightSpec, layer: int | None,
             factor: str | None) -> str:
    """Why tensor (spec, layer, factor) is absent, and the fix."""
    name = hf_name(spec, layer, factor)
    if factor is None and hf_name(spec, layer, "u") in tensors:
        return (f"tensor '{name}' is missing: the checkpoint holds it factorized ('{name}_u', '{name}_v'), "
                f"but no {VARIANTS_FILE} says so; restore the {VARIANTS_FILE} saved with these weights")
    if factor is not None and hf_name(spec, layer) in tensors:
        return (f"tensor '{name}' is missing: {VARIANTS_FILE} factorizes layer {layer} '{spec.name}', but "
                f"the checkpoint holds it dense ('{hf_name(spec, layer)}'); remove {VARIANTS_FILE} (and "
                f"'{VARIANTS_KEY}' in config.json) to load the dense weights")
    if spec.name == "lm_head":
        return ("config says tie_word_embeddings=false but 'lm_head.weight' is missing; "
                "set tie_word_embeddings=true in config.json if the head is tied")
    return f"tensor '{name}' is missing from the checkpoint"


def params_from_hf_tensors(config: LlamaConfig, tensors: dict[str, np.ndarray],
                           dtype=np.float32) -> Params:
    """Map HF tensor names/layouts to our stacked parameter tree (numpy arrays)."""

    def take(spec: WeightSpec, layer: int | None, factor: str | None, shape: tuple[int, ...]) -> np.ndarray:
        name = hf_name(spec, layer, factor)
        if name not in tensors:
            raise CheckpointError(_missing(tensors, config, spec, layer, factor))
        x = tensors[name].T if spec.matmul else tensors[name]
        if tuple(x.shape) == tuple(shape):
            return np.asarray(x, dtype=dtype)
        hf_shape = tuple(reversed(shape)) if spec.matmul else tuple(shape)
        if factor is not None:
            raise CheckpointError(
                f"tensor '{name}' has shape {tuple(tensors[name].shape)}, but {VARIANTS_FILE} gives layer "
                f"{layer} '{spec.name}' rank {layer_ranks(config, layer)[spec.name]}, which implies "
                f"{hf_shape}; the variant file does not belong to these weights: restore the "
                f"{VARIANTS_FILE} saved with them")
        raise CheckpointError(f"tensor '{name}' has shape {tuple(tensors[name].shape)}, but the config "
                              f"implies {hf_shape}; config.json and the weights are from different models")

    return build_params(config, take)


def load_hf_checkpoint(folder: str | os.PathLike, dtype=np.float32, progress: bool = False
                       ) -> tuple[LlamaConfig, Params]:
    """Read a Hugging Face Llama folder -> (config, params as numpy arrays); `progress`: a bar."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist")
    config = read_hf_config(folder)
    params = params_from_hf_tensors(config, _read_tensors(_tensor_files(folder), progress), dtype)
    return config, params


def hf_tensors_from_params(config: LlamaConfig, params: Params) -> dict[str, np.ndarray]:
    """Our parameter tree -> HF tensor names and `[out, in]` layouts (factors as `_u`, `_v`)."""
    out = {}
    for spec, layer, factor, x in iter_weights(config, params):
        x = np.asarray(x)
        out[hf_name(spec, layer, factor)] = np.ascontiguousarray(x.T if spec.matmul else x)
    return out


def hf_config_dict(config: LlamaConfig, dtype: str) -> dict:
    """config.json's contents; a low-rank model is marked so transformers refuses it (module doc)."""
    out = config.to_hf_dict()
    out["torch_dtype"] = dtype
    if config.layer_variants is not None:
        out.update(model_type=LOWRANK_MODEL_TYPE, architectures=[LOWRANK_ARCHITECTURE],
                   jaxmodels_note=LOWRANK_NOTE)
        out[VARIANTS_KEY] = VARIANTS_FILE
    return out


def _clear_weights(folder: Path) -> None:
    """Remove the weight files (and variants file) an earlier save left, dense or low-rank, so a
    folder never mixes two models."""
    for prefix in WEIGHT_PREFIXES.values():
        for old in [*folder.glob(f"{prefix}*.safetensors"), folder / f"{prefix}.safetensors.index.json"]:
            old.unlink(missing_ok=True)
    (folder / VARIANTS_FILE).unlink(missing_ok=True)


def _shards(tensors: dict[str, np.ndarray], shard_bytes: int) -> list[dict[str, np.ndarray]]:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, x in tensors.items():
        if shards[-1] and size + x.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    return shards


def save_hf_checkpoint(folder: str | os.PathLike, config: LlamaConfig, params: Params,
                       shard_bytes: int = SHARD_BYTES, merge: bool = False) -> Path:
    """Write config.json + safetensors (sharded with an index above `shard_bytes`), and
    layer_variants.json when the config has per-layer variants (a marked low-rank folder). With
    `merge`, factorized weights are merged (u @ v) first: a plain HF folder transformers loads."""
    if merge and config.layer_variants is not None:
        config, params = with_variants(config, params, None)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors_from_params(config, params)
    _clear_weights(folder)
    if config.layer_variants is not None:
        (folder / VARIANTS_FILE).write_text(json.dumps(config.layer_variants.to_json(), indent=1))
    hf_config = hf_config_dict(config, str(next(iter(tensors.values())).dtype))
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    prefix = WEIGHT_PREFIXES[config.layer_variants is not None]
    shards = _shards(tensors, shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(folder / f"{prefix}.safetensors"), metadata={"format": "pt"})
        return folder
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(x.nbytes for x in tensors.values())
    (folder / f"{prefix}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder


__all__ = ["CheckpointError", "ConfigError", "load_hf_checkpoint", "save_hf_checkpoint",
           "read_hf_config", "read_layer_variants", "params_from_hf_tensors", "hf_tensors_from_params",
           "VARIANTS_FILE", "LOWRANK_MODEL_TYPE", "hf_config_dict"]

"""Training configuration: frozen dataclasses, YAML presets and `section.key=value` overrides.

A `TrainConfig` is a tree of small frozen sections (model, data, optimizer, schedule, checkpoint,
mesh, run). It is built in three layers, each validated against the dataclass fields:

1. the dataclass defaults,
2. a preset (`training/presets/NAME.yaml`) or a YAML file (`--config FILE.yaml`),
3. command-line overrides `section.key=value` (strings, coerced to the field's type).

Every key, whether it comes from YAML or the command line, is checked: an unknown or mistyped key
raises `ConfigError` naming it and suggesting the closest valid key (difflib), and a value that does
not fit the field's type names the key, the value and the expected type.

Later features (layerskip, lowrank, compression) add one frozen section dataclass each and a field
on `TrainConfig`; the loader, overrides and error messages pick them up without other changes.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).parent / "presets"
LAYERSKIP_CURRICULA = ("none", "rotational", "gradual")
PIPELINE_SCHEDULES = ("gpipe", "circular")
EXIT_SCALES = ("sum_l", "linear_l", "sqrt_l", "uniform")
DROPOUT_SCHEDULES = ("constant", "exp")
LOWRANK_METHODS = ("none", "pufferfish", "cuttlefish")
LOWRANK_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


class ConfigError(ValueError):
    """A training config that cannot be used, naming the key and the fix."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection:
    """Model shape (Hugging Face `LlamaConfig` names). The vocabulary size comes from the tokenizer."""

    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    init_std: float = 0.02
    compute_dtype: str = "float32"  # "bfloat16": bf16 forward/backward, fp32 master weights + optimizer
    remat: bool = False  # recompute each layer in the backward pass (less memory, ~1/3 more compute)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSection:
    """Corpus, held-out split and tokenizer."""

    source: str = "stdlib"  # "stdlib", a folder of text files, or a .jsonl file ({"text": ...} per line)
    extensions: tuple[str, ...] = (".py", ".txt", ".md", ".rst")  # files taken from a folder source
    include_tests: bool = False  # stdlib only: also take test/ tests/ idle_test/ folders
    heldout_percent: float = 2.0  # share of documents held out, chosen by a stable hash of their name
    vocab_size: int = 8192  # size of the BPE trained on the train split
    tokenizer: str | None = None  # a saved tokenizer folder to use instead of training one
    cache_dir: str | None = None  # tokenizer + token cache; None = $JAXMODELS_CACHE or ~/.cache/jaxmodels


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerSection:
    """AdamW with global-norm clipping; `grad_accum` micro-batches per optimizer step."""

    lr: float = 3e-3
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to norms
    grad_clip: float = 1.0  # global-norm clip; 0 = off
    grad_accum: int = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScheduleSection:
    """Learning rate: linear warm-up to `optimizer.lr`, then cosine (or constant) decay."""

    warmup_steps: int = 50
    decay: str = "cosine"  # "cosine" | "constant"
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * lr
    total_steps: int = 0  # length of the decay (and LayerSkip schedules); 0 = run.steps (see schedule_steps)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointSection:
    """Orbax checkpoints in RUN_DIR/checkpoints."""

    enabled: bool = True
    every: int = 100  # save every N steps (and always at the end)
    keep: int = 3  # keep the newest K complete checkpoints
    async_save: bool = True  # write in the background while training continues


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshSection:
    """Device mesh: batch split over `data` x `fsdp`, parameters sharded over `fsdp`, the layer stack
    split into `stage` pipeline stages (training/pipeline.py)."""

    data: int = -1  # -1 = every device not used by fsdp and stage
    fsdp: int = 1
    stage: int = 1  # pipeline stages (1 = no pipeline)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSection:
    """Length, batch, logging and output of one run."""

    steps: int = 1000
    batch_size: int = 16  # sequences per optimizer step (all micro-batches, all devices)
    seq_len: int = 256
    log_every: int = 10
    eval_every: int = 200  # 0 = only at the end
    eval_batches: int = 8  # held-out batches per evaluation, the final one too (0 = the whole held-out split)
    seed: int = 0
    out_dir: str = "runs/default"  # RUN_DIR: metrics.jsonl, checkpoints/, model/
    sync_to: str = ""  # a copy of RUN_DIR kept at this URL (gs://..., any fsspec URL): training/mirror.py
    sample_prompt: str = "def "
    sample_tokens: int = 64  # tokens generated at the end (0 = no sample)
    sample_temperature: float = 0.8  # 0 = greedy (weak models loop under greedy decoding)
    sample_top_k: int = 40
    progress: bool = True  # tqdm progress bar
    decode_report: bool = True  # LayerSkip runs: plain vs self-speculative tokens/s at the end
    divergence_retries: int = 0  # NaN/Inf loss: roll back to the last checkpoint, skip the batch, N times at most


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerSkipSection:
    """LayerSkip: layer dropout and the early-exit loss (all off by default; see training/layerskip.py)."""

    dropout_max: float = 0.0  # p_max; 0 disables layer dropout
    dropout_schedule: str = "constant"  # S(t): 'constant' (continual) or 'exp' (from scratch)
    exit_loss: bool = False  # the early-exit loss through the shared exit
    e_scale: float = 1.0  # weight scale of the non-final exits
    exit_scale: str = "sum_l"  # how exit weights grow with depth: sum_l | linear_l | sqrt_l | uniform
    curriculum: str = "none"  # which exits are in the loss at step t: none | rotational | gradual
    rotation: int = 4  # R of the rotational curriculum
    exit_distill: float = 0.0  # beta: non-final exits learn (1-beta) CE(labels) + beta KL(final || exit)

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout_max <= 1.0:
            raise ConfigError(f"layerskip.dropout_max must be in [0, 1], got {self.dropout_max}")
        if self.dropout_schedule not in DROPOUT_SCHEDULES:
            raise ConfigError(f"layerskip.dropout_schedule must be one of {DROPOUT_SCHEDULES}, "
                             f"got '{self.dropout_schedule}'")
        if self.curriculum not in LAYERSKIP_CURRICULA:
            raise ConfigError(f"layerskip.curriculum must be one of {LAYERSKIP_CURRICULA}, got '{self.curriculum}'")
        if self.exit_scale not in EXIT_SCALES:
            raise ConfigError(f"layerskip.exit_scale must be one of {EXIT_SCALES}, got '{self.exit_scale}'")
        if self.rotation < 1:
            raise ConfigError(f"layerskip.rotation must be >= 1, got {self.rotation}")
        if not 0.0 <= self.exit_distill <= 1.0:
            raise ConfigError(f"layerskip.exit_distill must be in [0, 1], got {self.exit_distill}")
        if self.e_scale < 0:
            raise ConfigError(f"layerskip.e_scale must be >= 0, got {self.e_scale}")

    @property
    def dropout(self) -> bool:
        return self.dropout_max > 0.0

    @property
    def enabled(self) -> bool:
        return self.dropout or self.exit_loss


@dataclasses.dataclass(frozen=True, kw_only=True)
class LowRankSection:
    """Low-rank training (Pufferfish / Cuttlefish, see training/lowrank.py); off by default."""

    method: str = "none"  # none | pufferfish | cuttlefish
    rank_ratio: float = 0.25  # pufferfish: rank = rank_ratio * min(m, n), in (0, 1]
    full_rank_layers: int = 1  # the first K layers stay dense (hybrid)
    warmup_steps: int = 100  # full-rank steps before the switch (cuttlefish: the earliest switch)
    targets: tuple[str, ...] = LOWRANK_TARGETS  # which matmul weights of a layer are factorized
    rank_multiple: int = 8  # ranks rounded up to a multiple of this (matmul tiles)
    track_every: int = 10  # cuttlefish: measure stable ranks every N steps
    window: int = 3  # cuttlefish: settled = every rank moved <= threshold * full rank over this many measurements
    threshold: float = 0.02  # cuttlefish: largest settled change of a scaled stable rank, as a share of full rank
    power_iters: int = 20  # cuttlefish: power iterations per spectral-norm estimate
    frobenius_decay: float = 0.0  # lambda of lambda/2 * sum ||u v||_F^2 after the switch (0 = off)

    def __post_init__(self) -> None:
        if self.method not in LOWRANK_METHODS:
            raise ConfigError(f"lowrank.method must be one of {LOWRANK_METHODS}, got '{self.method}'")
        bad = [t for t in self.targets if t not in LOWRANK_TARGETS]
        if bad or not self.targets:
            raise ConfigError(f"lowrank.targets: {bad or 'empty'} is not a list of factorizable weights; "
                              f"choose from {', '.join(LOWRANK_TARGETS)}")

    @property
    def enabled(self) -> bool:
        return self.method != "none"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineSection:
    """Pipeline stages when `mesh.stage` > 1 (training/pipeline.py); micro-batches = optimizer.grad_accum."""

    schedule: str = "gpipe"  # gpipe | circular (interleaved chunks: a bubble `repeats` times smaller)
    repeats: int = 2  # circular: layer chunks per stage
    acsgd: bool = False  # AC-SGD between stages: each example's quantized activation change (training/acsgd_train.py)
    acsgd_forward_bits: int = 4  # 2 | 4 | 8: activation changes sent forward
    acsgd_backward_bits: int = 8  # 2 | 4 | 8, or 0 = gradients sent back uncompressed
    acsgd_buffer_mb: int = 4096  # host memory (MiB) per process for the per-example activation buffers

    def __post_init__(self) -> None:
        if self.schedule not in PIPELINE_SCHEDULES:
            raise ConfigError(f"pipeline.schedule must be one of {PIPELINE_SCHEDULES}, got '{self.schedule}'")
        if self.acsgd_forward_bits not in (2, 4, 8):
            raise ConfigError(f"pipeline.acsgd_forward_bits must be 2, 4 or 8, got {self.acsgd_forward_bits}")
        if self.acsgd_backward_bits not in (0, 2, 4, 8):
            raise ConfigError(f"pipeline.acsgd_backward_bits must be 0 (uncompressed), 2, 4 or 8, got "
                              f"{self.acsgd_backward_bits}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything one training run needs. `init_from` starts from an imported checkpoint."""

    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    optimizer: OptimizerSection = OptimizerSection()
    schedule: ScheduleSection = ScheduleSection()
    checkpoint: CheckpointSection = CheckpointSection()
    mesh: MeshSection = MeshSection()
    run: RunSection = RunSection()
    layerskip: LayerSkipSection = LayerSkipSection()
    lowrank: LowRankSection = LowRankSection()
    pipeline: PipelineSection = PipelineSection()
    init_from: str | None = None  # HF folder, .gguf file or run folder (uses its tokenizer)

    def replace(self, **flat: Any) -> "TrainConfig":
        """A copy with dotted keys changed, e.g. `cfg.replace(**{"run.steps": 10})`."""
        return apply_overrides(self, flat)


# --------------------------------------------------------------------------- keys and types
def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts, e.g. 'run.steps', 'init_from'."""
    keys = []
    for name, tp in _field_types(cls).items():
        if _is_section(tp):
            keys += valid_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _unknown_key(key: str) -> ConfigError:
    keys = valid_keys()
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:  # a right key under a wrong or missing section: compare the last part only
        tail = key.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] == tail][:1]
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint} (valid keys: python -m training.train --help-keys)")


def _field_type(key: str) -> Any:
    cls: Any = TrainConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        types_ = _field_types(cls)
        if part not in types_:
            raise _unknown_key(key)
        cls = types_[part]
        if _is_section(cls) and i == len(parts) - 1:
            raise ConfigError(f"'{key}' is a section; set one of its keys, e.g. "
                              f"'{valid_keys(cls, key + '.')[0]}=...'")
        if not _is_section(cls) and i < len(parts) - 1:
            raise _unknown_key(key)
    return cls


_TRUE, _FALSE, _NONE = ("true", "yes", "on", "1"), ("false", "no", "off", "0"), ("none", "null", "~", "")


def coerce(key: str, value: Any, tp: Any) -> Any:
    """`value` (a command-line string or a YAML scalar) as type `tp`; ConfigError if it does not fit."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return coerce(key, value, a)
            except ConfigError as err:
                errors.append(err)
        raise errors[-1]
    bad = ConfigError(f"config key '{key}' expects {getattr(tp, '__name__', tp)}, got {value!r}")
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise bad
        return tuple(coerce(key, v.strip() if isinstance(v, str) else v, args[0]) for v in items
                     if not (isinstance(v, str) and not v.strip()))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    raise bad from None
                if f.is_integer():
                    return int(f)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise ConfigError(f"config key '{key}' has an unsupported type {tp}")


# --------------------------------------------------------------------------- building configs
def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'run': {'steps': 3}} -> {'run.steps': 3}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def apply_overrides(cfg: TrainConfig, flat: dict[str, Any]) -> TrainConfig:
    """`cfg` with dotted keys set; values are coerced and checked against the field types."""
    changes: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in flat.items():
        tp = _field_type(key)
        value = coerce(key, value, tp)
        if "." in key:
            section, name = key.split(".", 1)
            changes.setdefault(section, {})[name] = value
        else:
            top[key] = value
    for section, values in changes.items():
        top[section] = dataclasses.replace(getattr(cfg, section), **values)
    return dataclasses.replace(cfg, **top)


def parse_overrides(args: list[str]) -> dict[str, str]:
    """['run.steps=10', 'model.remat=true'] -> {'run.steps': '10', ...}; checks the form only."""
    out = {}
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"expected an override 'section.key=value', got '{arg}'")
        key, value = arg.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def read_yaml(path: str | Path, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Flat `section.key -> value` from a YAML file. A top-level `base: PRESET` loads that preset
    first and lets this file change only what differs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse {path}: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return flatten(raw)
    if base in _seen:
        raise ConfigError(f"presets inherit from each other in a loop: {' -> '.join(_seen + (base,))}")
    return {**read_yaml(preset_path(base), _seen + (str(base),)), **flatten(raw)}


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, preset_names(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown preset '{name}'{hint} (presets: {', '.join(preset_names())})")
    return path


def load_config(preset: str | None = None, config_file: str | Path | None = None,
                overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """Defaults <- preset or YAML file <- overrides. With neither preset nor file: 'default'."""
    if preset and config_file:
        raise ConfigError("give either a preset or a config file, not both")
    path = Path(config_file) if config_file else preset_path(preset or "default")
    cfg = apply_overrides(TrainConfig(), read_yaml(path))
    if overrides:
        flat = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides)
        cfg = apply_overrides(cfg, flat)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Ranges of every numeric key, cross-field rules, the model shape (`training.validation`)."""
    from training.validation import validate as check  # it imports this module

    check(cfg)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A nested plain dict (tuples as lists), for YAML/JSON."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, tuple) else v)
    return out


def dump_yaml(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

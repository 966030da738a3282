"""The CHAI calibration file: per-layer cluster counts for one model, a small JSON beside the model.

Written by `python -m inference.chai_calibrate`, read by generation. Schema (version 1):

    {"format": "jaxmodels-chai", "version": 1,
     "model": {"num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": KV,
               "head_dim": hd, "vocab_size": V, "source": "<the --model argument>"},
     "granularity": "query" | "kv",      # what is clustered: the H query heads or the KV groups
     "clusters": [k_0, ..., k_{L-1}],     # per layer, in [1, n] (n = H or KV; n = no clustering)
     "static_groups": [[label per head or group] per layer],  # the calibration's grouping at k_l,
                                          # used for prompts too short to cluster on (jaxmodels.chai)
     "choice": {"mode": "auto" | "all" | "fixed", "tolerance": float | null, "rule": "<text>"},
     "curves": {"inertia": [[I_1, ..., I_n] per layer],   # k-means inertia summed over samples
                "total": [sum of squared feature norms per layer]},
     "texts": {"sources": [...], "description": "<what text>", "samples": N, "tokens": T}}

Only `model`, `granularity`, `clusters` and `static_groups` drive generation; the rest records how
the counts were chosen. Loading validates everything that would otherwise fail later or silently do
the wrong thing (another model's file, a count of 0 or above n, a corrupt file) and raises
`ConfigError` (this package's one error type) naming the file and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxmodels.chai import GRANULARITIES, HeadPlan, plan_from_prompt
from jaxmodels.config import ConfigError, LlamaConfig

FORMAT = "jaxmodels-chai"
VERSION = 1
MODEL_KEYS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")

__all__ = ["ChaiCalibration", "FORMAT", "VERSION", "model_identity", "load_chai", "recalibrate_hint"]


def model_identity(config: LlamaConfig) -> dict[str, int]:
    """The shape fields a calibration file must agree on with the model it is applied to."""
    return {key: int(getattr(config, key)) for key in MODEL_KEYS}


def recalibrate_hint(path: str | os.PathLike) -> str:
    return f"make one for this model with `python -m inference.chai_calibrate --model MODEL --out {path}`"


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class ChaiCalibration:
    """Per-layer CHAI settings of one model (see the module docstring for the file schema)."""

    model: dict[str, Any]
    granularity: str
    clusters: tuple[int, ...]
    static_groups: tuple[tuple[int, ...], ...]
    choice: dict[str, Any] = dataclasses.field(default_factory=dict)
    curves: dict[str, Any] = dataclasses.field(default_factory=dict)
    texts: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_units(self) -> int:
        """How many items a layer clusters: H query heads or KV groups."""
        key = "num_attention_heads" if self.granularity == "query" else "num_key_value_heads"
        return int(self.model[key])

    @classmethod
    def identity(cls, config: LlamaConfig, granularity: str = "kv") -> "ChaiCalibration":
        """Every head kept in every layer (`--clusters all`): the plan is dense attention."""
        n = config.num_attention_heads if granularity == "query" else config.num_key_value_heads
        return cls(model_identity(config), granularity, (n,) * config.num_hidden_layers,
                   (tuple(range(n)),) * config.num_hidden_layers, {"mode": "all"})

    def plan(self, layer: int, q: Any, k: Any, lengths: Any) -> HeadPlan:
        """Layer `layer`'s plan for a prefill (q [B, T, H, hd], k [B, KV, T, hd], lengths [B]):
        `jaxmodels.chai.plan_from_prompt` with this file's count and static grouping. Traceable."""
        return plan_from_prompt(q, k, lengths, self.clusters[layer], self.granularity,
                                np.asarray(self.static_groups[layer]))

    def score_heads(self) -> tuple[int, ...]:
        """Cq per layer: query heads that compute Q.K^T and softmax."""
        g = self.model["num_attention_heads"] // self.model["num_key_value_heads"]
        return tuple(k if self.granularity == "query" else k * g for k in self.clusters)

    def k_slots(self) -> tuple[int, ...]:
        """Ck per layer: K-cache slots (KV heads whose K is kept)."""
        kv = self.model["num_key_value_heads"]
        return tuple(kv if self.granularity == "query" else k for k in self.clusters)

    def savings(self) -> dict[str, float]:
        """Fractions saved against dense attention: of the K cache, of the whole KV cache, and of the
        attention-score FLOPs (Q.K^T + softmax; P.V is unchanged, so half of attention's matmuls)."""
        L, H, KV = (self.model[k] for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads"))
        k_saved = 1 - sum(self.k_slots()) / (KV * L)
        return {"k_cache": k_saved, "kv_cache": k_saved / 2,
                "score_flops": 1 - sum(self.score_heads()) / (H * L)}

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "model": dict(self.model),
                "granularity": self.granularity, "clusters": list(self.clusters),
                "static_groups": [list(g) for g in self.static_groups], "choice": dict(self.choice),
                "curves": dict(self.curves), "texts": dict(self.texts)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON (via a temporary file and a rename: never half-written)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_dict(cls, raw: Any, where: str = "calibration") -> "ChaiCalibration":
        """Parse and validate a decoded file (ConfigError naming `where` on any problem)."""
        _check_header(raw, where)
        model, granularity = _check_model_block(raw, where), raw.get("granularity")
        if granularity not in GRANULARITIES:
            raise ConfigError(f"{where}: granularity must be one of {GRANULARITIES}, got {granularity!r}; "
                              f"{recalibrate_hint(where)}")
        n = model["num_attention_heads"] if granularity == "query" else model["num_key_value_heads"]
        clusters = _check_clusters(raw.get("clusters"), model["num_hidden_layers"], n, granularity, where)
        groups = _check_groups(raw.get("static_groups"), clusters, n, where)
        extras = {key: raw[key] if isinstance(raw.get(key), dict) else {}
                  for key in ("choice", "curves", "texts")}
        return cls(model, granularity, clusters, groups, **extras)

    def check_model(self, config: LlamaConfig, where: str = "calibration") -> None:
        """ConfigError if this file was made for a model of another shape."""
        ours = model_identity(config)
        diff = [f"{k}: file {self.model[k]}, model {ours[k]}" for k in MODEL_KEYS if self.model[k] != ours[k]]
        if diff:
            raise ConfigError(f"{where} was calibrated for another model ({'; '.join(diff)}); "
                              f"{recalibrate_hint(where)}")


def load_chai(path: str | os.PathLike, config: LlamaConfig | None = None) -> ChaiCalibration:
    """Read and validate a calibration file; with `config`, also check it belongs to that model."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such CHAI calibration file; {recalibrate_hint(path)}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the CHAI calibration file ({err}); {recalibrate_hint(path)}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); it is damaged: {recalibrate_hint(path)}") from None
    calibration = ChaiCalibration.from_dict(raw, str(path))
    if config is not None:
        calibration.check_model(config, str(path))
    return calibration


# --------------------------------------------------------------------------- validation pieces
def _check_header(raw: Any, where: str) -> None:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ConfigError(f"{where} is not a CHAI calibration file (no \"format\": \"{FORMAT}\"); "
                          f"{recalibrate_hint(where)}")
    version = raw.get("version")
    if not _is_int(version) or not 1 <= version <= VERSION:
        raise ConfigError(f"{where} has calibration file version {version!r}; this jaxmodels reads "
                          f"version {VERSION}: upgrade jaxmodels or {recalibrate_hint(where)}")


def _check_model_block(raw: dict, where: str) -> dict[str, Any]:
    model = raw.get("model")
    if not isinstance(model, dict):
        raise ConfigError(f"{where} has no \"model\" object; it is damaged: {recalibrate_hint(where)}")
    bad = [k for k in MODEL_KEYS if not _is_int(model.get(k)) or model[k] < 1]
    if bad:
        raise ConfigError(f"{where}: model field(s) {', '.join(bad)} missing or not positive integers; "
                          f"it is damaged: {recalibrate_hint(where)}")
    if model["num_attention_heads"] % model["num_key_value_heads"]:
        raise ConfigError(f"{where}: {model['num_attention_heads']} heads do not divide into "
                          f"{model['num_key_value_heads']} KV heads; {recalibrate_hint(where)}")
    return {**model, **{k: int(model[k]) for k in MODEL_KEYS}}


def _check_clusters(clusters: Any, layers: int, n: int, granularity: str, where: str) -> tuple[int, ...]:
    unit = "query heads" if granularity == "query" else "KV heads"
    if not isinstance(clusters, list) or len(clusters) != layers:
        got = f"{len(clusters)} entries" if isinstance(clusters, list) else repr(clusters)
        raise ConfigError(f"{where}: \"clusters\" must list one count per layer ({layers}), got {got}; "
                          f"{recalibrate_hint(where)}")
    for layer, k in enumerate(clusters):
        if not _is_int(k) or not 1 <= k <= n:
            raise ConfigError(f"{where}: layer {layer} has cluster count {k!r}; counts must be integers in "
                              f"[1, {n}] ({n} = every one of the {n} {unit} kept). Fix the file or "
                              f"{recalibrate_hint(where)}")
    return tuple(int(k) for k in clusters)


def _check_groups(groups: Any, clusters: tuple[int, ...], n: int, where: str) -> tuple[tuple[int, ...], ...]:
    if not isinstance(groups, list) or len(groups) != len(clusters):
        raise ConfigError(f"{where}: \"static_groups\" must hold one grouping per layer ({len(clusters)}); "
                          f"{recalibrate_hint(where)}")
    for layer, (labels, k) in enumerate(zip(groups, clusters)):
        ok = (isinstance(labels, list) and len(labels) == n and all(_is_int(c) for c in labels)
              and set(labels) == set(range(k)))
        if not ok:
            raise ConfigError(f"{where}: layer {layer}'s static group must label each of {n} items with "
                              f"one of {k} clusters (0..{k - 1}, each used), got {labels!r}; "
                              f"{recalibrate_hint(where)}")
    return tuple(tuple(int(c) for c in labels) for labels in groups)

"""The sections of a training configuration: one frozen dataclass each, and `TrainConfig`, their tree.

Each section checks its own values (`__post_init__`) and says what is wrong and how to fix it.
Loading presets, YAML and `section.key=value` overrides is `training.config`, which re-exports
everything here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

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
        from training.config import apply_overrides  # the loader builds on these sections
        return apply_overrides(self, flat)

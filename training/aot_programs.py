"""The programs `training.aot` compiles for a TPU slice: the run's train step with its mesh and
shardings (abstract arguments only: nothing is allocated, no data is read), and the decode step of
the resulting model on one chip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from jaxmodels.config import LlamaConfig
from jaxmodels.kv_cache import KVCache
from jaxmodels.model import init_params
from training import parallel, pipeline_step
from training.aot import AotError, Topology, compile_report, tpu_devices
from training.config import TrainConfig, load_config


def model_config(cfg: TrainConfig) -> LlamaConfig:
    """The run's model: `init_from`'s config (read from the checkpoint's metadata, no weights), or
    the model section with `data.vocab_size` standing in for the tokenizer's vocabulary."""
    from training.run_state import model_config_for

    if cfg.init_from:
        return _checkpoint_config(cfg.init_from)

    class Vocabulary:  # what model_config_for reads from a tokenizer
        vocab_size, bos_token_id, eos_token_ids = cfg.data.vocab_size, None, (0,)

    return model_config_for(cfg, Vocabulary())


def _checkpoint_config(path: str) -> LlamaConfig:
    from jaxmodels.convert.gguf import gguf_config, open_gguf
    from jaxmodels.convert.hf import read_hf_config
    from jaxmodels.convert.load import ALIASES

    target = ALIASES[path.lower()]() if path.lower() in ALIASES else Path(path).expanduser()
    if str(target).endswith(".gguf"):
        return gguf_config(open_gguf(target))
    folder = target / "model" if (target / "model" / "config.json").is_file() else target
    if not (folder / "config.json").is_file():
        raise AotError(f"init_from={path}: no config.json (a Hugging Face folder, a run folder or a .gguf file)")
    return read_hf_config(folder)


VERIFY_TOKENS = 5  # the verification pass compiled: d + 1 tokens per row at draft length 4


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _nbytes(tree: Any) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


def lower_train_step(cfg: TrainConfig, config: LlamaConfig, devices: list) -> tuple[Any, dict[str, Any]]:
    """The train step lowered for `devices` with the run's mesh and shardings, and its state's sizes."""
    from training.train import make_fns

    if cfg.pipeline.acsgd:
        raise AotError("pipeline.acsgd is not compiled by training.aot yet; check the plain pipelined step "
                       "(pipeline.acsgd=false): AC-SGD adds its per-example memory arguments to it")
    mesh = parallel.make_mesh(cfg.mesh, devices)
    micro = cfg.run.batch_size // cfg.optimizer.grad_accum
    parallel.check_batch(mesh, micro)
    fns = make_fns(cfg, config, mesh)
    layout = pipeline_step.StageLayout(pipeline_step.spec_for(cfg)) if cfg.mesh.stage > 1 else parallel.ModelLayout()
    params = jax.eval_shape(lambda k: layout.to_train(init_params(config, k)), jax.random.PRNGKey(0))
    opt_state = jax.eval_shape(fns.optimizer.init, params)
    param_sh, opt_sh = layout.shardings(params, mesh), layout.shardings(opt_state, mesh)
    rep, bsh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    tokens = jax.ShapeDtypeStruct((cfg.optimizer.grad_accum, micro, cfg.run.seq_len), jnp.int32, sharding=bsh)
    args = (_abstract(params, param_sh), _abstract(opt_state, opt_sh), {"inputs": tokens, "targets": tokens},
            jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep), jax.ShapeDtypeStruct((), jnp.int32, sharding=rep))
    lowered = parallel.jit_train_step(fns.train_step, mesh, param_sh, opt_sh).trace(*args).lower()
    sizes = {"param_bytes": _nbytes(params), "optimizer_bytes": _nbytes(opt_state),
             "batch_bytes": 2 * tokens.size * 4, "mesh": dict(mesh.shape)}
    return lowered, sizes


def lower_decode_step(config: LlamaConfig, device: Any, batch: int, context: int, new_tokens: int = 1) -> Any:
    """One decode step (a token per row after `context` cached positions) or, with `new_tokens` =
    d + 1, one self-speculative verification pass, on one chip: float32 weights and cache as
    `inference.generate` serves them, cached attention through the Pallas kernel (what "auto"
    picks on a TPU)."""
    from inference.engine import decode_step
    from jaxmodels.model import forward

    one = SingleDeviceSharding(device)
    params = jax.eval_shape(lambda k: init_params(config, k), jax.random.PRNGKey(0))
    cache = jax.eval_shape(lambda: KVCache.create(config, batch, context, attention_impl="pallas"))
    on_chip = lambda tree: jax.tree_util.tree_map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), tree)
    if new_tokens == 1:
        token = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=one)
        step = jax.jit(lambda p, t, c: decode_step(p, config, t, c), donate_argnums=(2,))
    else:
        token = jax.ShapeDtypeStruct((batch, new_tokens), jnp.int32, sharding=one)
        step = jax.jit(lambda p, t, c: forward(p, config, t, cache=c), donate_argnums=(2,))
    with jax.set_mesh(jax.sharding.Mesh([device], ("chip",))):  # Pallas lowers for the chip, not the host
        return step.trace(on_chip(params), token, on_chip(cache)).lower()


def model_flops(config: LlamaConfig, tokens: int, context: int, train: bool) -> float:
    """Analytic FLOPs: 2 per matmul weight per token forward (x3 with the backward pass), plus
    attention's scores and mixing against `context` positions (halved for causal training). The
    compiler's own count (`flops` in the report) sees a scanned layer loop's body once."""
    from jaxmodels.weights import matmul_param_count

    width = config.num_attention_heads * config.head_dim
    attention = 4 * config.num_hidden_layers * context * width * tokens
    return (6 * matmul_param_count(config) * tokens + 3 * attention / 2) if train else \
        (2 * matmul_param_count(config) * tokens + attention)


def run(topo: Topology, preset: str | None, config_file: str | None, overrides: list[str],
        decode: tuple[int, int] | None) -> dict[str, Any]:
    """Compile the run's programs for `topo`; the report `training.aot` prints."""
    cfg = load_config(preset=preset, config_file=config_file, overrides=overrides)
    jax.config.update("jax_enable_compilation_cache", False)  # TPU programs: nothing to reuse on this host
    devices = tpu_devices(topo)
    with jax.default_device(jax.devices("cpu")[0]):  # eval_shape's PRNG key: not a TPU array
        config = model_config(cfg)
        lowered, sizes = lower_train_step(cfg, config, devices)
    report = {"topology": topo.name, "chips": topo.chips, "device_kind": devices[0].device_kind,
              "model": f"{config.num_params() / 1e6:.1f}M parameters, {config.num_hidden_layers} layers",
              "params": config.num_params(), **sizes,
              "batch": f"{cfg.run.batch_size} x {cfg.run.seq_len} tokens ({cfg.optimizer.grad_accum} micro-batches)",
              "train_step": compile_report(lowered, topo.hbm_bytes)}
    tokens = cfg.run.batch_size * cfg.run.seq_len
    report["train_step"]["model_flops_per_chip"] = model_flops(config, tokens, cfg.run.seq_len, True) / topo.chips
    if decode is not None:
        batch, context = decode
        report["decode"] = f"batch {batch}, {context} cached positions"
        report["decode_step"] = compile_report(lower_decode_step(config, devices[0], batch, context), topo.hbm_bytes)
        report["decode_step"]["model_flops_per_chip"] = model_flops(config, batch, context, False)
        report["verify_step"] = compile_report(lower_decode_step(config, devices[0], batch, context, VERIFY_TOKENS),
                                               topo.hbm_bytes)
        report["verify_step"]["model_flops_per_chip"] = model_flops(config, batch * VERIFY_TOKENS, context, False)
    return report


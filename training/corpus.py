"""Text corpora as sorted lists of named documents, split into train and held-out by a fixed rule.

Sources:
- `"stdlib"`: the Python standard library's `.py` files on the running machine
  (`sysconfig.get_paths()["stdlib"]`), without `site-packages` and, unless asked, without test folders.
- a folder: every file under it whose name ends in one of `extensions`.
- a `.jsonl` file: one `{"text": ...}` object per line; the document's name is `line-<n>`.

**Split rule.** A document is held out when `sha256(name)`, read as an integer, modulo 10000 is below
`heldout_percent * 100`: stable across machines, runs and corpus growth (adding a file never moves
another), and whole modules are held out, so held-out loss measures unseen code. If the rule would
leave either side empty (tiny corpora), the last document (sorted order) goes to held-out.

The fingerprint (sha256 over names and contents, plus the split rule) keys the tokenizer and token
caches, so a changed corpus is never served stale tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sysconfig
from pathlib import Path

STDLIB_SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__")
TEST_DIRS = ("test", "tests", "idle_test")


class DataError(ValueError):
    """A corpus that cannot be used (missing path, empty, unreadable), with the fix."""


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Documents in sorted-name order, split into train and held-out."""

    train: tuple[str, ...]
    heldout: tuple[str, ...]
    train_names: tuple[str, ...]
    heldout_names: tuple[str, ...]
    fingerprint: str
    source: str

    @property
    def num_chars(self) -> int:
        return sum(map(len, self.train)) + sum(map(len, self.heldout))


def is_heldout(name: str, heldout_percent: float) -> bool:
    """The fixed split rule (see the module docstring)."""
    bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10000
    return bucket < round(heldout_percent * 100)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:  # a few stdlib test fixtures are deliberately not UTF-8
        return None
    except OSError as err:  # unreadable (permissions, a broken link): say which file
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None


def _stdlib_documents(include_tests: bool) -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"the standard library folder {root} (sysconfig 'stdlib') does not exist; "
                        f"set data.source to a folder of text files or a .jsonl file")
    skip = STDLIB_SKIP_DIRS + (() if include_tests else TEST_DIRS)
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = Path(dirpath) / name
                text = _read_text(path)
                if text:
                    docs.append((path.relative_to(root).as_posix(), text))
    return docs


def _folder_documents(root: Path, extensions: tuple[str, ...]) -> list[tuple[str, str]]:
    docs = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and (not extensions or path.name.endswith(tuple(extensions))):
            text = _read_text(path)
            if text:
                docs.append((path.relative_to(root).as_posix(), text))
    return docs


def _jsonl_line(path: Path, n: int, raw: bytes) -> dict:
    """One parsed line of a .jsonl corpus; DataError naming the file and line if it is not {"text": str}."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}:{n} is not UTF-8 text (byte {err.start}); a .jsonl corpus holds one "
                        f'{{"text": "..."}} JSON object per line') from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{n} is not valid JSON ({err}); each line must be "
                        f'{{"text": "..."}}') from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise DataError(f'{path}:{n} has no string field "text"; each line must be {{"text": "..."}}')
    return record


def _jsonl_documents(path: Path) -> list[tuple[str, str]]:
    docs = []
    try:
        with path.open("rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                record = _jsonl_line(path, n, raw)
                if record["text"]:
                    docs.append((f"line-{n}", record["text"]))
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    return docs


def read_documents(source: str, extensions: tuple[str, ...] = (".py", ".txt", ".md", ".rst"),
                   include_tests: bool = False) -> list[tuple[str, str]]:
    """(name, text) pairs, sorted by name, from 'stdlib', a folder or a .jsonl file."""
    if source == "stdlib":
        docs = _stdlib_documents(include_tests)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"data path '{source}' does not exist; set data.source to 'stdlib', "
                            f"a folder of text files or a .jsonl file")
        if path.is_dir():
            docs = _folder_documents(path, extensions)
        elif path.suffix == ".jsonl":
            docs = _jsonl_documents(path)
        else:
            raise DataError(f"data path '{source}' is a file but not .jsonl; give a folder of text "
                            f"files or a .jsonl file with one {{\"text\": ...}} per line")
    if not docs:
        what = f"files ending in {', '.join(extensions)}" if source != "stdlib" else ".py files"
        raise DataError(f"the corpus '{source}' is empty: no non-empty {what} found")
    return sorted(docs)


def load_corpus(source: str, heldout_percent: float = 2.0,
                extensions: tuple[str, ...] = (".py", ".txt", ".md", ".rst"),
                include_tests: bool = False) -> Corpus:
    """Read a corpus and split it by the fixed rule."""
    docs = read_documents(source, extensions, include_tests)
    held = [is_heldout(name, heldout_percent) for name, _ in docs]
    if len(docs) > 1 and heldout_percent > 0 and (all(held) or not any(held)):
        held = [False] * (len(docs) - 1) + [True]
    digest = hashlib.sha256(f"split-v1:{heldout_percent}".encode())
    for (name, text), h in zip(docs, held):
        digest.update(f"\0{name}\0{int(h)}\0".encode())
        digest.update(text.encode())
    return Corpus(
        train=tuple(t for (_, t), h in zip(docs, held) if not h),
        heldout=tuple(t for (_, t), h in zip(docs, held) if h),
        train_names=tuple(n for (n, _), h in zip(docs, held) if not h),
        heldout_names=tuple(n for (n, _), h in zip(docs, held) if h),
        fingerprint=digest.hexdigest(),
        source=source,
    )

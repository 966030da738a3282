"""Tokenizer, token cache, packing and deterministic batches.

Pipeline: corpus (`training.corpus`) -> tokenizer (a byte-level BPE trained on the train split, or
the tokenizer of an imported checkpoint) -> each document encoded as `[BOS?] ids EOS` and
concatenated into one token stream per split -> fixed-length blocks.

Caching. The trained tokenizer is cached under `CACHE/tokenizers/` keyed by (corpus fingerprint,
vocab size); the tokenized splits under `CACHE/tokens/` keyed by (corpus fingerprint, tokenizer
fingerprint). Writes go to a temporary name and are renamed into place, so a killed process never
leaves a half-written cache entry that a later run would trust.

Batches. Block `i` is `stream[i*T : i*T + T + 1]` (inputs = the first T tokens, targets = the last
T). Each epoch visits every block once in the order `permutation(seed, epoch)`. The position
`DataPosition(epoch, index)` says which block comes next; it is saved in checkpoints, so a resumed
run continues with exactly the batch it would have seen. Held-out batches take blocks in order; the
last batch is filled up with weight-0 repeats so every evaluation batch has the same shape.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from jaxmodels.convert.tokenizer import Tokenizer
from training.config import DataSection
from training.corpus import Corpus, DataError, load_corpus

EOS_TOKEN = "<|endoftext|>"


def cache_root(cache_dir: str | None) -> Path:
    """`data.cache_dir`, else $JAXMODELS_CACHE, else ~/.cache/jaxmodels."""
    root = cache_dir or os.environ.get("JAXMODELS_CACHE") or "~/.cache/jaxmodels"
    return Path(root).expanduser()


# --------------------------------------------------------------------------- tokenizer
def train_bpe(texts: tuple[str, ...] | list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2 style pre-tokenizer, no prefix space) with `<|endoftext|>` = id 0.

    Byte-level means every string is encodable; the 256 byte symbols are always in the vocabulary.
    """
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=True,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer, length=len(texts))
    eos = hf.token_to_id(EOS_TOKEN)
    return Tokenizer(hf, bos_token_id=None, eos_token_ids=(eos,), add_bos=False)


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    digest = hashlib.sha256(tok.hf.to_str().encode())
    digest.update(f"{tok.bos_token_id}|{tok.add_bos}|{tok.eos_token_ids}".encode())
    return digest.hexdigest()


def _atomic_dir(final: Path, write) -> None:
    """Run `write(tmp_dir)` and rename the result to `final` (kept if another process got there first)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        os.replace(tmp, final)
    except OSError:
        if not final.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_bpe(corpus: Corpus, vocab_size: int, cache: Path) -> Tokenizer:
    """The BPE for this corpus and vocab size, trained once and then read from the cache."""
    folder = cache / "tokenizers" / f"bpe-{corpus.fingerprint[:20]}-v{vocab_size}"
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_folder(folder)
    tok = train_bpe(corpus.train, vocab_size)
    _atomic_dir(folder, tok.save)
    return Tokenizer.from_folder(folder)


ENCODE_CHUNK = 256  # documents per encode_batch call


def encode_documents(tok: Tokenizer, texts: tuple[str, ...] | list[str]) -> np.ndarray:
    """Documents -> one stream `[BOS?] doc EOS [BOS?] doc EOS ...` (uint16 if the vocab fits, else uint32)."""
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    prefix = [tok.bos_token_id] if tok.add_bos else []
    suffix = list(tok.eos_token_ids[:1])
    pieces, texts = [], list(texts)
    chunks = range(0, len(texts), ENCODE_CHUNK)  # chunks: a progress bar, and still a parallel batch each
    with tqdm(total=len(texts), desc="tokenizing", unit="doc", leave=False, disable=None) as bar:
        for i in chunks:
            for enc in tok.hf.encode_batch(texts[i: i + ENCODE_CHUNK], add_special_tokens=False):
                pieces.append(np.asarray(prefix + enc.ids + suffix, dtype))
            bar.update(min(ENCODE_CHUNK, len(texts) - i))
    return np.concatenate(pieces) if pieces else np.zeros((0,), dtype)


def cached_tokens(corpus: Corpus, tok: Tokenizer, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """(train stream, held-out stream), encoded once and then read from the cache."""
    path = cache / "tokens" / f"{corpus.fingerprint[:20]}-{tokenizer_fingerprint(tok)[:20]}.npz"
    if path.is_file():
        try:
            with np.load(path) as f:
                return f["train"], f["heldout"]
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)  # damaged: re-encode below
    train, heldout = encode_documents(tok, corpus.train), encode_documents(tok, corpus.heldout)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npz", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        np.savez(f, train=train, heldout=heldout)
    os.replace(tmp, path)
    return train, heldout


# --------------------------------------------------------------------------- packing and batches
@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where the train stream is: the next block is `permutation(seed, epoch)[index]`."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> "DataPosition":
        return cls(epoch=int(d["epoch"]), index=int(d["index"]))


class PackedBlocks:
    """A token stream cut into blocks of T+1 tokens (consecutive blocks share one boundary token)."""

    def __init__(self, stream: np.ndarray, seq_len: int, split: str = "train"):
        self.stream, self.seq_len = stream, seq_len
        self.num_blocks = max(0, (len(stream) - 1) // seq_len)
        if self.num_blocks == 0:
            raise DataError(f"the {split} split has {len(stream)} tokens, fewer than one block of "
                            f"run.seq_len + 1 = {seq_len + 1}; use a smaller run.seq_len, a larger corpus"
                            + (" or a larger data.heldout_percent" if split == "heldout" else ""))

    def blocks(self, indices: np.ndarray) -> np.ndarray:
        """indices [N] -> tokens [N, T+1] (int32)."""
        starts = np.asarray(indices, np.int64)[:, None] * self.seq_len
        return self.stream[starts + np.arange(self.seq_len + 1)].astype(np.int32)


class DataSet:
    """Packed train and held-out splits of one corpus under one tokenizer."""

    def __init__(self, train: np.ndarray, heldout: np.ndarray, tokenizer: Tokenizer, seq_len: int,
                 seed: int, corpus: Corpus | None = None):
        self.tokenizer, self.seq_len, self.seed, self.corpus = tokenizer, seq_len, seed, corpus
        self.train = PackedBlocks(train, seq_len, "train")
        self.heldout = PackedBlocks(heldout, seq_len, "heldout")
        self._perm_epoch, self._perm = -1, np.zeros((0,), np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        """The block order of one epoch: a fixed function of (seed, epoch)."""
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(self.train.num_blocks), epoch
        return self._perm

    def train_ids(self, position: DataPosition, batch_size: int) -> tuple[np.ndarray, DataPosition]:
        """The block ids [B] of the next batch and the position after them (epochs roll over).

        A block's id is its index in the train split: stable across epochs and resumes, so it names
        one training example (AC-SGD keys its per-example memory by it)."""
        epoch, index, out = position.epoch, position.index, []
        while len(out) < batch_size:
            if index >= self.train.num_blocks:
                epoch, index = epoch + 1, 0
            take = min(batch_size - len(out), self.train.num_blocks - index)
            out.extend(self.permutation(epoch)[index:index + take])
            index += take
        return np.asarray(out, np.int64), DataPosition(epoch, index)

    def train_blocks(self, ids: np.ndarray) -> np.ndarray:
        """ids [N] -> their blocks [N, T+1]: what one process reads for its share of a batch."""
        return self.train.blocks(ids)

    def train_batch(self, position: DataPosition, batch_size: int) -> tuple[np.ndarray, DataPosition]:
        """The next `batch_size` blocks [B, T+1] and the position after them (the whole batch)."""
        ids, position = self.train_ids(position, batch_size)
        return self.train_blocks(ids), position

    def heldout_batches(self, batch_size: int, max_batches: int = 0
                        ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(blocks [B, T+1], weights [B]) over the held-out blocks in order; 0 = all batches."""
        n = self.heldout.num_blocks
        num = -(-n // batch_size)
        num = min(num, max_batches) if max_batches else num
        for b in range(num):
            idx = np.arange(b * batch_size, (b + 1) * batch_size)
            weights = (idx < n).astype(np.float32)
            yield self.heldout.blocks(idx % n), weights

    @property
    def tokens_per_epoch(self) -> int:
        return self.train.num_blocks * self.seq_len


def split_batch(blocks: np.ndarray, grad_accum: int) -> dict[str, np.ndarray]:
    """blocks [B, T+1] -> {"inputs", "targets"}: [A, B/A, T] int32 (A = grad_accum micro-batches)."""
    b, t1 = blocks.shape
    blocks = blocks.reshape(grad_accum, b // grad_accum, t1)
    return {"inputs": blocks[..., :-1], "targets": blocks[..., 1:]}


def load_tokenizer(cfg: DataSection, corpus: Corpus) -> Tokenizer:
    if cfg.tokenizer:
        if not Path(cfg.tokenizer).expanduser().is_dir():
            raise DataError(f"data.tokenizer '{cfg.tokenizer}' is not a folder with tokenizer.json")
        return Tokenizer.from_folder(Path(cfg.tokenizer).expanduser())
    return cached_bpe(corpus, cfg.vocab_size, cache_root(cfg.cache_dir))


def prepare_data(cfg: DataSection, seq_len: int, seed: int, tokenizer: Tokenizer | None = None) -> DataSet:
    """Corpus -> tokenizer (given, `data.tokenizer`, or a cached BPE) -> cached tokens -> DataSet."""
    corpus = load_corpus(cfg.source, cfg.heldout_percent, cfg.extensions, cfg.include_tests)
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg, corpus)
    train, heldout = cached_tokens(corpus, tok, cache_root(cfg.cache_dir))
    if len(train) == 0:
        raise DataError(f"the corpus '{cfg.source}' encodes to no train tokens")
    return DataSet(train, heldout, tok, seq_len, seed, corpus)

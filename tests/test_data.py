"""Corpus, split rule, tokenizer/token caches, packing and resumable batch order."""

import json

import numpy as np
import pytest

from training import data as data_lib
from training.config import DataSection
from training.corpus import DataError, is_heldout, load_corpus
from training.data import DataPosition, DataSet, prepare_data, split_batch
from training.testing import small_corpus


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus"))


def _data_cfg(source, cache, **kw):
    return DataSection(source=str(source), cache_dir=str(cache), vocab_size=kw.pop("vocab_size", 400),
                       heldout_percent=kw.pop("heldout_percent", 10.0), **kw)


def test_split_rule_is_fixed():
    # the documented rule: sha256(name) mod 10000 < percent * 100
    names = [f"pkg/mod{i}.py" for i in range(2000)]
    held = [n for n in names if is_heldout(n, 2.0)]
    assert 20 <= len(held) <= 60  # ~2%
    assert held == [n for n in names if is_heldout(n, 2.0)]
    assert set(held) <= {n for n in names if is_heldout(n, 5.0)}  # growing the share only adds


def test_stdlib_corpus():
    corpus = load_corpus("stdlib")
    names = corpus.train_names + corpus.heldout_names
    assert len(names) > 300 and not any("site-packages" in n for n in names)
    assert not any(n.startswith("test/") for n in names)
    assert 0 < len(corpus.heldout) < 0.05 * len(names)
    assert list(corpus.train_names) == sorted(corpus.train_names)


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.py").write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_corpus(str(tmp_path / "empty"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="not .jsonl"):
        load_corpus(str(tmp_path / "x.csv"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(DataError, match=r'bad.jsonl:2 has no string field "text"'):
        load_corpus(str(bad))
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'{"text": "ok"}\n{"text": "fine"}\n\x89PNG\r\n\x1a\n\xff\xfe\x00\n')
    with pytest.raises(DataError, match=r"binary.jsonl:3 is not UTF-8 text"):
        load_corpus(str(binary))
    binary.write_bytes(b'{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"binary.jsonl:2 is not valid JSON"):
        load_corpus(str(binary))


def test_jsonl_source(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document number {i}\n"}) + "\n" for i in range(50)))
    corpus = load_corpus(str(path), heldout_percent=10.0)
    assert len(corpus.train) + len(corpus.heldout) == 50 and corpus.heldout


def test_tokenizer_and_tokens_are_cached(corpus_dir, tmp_path, monkeypatch):
    cfg = _data_cfg(corpus_dir, tmp_path / "cache")
    ds = prepare_data(cfg, seq_len=32, seed=0)
    tok = ds.tokenizer
    assert tok.vocab_size == 400 and tok.eos_token_ids == (0,)
    text = "def f(x):\n    return x  # ok\n"
    assert tok.decode(tok.encode(text)) == text
    # the stream is documents joined by EOS
    assert int((ds.train.stream == 0).sum()) == len(ds.corpus.train)
    # second run: no BPE training, no encoding
    monkeypatch.setattr(data_lib, "train_bpe", lambda *a, **k: pytest.fail("tokenizer retrained"))
    monkeypatch.setattr(data_lib, "encode_documents", lambda *a, **k: pytest.fail("corpus re-encoded"))
    again = prepare_data(cfg, seq_len=32, seed=0)
    np.testing.assert_array_equal(again.train.stream, ds.train.stream)
    np.testing.assert_array_equal(again.heldout.stream, ds.heldout.stream)


def test_changed_corpus_is_not_served_stale(corpus_dir, tmp_path):
    cfg = _data_cfg(corpus_dir, tmp_path / "cache")
    first = prepare_data(cfg, seq_len=32, seed=0)
    changed = tmp_path / "changed"
    changed.mkdir()
    for p in corpus_dir.iterdir():
        (changed / p.name).write_text(p.read_text())
    (changed / "extra.py").write_text("print('a new file')\n" * 20)
    second = prepare_data(_data_cfg(changed, tmp_path / "cache"), seq_len=32, seed=0)
    assert second.corpus.fingerprint != first.corpus.fingerprint
    assert len(second.train.stream) + len(second.heldout.stream) > len(first.train.stream) + len(first.heldout.stream)


def _dataset(n_tokens=1000, seq_len=8, seed=0):
    stream = np.arange(n_tokens, dtype=np.uint16)
    return DataSet(stream, stream[:100].copy(), tokenizer=None, seq_len=seq_len, seed=seed)


def test_packing_and_epochs():
    ds = _dataset()
    assert ds.train.num_blocks == (1000 - 1) // 8
    blocks, pos = ds.train_batch(DataPosition(), 4)
    assert blocks.shape == (4, 9) and blocks.dtype == np.int32
    np.testing.assert_array_equal(blocks[:, 1:] - blocks[:, :-1], 1)  # contiguous windows
    assert all(b[0] % 8 == 0 for b in blocks)
    # one epoch visits every block exactly once
    seen, pos = [], DataPosition()
    while pos.epoch == 0:
        b, pos = ds.train_batch(pos, 5)
        seen += list(b[:, 0] // 8)
    assert sorted(seen[:ds.train.num_blocks]) == list(range(ds.train.num_blocks))
    assert _dataset(seed=1).permutation(0).tolist() != ds.permutation(0).tolist()
    batch = split_batch(blocks, 2)
    assert batch["inputs"].shape == (2, 2, 8)
    np.testing.assert_array_equal(batch["targets"][..., :-1], batch["inputs"][..., 1:])


def test_resume_position_continues_the_same_batches():
    ds = _dataset()
    pos, full = DataPosition(), []
    for _ in range(40):
        b, pos = ds.train_batch(pos, 7)
        full.append(b)
    # stop after 25 batches, save the position (as JSON), start a new loader from it
    pos = DataPosition()
    for _ in range(25):
        _, pos = ds.train_batch(pos, 7)
    saved = json.loads(json.dumps(pos.to_dict()))
    fresh, pos = _dataset(), DataPosition.from_dict(saved)
    for i in range(25, 40):
        b, pos = fresh.train_batch(pos, 7)
        np.testing.assert_array_equal(b, full[i])


@pytest.mark.parametrize("mesh_shape", [{"data": 2, "fsdp": 4}, {"data": 1, "stage": 2}])
def test_a_global_batch_from_ids_equals_the_whole_batch_placed(mesh_shape):
    import jax
    from training import parallel
    from training.config import MeshSection

    ds, reads = _dataset(), []
    ids, _ = ds.train_ids(DataPosition(0, 3), 16)
    assert ids.dtype == np.int64 and len(set(ids.tolist())) == 16
    np.testing.assert_array_equal(ds.train_blocks(ids), ds.train_batch(DataPosition(0, 3), 16)[0])
    mesh = parallel.make_mesh(MeshSection(**mesh_shape))
    sharding = parallel.batch_sharding(mesh)

    def read(rows):
        reads.append(np.asarray(rows).copy())
        return ds.train_blocks(rows)

    batch = parallel.global_train_batch(ids, 2, ds.seq_len, read, sharding)
    expected = split_batch(ds.train_blocks(ids), 2)
    for key in ("inputs", "targets"):
        assert batch[key].sharding == sharding
        np.testing.assert_array_equal(jax.device_get(batch[key]), expected[key])
    # every row read exactly once, however many devices (and inputs and targets) use it
    assert sorted(np.concatenate(reads).tolist()) == sorted(ids.tolist())


def test_heldout_batches_pad_with_zero_weight():
    ds = _dataset(seq_len=8)  # held-out: 100 tokens -> 12 blocks
    batches = list(ds.heldout_batches(5))
    assert len(batches) == 3
    assert [w.sum() for _, w in batches] == [5, 5, 2]
    assert list(ds.heldout_batches(5, max_batches=1))[0][1].sum() == 5


def test_too_short_split_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than one block"):
        DataSet(np.arange(1000, dtype=np.uint16), np.arange(5, dtype=np.uint16), None, 8, 0)

"""benchmarks/chai.py: the next-line multiple-choice items, and the --quick run (every mode measured,
the bytes in the table are the calibration's, the report has its tables and verdicts)."""

import dataclasses

import pytest

from benchmarks import chai as bench
from benchmarks.chai_tasks import item_rows, next_line_items
from jaxmodels.chai_file import load_chai
from tests.tiny_model import byte_tokenizer, tiny_model_folder


def test_next_line_items_hold_the_true_next_line():
    tok = byte_tokenizer()
    lines = [f"value_{i:03d} = compute({i * 7}, flag={i % 3})" for i in range(40)]
    doc = "\n".join(lines)
    items = next_line_items(tok, [doc], 6, 128)
    assert len(items) == 6 and items == next_line_items(tok, [doc], 6, 128)  # seeded
    assert {item.answer for item in items} <= {0, 1, 2, 3} and len({item.answer for item in items}) > 1
    for item in items:
        context, true = tok.decode(item.context), tok.decode(item.options[item.answer])
        assert true.startswith("\n") and context + true in doc  # the module's own text, split at a line break
        assert len({tok.decode(o) for o in item.options}) == 4
        assert all(tok.decode(o)[1:] in lines for o in item.options)
    tokens, mask = item_rows(items, 128)
    assert tokens.shape == (24, 128)
    assert mask.sum(axis=1).tolist() == [len(o) for item in items for o in item.options]
    first = items[0]
    c = len(first.context)
    assert tokens[first.answer, c:c + len(first.options[first.answer])].tolist() == first.options[first.answer]


def test_quick_run_on_a_tiny_model(tmp_path):
    model = tiny_model_folder(tmp_path / "tiny", num_hidden_layers=2)
    settings = dataclasses.replace(bench.QUICK, batches=(1,))  # half the compilations of --quick
    rows = bench.run(str(model), settings, tmp_path / "out")
    assert [r["mode"] for r in rows] == ["dense", "kv", "query"]
    layers, kv = rows[0]["layers"], rows[0]["kv_heads"]
    for row in rows:
        assert 0 <= row["accuracy"] <= 1 and row["perplexity"] > 1 and 0 <= row["mc"] <= 1 and row["mc_items"] >= 1
        assert all(row[b]["tok_s"] > 0 for b in settings.batches)
    cal = load_chai(tmp_path / "out" / "tiny-chai-kv-1.json")
    assert rows[1]["calibration"].clusters == cal.clusters
    kv_row, query_row = rows[1][1], rows[2][1]
    assert kv_row["k_slots"] == sum(cal.k_slots())
    assert kv_row["kv_bytes"] * 2 * layers * kv == kv_row["dense_kv_bytes"] * (sum(cal.k_slots()) + layers * kv)
    assert query_row["kv_bytes"] == query_row["dense_kv_bytes"]  # query clusters keep every K slot
    heads = rows[0]["heads"]
    assert rows[0][1]["score_heads"] == layers * heads
    # --quick keeps one cluster per layer: one K slot and its G score heads (kv); one representative
    # query head, padded to one per K slot (query)
    assert cal.clusters == (1,) * layers and kv_row["k_slots"] == layers and kv_row["score_heads"] == layers * heads // kv
    assert query_row["score_heads"] == layers * kv
    body = bench.report(rows, settings)
    assert body.count("| tiny | dense |") == 2 and body.count("| tiny | CHAI kv |") == 2
    assert body.count("memory target") == 2


@pytest.mark.slow
def test_quick_command_trains_its_model(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXMODELS_CACHE", str(tmp_path / "cache"))
    # Decode timed at batch 2 only (--quick: 1 and 2): half the decode compilations; batch 1 is
    # measured by test_quick_run_on_a_tiny_model, and this test is about training the model.
    monkeypatch.setattr(bench, "QUICK", dataclasses.replace(bench.QUICK, batches=(2,)))
    body = bench.main(["--quick", "--out", str(tmp_path / "out")])
    assert body.count("| trained |") == 6 and (tmp_path / "out" / "trained" / "model").is_dir()

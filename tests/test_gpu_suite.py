"""benchmarks.gpu_suite: the tiny CPU mode runs every part end to end (kernels interpreted), so
whoever gets a GPU can run the full suite in one go; its time budget and failure handling."""

import json

import jax.numpy as jnp
import pytest

from benchmarks import gpu_suite
from benchmarks.gpu_attention import chai_tables, sparse_tables
from benchmarks.gpu_timing import Budget, per_call_seconds


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("suite") / "suite.json"
    body = gpu_suite.main(["--tiny", "--corpus", str(corpus), "--json", str(out)])
    return body, json.loads(out.read_text())


def _rows(result, part):
    table = result["tables"][part]
    assert table is not None, result["notes"][part]
    header, *rows = table
    return header, rows


def test_tiny_suite_fills_every_part_with_checked_rows(tiny_run):
    body, result = tiny_run
    header, rows = _rows(result, "decode attention")
    assert len(rows) == 2  # context 128 x batches (1, 2), none skipped
    assert "ours (Triton) µs" in header  # bf16, hd 64: "ours" is the Hopper kernel, Triton beside it
    for row in rows:
        cells = dict(zip(header, row))
        assert not any(isinstance(v, str) and v.startswith("failed") for v in row), cells
        assert cells["max rel. error vs reference"] < 1e-2  # every implementation agreed (bf16 outputs)
        assert cells["verify(5) / decode"] > 0
    header, rows = _rows(result, "CHAI and head-sparse tables")
    assert [r[0] for r in rows] == ["dense", "CHAI, 2 clusters", "head-sparse, 2 of 4 heads"]
    assert [r[3] for r in rows] == [1.0, pytest.approx(8 / 6), 2.0]  # 2H / (H + C) and H / K
    assert max(r[-1] for r in rows) < 1e-4
    header, rows = _rows(result, "SmolLM2 decoding")
    assert [(r[0], r[1]) for r in rows] == [(1, "reference"), (1, "pallas"), (2, "reference"), (2, "pallas")]
    header, rows = _rows(result, "LayerSkip self-speculation")
    assert rows[0][1] == "plain" and rows[1][1] == "E=2, d=2"
    assert rows[1][-1] is True  # self-speculation gave plain greedy decoding's tokens
    assert "### SmolLM2 decoding" in body and "failed" not in body


def test_the_suite_refuses_to_run_full_size_without_a_gpu():
    with pytest.raises(SystemExit, match="needs a GPU"):
        gpu_suite.main(["--no-append"])


def test_an_expired_budget_skips_rows_and_a_broken_part_is_reported_not_fatal(monkeypatch):
    settings = gpu_suite.tiny_settings(None)
    budget = Budget(0.0)
    budget.part(1.0)
    from benchmarks.gpu_attention import kernel_rows, plan_rows
    table, notes = kernel_rows(settings, budget, 1e9, on_gpu=False)
    assert table[1:] == [] and len(notes) == 2 and all("skipped (time budget)" in n for n in notes)
    table, notes = plan_rows(settings, budget)
    assert table[1:] == [] and len(notes) == 3

    def broken():
        raise RuntimeError("out of memory")

    tables, part_notes = {}, {}
    gpu_suite.run_part("x", broken, tables, part_notes)
    assert tables["x"] is None and part_notes["x"] == ["failed: RuntimeError: out of memory"]


def test_chai_and_sparse_tables_name_the_heads_they_claim():
    q_head, k_head, v_head = chai_tables(2, 8, 3)  # clusters of 3, 3, 2 heads
    assert k_head[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert q_head[0].tolist() == [0, 0, 0, 3, 3, 3, 6, 6]  # each cluster scored by its first head
    assert v_head[1].tolist() == list(range(8))
    active, _, _ = sparse_tables(2, 8, 4)
    assert active.tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]  # a different set per row


def test_per_call_seconds_grows_with_the_work_per_call():
    small, big = jnp.ones((64, 64)), jnp.ones((512, 512))
    matmul = lambda x, w: x @ w  # noqa: E731
    t_small = per_call_seconds(matmul, (small, small), n=20)
    t_big = per_call_seconds(matmul, (big, big), n=20)
    assert t_big > 10 * t_small  # 512x the FLOPs: the loop times the calls, not the dispatch

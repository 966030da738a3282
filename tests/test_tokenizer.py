"""Tokenizer: the SmolLM2 GGUF tokenizer against transformers', pre-tokenizer rules, save/load, errors.

transformers' GGUF tokenizer loader has no entry for llama.cpp's "smollm" pre-tokenizer, so it
falls back to plain GPT-2 ByteLevel and drops SmolLM2's Digits(individual_digits=True) step. The
ids still agree on most text (the vocabulary has no multi-digit tokens), but not where whitespace
runs meet a digit: for "x  1" the real tokenizer (and llama.cpp) gives ["x", "ĠĠ", "1"], transformers'
GGUF loader ["x", "Ġ", "Ġ", "1"]. The comparisons below use texts outside that case, and
`test_smollm_digits_split_before_byte_level` pins the right behaviour explicitly.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from jaxmodels.convert import CheckpointError, Tokenizer
from jaxmodels.convert.gguf import smollm2_gguf_path
from jaxmodels.convert.tokenizer import UnsupportedTokenizerError

TEXTS = [
    "Hello, world! How are you today?",
    "12345 and 3.14159, version 1.2.3 on 2024-01-01",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "héllo wörld — naïve café, 日本語のテキスト, emoji 🤖🎉",
    "  leading spaces\t\ttabs and trailing   ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "I'm sure they'll say it's fine, don't you think? WE'VE SEEN IT.",
    "",
]
MESSAGES = [[{"role": "user", "content": "Hi there!"}],
            [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
             {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]]


@pytest.fixture(scope="module")
def smol() -> tuple[Path, Tokenizer, object]:
    try:
        path = smollm2_gguf_path()
    except CheckpointError as err:
        pytest.skip(str(err))
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return path, Tokenizer.from_gguf(path), reference


def test_gguf_tokenizer_matches_transformers(smol):
    _, ours, ref = smol
    assert ours.vocab_size == 49152 == len(ref)
    assert (ours.bos_token, ours.eos_token, ours.add_bos) == (ref.bos_token, ref.eos_token, False)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.encode("<|im_start|>user")[0] == 1  # special tokens stay whole


def test_smollm_digits_split_before_byte_level(smol):
    _, ours, _ = smol
    tokens = lambda text: [ours.hf.id_to_token(i) for i in ours.encode(text)]
    assert tokens("12345") == ["1", "2", "3", "4", "5"]
    assert tokens("pi is 3.14159") == ["pi", "Ġis", "Ġ", "3", ".", "1", "4", "1", "5", "9"]
    # Digits runs before the GPT-2 regex, so a whitespace run stays whole (see module docstring)
    assert tokens("x  1") == ["x", "ĠĠ", "1"]
    assert tokens("foo\n\n1") == ["foo", "ĊĊ", "1"]


def test_chat_template_matches_transformers(smol):
    _, ours, ref = smol
    for messages in MESSAGES:
        expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(messages) == expected
        assert ours.apply_chat_template(messages, add_generation_prompt=False) == ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=False)
    assert ours.apply_chat_template(MESSAGES[0]).endswith("<|im_start|>assistant\n")


def test_save_round_trip_and_autotokenizer(smol, tmp_path):
    _, ours, _ = smol
    ours.save(tmp_path)
    again = Tokenizer.from_folder(tmp_path)
    assert (again.bos_token_id, again.eos_token_ids, again.add_bos, again.chat_template) == (
        ours.bos_token_id, ours.eos_token_ids, ours.add_bos, ours.chat_template)
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS + ["x  1"]:
        assert again.encode(text) == ours.encode(text) == auto.encode(text), text
    assert auto.apply_chat_template(MESSAGES[1], tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template(MESSAGES[1])


def test_add_bos_applied_once(smol, tmp_path):
    _, ours, _ = smol
    with_bos = Tokenizer(ours.hf, bos_token_id=0, eos_token_ids=[0], add_bos=True)
    assert with_bos.encode("hi") == [0, *ours.encode("hi")]
    assert with_bos.encode("hi", add_special_tokens=False) == ours.encode("hi")
    with_bos.save(tmp_path)  # the saved post-processor adds BOS for other readers; we do not add twice
    again = Tokenizer.from_folder(tmp_path)
    assert again.add_bos and again.encode("hi") == [0, *ours.encode("hi")]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path).encode("hi") == [0, *ours.encode("hi")]


# ------------------------------------------------------------------ small synthetic GGUF tokenizers
def byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table, indexed by byte."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, extra = {b: b for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = 256 + extra, extra + 1
    return [chr(table[b]) for b in range(256)]


def write_tokenizer_gguf(path: Path, *, model: str = "gpt2", pre: str | None = None,
                         merges: list[str] = (), extra: list[str] = (), control: list[str] = ()) -> Path:
    tokens = byte_alphabet() + [m.replace(" ", "") for m in merges] + list(extra) + list(control)
    types = [1] * (len(tokens) - len(control)) + [3] * len(control)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges:
        w.add_token_merges(list(merges))
    if control:
        w.add_eos_token_id(len(tokens) - 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# "3 4" is the best merge, so the pre-tokenizer decides the result for "1234":
# llama-bpe isolates \p{N}{1,3} -> "123" | "4"; GPT-2 regex keeps "1234" whole -> "12" "34";
# smollm isolates every digit.
@pytest.mark.parametrize("pre, expected", [("llama-bpe", ["123", "4"]), ("gpt2", ["12", "34"]),
                                           (None, ["12", "34"]), ("smollm", ["1", "2", "3", "4"])])
def test_gguf_pre_tokenizer_by_name(tmp_path, pre, expected):
    path = write_tokenizer_gguf(tmp_path / "t.gguf", pre=pre, merges=["3 4", "1 2", "12 3"],
                                control=["<|eot|>"])
    tok = Tokenizer.from_gguf(path)
    assert [tok.hf.id_to_token(i) for i in tok.encode("1234")] == expected
    ids = tok.encode("a1234<|eot|>")
    assert ids[-1] == tok.eos_token_ids[0] and tok.decode(ids) == "a1234"
    assert tok.decode(ids, skip_special_tokens=False) == "a1234<|eot|>"
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(MESSAGES[0])


def test_gguf_tokenizer_errors(tmp_path):
    sp = write_tokenizer_gguf(tmp_path / "sp.gguf", model="llama")
    with pytest.raises(UnsupportedTokenizerError, match="'llama' \\(SentencePiece\\).*from_folder"):
        Tokenizer.from_gguf(sp)
    with pytest.raises(CheckpointError, match="does not exist"):
        Tokenizer.from_gguf(tmp_path / "absent.gguf")


def test_from_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(CheckpointError, match="damaged"):
        Tokenizer.from_folder(tmp_path)


def test_from_folder_reads_hf_style_config(tmp_path):
    """tokenizer_config.json with AddedToken dicts, named templates and eos ids from generation_config."""
    write_tokenizer_gguf(tmp_path / "t.gguf", control=["<s>", "</s>", "<|eot|>"])
    Tokenizer.from_gguf(tmp_path / "t.gguf").save(tmp_path / "tok")
    folder = tmp_path / "tok"
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("add_bos_token"), cfg.pop("eos_token_ids")
    cfg.update(bos_token={"content": "<s>", "special": True}, eos_token="</s>",
               chat_template=[{"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"},
                              {"name": "tool_use", "template": "tools"}])
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [257, 258]}))
    tok = Tokenizer.from_folder(folder)
    assert tok.bos_token_id == 256 and tok.eos_token_ids == (257, 258)
    assert not tok.add_bos  # no flag and no BOS-adding post-processor
    assert tok.apply_chat_template(MESSAGES[0]) == "<s>Hi there!"

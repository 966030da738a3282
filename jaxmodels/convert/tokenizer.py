"""Text <-> token ids for the models this library loads, from a `tokenizer.json` folder or a GGUF file.

`Tokenizer` wraps a `tokenizers.Tokenizer` and keeps the few things generation needs beside it: the
BOS id (and whether to prepend it), the EOS ids that stop generation, and the chat template.

A GGUF file has no `tokenizer.json`, only llama.cpp's description of one (vocabulary, merges, token
types and a named pre-tokenizer); `from_gguf` rebuilds the byte-level BPE from it. The named
pre-tokenizer matters: SmolLM ("smollm") splits every digit into its own piece before the GPT-2
regex, so "  1" tokenizes as ["ĠĠ", "1"], not ["Ġ", "Ġ", "1"]. transformers' GGUF loader drops
that Digits step (tests/test_tokenizer.py shows a text where the ids then differ).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from jaxmodels.convert.hf import CheckpointError

# Meta's Llama-3 split regex (as in its tiktoken config), used for tokenizer.ggml.pre = "llama-bpe".
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


class UnsupportedTokenizerError(CheckpointError):
    """The file describes a tokenizer that `Tokenizer.from_gguf` cannot rebuild."""


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}; the file is damaged, re-download it") from err


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class Tokenizer:
    """A `tokenizers.Tokenizer` plus BOS/EOS handling and a chat template."""

    def __init__(self, hf_tokenizer: tokenizers.Tokenizer, *, bos_token_id: int | None = None,
                 eos_token_ids: Iterable[int] = (), add_bos: bool = False,
                 chat_template: str | None = None):
        self.hf = hf_tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        self.add_bos = bool(add_bos and bos_token_id is not None)
        self.chat_template = chat_template or None

    # ------------------------------------------------------------------ basics
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.hf.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self.hf.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. `<|im_start|>`) stay whole.

        The wrapped tokenizer's own post-processor is never applied, so BOS is prepended exactly
        once, by us, when `add_bos` and `add_special_tokens`.
        """
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render `messages` with the model's Jinja chat template, the way transformers does."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (the model is not a chat model, or "
                             "its tokenizer_config.json / GGUF lacks one); format the prompt yourself")
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, add_bos={self.add_bos}, "
                f"eos={[self.hf.id_to_token(i) for i in self.eos_token_ids]}, "
                f"chat_template={'yes' if self.chat_template else 'no'})")

    # ------------------------------------------------------------------ folders
    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "Tokenizer":
        """Load `tokenizer.json` (+ tokenizer_config.json, chat_template.jinja, generation_config.json)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{folder} has no tokenizer.json; pass a folder saved by a Hugging Face "
                                  f"fast tokenizer (or Tokenizer.save), or load the tokenizer from a .gguf")
        try:
            hf = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on parse errors
            raise CheckpointError(f"cannot read {path}: {err}; the file is damaged, re-download it") from err
        cfg = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}

        def token_id(value: Any) -> int | None:
            text = _token_text(value)
            return None if text is None else hf.token_to_id(text)

        bos = token_id(cfg.get("bos_token"))
        eos = _ids(cfg.get("eos_token_ids"))
        if token_id(cfg.get("eos_token")) is not None:
            eos.insert(0, token_id(cfg.get("eos_token")))
        for extra in ("generation_config.json", "config.json"):
            if (folder / extra).is_file():
                raw = _read_json(folder / extra)
                eos += _ids(raw.get("eos_token_id"))
                bos = bos if bos is not None else raw.get("bos_token_id")
        if "add_bos_token" in cfg:
            add_bos = bool(cfg["add_bos_token"])
        else:  # no flag: add BOS iff the tokenizer's own post-processor does (Llama 3 style)
            probe = hf.encode("a", add_special_tokens=True).ids
            add_bos = bos is not None and bool(probe) and probe[0] == bos
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default", next(iter(named.values()), None))
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(hf, bos_token_id=bos, eos_token_ids=eos, add_bos=add_bos, chat_template=template)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write tokenizer.json + tokenizer_config.json, readable by `from_folder` and AutoTokenizer."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        hf = tokenizers.Tokenizer.from_str(self.hf.to_str())
        if self.add_bos:  # other readers apply the post-processor; ours ignores it (see encode)
            bos = self.bos_token
            hf.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_token_id)])
        else:
            hf.post_processor = None
        hf.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "eos_token_ids": list(self.eos_token_ids),
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False),
                                                      encoding="utf-8")
        return folder

    # ------------------------------------------------------------------ GGUF
    @classmethod
    def from_gguf(cls, path_or_reader: str | os.PathLike | Any) -> "Tokenizer":
        """Rebuild the byte-level BPE tokenizer that a llama.cpp GGUF file describes."""
        import gguf

        from jaxmodels.convert.gguf import open_gguf

        reader = path_or_reader if isinstance(path_or_reader, gguf.GGUFReader) else open_gguf(path_or_reader)
        fields = reader.fields

        def get(key: str, default: Any = None) -> Any:
            return fields[key].contents() if key in fields else default

        kind = get("tokenizer.ggml.model")
        if kind is None:
            raise UnsupportedTokenizerError("this GGUF file has no tokenizer (tokenizer.ggml.model is "
                                            "absent); load one with Tokenizer.from_folder")
        if kind != "gpt2":
            name = {"llama": "SentencePiece"}.get(kind, kind)
            raise UnsupportedTokenizerError(
                f"GGUF tokenizer model '{kind}' ({name}) is not supported; only byte-level BPE ('gpt2': "
                f"Llama 3, SmolLM) is rebuilt from GGUF. Load the original tokenizer.json with "
                f"Tokenizer.from_folder instead")
        tokens: list[str] = get("tokenizer.ggml.tokens")
        merges = [tuple(m.split(" ", 1)) for m in get("tokenizer.ggml.merges", [])]
        types = get("tokenizer.ggml.token_type", [1] * len(tokens))
        vocab = {tok: i for i, tok in enumerate(tokens)}
        hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        pre = get("tokenizer.ggml.pre", "default")
        if pre == "smollm":
            hf.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        elif pre in _LLAMA3_PRE:
            hf.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                               for t, ty in zip(tokens, types) if ty == _CONTROL])
        hf.add_tokens([AddedToken(t, special=False, normalized=False)
                       for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
        eos = [get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                "tokenizer.ggml.eom_token_id")]
        bos = get("tokenizer.ggml.bos_token_id")
        return cls(hf, bos_token_id=None if bos is None else int(bos),
                   eos_token_ids=[int(e) for e in eos if e is not None],
                   add_bos=bool(get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=get("tokenizer.chat_template"))


_TEMPLATES: dict[str, Any] = {}


def _compile_template(source: str) -> Any:
    """A Jinja template in a sandbox, with the helpers HF chat templates expect."""
    if source not in _TEMPLATES:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ValueError(f"chat template error: {message}")

        def tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False,
                   sort_keys: bool = False) -> str:
            return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]


__all__ = ["Tokenizer", "UnsupportedTokenizerError", "LLAMA3_SPLIT"]

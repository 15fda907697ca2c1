"""The checkpoint's tokenizer (a SentencePiece `tokenizer.model`, else a Hugging Face `tokenizer.json`) with
atomic special/added tokens, chat templates and streaming decoding."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sentencepiece as spm
import tokenizers
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "cls_token", "sep_token", "mask_token")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _content(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


class SentencePieceVocab:
    """Plain-text ids from a SentencePiece model (the published ERNIE 4.5 folders' `tokenizer.model`)."""

    def __init__(self, path: Path):
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.num_pieces = self.sp.get_piece_size()
        self.added_ids: dict[str, int] = {}
        self.special_ids = {i for i in range(self.num_pieces) if self.sp.is_control(i)}

    def piece_id(self, text: str) -> int | None:
        piece_id = self.sp.piece_to_id(text)
        return None if piece_id == self.sp.unk_id() and text != self.sp.id_to_piece(piece_id) else piece_id

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class TokenizersVocab:
    """Plain-text ids from a Hugging Face `tokenizer.json` (what transformers 5 saves); its added tokens
    are atomic, those marked special are special."""

    def __init__(self, path: Path):
        self.json = path.read_text(encoding="utf-8")
        self.tk = tokenizers.Tokenizer.from_str(self.json)
        self.num_pieces = self.tk.get_vocab_size(with_added_tokens=True)
        added = self.tk.get_added_tokens_decoder()
        self.added_ids = {token.content: i for i, token in added.items()}
        self.special_ids = {i for i, token in added.items() if token.special}

    def piece_id(self, text: str) -> int | None:
        return self.tk.token_to_id(text)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=False) if ids else ""


def load_vocab(folder: Path) -> SentencePieceVocab | TokenizersVocab:
    """`tokenizer.model` when the folder has one (its ids are the reference's), else `tokenizer.json`."""
    if (folder / "tokenizer.model").is_file():
        return SentencePieceVocab(folder / "tokenizer.model")
    if (folder / "tokenizer.json").is_file():
        return TokenizersVocab(folder / "tokenizer.json")
    raise FileNotFoundError(
        f"{folder}: no tokenizer.model (SentencePiece) or tokenizer.json (Hugging Face) in the checkpoint"
    )


class Tokenizer:
    """Ids are the vocabulary's own for plain text; special and added tokens are never split."""

    def __init__(self, folder: str | Path, default_chat_template: str | None = None):
        folder = Path(folder)
        self.vocab = load_vocab(folder)
        config = _read_json(folder / "tokenizer_config.json")
        special_map = {**config, **_read_json(folder / "special_tokens_map.json")}
        self.special_tokens = {k: _content(special_map[k]) for k in SPECIAL_KEYS if special_map.get(k)}
        self.added_token_ids = {**self.vocab.added_ids, **self._collect_added(folder, config)}
        extra = [_content(t) for t in special_map.get("additional_special_tokens") or []]
        special_texts = set(self.special_tokens.values()) | {t for t in extra if t}
        self.atomic_token_ids = {t: self._piece_id(t) for t in special_texts | set(self.added_token_ids)}
        self.atomic_token_ids = {t: i for t, i in self.atomic_token_ids.items() if i is not None}
        self.id_to_atomic = {i: t for t, i in self.atomic_token_ids.items()}
        self.special_ids = {self.atomic_token_ids[t] for t in special_texts if t in self.atomic_token_ids}
        self.special_ids |= self.vocab.special_ids
        ordered = sorted(self.atomic_token_ids, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(map(re.escape, ordered)) + ")") if ordered else None
        self.vocab_size = max([self.vocab.num_pieces, *[i + 1 for i in self.id_to_atomic]])
        self.chat_template = _chat_template(folder, config) or default_chat_template
        self._template_env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._template_env.globals["raise_exception"] = _raise_template_error

    def _collect_added(self, folder: Path, config: dict) -> dict[str, int]:
        added = {str(k): int(v) for k, v in _read_json(folder / "added_tokens.json").items()}
        for token_id, token in (config.get("added_tokens_decoder") or {}).items():
            added.setdefault(_content(token), int(token_id))
        return added

    def _piece_id(self, text: str) -> int | None:
        if text in self.added_token_ids:
            return self.added_token_ids[text]
        return self.vocab.piece_id(text)

    def token_id(self, key: str) -> int | None:
        """Id of a named special token, e.g. token_id("eos_token")."""
        text = self.special_tokens.get(key)
        return self.atomic_token_ids.get(text) if text else None

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id("eos_token")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for chunk in self._split_re.split(text) if self._split_re else [text]:
            if chunk in self.atomic_token_ids:
                ids.append(self.atomic_token_ids[chunk])
            elif chunk:
                ids.extend(self.vocab.encode(chunk))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        parts: list[str] = []
        run: list[int] = []
        num_pieces = self.vocab.num_pieces
        for token_id in ids:
            if skip_special_tokens and token_id in self.special_ids:
                continue
            if token_id in self.id_to_atomic:
                parts.append(self.vocab.decode(run))
                parts.append(self.id_to_atomic[token_id])
                run = []
            elif 0 <= token_id < num_pieces:
                run.append(token_id)
        parts.append(self.vocab.decode(run))
        return "".join(parts)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Renders `messages` with `chat_template` (the checkpoint's when None) in a jinja sandbox."""
        source = chat_template or self.chat_template
        if not source:
            raise ValueError("this tokenizer has no chat_template; pass a prompt instead of messages")
        template = self._template_env.from_string(source)
        variables = {**self.special_tokens, **template_kwargs}
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)

    def bad_words_ids(self, words: Iterable[str]) -> list[list[int]]:
        """Each word's token ids, at the start of a text and after a space (vLLM's two forms), once."""
        found: list[list[int]] = []
        for word in words:
            for text in (word, " " + word.lstrip()) if word.strip() else ():
                ids = self.encode(text)
                if ids and ids not in found:
                    found.append(ids)
        return found

    def decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens)


def _raise_template_error(message: str) -> None:
    raise TemplateError(message)


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas that never end inside a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def step(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        decode = lambda ids: self.tokenizer.decode(ids, self.skip_special_tokens)
        prefix_text = decode(self.token_ids[self.prefix_offset : self.read_offset])
        new_text = decode(self.token_ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # wait for the rest of a multi-byte character
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return new_text[len(prefix_text) :]


def _chat_template(folder: Path, config: dict) -> str | None:
    """The checkpoint's own template: chat_template.jinja (as transformers saves it now), else
    tokenizer_config.json's `chat_template` (a string, or a list of named templates: the default one)."""
    file = folder / "chat_template.jinja"
    if file.is_file():
        return file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        template = named.get("default")
    return template

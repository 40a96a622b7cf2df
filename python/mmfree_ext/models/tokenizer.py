"""Tokenizers for generation: the checkpoint's ``tokenizer.json`` (via the optional
``tokenizers`` package) or a byte-level tokenizer that needs no files."""

from __future__ import annotations

import os
from typing import Protocol

__all__ = ["ByteTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer"]


class Tokenizer(Protocol):
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus ``<bos>`` = 256 and ``<eos>`` = 257 (vocab 258)."""

    BOS = 256
    EOS = 257

    def __init__(self) -> None:
        self.vocab_size = 258
        self.bos_token_id: int | None = self.BOS
        self.eos_token_id: int | None = self.EOS

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.BOS, *ids] if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizer.json`` through the ``tokenizers`` package (the paper's Llama tokenizer)."""

    def __init__(self, path: str, bos_token_id: int | None, eos_token_id: int | None) -> None:
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError as exc:
            raise ImportError(
                f"{path} needs the 'tokenizers' package: pip install tokenizers (or mmfree-ext[models])"
            ) from exc
        self._tok = _Tok.from_file(path)
        self.vocab_size = self._tok.get_vocab_size()
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(
    model_dir: str | None, vocab_size: int, bos_token_id: int | None = None, eos_token_id: int | None = None
) -> ByteTokenizer | HFTokenizer:
    """The folder's ``tokenizer.json`` if present, else the byte tokenizer (if the model's vocab fits it)."""
    if model_dir is not None:
        path = os.path.join(model_dir, "tokenizer.json")
        if os.path.isfile(path):
            return HFTokenizer(path, bos_token_id, eos_token_id)
    if vocab_size >= ByteTokenizer().vocab_size and vocab_size <= 1024:
        return ByteTokenizer()
    raise FileNotFoundError(
        f"no tokenizer.json in {model_dir!r} and the model's vocab ({vocab_size}) is not byte-level; "
        "put the checkpoint's tokenizer.json in the folder (the 'tokenizers' package reads it)"
    )

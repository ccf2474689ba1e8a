"""A small word-level tokenizer with open_clip's calling convention.

Ids: ``0`` is padding, ``1`` is ``<unk>``, then the vocabulary words, then ``<start>`` and
``<end>``. The end token has the highest id on purpose: open_clip's text tower pools the
sequence at ``tokens.argmax(-1)``, which must land on the end token as with CLIP's BPE.

Example:
    >>> tok = WordTokenizer(["a", "red", "circle"])
    >>> tok("a red circle", context_length=6).tolist()
    [[5, 2, 3, 4, 6, 0]]
    >>> tok.decode(tok("A red, circle!")[0])
    'a red circle'
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch

PAD, UNK, START, END = "<pad>", "<unk>", "<start>", "<end>"
_WORD = re.compile(r"[a-z0-9]+")


def split_words(text: str) -> list[str]:
    """Lower-case alphanumeric words of ``text``; punctuation and hyphens separate words."""
    return _WORD.findall(text.lower())


class WordTokenizer:
    """Word-level tokenizer callable like ``open_clip.get_tokenizer(...)``.

    Args:
        words: the vocabulary (without special tokens); duplicates are dropped, order kept.
        context_length: default sequence length L, start and end tokens included.
    """

    def __init__(self, words: Iterable[str], context_length: int = 48) -> None:
        vocab = list(dict.fromkeys(w for w in words if w not in (PAD, UNK, START, END)))
        self.words: list[str] = vocab
        self.itos: list[str] = [PAD, UNK, *vocab, START, END]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        self.context_length = context_length
        self.pad_id, self.unk_id = 0, 1
        self.start_id, self.end_id = len(self.itos) - 2, len(self.itos) - 1

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the text tower's ``vocab_size``)."""
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        """Word ids of ``text`` without start/end tokens; unknown words map to ``<unk>``."""
        return [self.stoi.get(w, self.unk_id) for w in split_words(text)]

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        """Tokenize to a (N, L) int64 tensor: start, words, end, padding.

        Texts longer than L - 2 words are truncated; the end token is always kept.
        """
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        out = torch.zeros(len(texts), length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.start_id, *self.encode(text)[: length - 2], self.end_id]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Words of one token row, special tokens dropped (``<unk>`` kept)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        skip = {self.pad_id, self.start_id, self.end_id}
        return " ".join(self.itos[i] for i in ids if i not in skip)

    def unknown_words(self, texts: Iterable[str]) -> set[str]:
        """Words of ``texts`` outside the vocabulary."""
        return {w for t in texts for w in split_words(t) if w not in self.stoi}

    def to_dict(self) -> dict:
        return {"type": "word", "vocab": self.words, "context_length": self.context_length}

    @classmethod
    def from_dict(cls, data: dict) -> WordTokenizer:
        """Inverse of :meth:`to_dict`; accepts ``vocab`` inline or a ``vocab_file`` path."""
        if data.get("type", "word") != "word":
            raise ValueError(f"not a word tokenizer: type={data.get('type')!r}")
        return cls(data["vocab"], int(data.get("context_length", 48)))

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        """Read a tokenizer written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def tokenizer_from_card(spec: dict, base_dir: str | Path | None = None) -> WordTokenizer:
    """The tokenizer a model card describes: ``{"type": "word", "vocab": [...]}`` or with
    ``"vocab_file"`` (a JSON written by :meth:`WordTokenizer.save`, relative to ``base_dir``).

    Raises:
        ValueError: not a word tokenizer, or neither ``vocab`` nor ``vocab_file`` given.
    """
    if "vocab" in spec:
        return WordTokenizer.from_dict(spec)
    if "vocab_file" in spec:
        path = Path(base_dir or ".") / spec["vocab_file"]
        tok = WordTokenizer.load(path)
        if "context_length" in spec:
            tok.context_length = int(spec["context_length"])
        return tok
    raise ValueError("a word tokenizer spec needs 'vocab' or 'vocab_file'")

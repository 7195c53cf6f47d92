"""Text tokenizers for CLIP text towers: a CLIP BPE tokenizer read from a checkpoint folder and a
small word-level tokenizer for jaxcf's synthetic worlds.

Both share one interface (:class:`Tokenizer`): ``encode(text)`` gives the ids of the words alone,
``tok(texts, max_length)`` gives ``int32 [B, max_length]`` rows ``[SOS] words [EOS] [PAD]...``
(words truncated so EOS always fits, as CLIP's tokenizer does), and ``sos_id``/``eos_id``/``pad_id``.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Sequence

import numpy as np


class Tokenizer:
    """Shared padding/truncation on top of a subclass's ``encode``."""

    sos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without SOS/EOS."""
        raise NotImplementedError

    def __call__(self, texts: str | Sequence[str], max_length: int = 77) -> np.ndarray:
        """``texts`` -> ``int32 [B, max_length]``: ``[SOS] ids [EOS] [PAD]...``."""
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (SOS and EOS), got {max_length}")
        if isinstance(texts, str):
            texts = [texts]
        out = np.full((len(texts), max_length), self.pad_id, dtype=np.int32)
        for i, text in enumerate(texts):
            ids = [self.sos_id, *self.encode(text)[: max_length - 2], self.eos_id]
            out[i, : len(ids)] = ids
        return out


class WordTokenizer(Tokenizer):
    """Word-level tokenizer over a fixed vocabulary (lower-cased words and punctuation marks).

    Ids: PAD = 0, the words 1..N in the given order, SOS = N + 1, EOS = N + 2 (the largest id, so
    both CLIP rules for finding EOS, first ``== eos_id`` or ``argmax``, agree).
    """

    _SPLIT = re.compile(r"[^\W_]+|[^\w\s]|_")

    def __init__(self, vocab_words: Iterable[str]):
        words: list[str] = []
        for w in vocab_words:
            w = w.lower()
            if not self._SPLIT.fullmatch(w):
                raise ValueError(f"vocabulary entry {w!r} is not one word or one punctuation mark")
            if w not in words:
                words.append(w)
        if not words:
            raise ValueError("WordTokenizer needs at least one vocabulary word")
        self.words = tuple(words)
        self._ids = {w: i + 1 for i, w in enumerate(words)}
        self.pad_id = 0
        self.sos_id = len(words) + 1
        self.eos_id = len(words) + 2
        self.vocab_size = len(words) + 3

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "WordTokenizer":
        """A tokenizer whose vocabulary is every word and mark in ``texts``, in order of appearance."""
        return cls(w for t in texts for w in cls._SPLIT.findall(t.lower()))

    def encode(self, text: str) -> list[int]:
        ids = []
        for w in self._SPLIT.findall(text.lower()):
            if w not in self._ids:
                raise ValueError(
                    f"word {w!r} in {text!r} is not in the tokenizer's vocabulary of {len(self.words)} words"
                )
            ids.append(self._ids[w])
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Inverse of ``encode``/``__call__`` up to spacing: skips SOS/PAD, stops at EOS."""
        out = ""
        for i in map(int, ids):
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.sos_id):
                continue
            if not 0 < i <= len(self.words):
                raise ValueError(f"id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            w = self.words[i - 1]
            out += w if (not out or not w[0].isalnum()) else " " + w
        return out


class CLIPBPETokenizer(Tokenizer):
    """transformers' ``CLIPTokenizer`` (byte-level BPE) behind the :class:`Tokenizer` interface."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.sos_id = int(hf_tokenizer.bos_token_id)
        self.eos_id = int(hf_tokenizer.eos_token_id)
        pad = hf_tokenizer.pad_token_id
        self.pad_id = int(self.eos_id if pad is None else pad)
        self.vocab_size = len(hf_tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=False)["input_ids"])


def load_tokenizer(name_or_path: str | os.PathLike, subfolder: str | None = None) -> CLIPBPETokenizer:
    """The CLIP tokenizer in a folder or hub repo (``vocab.json`` + ``merges.txt``, or ``tokenizer.json``).

    A Stable Diffusion repo keeps it in ``tokenizer/``; that subfolder is used when the top has none.
    """
    from jaxcf.models.loading import CheckpointError, resolve_checkpoint_dir

    folder = resolve_checkpoint_dir(name_or_path, subfolder)

    def has_files(f):
        return (f / "tokenizer.json").is_file() or ((f / "vocab.json").is_file() and (f / "merges.txt").is_file())

    if not has_files(folder) and has_files(folder / "tokenizer"):
        folder = folder / "tokenizer"
    if not has_files(folder):
        raise CheckpointError(
            f"no CLIP tokenizer in {str(folder)!r}: expected tokenizer.json, or vocab.json and merges.txt"
        )
    from transformers import CLIPTokenizer

    return CLIPBPETokenizer(CLIPTokenizer.from_pretrained(str(folder)))

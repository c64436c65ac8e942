"""CLIP's byte-level BPE tokenizer: text -> token ids, as the OpenAI CLIP text encoders were trained.

The vocabulary (``bpe_simple_vocab_16e6.txt.gz``, see ``LICENSE-CLIP``) and every rule below —
cleaning, pre-tokenisation pattern, id layout — must match the original exactly: a single shifted
id silently changes every text embedding.
"""
from __future__ import annotations

import functools
import gzip
import html
import os
from pathlib import Path
from typing import Iterable

import ftfy
import regex
import torch

__all__ = ["SimpleTokenizer", "tokenize"]

DEFAULT_BPE_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's vocabulary is 49408 = 256 bytes + 256 end-of-word bytes + 48894 merges + 2 special tokens.
VOCAB_SIZE = 49408
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2

# CLIP's pre-tokenisation: the special tokens, English contractions, letter runs, single digits,
# and runs of anything else that is not whitespace.
# Case-insensitive like CLIP's, even on lower-cased text: it changes how a few combining marks
# (e.g. U+0345) are matched.
_PRE_TOKEN_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


def byte_to_unicode() -> dict[int, str]:
    """Map each byte to a printable unicode character, so BPE works on strings without whitespace or
    control characters. Printable Latin-1 bytes map to themselves; the remaining 68 bytes are assigned
    the code points 256, 257, ... in byte order. The dict's insertion order is the vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(extra)
            extra += 1
    return table


def clean_text(text: str) -> str:
    """Normalise text as CLIP's tokenizer does: repair mojibake, unescape HTML (twice, for
    double-escaped entities), collapse whitespace, lower-case."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


class SimpleTokenizer:
    """CLIP's tokenizer: ``encode`` turns text into token ids (without start/end tokens), ``decode``
    turns ids back into (cleaned, space-separated) text."""

    def __init__(self, bpe_path: str | os.PathLike[str] = DEFAULT_BPE_PATH, cache_size: int = 1 << 16) -> None:
        self.byte_encoder = byte_to_unicode()
        self.byte_decoder = {char: b for b, char in self.byte_encoder.items()}
        with gzip.open(bpe_path) as f:
            lines = f.read().decode("utf-8").split("\n")
        # Line 0 is a version header; CLIP uses only the first NUM_MERGES merges.
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
        if len(merges) != NUM_MERGES or any(len(pair) != 2 for pair in merges):
            raise ValueError(f"{bpe_path} is not CLIP's BPE merge list (expected {NUM_MERGES} pairs after a header line)")
        self.bpe_ranks: dict[tuple[str, str], int] = {pair: rank for rank, pair in enumerate(merges)}

        byte_chars = list(self.byte_encoder.values())
        vocab = [*byte_chars, *(c + END_OF_WORD for c in byte_chars), *("".join(pair) for pair in merges)]
        vocab += [START_OF_TEXT, END_OF_TEXT]
        self.encoder: dict[str, int] = {token: i for i, token in enumerate(vocab)}
        self.decoder: dict[int, str] = {i: token for token, i in self.encoder.items()}
        self.sot_token = self.encoder[START_OF_TEXT]
        self.eot_token = self.encoder[END_OF_TEXT]
        # Words repeat a lot (class names x 80 templates); BPE of one word is the expensive step.
        self._bpe_cached = functools.lru_cache(maxsize=cache_size)(self._bpe)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, word: str) -> tuple[str, ...]:
        """Split one pre-token (already mapped to byte characters) into vocabulary entries by applying
        the learned merges, lowest rank first, until none applies."""
        if word in (START_OF_TEXT, END_OF_TEXT):
            return (word,)
        parts = [*word[:-1], word[-1] + END_OF_WORD]
        while len(parts) > 1:
            pairs = set(zip(parts, parts[1:]))
            best = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def bpe(self, token: str) -> str:
        """OpenAI's public form of the merge step: the vocabulary entries of one pre-token, space-separated."""
        return " ".join(self._bpe_cached(token))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no start/end tokens, no padding)."""
        ids: list[int] = []
        for pre_token in _PRE_TOKEN_PATTERN.findall(clean_text(text)):
            word = "".join(self.byte_encoder[b] for b in pre_token.encode("utf-8"))
            ids.extend(self.encoder[part] for part in self._bpe_cached(word))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids: each word followed by a space; padding zeros are not removed (id 0 is "!")."""
        try:
            chars = "".join(self.decoder[int(i)] for i in ids)
        except KeyError as err:
            raise ValueError(f"token id {err.args[0]} is outside CLIP's vocabulary (0..{self.vocab_size - 1})") from None
        return bytearray(self.byte_decoder[c] for c in chars).decode("utf-8", errors="replace").replace(END_OF_WORD, " ")


@functools.lru_cache(maxsize=1)
def _default_tokenizer() -> SimpleTokenizer:
    """The shared tokenizer, built on first use: loading the merges takes about a second."""
    return SimpleTokenizer()


class TextTooLongError(ValueError, RuntimeError):
    """A text longer than the context length: a ``ValueError``, and the ``RuntimeError`` that OpenAI's
    ``clip.tokenize`` raises, so that ``except`` clauses written for either keep working."""


def tokenize(texts: str | list[str], context_length: int = 77, truncate: bool = False) -> torch.Tensor:
    """Token ids for CLIP's text encoder: ``[start] + tokens + [end]``, zero-padded to ``context_length``.

    Returns a LongTensor of shape ``[len(texts), context_length]`` (one row for a single string).
    A text that does not fit raises :class:`TextTooLongError` unless ``truncate=True``, which cuts it and keeps the
    end token last (the text encoder pools its features at the end token).
    """
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 (start and end token), got {context_length}")
    if isinstance(texts, str):
        texts = [texts]
    tokenizer = _default_tokenizer()
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [tokenizer.sot_token, *tokenizer.encode(text), tokenizer.eot_token]
        if len(ids) > context_length:
            if not truncate:
                shown = text if len(text) <= 60 else text[:57] + "..."
                raise TextTooLongError(
                    f"text {shown!r} is {len(ids)} tokens long (with start/end tokens), more than the context "
                    f"length {context_length}; shorten it or pass truncate=True"
                )
            ids = ids[:context_length]
            ids[-1] = tokenizer.eot_token
        result[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return result

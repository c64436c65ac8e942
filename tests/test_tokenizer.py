"""Our CLIP tokenizer against open_clip's (an independent implementation over the same BPE data).

A mismatch in one id changes the text embedding of every prompt containing that word, so parity is
checked on every class name we ship, not only on a few sentences.
"""
from __future__ import annotations

import open_clip.tokenizer as oracle
import pytest
import torch

from clip.tokenizer import SimpleTokenizer, tokenize
from clip.zeroshot import TEXT_SETS

# open_clip names CLIP's two special tokens differently; the ids are the same.
ORACLE_SPECIAL = {"<|startoftext|>": "<start_of_text>", "<|endoftext|>": "<end_of_text>"}

VARIED_TEXTS = [
    "a photo of a cat.",
    "A PHOTO OF A DOG!",
    "Café crème brûlée, jalapeño, naïve façade",
    "Straße in München; Ærø; Łódź; İstanbul",
    "東京タワーの写真",
    "一只猫的照片",
    "고양이 사진",
    "фотография собаки",
    "صورة قطة",
    "Tom &amp; Jerry",
    "i &lt;3 clip",
    "double &amp;lt;escaped&amp;gt;",
    "<b>markup stops ftfy's own unescaping</b> &amp;lt;3 &amp;amp;",
    "&quot;quoted&quot; &#39;text&#39; &#x263A;",
    "emoji 😀🐶🐈‍⬛ 👍🏽 and flags 🇫🇷",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp and\u2003em space",
    "multiple     inner      spaces",
    "",
    "   ",
    "3.14159 is pi, 2+2=4, 1e-9, 1,000,000 and 007",
    "version v1.2.3-rc4 (build #5678) @ 12:30pm",
    "it's we're they've I'm you'll he'd don't",
    "IT'S WE'RE THEY'VE",
    "hello!!! ??? ... --- ___ ***",
    "C++ / C# / F# & .NET",
    "https://example.com/path?query=1&x=y#frag",
    "user@example.com",
    "mixedCASEwordsAndCamelCase",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "ﬁ ligature and ｆｕｌｌｗｉｄｔｈ letters",
    "â€œmojibakeâ€\x9d fixed by ftfy",
    "control\x00chars\x07here",
    "zero\u200bwidth\u200djoiner",
    "greek \u1fb3 and a lone combining ypogegrammeni x\u0345y",
    "combining e\u0301 vs precomposed é",
    "½ ¾ ² ³ ⅛ Ⅻ",
    "math ∑ ∫ √ ∞ ≠ ≤",
    "<html><b>bold</b></html>",
    "under_score and hyphen-ated and slash/ed",
    "'quoted' \"double\" `back`",
    "a" * 40,
    "aaaa bbbb cccc dddd eeee ffff gggg",
]


def _clip_texts() -> list[str]:
    """Every shipped class name in two of the prompt forms the text banks use."""
    return [template.format(name) for names in TEXT_SETS.values() for name in names
            for template in ("a photo of a {}.", "a bad photo of the {}.")]


@pytest.fixture(scope="module")
def ours() -> SimpleTokenizer:
    return SimpleTokenizer()


@pytest.fixture(scope="module")
def theirs() -> oracle.SimpleTokenizer:
    return oracle.SimpleTokenizer()


def test_vocabulary_matches_oracle(ours: SimpleTokenizer, theirs: oracle.SimpleTokenizer) -> None:
    expected = {ORACLE_SPECIAL.get(token, token): i for token, i in theirs.encoder.items()}
    remapped = {ORACLE_SPECIAL.get(token, token): i for token, i in ours.encoder.items()}
    assert ours.vocab_size == 49408
    assert remapped == expected
    assert (ours.sot_token, ours.eot_token) == (theirs.sot_token_id, theirs.eot_token_id)


@pytest.mark.parametrize("texts", [VARIED_TEXTS, _clip_texts()], ids=["varied", "class-names"])
def test_encode_matches_oracle(ours: SimpleTokenizer, theirs: oracle.SimpleTokenizer, texts: list[str]) -> None:
    mismatches = [text for text in texts if ours.encode(text) != theirs.encode(text)]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} texts differ, e.g. {mismatches[:5]}"


def test_tokenize_matches_oracle() -> None:
    texts = VARIED_TEXTS + _clip_texts()[::7]
    ours = tokenize(texts)
    assert ours.dtype == torch.long and ours.shape == (len(texts), 77)
    assert torch.equal(ours, oracle.tokenize(texts))


def test_tokenize_single_string_is_one_padded_row(ours: SimpleTokenizer) -> None:
    ids = tokenize("a photo of a cat.")
    body = ours.encode("a photo of a cat.")
    assert ids.shape == (1, 77)
    assert ids[0, : len(body) + 2].tolist() == [ours.sot_token, *body, ours.eot_token]
    assert not ids[0, len(body) + 2 :].any()


@pytest.mark.parametrize("context_length", [77, 16])
def test_truncate_keeps_end_token_like_oracle(context_length: int) -> None:
    long_texts = [" ".join(VARIED_TEXTS) * 3, "word " * 500, "a photo of a cat."]
    ours = tokenize(long_texts, context_length=context_length, truncate=True)
    assert torch.equal(ours, oracle.tokenize(long_texts, context_length=context_length))
    assert (ours[:2, -1] == 49407).all()


def test_too_long_text_raises_with_counts(ours: SimpleTokenizer) -> None:
    text = "a photo of a very long caption " * 20
    n_tokens = len(ours.encode(text)) + 2
    with pytest.raises(ValueError) as excinfo:
        tokenize(["short", text])
    assert isinstance(excinfo.value, RuntimeError)  # what OpenAI's clip.tokenize raises: old except clauses work
    message = str(excinfo.value)
    assert f"{n_tokens} tokens" in message and "77" in message and "truncate=True" in message
    assert "a photo of a very long caption" in message and len(message) < 300


def test_context_length_boundary() -> None:
    assert tokenize("a " * 75)[0, -1] == 49407  # 75 one-token words + start + end = 77: fits exactly
    with pytest.raises(ValueError):
        tokenize("a " * 76)
    with pytest.raises(ValueError, match="context_length"):
        tokenize("a", context_length=1)


def test_special_tokens_in_text_match_oracle(ours: SimpleTokenizer, theirs: oracle.SimpleTokenizer) -> None:
    text = "a <|startoftext|> b <|endoftext|> c"
    oracle_text = text
    for name, oracle_name in ORACLE_SPECIAL.items():
        oracle_text = oracle_text.replace(name, oracle_name)
    assert ours.encode(text) == theirs.encode(oracle_text)


def test_cleaning_invariances(ours: SimpleTokenizer) -> None:
    assert ours.encode("Tom &amp; Jerry") == ours.encode("tom & jerry")
    assert ours.encode("i &amp;lt;3 clip") == ours.encode("i <3 clip")
    assert ours.encode("  A\t\tPHOTO\n of   a CAT ") == ours.encode("a photo of a cat")


@pytest.mark.parametrize("text", ["a photo of a cat", "the quick brown fox jumps over the lazy dog",
                                  "supercalifragilisticexpialidocious", "great white shark"])
def test_decode_round_trip_on_clean_ascii(ours: SimpleTokenizer, text: str) -> None:
    assert ours.decode(ours.encode(text)) == text + " "


def test_decode_matches_oracle(ours: SimpleTokenizer, theirs: oracle.SimpleTokenizer) -> None:
    for text in VARIED_TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids) == theirs.decode(ids), text
    assert ours.decode(torch.tensor(ours.encode("a cat"))) == "a cat "


def test_decode_rejects_unknown_id(ours: SimpleTokenizer) -> None:
    with pytest.raises(ValueError, match="49408"):
        ours.decode([320, 49408])

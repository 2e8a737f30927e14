"""Documents of text and images <-> ids, SFT layout, and the streaming detokenizer."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.tokenizers.mixed_tokenizer import ImageSegment, MixedModalTokenizer
from model.tokenizers.text_tokenizer import iter_texts, train_text_tokenizer
from schemas.vocab import TINY
from tests.conftest import REPO

TEXT_TOKENIZER = train_text_tokenizer(iter_texts([REPO / "sample/text/docs.jsonl"]), TINY)
TOK = MixedModalTokenizer(TEXT_TOKENIZER)
V = TOK.vocab


def codes(seed: int) -> ImageSegment:
    return ImageSegment(np.random.default_rng(seed).integers(0, TINY.image_codes, TINY.tokens_per_image))


# Up to 5 segments: any text, or an image of random codes.
DOCUMENTS = st.lists(st.one_of(st.text(min_size=1), st.integers(0, 10_000).map(codes)), max_size=5)


def test_document_layout() -> None:
    image = codes(0)
    ids = TOK.encode(["A cat:", image, "done."])
    cat, done = TEXT_TOKENIZER.encode("A cat:"), TEXT_TOKENIZER.encode("done.")
    expected = [V.bos_id, *cat, V.boi_id, *(image.codes + 4), V.eoi_id, *done, V.eos_id]
    assert ids.tolist() == expected
    assert ids.dtype == np.int32
    assert TOK.decode(ids) == ["A cat:", image, "done."]


def test_sft_layout_masks_the_prompt() -> None:
    ids, n_prompt = TOK.encode_sft(["What is this?", codes(1)], ["A dog."])
    assert ids[0] == V.bos_id and ids[n_prompt - 1] == V.sep_id and ids[-1] == V.eos_id
    assert TOK.decode(ids[n_prompt:]) == ["A dog."]
    assert n_prompt == 1 + len(TEXT_TOKENIZER.encode("What is this?")) + TINY.image_block_len + 1


def test_streaming_emits_text_early_and_images_at_eoi() -> None:
    image = codes(2)
    ids = TOK.encode(["Here is a photo: ", image, "Nice, 日本!"])
    stream = TOK.stream()
    out: list = []
    eoi_at = int(np.flatnonzero(ids == V.eoi_id)[0])
    for n, token_id in enumerate(ids.tolist()):
        emitted = stream.push(token_id)
        assert not any(isinstance(s, str) and "\ufffd" in s for s in emitted)  # never half a character
        if any(isinstance(s, ImageSegment) for s in emitted):
            assert n == eoi_at  # the image arrives with its EOI, not later
        out += emitted
        if n == eoi_at - TINY.image_block_len:  # just before BOI: all the leading text is already out
            assert "".join(s for s in out if isinstance(s, str)) == "Here is a photo: "
    out += stream.finish()
    assert "".join(s for s in out if isinstance(s, str)) == "Here is a photo: Nice, 日本!"
    assert [s for s in out if isinstance(s, ImageSegment)] == [image]


@settings(max_examples=60, deadline=None)
@given(DOCUMENTS)
def test_decode_inverts_encode(segments: list) -> None:
    decoded = TOK.decode(TOK.encode(segments))
    merged: list = []
    for seg in segments:  # adjacent text segments come back as one
        if isinstance(seg, str) and merged and isinstance(merged[-1], str):
            merged[-1] += seg
        else:
            merged.append(seg)
    assert decoded == merged


@settings(max_examples=60, deadline=None)
@given(DOCUMENTS)
def test_streaming_gives_what_decode_gives(segments: list) -> None:
    ids = TOK.encode(segments)
    stream = TOK.stream(decode_images=False)
    out: list = []
    source_has_fffd = any(isinstance(s, str) and "\ufffd" in s for s in segments)
    for token_id in ids.tolist():
        emitted = stream.push(token_id)
        # Never half a character: U+FFFD only where the text itself has one.
        assert source_has_fffd or not any(isinstance(s, str) and "\ufffd" in s for s in emitted)
        out += emitted
    out += stream.finish()
    merged: list = []
    for seg in out:  # text may come out in several pieces; images are whole
        if isinstance(seg, str) and merged and isinstance(merged[-1], str):
            merged[-1] += seg
        else:
            merged.append(seg)
    assert merged == TOK.decode(ids)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([V.boi_id, *range(4, 4 + 10), V.eoi_id], "an image has 64 codes, got 10"),
        ([V.eoi_id], r"id \d+ \(EOI\) outside an image"),
        ([5], r"id 5 \(IMAGE\) outside an image"),
        ([V.boi_id, 4, 2000], r"id 2000 \(TEXT\) inside an image"),
        ([V.boi_id, *([4] * 65)], "more than 64 codes in one image"),
        ([V.boi_id, 4, 4], "the ids end inside an image after 2 codes"),
    ],
)
def test_malformed_sequences_fail_with_the_position(ids: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TOK.decode(ids)


def test_images_need_an_image_tokenizer() -> None:
    with pytest.raises(ValueError, match="no image tokenizer"):
        TOK.encode(["text", np.zeros((64, 64, 3), np.uint8)])

"""Records to tokenizer segments; caption-first is deterministic at the configured ratio."""

from pathlib import Path

from pipelines.documents import caption_first, document_segments, sft_segments

REF = {"bytes": b"\xff\xd8", "path": None, "url": None}


def test_caption_first_ratio_and_determinism() -> None:
    ids = [f"shard/{i:06d}" for i in range(4000)]
    share = sum(caption_first(i, 0.5) for i in ids) / len(ids)
    assert 0.47 < share < 0.53
    assert sum(caption_first(i, 0.2) for i in ids) / len(ids) < 0.23
    assert [caption_first(i, 0.5) for i in ids[:50]] == [caption_first(i, 0.5) for i in ids[:50]]
    assert not any(caption_first(i, 0.0) for i in ids) and all(caption_first(i, 1.0) for i in ids)


def test_segments_of_each_kind() -> None:
    assert document_segments("text", {"text": "hi"}) == ["hi"]
    assert document_segments("image_text", {"id": "a", "text": "cap", "image": REF}, 1.0) == ["cap", b"\xff\xd8"]
    assert document_segments("image_text", {"id": "a", "text": "cap", "image": REF}, 0.0) == [b"\xff\xd8", "cap"]
    doc = {"texts": ["a", None, "b"], "images": [None, {"bytes": None, "path": "/x.jpg", "url": None}, None]}
    assert document_segments("interleaved", doc) == ["a", Path("/x.jpg"), "b"]
    pair = {
        "prompt": [{"text": "q", "image": None}, {"text": None, "image": REF}],
        "answer": [{"text": "a", "image": None}],
    }
    assert sft_segments(pair) == (["q", b"\xff\xd8"], ["a"])


def test_consecutive_texts_are_joined_with_the_separator() -> None:
    record = {
        "texts": ["One sentence.", "Another one.", None, "After.", " Spaced.", "", "Last.\n", "Line."],
        "images": [None, None, REF, None, None, None, None, None],
    }
    assert document_segments("interleaved", record, text_separator=" ") == [
        "One sentence. Another one.",
        REF["bytes"],
        "After. Spaced. Last.\nLine.",
    ]  # whitespace already there is kept, not doubled; an empty text adds no gap
    assert document_segments("interleaved", record)[0] == "One sentence.\n\nAnother one."  # paragraphs by default
    images_only = {"texts": [None, None], "images": [REF, REF]}
    assert document_segments("interleaved", images_only) == [REF["bytes"], REF["bytes"]]
    blank = {"texts": ["", " "], "images": [None, None]}
    assert document_segments("interleaved", blank) == [""]  # left for cleanup to reject as empty_text

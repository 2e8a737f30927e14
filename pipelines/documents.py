"""Canonical raw records -> the segments the mixed-modal tokenizer encodes (text strings and image sources)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

ImageRef = dict[str, Any]

# What a reader puts between consecutive texts of an interleaved document: MMC4's `text_list` holds the sentences
# of one document (a space), OBELICS's `texts` hold blocks of a web page, paragraphs (a blank line).
SENTENCE_SEPARATOR = " "
PARAGRAPH_SEPARATOR = "\n\n"
TEXT_SEPARATOR_BY_FORMAT = {"jsonl": SENTENCE_SEPARATOR, "parquet": PARAGRAPH_SEPARATOR}


def image_source(ref: ImageRef) -> bytes | Path:
    """What the image tokenizer reads for an image reference: its bytes, or its local path (a Path, never a str,
    so it is not mistaken for a text segment)."""
    return ref["bytes"] if ref.get("bytes") is not None else Path(ref["path"])


def caption_first(record_id: str, ratio: float) -> bool:
    """Deterministic from the record id: True for about `ratio` of image-text pairs."""
    digest = hashlib.sha256(record_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < ratio


def join_texts(pieces: list[str], separator: str) -> str:
    """Consecutive texts as one: `separator` between two pieces unless whitespace already parts them; blank pieces
    are left out (an empty MMC4 sentence adds no gap). All blank: the first piece, for cleanup to reject."""
    out = ""
    for piece in pieces:
        if not piece.strip():
            continue
        if out and not (out[-1].isspace() or piece[0].isspace()):
            out += separator
        out += piece
    return out if out else pieces[0]


def interleaved_segments(texts: list[str | None], images: list[Any], separator: str) -> list[Any]:
    """Parallel texts / images -> segments, each run of consecutive texts joined into one text; images stand
    between texts as they are (the image block parts them)."""
    segments: list[Any] = []
    run: list[str] = []
    for text, image in zip(texts, images, strict=True):
        if text is not None:
            run.append(text)
            continue
        if run:
            segments.append(join_texts(run, separator))
            run = []
        segments.append(image_source(image))
    if run:
        segments.append(join_texts(run, separator))
    return segments


def document_segments(
    kind: str, record: dict[str, Any], caption_first_ratio: float = 0.5, text_separator: str = PARAGRAPH_SEPARATOR
) -> list[Any]:
    """Segments of a text, image-text or interleaved record, in reading order; consecutive texts of an interleaved
    record are joined with `text_separator`, so they decode as a reader would write them."""
    if kind == "text":
        return [record["text"]]
    if kind == "image_text":
        image = image_source(record["image"])
        # Both orders, so the model learns captioning (image first) and generation (caption first).
        return [record["text"], image] if caption_first(record["id"], caption_first_ratio) else [image, record["text"]]
    if kind == "interleaved":
        return interleaved_segments(record["texts"], record["images"], text_separator)
    raise ValueError(f"{kind!r} records are not documents; SFT records go through sft_segments")


def sft_segments(record: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """(prompt, answer) segments of an SFT record."""

    def side(segments: list[dict[str, Any]]) -> list[Any]:
        return [s["text"] if s["text"] is not None else image_source(s["image"]) for s in segments]

    return side(record["prompt"]), side(record["answer"])

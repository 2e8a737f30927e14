"""Canonical raw records -> the segments the mixed-modal tokenizer encodes (text strings and image sources)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

ImageRef = dict[str, Any]


def image_source(ref: ImageRef) -> bytes | Path:
    """What the image tokenizer reads for an image reference: its bytes, or its local path (a Path, never a str,
    so it is not mistaken for a text segment)."""
    return ref["bytes"] if ref.get("bytes") is not None else Path(ref["path"])


def caption_first(record_id: str, ratio: float) -> bool:
    """Deterministic from the record id: True for about `ratio` of image-text pairs."""
    digest = hashlib.sha256(record_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < ratio


def document_segments(kind: str, record: dict[str, Any], caption_first_ratio: float = 0.5) -> list[Any]:
    """Segments of a text, image-text or interleaved record, in reading order."""
    if kind == "text":
        return [record["text"]]
    if kind == "image_text":
        image = image_source(record["image"])
        # Both orders, so the model learns captioning (image first) and generation (caption first).
        return [record["text"], image] if caption_first(record["id"], caption_first_ratio) else [image, record["text"]]
    if kind == "interleaved":
        return [t if t is not None else image_source(i) for t, i in zip(record["texts"], record["images"], strict=True)]
    raise ValueError(f"{kind!r} records are not documents; SFT records go through sft_segments")


def sft_segments(record: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """(prompt, answer) segments of an SFT record."""

    def side(segments: list[dict[str, Any]]) -> list[Any]:
        return [s["text"] if s["text"] is not None else image_source(s["image"]) for s in segments]

    return side(record["prompt"]), side(record["answer"])

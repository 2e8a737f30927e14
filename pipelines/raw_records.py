"""User rows -> canonical raw records (the Arrow schemas of schemas/records.py), or a RecordError with a reason.

One function per record kind and layout. They take a plain dict (a parsed jsonl line, a parquet row or a
WebDataset sample), so every reader shares them and they are tested without Beam.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.prepare_config import DEFAULT_MAX_RECORD_BYTES
from schemas.records import REJECT_REASONS, SFT_CATEGORIES


class RecordError(ValueError):
    """A record that cannot be used; `reason` is a code of REJECT_REASONS, `detail` says what was wrong."""

    def __init__(self, reason: str, detail: str):
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Reject:
    """One record (or whole file) that did not make it, and why; a row of the REJECT schema."""

    source: str
    record_id: str
    stage: str
    reason: str
    detail: str

    def as_row(self) -> dict[str, str]:
        return {
            "source": self.source,
            "record_id": self.record_id,
            "stage": self.stage,
            "reason": self.reason,
            "detail": self.detail[:1000],
        }


def _field(row: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    if name not in row or row[name] is None:
        raise RecordError("bad_record", f"missing field {name!r} ({what}); fields present: {sorted(row)[:12]}")
    value = row[name]
    if not isinstance(value, kind):
        raise RecordError("bad_record", f"field {name!r} should be {what}, got {type(value).__name__}")
    return value


def image_ref(value: Any, base_dir: Path | str | None) -> dict[str, Any]:
    """Any way users give an image -> {bytes, path, url}: raw bytes, a HF-datasets struct, a local path or a URL."""
    if isinstance(value, bytes | bytearray | memoryview):
        return {"bytes": bytes(value), "path": None, "url": None}
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return {"bytes": bytes(value["bytes"]), "path": None, "url": value.get("url")}
        if value.get("path"):
            return image_ref(str(value["path"]), base_dir)
        if value.get("url"):
            return image_ref(str(value["url"]), base_dir)
        raise RecordError("image_missing", f"image entry has no bytes, path or url: keys {sorted(value)}")
    if isinstance(value, str) and value:
        scheme = value.split("://", 1)[0].lower() if "://" in value else ""
        if scheme in ("http", "https"):  # fetched by the download stage (pipelines/image_download.py), or rejected
            return {"bytes": None, "path": None, "url": value}
        if scheme and scheme != "file":
            raise RecordError("image_not_local", f"image given only as a {scheme}:// URL: {value[:200]}")
        path = Path(value.removeprefix("file://"))
        if isinstance(base_dir, str) and not path.is_absolute():  # beside an input on a store: read there, now
            return store_image(f"{base_dir.rstrip('/')}/{value.removeprefix('file://')}")
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return {"bytes": None, "path": str(path), "url": None}
    raise RecordError("image_missing", f"no image in a {type(value).__name__} value")


def store_image(url: str, max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> dict[str, Any]:
    """The image object at a store URL as an image reference holding its bytes (read by the worker that reads the
    record; at most `max_bytes`, checked before the rest is fetched)."""
    from model.files import storage

    try:
        data = storage.read_head(url, max_bytes)
    except FileNotFoundError:
        raise RecordError("image_missing", f"no image file at {url}") from None
    except OSError as err:
        raise RecordError("image_missing", f"cannot read {url}: {err}"[:500]) from None
    if len(data) > max_bytes:
        raise RecordError("record_too_large", f"{url}: more than {max_bytes:,} bytes (max_record_bytes)")
    return {"bytes": data, "path": None, "url": None}


def text_record(row: dict[str, Any], record_id: str, options: dict[str, Any]) -> dict[str, Any]:
    """A text document; `options.text_field` names its field (default `text`)."""
    text = _field(row, options.get("text_field", "text"), str, "a string")
    return {"id": record_id, "text": text, "source": None}


def image_text_record(
    row: dict[str, Any], record_id: str, options: dict[str, Any], base_dir: Path | str | None
) -> dict:
    """An image and its caption: img2dataset samples (jpg/png/webp + txt/json) or image-text parquet rows."""
    caption = None
    for name in (options.get("text_field"), "txt", "caption", "text"):
        if name and row.get(name) is not None:
            caption = row[name]
            break
    if caption is None and isinstance(row.get("json"), dict):
        caption = row["json"].get("caption")
    if isinstance(caption, bytes):
        caption = _utf8(caption, "caption")
    if not isinstance(caption, str):
        raise RecordError("bad_record", "no caption (looked for txt, caption, text)")
    image = None
    for name in (options.get("image_field"), "jpg", "jpeg", "png", "webp", "image", "image_path", "url"):
        if name and row.get(name) is not None:
            image = row[name]
            break
    if image is None:
        raise RecordError("image_missing", "no image (looked for jpg, jpeg, png, webp, image, image_path, url)")
    return {"id": record_id, "text": caption, "image": image_ref(image, base_dir), "width": None, "height": None}


def obelics_record(row: dict[str, Any], record_id: str, base_dir: Path | str | None) -> dict[str, Any]:
    """An OBELICS-style document: parallel `texts` / `images`, exactly one set at each position."""
    texts = _field(row, "texts", list, "a list of strings or nulls")
    images = _field(row, "images", list, "a list of images or nulls")
    if len(texts) != len(images):
        raise RecordError("bad_record", f"texts has {len(texts)} entries but images has {len(images)}")
    out_texts, out_images = [], []
    for n, (text, image) in enumerate(zip(texts, images, strict=True)):
        if (text is None) == (image is None):
            raise RecordError("bad_record", f"position {n}: exactly one of texts/images must be set")
        if text is not None and not isinstance(text, str):
            raise RecordError("bad_record", f"position {n}: text should be a string, got {type(text).__name__}")
        out_texts.append(text)
        out_images.append(None if image is None else image_ref(image, base_dir))
    if not out_texts:
        raise RecordError("empty_text", "the document has no entries")
    meta = row.get("metadata")
    return {
        "id": record_id,
        "texts": out_texts,
        "images": out_images,
        "metadata": meta if isinstance(meta, str) or meta is None else json.dumps(meta),
    }


def mmc4_record(row: dict[str, Any], record_id: str, options: dict[str, Any], base_dir: Path | str | None) -> dict:
    """An MMC4-style document: `text_list` sentences and `image_info` placed before their matched sentence."""
    sentences = _field(row, "text_list", list, "a list of sentences")
    infos = _field(row, "image_info", list, "a list of image entries")
    images_dir: Path | str | None = base_dir
    if options.get("images_dir"):  # a folder on a store stays a URL (Path would fold its `//`)
        given = str(options["images_dir"])
        images_dir = given if "://" in given and not given.startswith("file://") else Path(given)
    before: dict[int, list[dict[str, Any]]] = {}
    for info in infos:
        if not isinstance(info, dict) or not isinstance(info.get("matched_text_index"), int):
            raise RecordError("bad_record", "image_info entries need an integer matched_text_index")
        ref = None
        if info.get("image_name"):
            try:
                ref = image_ref(info["image_name"], images_dir)
            except RecordError:
                if not info.get("raw_url"):
                    raise  # else fetched from its URL below
        if info.get("raw_url") and (ref is None or (ref["path"] is not None and not Path(ref["path"]).is_file())):
            ref = image_ref(info["raw_url"], images_dir)  # MMC4 as published: not downloaded beside it, fetch it
        before.setdefault(info["matched_text_index"], []).append(ref or image_ref(None, images_dir))
    texts, images = [], []
    for n, sentence in enumerate(sentences):
        for ref in before.pop(n, []):
            texts.append(None)
            images.append(ref)
        if not isinstance(sentence, str):
            raise RecordError("bad_record", f"sentence {n} should be a string, got {type(sentence).__name__}")
        texts.append(sentence)
        images.append(None)
    if before:
        raise RecordError("bad_record", f"images matched to sentences that do not exist: {sorted(before)}")
    return {"id": record_id, "texts": texts, "images": images, "metadata": None}


def _segments(value: Any, side: str, base_dir: Path | str | None) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"text": value, "image": None}]
    if not isinstance(value, list) or not value:
        raise RecordError("bad_record", f"{side} should be a string or a non-empty list of segments")
    out = []
    for n, seg in enumerate(value):
        if isinstance(seg, str):
            seg = {"text": seg}
        if not isinstance(seg, dict) or (seg.get("text") is None) == (seg.get("image") is None):
            raise RecordError("bad_record", f"{side}[{n}] must set exactly one of text / image")
        if seg.get("text") is not None:
            if not isinstance(seg["text"], str):
                raise RecordError("bad_record", f"{side}[{n}].text should be a string")
            out.append({"text": seg["text"], "image": None})
        else:
            out.append({"text": None, "image": image_ref(seg["image"], base_dir)})
    return out


def sft_record(row: dict[str, Any], record_id: str, base_dir: Path | str | None) -> dict[str, Any]:
    """A prompt/answer pair; image paths are relative to the file; the category defaults to `text`."""
    category = row.get("category") or "text"
    if category not in SFT_CATEGORIES:
        raise RecordError("bad_record", f"unknown category {category!r}; allowed: {', '.join(SFT_CATEGORIES)}")
    prompt = _segments(row.get("prompt"), "prompt", base_dir)
    answer = _segments(row.get("answer"), "answer", base_dir)
    return {"id": record_id, "category": category, "prompt": prompt, "answer": answer}


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecordError("invalid_utf8", f"{what}: {err.reason} at byte {err.start}") from None

"""One record through the prepare job, without Beam: clean its text, normalize its images, count faces and
compute its curation attributes (`prepare_record`), then, once the VQ codes of its images are known, tokenize it
(`assemble_sample`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from model.tokenizers.image_preprocess import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, ImageError, preprocess
from model.tokenizers.mixed_tokenizer import ImageSegment, MixedModalTokenizer
from pipelines.documents import PARAGRAPH_SEPARATOR, document_segments, sft_segments
from pipelines.face_detection import DEFAULT_MAX_SIDE, FaceDetector
from pipelines.raw_records import RecordError, Reject
from pipelines.sample_attributes import sample_attributes
from pipelines.shard_writer import TokenizedSample
from pipelines.text_cleanup import DEFAULT_MAX_CHARS, DEFAULT_MIN_CHARS, clean_text
from schemas.prepare_config import PrepareConfig

JPEG_QUALITY = 90
FACE_SIDE = DEFAULT_MAX_SIDE


def _job_default(name: str) -> Any:
    """PrepareConfig's default for a field, so a setting's default is stated once, in the config."""
    return PrepareConfig.model_fields[name].default


@dataclass(frozen=True)
class PrepareSettings:
    """What the per-record work needs: fields named as PrepareConfig's shard settings or a source's options, filled
    from them by prepare_job.settings_for (tests/pipelines/test_prepare_settings.py holds every field to that)."""

    image_size: int = _job_default("image_size")
    detect_faces: bool = _job_default("detect_faces")
    fast_image_decode: bool = _job_default("fast_image_decode")
    write_images: bool = _job_default("write_images")
    caption_first_ratio: float = _job_default("caption_first_ratio")
    # Source options: None in a config means these defaults of the steps that apply them.
    min_chars: int = DEFAULT_MIN_CHARS
    max_chars: int = DEFAULT_MAX_CHARS
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE
    max_tokens: int | None = None
    text_separator: str | None = None  # interleaved sources: between consecutive texts (documents.py)


@dataclass
class PreparedRecord:
    """A record ready for tokenization: cleaned text segments and image slots (ints) pointing into `images`."""

    source: str
    kind: str
    task: int
    index: int  # position within its read task: with the task, a stable sample key
    record_id: str
    prompt: list[str | int]  # the whole document, or the SFT prompt
    answer: list[str | int] | None
    images: list[np.ndarray] = field(default_factory=list)  # uint8 size x size x 3, dropped before the join
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    n_faces: int = 0
    jpgs: list[bytes] = field(default_factory=list)
    category: str | None = None  # SFT records: text, code, image_generation, visual_chat, interleaved, safety
    attributes: dict[str, Any] = field(default_factory=dict)  # curation attributes (pipelines/sample_attributes.py)

    @property
    def key(self) -> str:
        return f"{self.source}_{self.task:05d}_{self.index:06d}"

    def without_pixels(self) -> PreparedRecord:
        return replace(self, images=[])


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _face_view(source: Any, pixels: np.ndarray, mode: str, settings: PrepareSettings) -> np.ndarray:
    """The image faces are counted on: what the model sees, at FACE_SIDE px (a tiny tokenizer's 64 px is too small)."""
    if settings.image_size >= FACE_SIDE:
        return pixels  # the detector itself scales it down to FACE_SIDE
    return preprocess(
        source,
        size=FACE_SIDE,
        mode=mode,
        max_pixels=settings.max_pixels,
        min_side=settings.min_side,
        fast=settings.fast_image_decode,
    ).pixels


def prepare_record(
    source: str,
    kind: str,
    task: int,
    index: int,
    record: dict[str, Any],
    settings: PrepareSettings,
    detector: FaceDetector | None = None,
) -> PreparedRecord | Reject:
    """Clean, normalize and detect faces in one canonical record; a Reject with the stage and reason if it fails."""
    if kind == "sft":
        prompt_raw, answer_raw = sft_segments(record)
    else:
        separator = settings.text_separator if settings.text_separator is not None else PARAGRAPH_SEPARATOR
        prompt_raw, answer_raw = document_segments(kind, record, settings.caption_first_ratio, separator), None
    out = PreparedRecord(source, kind, task, index, record["id"], [], None, category=record.get("category"))
    mode = "pad" if kind == "sft" else "crop"  # SFT images are padded so nothing is cut off

    def convert(segments: list[Any]) -> list[str | int]:
        converted: list[str | int] = []
        for seg in segments:
            if isinstance(seg, str):
                converted.append(clean_text(seg, settings.min_chars if kind == "text" else 1, settings.max_chars))
                continue
            image = preprocess(
                seg,
                size=settings.image_size,
                mode=mode,
                max_pixels=settings.max_pixels,
                min_side=settings.min_side,
                fast=settings.fast_image_decode,
            )
            converted.append(len(out.images))
            out.images.append(image.pixels)
            out.image_sizes.append(image.original_size)
            if detector is not None:
                out.n_faces += detector.count_faces(_face_view(seg, image.pixels, mode, settings))
            if settings.write_images:
                out.jpgs.append(_jpeg(image.pixels))
        return converted

    try:
        out.prompt = convert(prompt_raw)
        out.answer = convert(answer_raw) if answer_raw is not None else None
    except RecordError as err:
        return Reject(source, record["id"], "clean", err.reason, err.detail)
    except ImageError as err:
        return Reject(source, record["id"], "image", err.reason, err.detail)
    except Exception as err:  # counted with its reason rather than failing the whole job on one record
        return Reject(source, record["id"], "clean", "unexpected_error", f"{type(err).__name__}: {err}"[:500])
    texts = [p for p in [*out.prompt, *(out.answer or [])] if isinstance(p, str)]
    # The metadata columns the source names (options.attributes) were read with the record (source_reader.py).
    out.attributes = sample_attributes(texts, out.image_sizes, out.n_faces, record.get("attributes") or {})
    return out


def assemble_sample(
    record: PreparedRecord, codes: dict[int, np.ndarray], tokenizer: MixedModalTokenizer, settings: PrepareSettings
) -> TokenizedSample | Reject:
    """Token ids of a prepared record, given the VQ codes of its images (by slot)."""
    missing = [i for i in range(len(record.image_sizes)) if i not in codes]
    if missing:
        raise ValueError(f"{record.record_id}: no VQ codes for image slots {missing}")

    def segments(parts: list[str | int]) -> list[Any]:
        return [p if isinstance(p, str) else ImageSegment(np.asarray(codes[p])) for p in parts]

    if record.answer is not None:
        ids, n_prompt = tokenizer.encode_sft(segments(record.prompt), segments(record.answer))
    else:
        ids, n_prompt = tokenizer.encode(segments(record.prompt)), 0
    if settings.max_tokens is not None and len(ids) > settings.max_tokens:
        return Reject(
            record.source, record.record_id, "tokenize", "too_long", f"{len(ids)} tokens, maximum {settings.max_tokens}"
        )
    meta = {
        "source": record.source,
        "kind": record.kind,
        "record_id": record.record_id,
        "n_tokens": len(ids),
        "n_images": len(record.image_sizes),
        "n_prompt_tokens": n_prompt,
        "has_face": record.n_faces > 0,
        "n_faces": record.n_faces,
        "image_sizes": [list(s) for s in record.image_sizes],
    }
    if record.category is not None:
        meta["category"] = record.category
    return TokenizedSample(key=record.key, tokens=ids, meta=meta, images_jpg=record.jpgs, attributes=record.attributes)

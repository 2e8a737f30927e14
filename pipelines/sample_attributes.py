"""Per-sample curation attributes, computed while preparing (schemas/sample_filters.py names them): faces, the
first image's size and aspect, the text's length and language, and numeric columns of the input's metadata named
in the source's `options.attributes` (LAION-Aesthetics' `aesthetic`, a CLIP score, ...).

Language id is py3langid: its model ships inside the package (4.6 MB), nothing is downloaded at run time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from functools import cache
from typing import Any

# Language id reads this many characters of a sample's text: enough for a stable answer, bounded cost on 1 MB
# documents.
LANGUAGE_CHARS = 2000


def _number(value: Any) -> float | None:
    """A finite number from a metadata value (int, float, bool, or a numeric string or bytes); else None."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, bool | int | float) and math.isfinite(float(value)):
        return float(value)
    return None


def _metadata_objects(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Where an input keeps per-record metadata besides its own columns: img2dataset's `.json` member, and a
    `metadata` field (OBELICS: a JSON string) when it holds an object."""
    found = []
    for name in ("json", "metadata"):
        value = row.get(name)
        if isinstance(value, str | bytes):
            try:
                value = json.loads(value)
            except (ValueError, UnicodeDecodeError):
                continue
        if isinstance(value, dict):
            found.append(value)
    return found


def metadata_attributes(row: dict[str, Any], names: Sequence[str]) -> dict[str, float | None]:
    """The named numeric columns of one input row: a column or field of that name (parquet, jsonl, a WebDataset
    member), else a key of its metadata object (img2dataset `.json`, OBELICS `metadata`); None where absent or not
    a number."""
    objects = _metadata_objects(row)
    out: dict[str, float | None] = {}
    for name in names:
        value = row.get(name)
        if value is None:
            value = next((obj[name] for obj in objects if obj.get(name) is not None), None)
        out[name] = _number(value)
    return out


@cache
def _language_identifier() -> Any:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def language_of(text: str) -> tuple[str | None, float | None]:
    """(ISO 639-1 code, probability) of a text's language from its first LANGUAGE_CHARS characters; (None, None)
    for a text with no letters."""
    head = text[:LANGUAGE_CHARS]
    if not any(ch.isalpha() for ch in head):
        return None, None
    code, score = _language_identifier().classify(head)
    return str(code), round(float(score), 4)


def sample_attributes(
    texts: Sequence[str], image_sizes: Sequence[tuple[int, int]], n_faces: int, metadata: dict[str, float | None]
) -> dict[str, Any]:
    """The attributes of one prepared record but its token counts (known once it is tokenized): faces, the first
    image's size and aspect (None without images), text length and language, then the metadata columns."""
    text = "\n".join(texts)
    language, score = language_of(text)
    width, height = image_sizes[0] if image_sizes else (None, None)
    return {
        "has_face": int(n_faces > 0),
        "face_count": n_faces,
        "width": width,
        "height": height,
        "aspect": round(width / height, 6) if width and height else None,
        "text_length": len(text) - max(0, len(texts) - 1),  # the texts' characters, not the joins
        "language": language,
        "language_score": score,
        **metadata,
    }

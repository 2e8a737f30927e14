"""Text cleanup before tokenization: valid UTF-8, NFC, control characters stripped, length bounds."""

from __future__ import annotations

import re
import unicodedata

from pipelines.raw_records import RecordError

# C0/C1 controls and DEL, except tab, newline and carriage return (code and prose need them).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
DEFAULT_MIN_CHARS = 1
DEFAULT_MAX_CHARS = 1_000_000


def clean_text(text: str, min_chars: int = DEFAULT_MIN_CHARS, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """The cleaned text, or a RecordError (invalid_utf8, empty_text, text_too_short, text_too_long)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # lone surrogates, e.g. from a JSON "\ud800" escape
        raise RecordError("invalid_utf8", f"{err.reason} at character {err.start}") from None
    # Controls go first, so the NFC form is computed on the text that remains.
    text = unicodedata.normalize("NFC", _CONTROL.sub("", text)).replace("\r\n", "\n")
    if not text.strip():
        raise RecordError("empty_text", "no text left after cleanup")
    if len(text) < min_chars:
        raise RecordError("text_too_short", f"{len(text)} characters, minimum {min_chars}")
    if len(text) > max_chars:
        raise RecordError("text_too_long", f"{len(text)} characters, maximum {max_chars}")
    return text

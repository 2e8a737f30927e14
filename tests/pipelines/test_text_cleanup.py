"""Text cleanup: NFC, control characters, surrogates, bounds."""

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipelines.raw_records import RecordError
from pipelines.text_cleanup import clean_text


def test_cleanup_rules() -> None:
    assert clean_text("Cafe\u0301") == "Caf\u00e9"  # NFC
    assert clean_text("a\x00b\x07c\x1b[0m\x7f\x85d") == "abc[0md"
    assert clean_text("line\r\n\tindented\n") == "line\n\tindented\n"


@pytest.mark.parametrize(
    ("text", "kwargs", "reason"),
    [
        ("bad \ud800 surrogate", {}, "invalid_utf8"),
        ("  \n\t ", {}, "empty_text"),
        ("\x00\x01", {}, "empty_text"),
        ("short", {"min_chars": 10}, "text_too_short"),
        ("x" * 11, {"max_chars": 10}, "text_too_long"),
    ],
)
def test_rejects_with_reasons(text: str, kwargs: dict, reason: str) -> None:
    with pytest.raises(RecordError) as info:
        clean_text(text, **kwargs)
    assert info.value.reason == reason


@given(st.text(min_size=1))
def test_output_is_nfc_valid_utf8_without_controls(text: str) -> None:
    try:
        out = clean_text(text)
    except RecordError as err:
        assert err.reason in {"empty_text", "invalid_utf8"}
        return
    out.encode("utf-8")
    assert out == unicodedata.normalize("NFC", out)
    assert not any(ord(c) < 32 and c not in "\t\n\r" for c in out)

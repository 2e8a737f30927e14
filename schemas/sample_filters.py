"""Sample attributes and the filters a mixture source applies to them (`aesthetic >= 6`, `0.9 <= aspect <= 1.1`).

The prepare job stores every sample's attributes beside its tokens (pipelines/shard_writer.py); the mix job keeps
the samples that pass all of a source's filters, so a new threshold is a re-mix, never a re-tokenization. A filter
is parsed here, without eval: one attribute, one or two comparisons with numbers (a string for `language`).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Attributes every prepared sample has, and what each holds. Numbers, except `language`; a value can be missing
# (no image: width, height and aspect; no text: language), and a filter on a missing value excludes the sample.
BUILTIN_ATTRIBUTES: dict[str, str] = {
    "n_tokens": "tokens of the sample",
    "n_images": "images in the sample",
    "has_face": "1 when a face was detected in any of its images, else 0",
    "face_count": "faces detected in all its images",
    "width": "the first image's width as read (before resize and crop), px",
    "height": "the first image's height as read, px",
    "aspect": "width / height of the first image",
    "text_length": "characters of its text after cleanup",
    "language": "ISO 639-1 code of its text (py3langid), e.g. en",
    "language_score": "py3langid's probability of that language, 0 to 1",
}
STRING_ATTRIBUTES = frozenset({"language"})

OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}
# `6 < aesthetic` is `aesthetic > 6`: the comparison seen from the attribute's side.
MIRRORED = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}

_TOKEN = re.compile(
    r"\s*(?:(?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(?P<op><=|>=|==|!=|<|>)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<string>\"[^\"]*\"|'[^']*'))"
)


class FilterError(ValueError):
    """A filter that cannot be parsed or names an attribute the source does not have."""


@dataclass(frozen=True)
class SampleFilter:
    """A parsed filter: the attribute and its conditions, each (operator, value) with the attribute on the left."""

    text: str
    attribute: str
    conditions: tuple[tuple[str, float | str], ...]

    def accepts(self, value: Any) -> bool:
        """Whether one value passes; a missing value (None) never does."""
        if value is None:
            return False
        return all(OPERATORS[op](value, bound) for op, bound in self.conditions)


def _tokens(text: str) -> list[tuple[str, str]]:
    out, position = [], 0
    while position < len(text.rstrip()):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise FilterError(f"filter {text!r}: cannot read {text[position:].strip()[:20]!r}")
        kind = match.lastgroup
        assert kind is not None
        out.append((kind, match.group(kind)))
        position = match.end()
    return out


def parse_filter(text: str) -> SampleFilter:
    """`ATTRIBUTE OP NUMBER`, `NUMBER OP ATTRIBUTE`, or chained `NUMBER OP ATTRIBUTE OP NUMBER` with both
    operators < / <= or both > / >=; `language == en` (or !=) compares a word. Anything else is a FilterError
    saying what was expected."""
    if not isinstance(text, str) or not text.strip():
        raise FilterError("a filter must be a non-empty string such as 'aesthetic >= 6'")
    tokens = _tokens(text)
    kinds = [kind for kind, _ in tokens]
    if kinds == ["name", "op", "name"] and tokens[0][1] in STRING_ATTRIBUTES:  # language == en: a bare word
        kinds[2] = "string"
    attribute = tokens[0][1] if kinds[:1] == ["name"] else tokens[2][1] if len(tokens) > 2 else ""
    if kinds == ["name", "op", "string"]:
        op, value = tokens[1][1], tokens[2][1].strip("\"'")
        if attribute not in STRING_ATTRIBUTES or op not in ("==", "!="):
            words = ", ".join(sorted(STRING_ATTRIBUTES))
            raise FilterError(f"filter {text!r}: only {words} compares with a word, and only by == or !=")
        return SampleFilter(text, attribute, ((op, value),))
    if kinds == ["name", "op", "number"]:
        conditions = ((tokens[1][1], float(tokens[2][1])),)
    elif kinds == ["number", "op", "name"]:
        conditions = ((MIRRORED[tokens[1][1]], float(tokens[0][1])),)
    elif kinds == ["number", "op", "name", "op", "number"]:
        first, second = tokens[1][1], tokens[3][1]
        if not ({first, second} <= {"<", "<="} or {first, second} <= {">", ">="}):
            raise FilterError(f"filter {text!r}: a chained comparison needs both operators < / <= or both > / >=")
        conditions = ((MIRRORED[first], float(tokens[0][1])), (second, float(tokens[4][1])))
    else:
        raise FilterError(
            f"filter {text!r}: expected ATTRIBUTE OP NUMBER (aesthetic >= 6) or NUMBER OP ATTRIBUTE OP NUMBER "
            f"(0.9 <= aspect <= 1.1), OP one of {' '.join(OPERATORS)}"
        )
    if attribute in STRING_ATTRIBUTES:
        raise FilterError(f"filter {text!r}: {attribute} is a word, compared by == or != (e.g. {attribute} == en)")
    return SampleFilter(text, attribute, conditions)


def check_attributes(filters: list[SampleFilter], available: list[str], where: str) -> None:
    """Every filter names one of `available` (the source's attributes), else a FilterError listing them."""
    for f in filters:
        if f.attribute not in available:
            raise FilterError(
                f"{where}: filter {f.text!r} names attribute {f.attribute!r}, which the source's samples do not "
                f"have; its attributes: {', '.join(available)} (a column of the input's metadata is stored when the "
                f"prepare config names it in the source's options.attributes)"
            )

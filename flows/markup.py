"""Markdown for Prefect artifacts: our own structure is trusted, every other text (prompts, model output, paths,
names, reasons) is escaped so that a renderer shows it as the text it is, never as HTML, a link or an image.

Where it is rendered (docs/orchestration.md, "Text in artifacts"): the V2 UI draws markdown artifacts and artifact
descriptions with react-markdown + rehype-raw + rehype-sanitize (GitHub schema: `<img src=http...>` and links are
kept) and table cells as plain text; the V1 UI draws markdown, descriptions and every string table cell with marked
(links are drawn with any href, raw HTML is kept). So:

- `escape_markdown` is for markdown: every character that CommonMark or GFM could read as markup is escaped, and the
  rendered text is exactly the input (whitespace aside);
- `escape_table_cell` is for table artifacts, whose cells the default UI shows as they are: only what could become
  HTML, a link, an image or an autolink is escaped, so ordinary text (names, paths, prose) is left alone.
"""

from __future__ import annotations

import re
import string
from typing import Any

NBSP = "\u00a0"
# Always escaped in markdown: inline markup (emphasis, code, strikethrough, links, images, tables, escapes).
_INLINE = re.compile(r"[\\`*_~\[\]|]")
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
# GFM autolink literals: `scheme:` (http://, mailto:, javascript:...), `www.` and e-mail addresses. Escaping the `:`,
# the `.` or the `@` breaks them; `javascript:` needs no link syntax of its own in some renderers, so every
# `letters:` followed by a non-space is broken the same way.
_SCHEME_COLON = re.compile(r"(?<=[A-Za-z]):(?=\S)")
_WWW_DOT = re.compile(r"(?i)(?<![A-Za-z0-9])(www)\.")
_EMAIL_AT = re.compile(r"(?<=[\w.+-])@(?=[\w-])")
# Block markers at the start of a line (after its indentation): headings, lists, setext underlines, thematic breaks
# (`>` is never one: it is always written as &gt;).
_LINE_MARKER = re.compile(r"^([#+=-](?=[\s#=-]|$)|\d{1,9}(?=[.)](?:\s|$)))")
_ENTITY_LIKE = re.compile(r"&(?=#[0-9]|#[xX][0-9A-Fa-f]|[A-Za-z][A-Za-z0-9]*;)")


class Markdown(str):
    """Markdown we wrote (headings, charts, our data-URI images, code spans of our own making): used as it is."""


def _newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _escape_line(line: str) -> str:
    body = line.lstrip(" \t")
    indent = line[: len(line) - len(body)].replace("\t", NBSP * 4).replace(" ", NBSP)  # never an indented code block
    body = "".join(_ENTITIES.get(c, c) for c in body)
    body = _INLINE.sub(lambda m: "\\" + m.group(0), body)
    body = _SCHEME_COLON.sub(r"\\:", body)
    body = _WWW_DOT.sub(r"\1\\.", body)
    body = _EMAIL_AT.sub(r"\\@", body)
    marker = _LINE_MARKER.match(body)
    if marker:  # `1.` / `1)`: the `.` or `)` after the digits; otherwise the marker itself
        end = marker.end()
        body = body[:end] + "\\" + body[end:] if marker.group(0)[0].isdigit() else "\\" + body
    return indent + body


def escape_markdown(text: Any) -> Markdown:
    """`text` (str() of it) as markdown that renders as exactly that text: no HTML, link, image, autolink, heading,
    list, quote, table, emphasis or code. Markdown (ours) is returned as it is."""
    if isinstance(text, Markdown):
        return text
    return Markdown("\n".join(_escape_line(line) for line in _newlines(str(text)).split("\n")))


def escape_cell(text: Any) -> Markdown:
    """`escape_markdown` for a cell of a markdown table: one line (newlines become <br>), `|` escaped."""
    if isinstance(text, Markdown):
        return Markdown(_newlines(text).replace("\n", " "))
    return Markdown("<br>".join(escape_markdown(line) for line in _newlines(str(text)).split("\n")))


def escape_table_cell(value: Any) -> Any:
    """A table artifact's cell: strings lose what a markdown renderer would make into HTML, a link, an image or an
    autolink (`<`, `[`, `]`, `\\`, entities, `scheme:`, `www.`, e-mail `@`); numbers, None and booleans pass."""
    if not isinstance(value, str):
        return value
    text = value.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")
    text = _ENTITY_LIKE.sub("&amp;", text).replace("<", "&lt;")
    text = _SCHEME_COLON.sub(r"\\:", text)
    text = _WWW_DOT.sub(r"\1\\.", text)
    return _EMAIL_AT.sub(r"\\@", text)


def code(text: Any) -> Markdown:
    """`text` as an inline code span (paths, names): shown verbatim, nothing inside it is markup. One line."""
    text = " ".join(_newlines(str(text)).split("\n"))
    if not text:
        return Markdown("")
    run = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * (run + 1)
    # CommonMark strips one space from each end of a span that starts and ends with one (unless all spaces).
    pad = " " if text.strip(" ") and (text.startswith(("`", " ")) or text.endswith(("`", " "))) else ""
    return Markdown(f"{fence}{pad}{text}{pad}{fence}")


class _Formatter(string.Formatter):
    def format_field(self, value: Any, format_spec: str) -> str:
        formatted = super().format_field(value, format_spec)
        if isinstance(value, Markdown) or (isinstance(value, int | float) and not isinstance(value, bool)):
            return formatted
        return escape_markdown(formatted)


def md(template: str, /, *args: Any, **kwargs: Any) -> Markdown:
    """`template.format(*args, **kwargs)` with the template trusted and every value escaped (`escape_markdown`),
    except Markdown values and numbers: build artifact markdown with this, never with an f-string of text."""
    return Markdown(_Formatter().format(template, *args, **kwargs))


def join(separator: str, parts: list[Markdown]) -> Markdown:
    """Markdown parts joined; a part that is plain text is escaped."""
    return Markdown(separator.join(escape_markdown(p) for p in parts))

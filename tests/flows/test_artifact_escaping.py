"""Text in artifacts: prompts, model output, paths and names render as the text they are, never as markup.

Escaped markdown is rendered here with markdown-it (CommonMark, raw HTML on, GFM tables and strikethrough), the
worst case of what the Prefect UIs do; GFM autolink literals (which markdown-it leaves to a plugin) are checked on
the escaped source.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt
from prefect import flow

from flows.artifacts import markdown_artifact, markdown_table, mermaid_bars, mermaid_lines, png_markdown, table_artifact
from flows.markup import Markdown, code, escape_markdown, escape_table_cell, md

HOSTILE = [
    "<img src=http://127.0.0.1:9/x>",
    "<script>alert(1)</script>",
    "[click](javascript:alert(1))",
    "![x](http://evil/x.png)",
    "| a | b |",
    "a cell\n# heading",
    "```\ncode\n```",
    "`tick` and ``two``",
    "javascript:alert(1)",
    "<javascript:alert(1)>",
    "http://evil.example/x www.evil.example me@evil.example",
    "[ref]\n\n[ref]: http://evil/",
    "&lt;img src=x&gt; &#60;b&#62;",
    '<a href="http://x" onclick="alert(1)">x</a>',
    "    indented <b>code</b>",
    "- item\n+ item\n1. one\n2) two\n> quote\n---\n===\n***",
    "*em* _em_ **strong** ~~del~~ \\* \\",
    "<!-- comment --> <?php ?> <![CDATA[x]]>",
]
MARKDOWN = MarkdownIt("commonmark").enable(["table", "strikethrough"])  # html=True in this preset: raw HTML passes
STRUCTURE = {
    "p",
    "br",
    "blockquote",
    "table",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
    "h1",
    "h2",
    "h3",
    "em",
    "strong",
    "code",
    "pre",
    "ul",
    "ol",
    "li",
    "hr",
    "s",
    "h4",
    "h5",
    "h6",
}
URL_ATTRIBUTE = re.compile(r"<[A-Za-z][^>]*\s(href|src)\s*=")  # a tag that links or fetches
# GFM autolink literals as they would appear in the escaped source: scheme:, www., an e-mail's @.
AUTOLINK = re.compile(r"(?i)[a-z]:(?=\S)|(?<![a-z0-9\\])www\.|[\w.+-]@[\w-]")
# Text that mixes markdown syntax with letters, digits, spaces, line breaks and a few non-ASCII characters.
MARKUP_TEXT = st.text(
    st.sampled_from(list("<>&[]()!`*_~|#+-=.:@/\\\"' \t\n\r") + list("aZ09;xwh") + ["é", "\u00a0"]), max_size=60
) | st.text(max_size=40)


def tags(rendered: str) -> set[str]:
    return {m.lower() for m in re.findall(r"<\s*/?\s*([A-Za-z][\w-]*)", rendered)}


def visible(rendered: str) -> str:
    """The text a reader sees, whitespace collapsed (so it compares with the input's)."""
    text = html.unescape(re.sub(r"<[^>]*>", "", re.sub(r"<br\s*/?>", " ", rendered)))
    return " ".join(text.split())


def same_text(text: str) -> str:
    """`text` as CommonMark normalizes it (NUL is U+FFFD), whitespace collapsed."""
    return " ".join(text.replace("\0", "\ufffd").split())


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_text_renders_as_its_text(text: str) -> None:
    escaped = escape_markdown(text)
    rendered = MARKDOWN.render(escaped)
    assert tags(rendered) <= {"p", "br"}, rendered
    assert visible(rendered) == same_text(text)
    assert not AUTOLINK.search(escaped), escaped


@settings(max_examples=400, deadline=None)
@given(MARKUP_TEXT)
def test_any_escaped_text_renders_as_itself_and_nothing_else(text: str) -> None:
    escaped = escape_markdown(text)
    rendered = MARKDOWN.render(escaped)
    assert tags(rendered) <= {"p", "br"}, (escaped, rendered)
    assert visible(rendered) == same_text(text), (escaped, rendered)
    assert not AUTOLINK.search(escaped), escaped
    # Inside our own structure too: after a bold label, in a quote, as a heading.
    for template in ("**Prompt:** {}", "> {}", "## {}"):
        wrapped = MARKDOWN.render(md(template, text))
        assert tags(wrapped) <= {"p", "br", "strong", "blockquote", "h2"}, wrapped


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(MARKUP_TEXT, MARKUP_TEXT), min_size=1, max_size=3))
def test_markdown_table_cells_stay_in_their_cell(cells: list[tuple[str, str]]) -> None:
    rows = [{"name": a, "value": b} for a, b in cells]
    rendered = MARKDOWN.render(markdown_table(rows))
    assert tags(rendered) <= {"table", "thead", "tbody", "tr", "th", "td", "br"}, rendered
    body = re.findall(r"<tr>\s*<td>(.*?)</td>\s*<td>(.*?)</td>\s*</tr>", rendered, flags=re.S)
    assert [(visible(a), visible(b)) for a, b in body] == [(same_text(a), same_text(b)) for a, b in cells]


@settings(max_examples=300, deadline=None)
@given(MARKUP_TEXT)
def test_table_artifact_cells_make_no_html_link_or_image(text: str) -> None:
    """The V1 UI renders each string cell as markdown; the V2 UI shows it as text (so only what is dangerous is
    escaped)."""
    escaped = escape_table_cell(text)
    rendered = MARKDOWN.render(escaped)
    assert tags(rendered) <= STRUCTURE, (escaped, rendered)
    assert not URL_ATTRIBUTE.search(rendered), rendered
    assert not AUTOLINK.search(escaped), escaped


@pytest.mark.parametrize("text", HOSTILE)
def test_table_artifact_cells_with_hostile_text(text: str) -> None:
    rendered = MARKDOWN.render(escape_table_cell(text))
    assert tags(rendered) <= STRUCTURE and not URL_ATTRIBUTE.search(rendered), rendered


def test_ordinary_table_cells_are_left_alone() -> None:
    plain = [
        "image_text",
        "/tmp/runs/stage-1/checkpoints/step-00000004",
        "source: prose",
        "too_short: 3; dup: 1",
        "Don't (really) -- 50% of *this*",
        "2026-12-07T06:53:09",
    ]
    assert [escape_table_cell(t) for t in plain] == plain
    assert [escape_table_cell(v) for v in (1, 2.5, None, True)] == [1, 2.5, None, True]


@settings(max_examples=200, deadline=None)
@given(MARKUP_TEXT)
def test_code_spans_show_their_text_verbatim(text: str) -> None:
    rendered = MARKDOWN.render(md("Folder: {}", code(text)))
    shown = " ".join(text.replace("\r\n", "\n").replace("\r", "\n").replace("\0", "\ufffd").split("\n"))
    if shown:
        assert tags(rendered) <= {"p", "code"}, rendered
        (inside,) = re.findall(r"<code>(.*?)</code>", rendered, flags=re.S)
        assert html.unescape(inside) == shown


def test_md_escapes_the_values_not_the_template() -> None:
    out = md("**{}** {:.2f} {n}: {c}", "<b>x</b>", 1.5, n=3, c=code("a|b"))
    assert out == "**&lt;b&gt;x&lt;/b&gt;** 1.50 3: `a|b`" and isinstance(out, Markdown)
    assert escape_markdown(out) is out  # ours passes as it is


def test_chart_labels_cannot_leave_the_chart(tmp_path: Path) -> None:
    name = 'x"]\n```\n<img src=http://evil/x.png>\n```mermaid'
    for chart in (mermaid_bars(name, {name: 1.0, "b": 2.0}, name), mermaid_lines(name, {name: [(1, 1.0), (2, 0.5)]})):
        rendered = MARKDOWN.render(chart)
        assert chart.count("```") == 2 and "<img" not in rendered, chart
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    rendered = MARKDOWN.render(png_markdown(png, "a](javascript:alert(1)) ![b"))
    assert rendered.count("<img") == 1 and 'src="data:image/png;base64,' in rendered and "<a" not in rendered


def test_generation_markdown_shows_the_prompt_and_the_answer_as_text(tmp_path: Path) -> None:
    from flows.evaluation_flows import generation_markdown

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "g-1.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    answer = "Sure!\n<img src=http://127.0.0.1:9/x>\n[click](javascript:alert(1))\n# heading\n    code"
    result = {
        "mode": "mixed",
        "prompt": HOSTILE[0] + " " + HOSTILE[2],
        "new_tokens": 7,
        "seconds": 0.5,
        "segments": [{"kind": "text", "text": answer}, {"kind": "image", "path": "images/g-1.png"}],
    }
    shown = generation_markdown(tmp_path, result)
    rendered = MARKDOWN.render(shown)
    assert "<img src=http" not in shown and "](javascript:" not in shown
    assert rendered.count("<img") == 1 and 'src="data:image/png;base64,' in rendered  # our image, only
    assert tags(rendered) <= {"h2", "p", "strong", "blockquote", "br", "img", "code"} and "<a" not in rendered
    assert "&lt;img src=http://127.0.0.1:9/x&gt;" in rendered and "[click](javascript:alert(1))" in rendered
    assert "# heading" in rendered and "<h1>" not in rendered


def test_end_to_end_summary_escapes_generated_text(tmp_path: Path) -> None:
    from flows.end_to_end import summary_markdown

    generations = [{"mode": "text", "text": "<script>alert(1)</script> [x](javascript:y)", "images": []}]
    rendered = MARKDOWN.render(summary_markdown(tmp_path / "report `x`.html", 1.5, generations))
    assert "<script" not in rendered and "<a" not in rendered and "&lt;script&gt;" in rendered
    assert f"<code>{tmp_path / 'report `x`.html'}</code>" in rendered


def test_artifact_markdown_must_be_built_escaped() -> None:
    with pytest.raises(TypeError, match=r"flows\.markup"):
        markdown_artifact("<img src=x>", key="x", description="y")  # type: ignore[arg-type]


@flow
def shows_hostile_text() -> None:
    markdown_artifact(
        md("**Prompt:** {}\n\n{}", HOSTILE[0], markdown_table([{"text": t} for t in HOSTILE])),
        key="hostile-markdown",
        description=HOSTILE[2],
    )
    table_artifact(
        [{"prompt": t, "n": k} for k, t in enumerate(HOSTILE)],
        key="hostile-table",
        description="rows of <img src=http://127.0.0.1:9/x>",
    )


def test_artifacts_read_back_through_the_api_hold_no_markup(prefect_api) -> None:
    state = shows_hostile_text(return_state=True)
    assert state.is_completed(), state.message
    artifacts = prefect_api.artifacts(state.state_details.flow_run_id)
    shown = prefect_api.by_key(artifacts, "hostile-markdown")
    table = prefect_api.by_key(artifacts, "hostile-table")
    for text in (shown["data"], shown["description"], table["description"], *(r["prompt"] for r in table["data"])):
        assert "<img" not in text and "<script" not in text and "](javascript:" not in text
        rendered = MARKDOWN.render(text)
        assert "<img" not in rendered and "<a" not in rendered and "<script" not in rendered
    assert "&lt;img src=http" in shown["data"] and "&lt;img src=http" in table["description"]
    assert [r["n"] for r in table["data"]] == list(range(len(HOSTILE)))
    rendered = MARKDOWN.render(shown["data"])
    assert rendered.count("<tr>") == len(HOSTILE) + 1  # one row per text: no | or newline split a row


def test_html_pages_escape_text_and_draw_only_images_beside_the_page(tmp_path: Path) -> None:
    from flows.html_report import dict_table, generation_html
    from model.generation.segment_output import segments_html

    records = [{"kind": "text", "text": HOSTILE[0] + HOSTILE[1] + '"><img src=x onerror=alert(1)>'}]
    paths = ("images/a-1.png", "http://127.0.0.1:9/x.png", " //evil/x", "javascript:alert(1)", "/etc/x", "../x.png")
    records += [{"kind": "image", "path": p} for p in paths]
    page = segments_html(records)
    assert re.findall(r"<img [^>]*>", page) == ['<img src="images/a-1.png" alt="generated image">']
    assert "<script" not in page and "&lt;img src=http://127.0.0.1:9/x&gt;" in page
    png = tmp_path / "images" / "g.png"
    png.parent.mkdir()
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    segments = [{"kind": "text", "text": HOSTILE[1]}, {"kind": "image", "path": "images/g.png"}]
    result = {"mode": "<b>m</b>", "prompt": HOSTILE[0], "new_tokens": 1, "seconds": 0.1, "segments": segments}
    shown = generation_html(tmp_path, result) + dict_table([{"<th>": HOSTILE[0], "n": None}])
    assert [t[:32] for t in re.findall(r"<img [^>]*>", shown)] == ['<img src="data:image/png;base64,']
    assert "<script" not in shown and "<b>m" not in shown and "<th>&lt;th&gt;</th>" in shown
    assert "<td>&lt;img src=http://127.0.0.1:9/x&gt;</td><td></td>" in shown  # None is an empty cell

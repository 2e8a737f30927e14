"""The end-to-end report: one self-contained HTML page (tables, PNG plots and generated images inlined)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from flows.artifacts import png_data_uri
from pipelines.mix_report import ROW_FIELDS, report_rows

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f3f7; } td:first-child, th:first-child { text-align: left; }
.sample { border: 1px solid #ddd; border-radius: 6px; padding: 0.8em; margin: 0.8em 0; }
.sample img { width: 192px; image-rendering: pixelated; margin: 0.3em; border: 1px solid #ccc; }
.text { white-space: pre-wrap; font-family: ui-monospace, monospace; background: #fafafa; padding: 0.4em; }
.muted { color: #777; font-size: 0.9em; }
"""


def _text(value: Any) -> str:
    """A cell's text, escaped; None (e.g. a CE the run has no value for) is an empty cell, not "None" or 0."""
    return "" if value is None else html.escape(str(value))


def table(columns: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_text(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_text(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def dict_table(rows: list[dict[str, Any]]) -> str:
    return table(list(rows[0]), [list(r.values()) for r in rows]) if rows else "<p class=muted>(none)</p>"


def image_tag(path: Path, alt: str) -> str:
    return f'<img src="{png_data_uri(path)}" alt="{html.escape(alt)}">'


def generation_html(folder: Path, result: dict[str, Any]) -> str:
    """A generated answer: the prompt, then its text and images in order."""
    parts = [
        f"<div class=sample><b>{html.escape(result['mode'])}</b> &middot; prompt: "
        f"<i>{html.escape(result['prompt'])}</i><br>"
    ]
    for segment in result["segments"]:
        if segment["kind"] == "text":
            parts.append(f"<div class=text>{html.escape(segment['text'])}</div>")
        else:
            parts.append(image_tag(folder / segment["path"], segment["path"]))
    parts.append(f"<div class=muted>{result['new_tokens']} new tokens, {result['seconds']:.1f} s</div></div>")
    return "".join(parts)


def write_report(path: Path, report: dict[str, Any]) -> Path:
    """The page: data prepared, mixtures, loss curves, final metrics, evaluation and generated samples."""
    sections = [
        f"<h1>chameleon-pipeline: end-to-end run</h1><p class=muted>{html.escape(report['out_dir'])} "
        f"&middot; {report['seconds']} s</p>"
    ]
    sections.append("<h2>1. Tokenizers</h2>" + dict_table(report["tokenizers"]))
    sections.append(
        "<h2>2. Prepared sources (records in, samples out, rejects by reason)</h2>" + dict_table(report["prepared"])
    )
    sections.append("<h2>3. Mixtures: target vs realized token shares</h2>")
    for stage, manifest in report["mixed"].items():
        sections.append(
            f"<h3>{html.escape(stage)}: {manifest['sequences']:,} sequences of {manifest['seq_len']}, "
            f"{manifest['tokens']:,} tokens, {manifest['modality']['image_share']:.1%} image</h3>"
        )
        sections.append(table(list(ROW_FIELDS), [list(r) for r in report_rows(manifest)]))
    if report.get("shares_png"):
        sections.append(image_tag(Path(report["shares_png"]), "token shares").replace("<img", "<img width=900"))
    sections.append("<h2>4. Training: loss curves and final metrics</h2>")
    sections.append(image_tag(Path(report["loss_png"]), "loss curves").replace("<img", "<img width=700"))
    sections.append(dict_table(report["training"]))
    sections.append("<h2>5. Evaluation</h2>" + dict_table(report["evaluation"]))
    if report.get("benchmarks"):
        sections.append("<h3>Benchmarks</h3>" + dict_table(report["benchmarks"]))
    if report.get("annotate_page"):
        sections.append(
            f"<p>Answers to the prompt set, to annotate: <code>{html.escape(report['annotate_page'])}</code></p>"
        )
    sections.append("<h2>6. Generated samples</h2>")
    sections += [generation_html(Path(folder), result) for folder, result in report["generations"]]
    page = (
        f"<!doctype html><html><head><meta charset=utf-8><title>chameleon-pipeline end-to-end</title>"
        f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path

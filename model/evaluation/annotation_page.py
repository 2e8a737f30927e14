"""Standalone HTML pages for annotators: each item's prompt and response(s), radio choices, a download button.

The button saves the choices as annotation jsonl (schemas/eval_prompts.py `Annotation`), the scorer's input.
No external assets: the page, its images/ folder and a browser are all an annotator needs.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import Any

from model.generation.segment_output import html_page, segments_html
from schemas.eval_prompts import ABSOLUTE_LABELS, RELATIVE_LABELS

ABSOLUTE_TEXT = dict(zip(ABSOLUTE_LABELS, ("Fulfills", "Partially fulfills", "Does not fulfill"), strict=True))
RELATIVE_TEXT = dict(zip(RELATIVE_LABELS, ("Response 1 is better", "Tie", "Response 2 is better"), strict=True))

EXTRA_STYLE = """<style>
.item { border-top: 1px solid #ccc; margin-top: 2rem; padding-top: .5rem; }
.choices { border: 1px solid #ccc; margin: .8rem 0; } .choices label { margin-right: 1.2rem; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }
.bar { position: sticky; top: 0; background: #fff; padding: .5rem 0; border-bottom: 1px solid #ccc; }
</style>"""

# Minimal on purpose: read the checked radios, write one JSON line per answered item, offer it as a file.
SCRIPT = """<script>
function downloadAnnotations(task) {
  const who = document.getElementById('annotator').value.trim();
  if (!who) { alert('Enter your annotator name first.'); return; }
  const lines = []; let missing = 0;
  for (const item of document.querySelectorAll('section.item')) {
    const picked = item.querySelector('input[type=radio]:checked');
    if (!picked) { missing++; continue; }
    lines.push(JSON.stringify({task: task, item: item.dataset.item, category: item.dataset.category,
                               annotator: who, label: picked.value}));
  }
  if (missing && !confirm(missing + ' item(s) have no choice yet. Download the others anyway?')) return;
  const link = document.createElement('a');
  link.href = URL.createObjectURL(new Blob([lines.join('\\n') + '\\n'], {type: 'application/x-ndjson'}));
  link.download = 'annotations-' + task + '-' + who.replace(/[^A-Za-z0-9_.-]/g, '_') + '.jsonl';
  link.click();
}
</script>"""


def _bar(task: str, n_items: int) -> str:
    return (
        f"<div class='bar'><label>Annotator name <input id='annotator' autocomplete='off'></label> "
        f"<button type='button' onclick=\"downloadAnnotations('{task}')\">Download annotations</button> "
        f"<span class='meta'>{n_items} items</span></div>"
    )


def _prompt(item: dict[str, Any]) -> str:
    images = [{"kind": "image", "path": p} for p in item["prompt_images"]]
    return f"<div class='prompt'>{segments_html([*images, {'kind': 'text', 'text': item['prompt']}])}</div>"


def _choices(item_id: str, question: str, labels: dict[str, str]) -> str:
    name = html.escape(f"choice-{item_id}")
    radios = "".join(
        f"<label><input type='radio' name='{name}' value='{value}'> {text}</label>" for value, text in labels.items()
    )
    return f"<fieldset class='choices'><legend>{html.escape(question)}</legend>{radios}</fieldset>"


def _section(item: dict[str, Any], k: int, body: str) -> str:
    item_id, category = html.escape(item["id"]), html.escape(item["category"])
    return (
        f"<section class='item' data-item='{item_id}' data-category='{category}'>"
        f"<h2>{k}. {item_id} <span class='meta'>({category})</span></h2>\n{body}</section>"
    )


def absolute_page(records: Sequence[dict[str, Any]], title: str = "Task fulfillment") -> str:
    """Per response record: the prompt, the response, and fulfills / partially fulfills / does not fulfill."""
    intro = (
        "<p>For each item, read the prompt and the response, then judge whether the response fulfills the task "
        "the prompt asks for. Choose one answer per item, then download your annotations.</p>"
    )
    sections = [
        _section(
            r,
            k,
            f"<h3>Prompt</h3>{_prompt(r)}<h3>Response</h3><div class='response'>"
            f"{segments_html(r['response'])}</div>"
            f"{_choices(r['id'], 'Does the response fulfill the task?', ABSOLUTE_TEXT)}",
        )
        for k, r in enumerate(records, 1)
    ]
    return html_page(title, "\n".join([EXTRA_STYLE, intro, _bar("absolute", len(records)), *sections, SCRIPT]))


def comparison_page(items: Sequence[dict[str, Any]], title: str = "Which response is better?") -> str:
    """Per item: the prompt, responses 1 and 2 side by side (blinded), and 1 better / tie / 2 better."""
    intro = (
        "<p>For each item, read the prompt and both responses, then choose the one that fulfills the task "
        "better, or a tie. Choose one answer per item, then download your annotations.</p>"
    )
    sections = []
    for k, item in enumerate(items, 1):
        pair = "".join(
            f"<div><h3>Response {slot}</h3><div class='response'>{segments_html(records)}</div></div>"
            for slot, records in enumerate(item["responses"], 1)
        )
        body = (
            f"<h3>Prompt</h3>{_prompt(item)}<div class='pair'>{pair}</div>"
            f"{_choices(item['id'], 'Which response is better?', RELATIVE_TEXT)}"
        )
        sections.append(_section(item, k, body))
    return html_page(title, "\n".join([EXTRA_STYLE, intro, _bar("relative", len(items)), *sections, SCRIPT]))


def annotation_line(task: str, item: str, category: str, annotator: str, label: str) -> str:
    """One line as the page's download button writes it (for tests and hand-made files)."""
    return json.dumps({"task": task, "item": item, "category": category, "annotator": annotator, "label": label})

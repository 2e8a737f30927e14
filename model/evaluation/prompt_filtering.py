"""Prompt filtering by several annotators, as Chameleon filtered its evaluation prompts (paper, section 4.1).

Each annotator gets a page of the prompts and labels each one: keep (clear, and a good answer needs images),
unclear, or not_mixed_modal (clear, but a good answer needs no image). The label files come back in the
annotation-file format (one JSON line per prompt, `FilterLabel`); `filter_prompts` checks them, measures the
annotators' agreement (shares and Fleiss' kappa) and decides per prompt by an explicit rule: `majority` (more than
half of the annotators say keep; the paper's majority vote) or `unanimous` (all of them do).
"""

from __future__ import annotations

import html
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model.evaluation.annotation_page import EXTRA_STYLE, SCRIPT
from model.evaluation.human_eval import EvalFileError, read_jsonl
from model.evaluation.prompt_statistics import statistics_of_prompts
from model.files.atomic import write_atomic
from model.generation.segment_output import html_page, save_thumbnail, segments_html
from schemas.eval_prompts import FILTER_LABELS, EvalPrompt, FilterLabel

RULES = ("majority", "unanimous")
FILTER_TASK = "filter"
FILTER_TEXT = {
    "keep": "Keep: clear, and a good answer needs images",
    "unclear": "Unclear",
    "not_mixed_modal": "Clear, but a good answer needs no images",
}
AGREEMENT = ("all_agree", "majority_agree", "no_majority")  # with three annotators: all three, two, none agree
ANNOTATOR_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # names become file names


def fleiss_kappa(table: Sequence[Sequence[int]]) -> float | None:
    """Fleiss' kappa of an items x categories table of rating counts (every row sums to the same n >= 2).

    kappa = (P - Pe) / (1 - Pe), P the mean over items of the share of agreeing rater pairs, Pe the sum over
    categories of the squared share of all ratings. None when Pe = 1 (every rating in one category: undefined).
    """
    if not table:
        raise ValueError("fleiss_kappa: no items")
    n = sum(table[0])
    if n < 2 or any(sum(row) != n for row in table):
        raise ValueError("fleiss_kappa: every item needs the same number (>= 2) of ratings")
    items = len(table)
    agree = sum((sum(c * c for c in row) - n) / (n * (n - 1)) for row in table) / items
    shares = [sum(row[j] for row in table) / (items * n) for j in range(len(table[0]))]
    chance = sum(p * p for p in shares)
    if chance >= 1.0:
        return None
    return (agree - chance) / (1 - chance)


def _filter_item(prompt: EvalPrompt, k: int, images: list[str]) -> str:
    item_id, category = html.escape(prompt.id), html.escape(prompt.category)
    segments = [*({"kind": "image", "path": p} for p in images), {"kind": "text", "text": prompt.prompt}]
    name = html.escape(f"choice-{prompt.id}")
    radios = "".join(
        f"<label><input type='radio' name='{name}' value='{value}'> {html.escape(text)}</label>"
        for value, text in FILTER_TEXT.items()
    )
    return (
        f"<section class='item' data-item='{item_id}' data-category='{category}'>"
        f"<h2>{k}. {item_id} <span class='meta'>({category})</span></h2>\n"
        f"<div class='prompt'>{segments_html(segments)}</div>"
        f"<fieldset class='choices'><legend>Is the prompt clear, and does a good answer need images?</legend>"
        f"{radios}</fieldset></section>"
    )


def filter_page(prompts: Sequence[EvalPrompt], annotator: str, images: dict[str, list[str]]) -> str:
    """One annotator's filtering page: each prompt (with its images, `images[id]`: paths beside the page) and the
    three labels; the download button saves `annotations-filter-<annotator>.jsonl`."""
    intro = (
        "<p>For each prompt, decide whether it is clear, and whether a good answer to it would contain images as "
        "well as text. Choose one answer per prompt, then download your labels.</p>"
    )
    bar = (
        f"<div class='bar'><label>Annotator name <input id='annotator' autocomplete='off' "
        f"value='{html.escape(annotator)}'></label> "
        f"<button type='button' onclick=\"downloadAnnotations('{FILTER_TASK}')\">Download labels</button> "
        f"<span class='meta'>{len(prompts)} prompts</span></div>"
    )
    sections = [_filter_item(p, k, images[p.id]) for k, p in enumerate(prompts, 1)]
    return html_page("Which prompts to keep?", "\n".join([EXTRA_STYLE, intro, bar, *sections, SCRIPT]))


def write_filter_pages(prompts: Sequence[EvalPrompt], annotators: Sequence[str], out: str | Path) -> list[Path]:
    """out/filter-<annotator>.html for each annotator, the prompts' images copied under out/images/prompts/."""
    bad = [a for a in annotators if not ANNOTATOR_NAME.match(a)]
    if bad or not annotators:
        raise EvalFileError(f"annotator names: give at least one, letters, digits and _ . - only (got {bad})")
    if len(set(annotators)) != len(annotators):
        raise EvalFileError(f"annotator names repeat: {sorted(a for a, c in Counter(annotators).items() if c > 1)}")
    out = Path(out)
    images: dict[str, list[str]] = {}
    for prompt in prompts:
        images[prompt.id] = []
        for k, source in enumerate(prompt.images):
            relative = f"images/prompts/{prompt.id}-{k}.png"
            save_thumbnail(source, out / relative, EvalFileError)
            images[prompt.id].append(relative)
    pages = []
    for annotator in annotators:
        page = out / f"filter-{annotator}.html"
        write_atomic(page, filter_page(prompts, annotator, images))
        pages.append(page)
    return pages


def read_filter_labels(paths: Sequence[str | Path]) -> list[tuple[str, FilterLabel]]:
    """("file:line", label) from one or more filtering label files; EvalFileError naming file:line on a bad line."""
    return [(f"{path}:{n}", label) for path in paths for n, label in read_jsonl(path, FilterLabel)]


def _decision(labels: Sequence[str], rule: str) -> str:
    """keep, or why the prompt is dropped: the drop label most annotators chose (unclear on a tie: an unclear
    prompt cannot be judged for what its answer needs)."""
    votes = Counter(labels)
    keep = votes["keep"] * 2 > len(labels) if rule == "majority" else votes["keep"] == len(labels)
    if keep:
        return "keep"
    return "unclear" if votes["unclear"] >= votes["not_mixed_modal"] else "not_mixed_modal"


def _agreement(labels: Sequence[str]) -> str:
    top = Counter(labels).most_common(1)[0][1]
    if top == len(labels):
        return "all_agree"
    return "majority_agree" if top * 2 > len(labels) else "no_majority"


def _summary(decisions: Sequence[str], agreement: Sequence[str]) -> dict[str, Any]:
    n, kept, agree = len(decisions), Counter(decisions), Counter(agreement)
    return {
        "prompts": n,
        "kept": kept["keep"],
        "dropped": {k: kept[k] for k in FILTER_LABELS if k != "keep"},
        "kept_share": kept["keep"] / n,
        "agreement": {k: agree[k] / n for k in AGREEMENT},
        "agreement_counts": {k: agree[k] for k in AGREEMENT},
    }


def _check_labels(
    prompts: Sequence[EvalPrompt], labels: Sequence[tuple[str, FilterLabel]]
) -> dict[str, dict[str, tuple[str, str]]]:
    """{prompt id: {annotator: (label, file:line)}}; EvalFileError for a label of an unknown prompt, a category
    that differs from the prompt file's, an annotator labelling a prompt twice, or a prompt an annotator skipped."""
    categories = {p.id: p.category for p in prompts}
    given: dict[str, dict[str, tuple[str, str]]] = defaultdict(dict)
    for where, label in labels:
        if label.item not in categories:
            raise EvalFileError(f"{where}: prompt {label.item!r} is not in the prompt file")
        if label.category != categories[label.item]:
            raise EvalFileError(
                f"{where}: prompt {label.item!r} has category {label.category!r} here but "
                f"{categories[label.item]!r} in the prompt file"
            )
        if label.annotator in given[label.item]:
            raise EvalFileError(
                f"{where}: annotator {label.annotator!r} already labelled prompt {label.item!r} at "
                f"{given[label.item][label.annotator][1]}"
            )
        given[label.item][label.annotator] = (label.label, where)
    annotators = sorted({a for by_annotator in given.values() for a in by_annotator})
    if len(annotators) < 2:
        raise EvalFileError(f"filtering needs labels of at least two annotators (got {annotators})")
    for annotator in annotators:
        missing = [p.id for p in prompts if annotator not in given[p.id]]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise EvalFileError(
                f"annotator {annotator!r} has no label for {len(missing)} prompt(s): {', '.join(missing[:5])}{more}; "
                "every annotator labels every prompt"
            )
    return given


def filter_prompts(
    prompts: Sequence[EvalPrompt], labels: Sequence[tuple[str, FilterLabel]], rule: str = "majority"
) -> tuple[list[EvalPrompt], dict[str, Any]]:
    """(the kept prompts, marked `expects="mixed"`, in file order; the report): per prompt its labels and decision,
    kept and dropped counts, agreement shares and Fleiss' kappa (over the three labels, and over keep vs drop),
    overall and per category, and the prompt-set statistics before and after."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    given = _check_labels(prompts, labels)
    annotators = sorted({a for by_annotator in given.values() for a in by_annotator})
    items, kept = {}, []
    decisions: dict[str, list[str]] = defaultdict(list)
    agreement: dict[str, list[str]] = defaultdict(list)
    for prompt in prompts:
        chosen = [given[prompt.id][a][0] for a in annotators]
        decision, agree = _decision(chosen, rule), _agreement(chosen)
        items[prompt.id] = {"category": prompt.category, "labels": dict(zip(annotators, chosen, strict=True))}
        items[prompt.id] |= {"decision": decision, "agreement": agree}
        for key in ("all", prompt.category):
            decisions[key].append(decision)
            agreement[key].append(agree)
        if decision == "keep":
            kept.append(prompt.model_copy(update={"expects": "mixed"}))
    votes = [Counter(item["labels"].values()) for item in items.values()]
    all_labels = Counter(label for v in votes for label in v.elements())
    report = {
        "rule": rule,
        "annotators": annotators,
        **_summary(decisions["all"], agreement["all"]),
        "label_counts": {k: all_labels[k] for k in FILTER_LABELS},
        "fleiss_kappa": {
            "labels": fleiss_kappa([[v[k] for k in FILTER_LABELS] for v in votes]),
            "keep_or_drop": fleiss_kappa([[v["keep"], len(annotators) - v["keep"]] for v in votes]),
        },
        "by_category": {c: _summary(decisions[c], agreement[c]) for c in sorted({p.category for p in prompts})},
        "prompt_set": {"before": statistics_of_prompts(prompts)},
        "items": items,
    }
    if kept:
        report["prompt_set"]["kept"] = statistics_of_prompts(kept)
    return kept, report

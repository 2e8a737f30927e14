"""Scores of human annotations, as in Chameleon's human evaluation (paper, sections 4.2-4.3).

Every item has exactly three annotators. The headline rates use each item's majority label; with no majority the
item counts as a tie (relative, as the paper does) or as partially fulfills (absolute: the middle of the scale).
Agreement shares: items where all three agree, where exactly two agree, where all three differ.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model.evaluation.human_eval import EvalFileError, read_jsonl
from schemas.eval_prompts import ABSOLUTE_LABELS, Annotation

ANNOTATORS = 3
NO_MAJORITY = {"absolute": "partially_fulfills", "relative": "tie"}
OUTCOMES = {"absolute": ABSOLUTE_LABELS, "relative": ("win", "tie", "loss")}  # relative: system A's result vs B
AGREEMENT = {1: "all_agree", 2: "two_agree", 3: "none_agree"}  # by the number of distinct labels of an item


def read_annotations(paths: Sequence[str | Path]) -> list[tuple[str, Annotation]]:
    """("file:line", annotation) from one or more annotation files (e.g. one per annotator)."""
    return [(f"{path}:{n}", a) for path in paths for n, a in read_jsonl(path, Annotation)]


def read_blinding(path: str | Path) -> dict[str, Any]:
    """The blinding map `make_comparison` wrote: {"seed", "systems": {"A", "B"}, "items": {id: {"first", ...}}}."""
    path = Path(path)
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvalFileError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EvalFileError(f"{path}: not a JSON blinding map ({err})") from None
    items = mapping.get("items") if isinstance(mapping, dict) else None
    if not isinstance(items, dict) or not all(
        isinstance(v, dict) and v.get("first") in ("A", "B") for v in items.values()
    ):
        raise EvalFileError(f"{path}: not a blinding map (expected items: {{id: {{first: A or B}}}})")
    return mapping


def _outcome(annotation: Annotation, blinding: dict[str, Any] | None) -> str:
    if annotation.task == "absolute":
        return annotation.label
    if annotation.label == "tie":
        return "tie"
    first = blinding["items"][annotation.item]["first"]  # the system shown as response 1
    winner = first if annotation.label == "first_wins" else ("B" if first == "A" else "A")
    return "win" if winner == "A" else "loss"


def _summary(task: str, labels_by_item: dict[str, list[str]]) -> dict[str, Any]:
    n = len(labels_by_item)
    majority, agreement = Counter(), Counter()
    for labels in labels_by_item.values():
        label, count = Counter(labels).most_common(1)[0]
        majority[label if count >= 2 else NO_MAJORITY[task]] += 1
        agreement[AGREEMENT[len(set(labels))]] += 1
    return {
        "items": n,
        "rates": {k: majority[k] / n for k in OUTCOMES[task]},
        "counts": {k: majority[k] for k in OUTCOMES[task]},
        "agreement": {k: agreement[k] / n for k in AGREEMENT.values()},
        "agreement_counts": {k: agreement[k] for k in AGREEMENT.values()},
    }


def score_annotations(
    annotations: Sequence[tuple[str, Annotation]],
    blinding: dict[str, Any] | None = None,
    known_items: set[str] | None = None,
) -> dict[str, Any]:
    """Rates (majority label per item) and agreement shares, overall and per category; EvalFileError when the
    annotations are not three per item, mix tasks, or name items the blinding map / `known_items` lack."""
    if not annotations:
        raise EvalFileError("no annotations")
    task = annotations[0][1].task
    if task == "relative" and blinding is None:
        raise EvalFileError("relative annotations need the blinding map `cham eval compare` wrote (--blinding)")
    if task == "relative":
        known_items = set(blinding["items"])
    labels: dict[str, list[str]] = defaultdict(list)
    annotators: dict[str, dict[str, str]] = defaultdict(dict)
    category: dict[str, tuple[str, str]] = {}
    for where, a in annotations:
        if a.task != task:
            raise EvalFileError(f"{where}: a {a.task} annotation among {task} ones; score each task on its own")
        if known_items is not None and a.item not in known_items:
            raise EvalFileError(f"{where}: item {a.item!r} is not one of the evaluated items")
        if a.annotator in annotators[a.item]:
            raise EvalFileError(
                f"{where}: annotator {a.annotator!r} already judged item {a.item!r} at "
                f"{annotators[a.item][a.annotator]}"
            )
        first_category = category.setdefault(a.item, (a.category, where))
        if first_category[0] != a.category:
            raise EvalFileError(
                f"{where}: item {a.item!r} has category {a.category!r} here but "
                f"{first_category[0]!r} at {first_category[1]}"
            )
        annotators[a.item][a.annotator] = where
        labels[a.item].append(_outcome(a, blinding))
    for item, who in annotators.items():
        if len(who) != ANNOTATORS:
            raise EvalFileError(
                f"item {item!r} has {len(who)} annotator(s) ({', '.join(sorted(who))}); every item "
                f"needs exactly {ANNOTATORS}"
            )
    by_category: dict[str, dict[str, list[str]]] = defaultdict(dict)
    for item, item_labels in labels.items():
        by_category[category[item][0]][item] = item_labels
    result = {"task": task, "annotators_per_item": ANNOTATORS, **_summary(task, labels)}
    if task == "relative":
        result["systems"] = blinding.get("systems", {})
    result["by_category"] = {name: _summary(task, items) for name, items in sorted(by_category.items())}
    if known_items is not None:
        result["unannotated_items"] = sorted(known_items - set(labels))
    return result

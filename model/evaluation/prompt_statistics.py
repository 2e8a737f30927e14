"""The prompt-set statistics Chameleon reports (paper, section 4.1): how many prompts are mixed-modal (text and
images) and how many text-only, and what their answers are expected to contain, overall and per category."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from schemas.eval_prompts import EvalPrompt

PROMPT_KINDS = ("mixed_modal", "text_only", "image_only")  # by what the prompt itself holds
ANSWER_KINDS = ("mixed", "text", "unknown")  # by what its answer is expected to hold (`expects`; unknown when unset)


def prompt_kind(text: str, images: int) -> str:
    """mixed_modal (text and images), text_only, or image_only."""
    if images and text.strip():
        return "mixed_modal"
    return "image_only" if images else "text_only"


def _summary(rows: Sequence[tuple[str, str]]) -> dict[str, Any]:
    n = len(rows)
    prompt, answer = Counter(r[0] for r in rows), Counter(r[1] for r in rows)
    return {
        "prompts": n,
        "prompt_modality": {k: prompt[k] for k in PROMPT_KINDS},
        "prompt_modality_shares": {k: prompt[k] / n for k in PROMPT_KINDS},
        "expected_answer": {k: answer[k] for k in ANSWER_KINDS},
        "expected_answer_shares": {k: answer[k] / n for k in ANSWER_KINDS},
    }


def prompt_set_statistics(items: Iterable[tuple[str, str, int, str | None]]) -> dict[str, Any]:
    """Counts and shares of (category, prompt text, number of images, expected answer or None) items, overall and
    per category (categories sorted by name)."""
    rows: list[tuple[str, str]] = []
    by_category: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for category, text, images, expects in items:
        row = (prompt_kind(text, images), expects or "unknown")
        rows.append(row)
        by_category[category].append(row)
    if not rows:
        raise ValueError("no prompts to count")
    return {**_summary(rows), "by_category": {k: _summary(v) for k, v in sorted(by_category.items())}}


def statistics_of_prompts(prompts: Sequence[EvalPrompt]) -> dict[str, Any]:
    """`prompt_set_statistics` of a prompt file's prompts (`read_prompts`)."""
    return prompt_set_statistics((p.category, p.prompt, len(p.images), p.expects) for p in prompts)


def statistics_of_responses(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """`prompt_set_statistics` of the prompts a responses file answers (`read_responses`); the expected answer is
    known only where a record carries `expects` (the augmented baseline's do)."""
    return prompt_set_statistics(
        (r["category"], r["prompt"], len(r["prompt_images"]), r.get("expects")) for r in records
    )

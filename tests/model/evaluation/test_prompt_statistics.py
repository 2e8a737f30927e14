"""The prompt-set statistics: prompts by what they hold and by what their answer is expected to hold."""

from __future__ import annotations

import pytest

from model.evaluation.prompt_statistics import (
    prompt_kind,
    prompt_set_statistics,
    statistics_of_prompts,
    statistics_of_responses,
)
from schemas.eval_prompts import EvalPrompt


def test_prompt_kinds() -> None:
    assert prompt_kind("What is this?", 1) == "mixed_modal"
    assert prompt_kind("Tell me a story.", 0) == "text_only"
    assert prompt_kind("  \n", 2) == "image_only"  # whitespace is no text


def test_counts_and_shares_overall_and_per_category() -> None:
    prompts = [
        EvalPrompt(id="a", prompt="Show me.", category="story", expects="mixed"),
        EvalPrompt(id="b", prompt="What is it?", images=["x.png"], category="story", expects="text"),
        EvalPrompt(id="c", images=["y.png"], category="other"),
        EvalPrompt(id="d", prompt="Explain.", category="other"),
    ]
    stats = statistics_of_prompts(prompts)
    assert stats["prompts"] == 4
    assert stats["prompt_modality"] == {"mixed_modal": 1, "text_only": 2, "image_only": 1}
    assert stats["prompt_modality_shares"] == {"mixed_modal": 0.25, "text_only": 0.5, "image_only": 0.25}
    assert stats["expected_answer"] == {"mixed": 1, "text": 1, "unknown": 2}
    assert list(stats["by_category"]) == ["other", "story"]
    assert stats["by_category"]["story"]["expected_answer_shares"] == {"mixed": 0.5, "text": 0.5, "unknown": 0.0}
    assert stats["by_category"]["other"]["prompt_modality"] == {"mixed_modal": 0, "text_only": 1, "image_only": 1}


def test_responses_count_their_prompts_and_expects_when_given() -> None:
    records = [
        {"id": "a", "category": "how-to", "prompt": "Brew tea.", "prompt_images": [], "response": []},
        {"id": "b", "category": "how-to", "prompt": "Fix it.", "prompt_images": ["p.png"], "response": []},
        {"id": "c", "category": "how-to", "prompt": "Draw.", "prompt_images": [], "response": [], "expects": "mixed"},
    ]
    stats = statistics_of_responses(records)
    assert stats["prompt_modality"] == {"mixed_modal": 1, "text_only": 2, "image_only": 0}
    assert stats["expected_answer"] == {"mixed": 1, "text": 0, "unknown": 2}
    with pytest.raises(ValueError, match="no prompts"):
        prompt_set_statistics([])

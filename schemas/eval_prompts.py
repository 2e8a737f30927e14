"""Records of the human-evaluation harness: prompts in, annotations back (one JSON object per line each)."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, model_validator

from schemas.config_base import StrictModel

# The task categories of Chameleon's evaluation prompts (paper, section 4.1); a prompt file may use others.
CHAMELEON_CATEGORIES = (
    "how-to",
    "advice",
    "explanation",
    "hypothetical",
    "brainstorming",
    "reasoning",
    "comparison",
    "identification",
    "article",
    "report",
    "story",
    "other",
)

AbsoluteLabel = Literal["fulfills", "partially_fulfills", "does_not_fulfill"]
ABSOLUTE_LABELS: tuple[str, ...] = get_args(AbsoluteLabel)
# Relative labels name the blinded slots of the comparison page; the blinding map says which system each was.
RelativeLabel = Literal["first_wins", "tie", "second_wins"]
RELATIVE_LABELS: tuple[str, ...] = get_args(RelativeLabel)
EvalTask = Literal["absolute", "relative"]
# Prompt filtering (paper, section 4.1): each annotator says whether a prompt is clear and calls for a mixed-modal
# answer ("keep"), is unclear, or is clear but needs no image in its answer.
FilterLabelValue = Literal["keep", "unclear", "not_mixed_modal"]
FILTER_LABELS: tuple[str, ...] = get_args(FilterLabelValue)
# What a prompt's answer is expected to contain: text only, or text and images.
ExpectedAnswer = Literal["text", "mixed"]

# Ids become file names (images/{id}-...png) and HTML attributes: keep them to a safe alphabet.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class EvalPrompt(StrictModel):
    """One prompt: its text and images (paths relative to the prompt file, shown before the text)."""

    id: str = Field(pattern=ID_PATTERN, max_length=100)
    prompt: str = ""
    images: list[str] = Field(default_factory=list)
    category: str = Field(min_length=1)
    # Optional: set on the prompts that filtering kept ("mixed"); counted by the prompt-set statistics.
    expects: ExpectedAnswer | None = None

    @model_validator(mode="after")
    def _has_content(self) -> EvalPrompt:
        if not self.prompt.strip() and not self.images:
            raise ValueError("prompt: give prompt text, images, or both")
        return self


class Annotation(StrictModel):
    """One annotator's judgement of one item (absolute: one response; relative: two, blinded)."""

    task: EvalTask
    item: str = Field(pattern=ID_PATTERN, max_length=100)
    category: str = Field(min_length=1)
    annotator: str = Field(min_length=1)
    label: str

    @model_validator(mode="after")
    def _label_fits_task(self) -> Annotation:
        allowed = ABSOLUTE_LABELS if self.task == "absolute" else RELATIVE_LABELS
        if self.label not in allowed:
            raise ValueError(f"label: {self.label!r} is not a {self.task} label; allowed: {', '.join(allowed)}")
        return self


class FilterLabel(StrictModel):
    """One annotator's filtering label of one prompt (the line a filtering page's download button writes)."""

    task: Literal["filter"]
    item: str = Field(pattern=ID_PATTERN, max_length=100)
    category: str = Field(min_length=1)
    annotator: str = Field(min_length=1)
    label: FilterLabelValue


class BaselineAnswer(StrictModel):
    """One answer of a text-only baseline to a prompt of the baseline's prompt file (a line of the file the user
    brings, e.g. from an API model): `<caption>...</caption>` tags mark where its images belong."""

    id: str = Field(pattern=ID_PATTERN, max_length=100)
    answer: str
    system: str | None = None  # the baseline's name, e.g. the API model's

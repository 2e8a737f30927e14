"""VQAv2 accuracy as the official evaluation (GT-Vision-Lab/VQA, vqaEval.py) computes it.

An answer scores min(#humans who gave it / 3, 1), averaged over the ten leave-one-human-out subsets of the ten human
answers (so 3 matching humans of 10 score 0.9, not 1). Answers are normalised as the official code does: punctuation
removed or made a space, number words made digits, articles dropped, contractions given their apostrophe; and, as
there, only for questions whose humans did not all give the same answer (when they all agree the answer is compared
as given, whitespace trimmed). Checked against the official code's outputs on the same inputs:
tests/model/evaluation/benchmarks/fixtures/reference.json.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

_PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not before a digit (3.5 keeps its point)
_PERIODS_REMOVED = 32  # the official code passes re.UNICODE (32) where `sub` takes its count
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# The official table, as `spelling:replacement` pairs. Entries spelled with capitals (Im, Ive, Id've, I'dve) never
# match (answers are lowercased first) and are left out; `somebody'd -> somebodyd` is the official table's own.
_CONTRACTION_TABLE = """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've couldnt've:couldn't've
didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've hadn'tve:hadn't've hasnt:hasn't
havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd howll:how'll hows:how's isnt:isn't
itd:it'd itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't mightnt've:mightn't've
mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've neednt:needn't notve:not've oclock:o'clock
oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've
she's:she's shouldve:should've shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've
somebody'd:somebodyd somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll
somebodys:somebody's someoned:someone'd someoned've:someone'd've someone'dve:someone'd've someonell:someone'll
someones:someone's somethingd:something'd somethingd've:something'd've something'dve:something'd've
somethingll:something'll thats:that's thered:there'd thered've:there'd've there'dve:there'd've therere:there're
theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've
twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're
whats:what's whatve:what've whens:when's whered:where'd wheres:where's whereve:where've whod:who'd whod've:who'd've
who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll whyre:why're whys:why's wont:won't
wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll
y'allll:y'all'll yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've
you'dve:you'd've youll:you'll youre:you're youve:you've
"""
_CONTRACTIONS = dict(pair.split(":", 1) for pair in _CONTRACTION_TABLE.split())


def _punctuation(text: str) -> str:
    """Each punctuation mark removed when it touches a space (or the text has a digit,digit), else made a space;
    then periods not before a digit removed."""
    out = text
    drop = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCTUATION:
        # The official test reads the original text, not the text as already changed by earlier marks.
        out = out.replace(mark, "" if drop or f"{mark} " in text or f" {mark}" in text else " ")
    return _PERIOD.sub("", out, count=_PERIODS_REMOVED)


def _digits_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """An answer as the official evaluation compares it (when the humans disagree)."""
    return _digits_articles(_punctuation(answer))


def _trim(answer: str) -> str:
    return answer.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(answer: str, human_answers: Sequence[str]) -> float:
    """The official accuracy of one answer (0..1) against the humans' answers (ten in VQAv2)."""
    if not human_answers:
        raise ValueError("a question needs human answers to be scored")
    humans, answer = [_trim(a) for a in human_answers], _trim(answer)
    if len(set(humans)) > 1:
        humans, answer = [normalize_answer(a) for a in humans], normalize_answer(answer)
    matches = [h == answer for h in humans]
    total = sum(matches)
    # Leave each human out in turn: the others who match it, at most 3, over 3.
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(humans)


def score_vqa(annotations: Sequence[Mapping[str, Any]], answers: Mapping[Hashable, str]) -> dict[str, Any]:
    """Accuracy in percent over the annotated questions (`question_id`, `answers`: [{"answer"}], `answer_type`,
    `question_type`), overall, per answer type and per question type, and per question. `answers` maps each
    question id to the model's answer; a question without one is an error."""
    missing = [a["question_id"] for a in annotations if a["question_id"] not in answers]
    if missing:
        raise ValueError(f"{len(missing)} questions have no answer, e.g. {missing[0]!r}")
    per_question: dict[Hashable, float] = {}
    by_answer_type: dict[str, list[float]] = {}
    by_question_type: dict[str, list[float]] = {}
    for a in annotations:
        accuracy = 100.0 * vqa_accuracy(answers[a["question_id"]], [h["answer"] for h in a["answers"]])
        per_question[a["question_id"]] = accuracy
        by_answer_type.setdefault(str(a.get("answer_type")), []).append(accuracy)
        by_question_type.setdefault(str(a.get("question_type")), []).append(accuracy)

    def mean(values: Sequence[float]) -> float:
        return sum(values) / len(values)

    return {
        "accuracy": mean(list(per_question.values())) if per_question else 0.0,
        "by_answer_type": {k: mean(v) for k, v in by_answer_type.items()},
        "by_question_type": {k: mean(v) for k, v in by_question_type.items()},
        "per_question": per_question,
    }

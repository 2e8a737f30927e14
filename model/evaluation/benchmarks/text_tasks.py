"""Text benchmarks read from their own published files, posed as lm-evaluation-harness poses them.

Each reader turns one task's published format into `ChoiceDoc`s (multiple choice, scored by log-likelihood) or
`GenerateDoc`s (generation, scored by exact match), with the prompt text of lm-evaluation-harness's task YAML:

- HellaSwag (rowanz jsonl: activity_label, ctx_a, ctx_b, endings, label): lm-eval's `preprocess` of
  "{activity_label}: {ctx_a} {ctx_b.capitalize()}" and of each ending.
- ARC (AI2 jsonl: question.stem, question.choices[].text/label, answerKey; or HF's flat question / choices):
  "Question: {question}\\nAnswer:".
- PIQA (goal, sol1, sol2 jsonl; the label in the record or in the `*-labels.lst` file beside it):
  "Question: {goal}\\nAnswer:".
- WinoGrande (sentence with "_", option1, option2, answer "1"/"2"): partial scoring, the context is the sentence up to
  the blank with each option, the scored continuation the rest of the sentence.
- BoolQ (question, passage, answer true/false; or SuperGLUE's label): "{passage}\\nQuestion: {question}?\\nAnswer:",
  choices "no" / "yes".
- MMLU (Hendrycks' headerless csv `<subject>_<split>.csv`: question, A-D, answer letter; or HF's jsonl with subject,
  choices, answer index): the subject's description, "A. ...\\nAnswer:", choices " A".." D", few-shot first-n.
- GSM8K (question, answer ending "#### N"): "Question: {question}\\nAnswer:", greedy generation until "Question:".

Few-shot examples follow lm-eval's samplers exactly (`fewshot_examples`), so with the same seed and pool the prompts
are lm-eval's character for character.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

FORMATS = ("hellaswag", "arc", "piqa", "winogrande", "boolq", "mmlu", "gsm8k")
Format = Literal["hellaswag", "arc", "piqa", "winogrande", "boolq", "mmlu", "gsm8k"]
DEFAULT_FEWSHOT_SEED = 1234  # lm-evaluation-harness's default fewshot_random_seed
MAX_TASK_BYTES = 512 << 20  # a task file is read whole: refuse anything this large rather than exhaust memory
MMLU_LETTERS = ("A", "B", "C", "D")
GSM8K_UNTIL = ("Question:", "</s>", "<|im_end|>")
# The bundled sample files under sample/eval/text/ (written by the team): name -> (task file, few-shot file or None).
SAMPLE_TASKS: dict[str, tuple[str, str | None]] = {
    "hellaswag": ("hellaswag.jsonl", None),
    "arc": ("arc_challenge.jsonl", None),
    "piqa": ("piqa_valid.jsonl", None),
    "winogrande": ("winogrande.jsonl", None),
    "boolq": ("boolq.jsonl", None),
    "mmlu": ("mmlu/astronomy_test.csv", "mmlu/astronomy_dev.csv"),
    "gsm8k": ("gsm8k.jsonl", None),
}


class TaskFileError(ValueError):
    """A task file that cannot be read as the format it claims, naming the file and the line."""


@dataclass(frozen=True)
class ChoiceDoc:
    """One multiple-choice question.

    Usually every choice is scored as the continuation of `query`. With `continuation` set (WinoGrande's partial
    scoring), `choices` are the contexts instead and the shared `continuation` is scored after each of them.
    """

    query: str
    choices: tuple[str, ...]
    gold: int
    continuation: str | None = None
    description: str = ""  # text before the few-shot examples (MMLU's subject line)

    @property
    def partial(self) -> bool:
        """Scored by the continuation after each choice (WinoGrande), not by each choice after the query."""
        return self.continuation is not None

    def example(self) -> tuple[str, str]:
        """(question, answer) as a solved few-shot example shows it."""
        if self.continuation is not None:
            return self.choices[self.gold], self.continuation
        return self.query, self.choices[self.gold]


@dataclass(frozen=True)
class GenerateDoc:
    """One question answered by generation; `target` is the full reference answer (GSM8K: reasoning, "#### N")."""

    query: str
    target: str
    description: str = ""

    def example(self) -> tuple[str, str]:
        """(question, answer) as a solved few-shot example shows it."""
        return self.query, self.target


@dataclass(frozen=True)
class TextTask:
    """The documents of one task file and how lm-eval prompts and scores them."""

    name: str
    format: Format
    docs: tuple[ChoiceDoc, ...] | tuple[GenerateDoc, ...]
    path: Path
    fewshot_sampler: Literal["random", "first_n"] = "random"
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    until: tuple[str, ...] = field(default=())  # generation stops at any of these

    @property
    def kind(self) -> Literal["multiple_choice", "generate"]:
        """How the task is scored."""
        return "generate" if self.format == "gsm8k" else "multiple_choice"


def _records(path: Path) -> list[dict[str, Any]]:
    """The objects of a jsonl file (or of a JSON array), each checked to be an object."""
    text = _read_text(path)
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise TaskFileError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
        rows = list(enumerate(data, 1))
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise TaskFileError(f"{path}:{number}: not a JSON line ({err.msg})") from None
    for number, row in rows:
        if not isinstance(row, dict):
            raise TaskFileError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
    return [row for _, row in rows]


def _read_text(path: Path) -> str:
    try:
        if path.stat().st_size > MAX_TASK_BYTES:
            raise TaskFileError(f"{path}: larger than {MAX_TASK_BYTES >> 20} MiB; split it")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskFileError(f"{path}: no such file") from None
    except UnicodeDecodeError as err:
        raise TaskFileError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise TaskFileError(f"{path}: cannot read it ({err.strerror or err})") from None


def _field(record: dict[str, Any], key: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    if key not in record:
        raise TaskFileError(f"{where}: no {key!r} field")
    value = record[key]
    if not isinstance(value, kind):
        raise TaskFileError(f"{where}: {key!r} is a {type(value).__name__}")
    return value


def _gold(value: Any, n: int, where: str) -> int:
    try:
        gold = int(value)
    except (TypeError, ValueError):
        raise TaskFileError(f"{where}: the label {value!r} is not an index") from None
    if not 0 <= gold < n:
        raise TaskFileError(f"{where}: the label {gold} is not one of the {n} choices")
    return gold


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleaning: WikiHow's " [title]" becomes ". ", other [bracketed] artifacts go."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(path: Path) -> list[ChoiceDoc]:
    """HellaSwag's jsonl (activity_label, ctx_a, ctx_b, endings, label)."""
    docs = []
    for n, r in enumerate(_records(path), 1):
        where = f"{path}: record {n}"
        endings = _field(r, "endings", where, list)
        ctx = _field(r, "ctx_a", where) + " " + _field(r, "ctx_b", where).capitalize()
        query = hellaswag_preprocess(_field(r, "activity_label", where) + ": " + ctx)
        choices = tuple(hellaswag_preprocess(str(e)) for e in endings)
        docs.append(ChoiceDoc(query, choices, _gold(_field(r, "label", where, (int, str)), len(choices), where)))
    return docs


def read_arc(path: Path) -> list[ChoiceDoc]:
    """ARC's jsonl: AI2's (question.stem, question.choices, answerKey) or HF's flat (question, choices.text)."""
    docs = []
    for n, r in enumerate(_records(path), 1):
        where = f"{path}: record {n}"
        question = _field(r, "question", where, (str, dict))
        if isinstance(question, dict):  # AI2's published layout
            stem = _field(question, "stem", where)
            options = _field(question, "choices", where, list)
            texts = [str(_field(c, "text", where, (str, int))) for c in options]
            labels = [str(_field(c, "label", where, (str, int))) for c in options]
        else:
            stem, choices = question, _field(r, "choices", where, dict)
            texts = [str(t) for t in _field(choices, "text", where, list)]
            labels = [str(t) for t in _field(choices, "label", where, list)]
        key = str(_field(r, "answerKey", where, (str, int)))
        if key not in labels:
            raise TaskFileError(f"{where}: answerKey {key!r} is none of the labels {labels}")
        docs.append(ChoiceDoc(f"Question: {stem}\nAnswer:", tuple(texts), labels.index(key)))
    return docs


def read_piqa(path: Path) -> list[ChoiceDoc]:
    """PIQA's jsonl (goal, sol1, sol2); labels from each record's `label` or the `<stem>-labels.lst` beside it."""
    records = _records(path)
    labels_file = path.with_name(path.name.rsplit(".", 1)[0] + "-labels.lst")
    labels: list[str] | None = None
    if not all("label" in r for r in records):
        if not labels_file.is_file():
            raise TaskFileError(f"{path}: its records have no label and there is no {labels_file.name} beside it")
        labels = _read_text(labels_file).split()
        if len(labels) != len(records):
            raise TaskFileError(f"{labels_file}: {len(labels)} labels for {len(records)} questions")
    docs = []
    for n, r in enumerate(records, 1):
        where = f"{path}: record {n}"
        choices = (_field(r, "sol1", where), _field(r, "sol2", where))
        label = r["label"] if labels is None else labels[n - 1]
        docs.append(ChoiceDoc(f"Question: {_field(r, 'goal', where)}\nAnswer:", choices, _gold(label, 2, where)))
    return docs


def read_winogrande(path: Path) -> list[ChoiceDoc]:
    """WinoGrande's jsonl (sentence with one "_", option1, option2, answer "1" or "2"), scored partially."""
    docs = []
    for n, r in enumerate(_records(path), 1):
        where = f"{path}: record {n}"
        sentence = _field(r, "sentence", where)
        if "_" not in sentence:
            raise TaskFileError(f"{where}: the sentence has no blank (_)")
        blank = sentence.index("_")
        options = (_field(r, "option1", where), _field(r, "option2", where))
        answer = str(_field(r, "answer", where, (str, int)))
        if answer not in ("1", "2"):
            raise TaskFileError(f"{where}: answer {answer!r} is neither '1' nor '2'")
        contexts = tuple(sentence[:blank] + option for option in options)
        docs.append(ChoiceDoc("", contexts, int(answer) - 1, continuation=sentence[blank + 1 :].strip()))
    return docs


def read_boolq(path: Path) -> list[ChoiceDoc]:
    """BoolQ's jsonl (question, passage, answer true/false; or SuperGLUE's label 0/1)."""
    docs = []
    for n, r in enumerate(_records(path), 1):
        where = f"{path}: record {n}"
        if "answer" in r:
            gold = int(_field(r, "answer", where, bool))
        else:
            gold = _gold(_field(r, "label", where, (int, str)), 2, where)
        query = f"{_field(r, 'passage', where)}\nQuestion: {_field(r, 'question', where)}?\nAnswer:"
        docs.append(ChoiceDoc(query, ("no", "yes"), gold))
    return docs


_SPLIT_SUFFIX = re.compile(r"^mmlu_|_(test|dev|val|train)$")  # astronomy_test.csv -> astronomy


def mmlu_description(subject: str) -> str:
    """lm-eval's MMLU description line for a subject such as "abstract_algebra"."""
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def _mmlu_doc(question: str, options: Sequence[str], gold: int, subject: str) -> ChoiceDoc:
    lines = "".join(f"\n{letter}. {option}" for letter, option in zip(MMLU_LETTERS, options, strict=True))
    return ChoiceDoc(f"{question.strip()}{lines}\nAnswer:", MMLU_LETTERS, gold, description=mmlu_description(subject))


def read_mmlu(path: Path) -> list[ChoiceDoc]:
    """MMLU: Hendrycks' headerless `<subject>_<split>.csv` (question, A, B, C, D, answer letter), or HF's jsonl
    (question, subject, choices, answer index)."""
    if path.suffix == ".csv":
        subject = _SPLIT_SUFFIX.sub("", path.stem)
        docs = []
        for n, row in enumerate(csv.reader(_read_text(path).splitlines()), 1):
            if not row:
                continue
            if len(row) != 6 or row[5].strip() not in MMLU_LETTERS:
                raise TaskFileError(f"{path}:{n}: expected question, A, B, C, D, answer letter ({len(row)} columns)")
            docs.append(_mmlu_doc(row[0], row[1:5], MMLU_LETTERS.index(row[5].strip()), subject))
        return docs
    docs = []
    for n, r in enumerate(_records(path), 1):
        where = f"{path}: record {n}"
        options = _field(r, "choices", where, list)
        if len(options) != 4:
            raise TaskFileError(f"{where}: MMLU has 4 choices, this record {len(options)}")
        gold = _gold(_field(r, "answer", where, (int, str)), 4, where)
        docs.append(_mmlu_doc(_field(r, "question", where), [str(o) for o in options], gold, r.get("subject", "")))
    return docs


def read_gsm8k(path: Path) -> list[GenerateDoc]:
    """GSM8K's jsonl (question, answer whose last line is "#### N")."""
    docs = []
    for n, r in enumerate(_records(path), 1):
        where = f"{path}: record {n}"
        answer = _field(r, "answer", where)
        if "####" not in answer:
            raise TaskFileError(f"{where}: the answer has no '#### N' line")
        docs.append(GenerateDoc(f"Question: {_field(r, 'question', where)}\nAnswer:", answer))
    return docs


READERS: dict[str, Callable[[Path], list[Any]]] = {
    "hellaswag": read_hellaswag,
    "arc": read_arc,
    "piqa": read_piqa,
    "winogrande": read_winogrande,
    "boolq": read_boolq,
    "mmlu": read_mmlu,
    "gsm8k": read_gsm8k,
}
# A format is recognised from the fields of a file's first record when its name does not say it.
_SIGNATURES: tuple[tuple[str, frozenset[str]], ...] = (
    ("hellaswag", frozenset({"ctx_a", "endings"})),
    ("winogrande", frozenset({"sentence", "option1"})),
    ("piqa", frozenset({"goal", "sol1"})),
    ("boolq", frozenset({"passage", "question"})),
    ("arc", frozenset({"answerKey"})),
    ("mmlu", frozenset({"choices", "answer", "question"})),
    ("gsm8k", frozenset({"question", "answer"})),
)


def detect_format(path: Path) -> Format:
    """The format of a task file: named in its file name (arc_challenge_test.jsonl, hellaswag_val.jsonl, ...), an
    MMLU csv, or recognised from the fields of its first record."""
    name = path.name.lower()
    for fmt in FORMATS:
        if fmt in name or (fmt == "arc" and name.startswith(("arc-", "arc_"))):
            return fmt  # type: ignore[return-value]
    if path.suffix == ".csv":
        return "mmlu"
    records = _records(path)
    if records:
        keys = set(records[0])
        for fmt, needed in _SIGNATURES:
            if needed <= keys:
                return fmt  # type: ignore[return-value]
    raise TaskFileError(f"{path}: cannot tell its format; pass it (one of {', '.join(FORMATS)})")


def read_task(path: str | Path, fmt: str | None = None) -> TextTask:
    """A task file read in its published format (`fmt`, or `detect_format`)."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt not in READERS:
        raise TaskFileError(f"unknown task format {fmt!r}; known: {', '.join(FORMATS)}")
    docs = READERS[fmt](path)
    if not docs:
        raise TaskFileError(f"{path}: no questions in it")
    name = "mmlu_" + _SPLIT_SUFFIX.sub("", path.stem) if fmt == "mmlu" else fmt
    return TextTask(
        name=name,
        format=fmt,  # type: ignore[arg-type]
        docs=tuple(docs),
        path=path,
        fewshot_sampler="first_n" if fmt == "mmlu" else "random",
        until=GSM8K_UNTIL if fmt == "gsm8k" else (),
    )


def sample_folder() -> Path:
    """sample/eval/text/ of the repository (or of $CHAM_SAMPLE_DIR, as `cham sample-data` reads it)."""
    root = os.environ.get("CHAM_SAMPLE_DIR") or Path(__file__).resolve().parents[3] / "sample"
    return Path(root) / "eval" / "text"


def resolve_task(name_or_path: str | Path) -> tuple[Path, Path | None]:
    """(task file, its bundled few-shot file or None) for a path, or for the name of a bundled sample task."""
    path = Path(name_or_path)
    if path.exists() or str(name_or_path) not in SAMPLE_TASKS:
        if not path.exists():
            raise TaskFileError(f"{path}: no such file, and not a bundled task ({', '.join(SAMPLE_TASKS)})")
        return path, None
    task_file, fewshot_file = SAMPLE_TASKS[str(name_or_path)]
    folder = sample_folder()
    return folder / task_file, (folder / fewshot_file if fewshot_file else None)


def fewshot_examples(
    task: TextTask,
    shots: int,
    pool: Sequence[ChoiceDoc | GenerateDoc] | None = None,
    seed: int = DEFAULT_FEWSHOT_SEED,
    limit: int | None = None,
) -> list[list[ChoiceDoc | GenerateDoc]]:
    """The solved examples shown before each of the task's first `limit` documents, as lm-eval's samplers draw them.

    `pool` is a separate few-shot split (MMLU's dev file, a train file); without one the examples come from the
    task's own documents, never the question itself. One `random.Random(seed)` serves the documents in order:
    "random" draws shots (shots + 1 from the task's own documents, the question then dropped); "first_n" takes the
    first ones.
    """
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    same_split = pool is None
    candidates = list(task.docs if pool is None else pool)
    rnd = random.Random(seed)
    docs = task.docs[:limit] if limit is not None else task.docs
    out: list[list[ChoiceDoc | GenerateDoc]] = []
    for doc in docs:
        if shots == 0:
            out.append([])
            continue
        others = [x for x in candidates if x != doc] if same_split else candidates
        if len(others) < shots:
            raise TaskFileError(f"{task.path}: {shots} shots asked, {len(others)} other questions to draw them from")
        if task.fewshot_sampler == "first_n":
            out.append(others[:shots])
            continue
        if same_split:
            drawn = [x for x in rnd.sample(candidates, shots + 1) if x != doc][:shots]
            if len(drawn) < shots:  # copies of the question were drawn: draw again without them, as lm-eval does
                drawn = rnd.sample(others, shots)
        else:
            drawn = rnd.sample(candidates, shots)
        out.append(drawn)
    return out


def prompt_prefix(task: TextTask, doc: ChoiceDoc | GenerateDoc, examples: Sequence[ChoiceDoc | GenerateDoc]) -> str:
    """The description and the solved examples before a question: lm-eval's system message and few-shot turns."""
    shown = "".join(q + task.target_delimiter + a + task.fewshot_delimiter for q, a in (e.example() for e in examples))
    return doc.description + shown


def choice_requests(
    task: TextTask, doc: ChoiceDoc, examples: Sequence[ChoiceDoc | GenerateDoc]
) -> list[tuple[str, str]]:
    """(context, continuation) per choice, the strings lm-eval scores: the continuation starts with the delimiter."""
    prefix = prompt_prefix(task, doc, examples)
    if doc.continuation is not None:
        return [(prefix + context, task.target_delimiter + doc.continuation) for context in doc.choices]
    return [(prefix + doc.query, task.target_delimiter + choice) for choice in doc.choices]

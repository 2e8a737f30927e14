"""Readers of the image-to-text benchmarks' published formats, from local files.

- COCO-Karpathy (`dataset_coco.json`): {"images": [{"filepath", "filename", "split", "cocoid", "sentences": [{"raw"}]}]}
- COCO caption annotations (`captions_val2014.json`): {"images": [{"id", "file_name"}], "annotations":
  [{"image_id", "caption"}]}; results (what the COCO server takes): [{"image_id", "caption"}]
- VQAv2 questions (`v2_OpenEnded_mscoco_val2014_questions.json`): {"data_subtype", "questions": [{"question_id",
  "image_id", "question"}]} and annotations (`v2_mscoco_val2014_annotations.json`): {"annotations": [{"question_id",
  "image_id", "answers": [{"answer"}], "multiple_choice_answer", "answer_type", "question_type"}]}; results:
  [{"question_id", "answer"}]. Images are found as COCO names them (`COCO_val2014_000000000042.jpg`) in the image
  folder or its `val2014/`, or by an `"images": [{"id", "file_name"}]` list in the questions file (the bundled sample
  has one; the published files do not).

Every reader refuses a file over `MAX_JSON_BYTES` before reading it, and raises BenchmarkFileError naming the file
and the entry that is wrong.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.files.reading import read_json

MAX_JSON_BYTES = 2 * 2**30  # the largest published file (VQAv2 train annotations) is about 0.3 GB
KARPATHY_SUPPORT_SPLITS = ("train", "restval")


class BenchmarkFileError(ValueError):
    """A benchmark file that cannot be used: the message names the file, the entry and what is wrong."""


@dataclass(frozen=True)
class CaptionImage:
    """One image of a captioning set: its id, its file (None when no image folder was given), its reference
    captions and its Karpathy split (None in COCO annotation files)."""

    image_id: Hashable
    file: Path | None
    captions: list[str]
    split: str | None = None


@dataclass(frozen=True)
class VQAQuestion:
    """One VQAv2 question with its image and the humans' answers (empty when no annotations were given)."""

    question_id: Hashable
    image_id: Hashable
    question: str
    file: Path | None
    answers: list[str] = field(default_factory=list)
    answer_type: str | None = None
    question_type: str | None = None
    multiple_choice_answer: str | None = None

    def shot_answer(self) -> str:
        """The answer shown when this question is a few-shot example: the annotators' most common one."""
        if self.multiple_choice_answer:
            return self.multiple_choice_answer
        return Counter(self.answers).most_common(1)[0][0]


def read_benchmark_json(path: str | Path) -> Any:
    """The JSON value of a benchmark file, refused over MAX_JSON_BYTES; BenchmarkFileError naming it otherwise."""
    path = Path(path)
    if path.is_file() and path.stat().st_size > MAX_JSON_BYTES:
        raise BenchmarkFileError(
            f"{path}: {path.stat().st_size:,} bytes, more than a benchmark file's {MAX_JSON_BYTES:,}"
        )
    return read_json(path, BenchmarkFileError)


def _field(entry: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(entry, dict):
        raise BenchmarkFileError(f"{where}: not a JSON object")
    if key not in entry:
        raise BenchmarkFileError(f"{where}: no {key!r}")
    value = entry[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise BenchmarkFileError(f"{where}: {key!r} is {type(value).__name__}, expected {names}")
    return value


def _list(data: Any, key: str, path: Path, what: str) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise BenchmarkFileError(f"{path}: not {what} (no {key!r} list)")
    return data[key]


def _image_file(images: Path | None, candidates: list[Path], where: str) -> Path | None:
    """The first candidate that exists under `images`; None without an image folder."""
    if images is None:
        return None
    for candidate in candidates:
        if (images / candidate).is_file():
            return images / candidate
    tried = ", ".join(str(images / c) for c in candidates)
    raise BenchmarkFileError(f"{where}: image not found (looked for {tried})")


def read_coco_karpathy(path: str | Path, images: str | Path | None = None) -> list[CaptionImage]:
    """Every image of a COCO-Karpathy file; files are images/filepath/filename or images/filename."""
    return _karpathy(read_benchmark_json(path), Path(path), Path(images) if images is not None else None)


def _karpathy(data: Any, path: Path, root: Path | None) -> list[CaptionImage]:
    out, seen = [], set()
    for n, entry in enumerate(_list(data, "images", path, "a COCO-Karpathy file")):
        where = f"{path}: images[{n}]"
        name = _field(entry, "filename", str, where)
        image_id = entry.get("cocoid", entry.get("imgid", name))
        if image_id in seen:
            raise BenchmarkFileError(f"{where}: image id {image_id!r} appears twice")
        seen.add(image_id)
        sentences = _field(entry, "sentences", list, where)
        captions = [_field(s, "raw", str, f"{where}.sentences[{k}]") for k, s in enumerate(sentences)]
        if not captions:
            raise BenchmarkFileError(f"{where}: no sentences")
        folder = entry.get("filepath") or ""
        file = _image_file(root, [Path(folder) / name, Path(name)] if folder else [Path(name)], where)
        out.append(CaptionImage(image_id, file, captions, _field(entry, "split", str, where)))
    if not out:
        raise BenchmarkFileError(f"{path}: no images")
    return out


def read_coco_captions(path: str | Path, images: str | Path | None = None) -> list[CaptionImage]:
    """Every annotated image of a COCO caption annotation file, in the file's image order."""
    return _coco(read_benchmark_json(path), Path(path), Path(images) if images is not None else None)


def _coco(data: Any, path: Path, root: Path | None) -> list[CaptionImage]:
    captions: dict[Hashable, list[str]] = {}
    for n, entry in enumerate(_list(data, "annotations", path, "a COCO caption annotation file")):
        where = f"{path}: annotations[{n}]"
        image_id = _field(entry, "image_id", (int, str), where)
        captions.setdefault(image_id, []).append(_field(entry, "caption", str, where))
    out, names = [], {}
    for n, entry in enumerate(_list(data, "images", path, "a COCO caption annotation file")):
        where = f"{path}: images[{n}]"
        names[_field(entry, "id", (int, str), where)] = (_field(entry, "file_name", str, where), where)
    unknown = [k for k in captions if k not in names]
    if unknown:
        raise BenchmarkFileError(f"{path}: captions of image {unknown[0]!r}, which is not in its images list")
    for image_id, (name, where) in names.items():
        if image_id in captions:
            out.append(CaptionImage(image_id, _image_file(root, [Path(name)], where), captions[image_id]))
    if not out:
        raise BenchmarkFileError(f"{path}: no captions")
    return out


def read_caption_set(path: str | Path, images: str | Path | None = None) -> tuple[str, list[CaptionImage]]:
    """("karpathy" or "coco", the images) of either format, told apart by their keys."""
    path = Path(path)
    data = read_benchmark_json(path)
    root = Path(images) if images is not None else None
    if isinstance(data, dict) and "annotations" in data:
        return "coco", _coco(data, path, root)
    if isinstance(data, dict) and isinstance(data.get("images"), list) and data["images"]:
        return "karpathy", _karpathy(data, path, root)
    raise BenchmarkFileError(
        f"{path}: neither a COCO-Karpathy file (images with sentences) nor COCO caption annotations"
    )


def _results(path: Path, key: str, value: str) -> dict[Hashable, str]:
    data = read_benchmark_json(path)
    if not isinstance(data, list):
        raise BenchmarkFileError(f"{path}: not a results file (a JSON list of {{{key!r}, {value!r}}} expected)")
    out: dict[Hashable, str] = {}
    for n, entry in enumerate(data):
        where = f"{path}: [{n}]"
        item = _field(entry, key, (int, str), where)
        if item in out:
            raise BenchmarkFileError(f"{where}: {key} {item!r} appears twice")
        out[item] = _field(entry, value, str, where)
    return out


def read_caption_results(path: str | Path) -> dict[Hashable, str]:
    """{image_id: caption} of a COCO caption results file."""
    return _results(Path(path), "image_id", "caption")


def read_vqa_results(path: str | Path) -> dict[Hashable, str]:
    """{question_id: answer} of a VQA results file."""
    return _results(Path(path), "question_id", "answer")


def read_vqa(
    questions_path: str | Path, annotations_path: str | Path | None = None, images: str | Path | None = None
) -> list[VQAQuestion]:
    """The questions of a VQAv2 questions file, with the humans' answers from its annotations file."""
    questions_path = Path(questions_path)
    data = read_benchmark_json(questions_path)
    entries = _list(data, "questions", questions_path, "a VQAv2 questions file")
    subtype = data.get("data_subtype") if isinstance(data.get("data_subtype"), str) else None
    named = {}
    for n, entry in enumerate(data.get("images") or []):
        where = f"{questions_path}: images[{n}]"
        named[_field(entry, "id", (int, str), where)] = _field(entry, "file_name", str, where)
    annotations = _vqa_annotations(Path(annotations_path)) if annotations_path is not None else {}
    root = Path(images) if images is not None else None
    out, seen = [], set()
    for n, entry in enumerate(entries):
        where = f"{questions_path}: questions[{n}]"
        qid = _field(entry, "question_id", (int, str), where)
        if qid in seen:
            raise BenchmarkFileError(f"{where}: question_id {qid!r} appears twice")
        seen.add(qid)
        image_id = _field(entry, "image_id", (int, str), where)
        if image_id in named:
            candidates = [Path(named[image_id])]
        elif isinstance(image_id, int) and subtype:
            name = f"COCO_{subtype}_{image_id:012d}.jpg"
            candidates = [Path(name), Path(subtype) / name]
        else:
            candidates = [Path(f"{image_id}.jpg")]
        question = VQAQuestion(
            qid, image_id, _field(entry, "question", str, where), _image_file(root, candidates, where)
        )
        if annotations_path is not None:
            if qid not in annotations:
                raise BenchmarkFileError(f"{annotations_path}: no annotation for question {qid!r} of {questions_path}")
            answers, answer_type, question_type, choice = annotations[qid]
            question = VQAQuestion(
                qid, image_id, question.question, question.file, answers, answer_type, question_type, choice
            )
        out.append(question)
    if not out:
        raise BenchmarkFileError(f"{questions_path}: no questions")
    return out


def _vqa_annotations(path: Path) -> dict[Hashable, tuple[list[str], str | None, str | None, str | None]]:
    entries = _list(read_benchmark_json(path), "annotations", path, "a VQAv2 annotations file")
    out = {}
    for n, entry in enumerate(entries):
        where = f"{path}: annotations[{n}]"
        qid = _field(entry, "question_id", (int, str), where)
        humans = _field(entry, "answers", list, where)
        answers = [_field(h, "answer", str, f"{where}.answers[{k}]") for k, h in enumerate(humans)]
        if not answers:
            raise BenchmarkFileError(f"{where}: no answers")
        optional = [entry.get(k) if isinstance(entry.get(k), str) else None for k in ("answer_type", "question_type")]
        choice = entry.get("multiple_choice_answer")
        out[qid] = (answers, *optional, choice if isinstance(choice, str) else None)
    return out

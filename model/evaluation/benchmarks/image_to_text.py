"""Few-shot image-to-text benchmarks: COCO captioning (CIDEr-D, BLEU-4) and VQAv2 (accuracy) with a checkpoint.

Each query is a completion prompt of `shots` examples chosen at random from the support pool, each an image and its
text, then the query's image and the text's opening, as in the paper's 2-shot evaluation:

    <img> Caption: {caption}\\n <img> Caption: {caption}\\n <query img> Caption:
    <img> Question: {question} Short answer: {answer}\\n ... <query img> Question: {question} Short answer:

The examples never show the query's own image; they are drawn with `random.Random` seeded from `seed` and the query's
id, so a query gets the same examples however many queries run. The model continues greedily in text mode (image
tokens masked), and the text up to the first newline is the caption or the answer (answers lowercased: VQA answers
are, and the official scorer does not normalise an answer when all humans agree).
"""

from __future__ import annotations

import json
import random
import time
import zlib
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

from model.evaluation.benchmarks.captioning_metrics import score_captions
from model.evaluation.benchmarks.image_to_text_data import KARPATHY_SUPPORT_SPLITS, CaptionImage, VQAQuestion
from model.evaluation.benchmarks.vqa_metrics import score_vqa
from model.files.atomic import write_atomic
from model.generation.generator import Generator
from model.generation.inference import InferenceModel
from model.generation.prompting import PromptError, respond_batch
from schemas.config_base import validate_config
from schemas.generate_config import GenerateConfig

CAPTION_OPENING = "Caption:"
QUESTION_OPENING = "Question: {question} Short answer:"
Progress = Callable[[int, int], None]


class BenchmarkError(ValueError):
    """A benchmark that cannot run: too few examples to draw shots from, a prompt too long, an unreadable image."""


def shot_rng(seed: int, key: Hashable) -> random.Random:
    """The generator that draws one query's examples: from the seed and the query's id only."""
    return random.Random(seed * 1_000_003 + zlib.crc32(str(key).encode()))


def choose_shots(pool: Sequence[Any], k: int, rng: random.Random, image_id: Hashable) -> list[Any]:
    """k distinct examples of `pool` (objects with `image_id`) whose image is not the query's."""
    candidates = [item for item in pool if item.image_id != image_id]
    if len(candidates) < k:
        raise BenchmarkError(
            f"{k} shots asked for, but the support pool has {len(candidates)} examples of other images"
        )
    return rng.sample(candidates, k)


def caption_prompt(shots: Sequence[tuple[CaptionImage, str]], query: CaptionImage) -> list[Any]:
    """The segments of a few-shot captioning prompt: (image, caption) examples, then the query's image."""
    segments: list[Any] = []
    for image, caption in shots:
        segments += [image.file, f"{CAPTION_OPENING} {caption.strip()}\n"]
    return [*segments, query.file, CAPTION_OPENING]


def vqa_prompt(shots: Sequence[VQAQuestion], query: VQAQuestion) -> list[Any]:
    """The segments of a few-shot VQA prompt: (image, question and answer) examples, then the query."""
    segments: list[Any] = []
    for shot in shots:
        segments += [shot.file, f"{QUESTION_OPENING.format(question=shot.question)} {shot.shot_answer()}\n"]
    return [*segments, query.file, QUESTION_OPENING.format(question=query.question)]


def first_line(text: str) -> str:
    """The generated text up to its first newline, trimmed."""
    return text.split("\n", 1)[0].strip()


def generate_texts(
    loaded: InferenceModel,
    prompts: Sequence[Sequence[Any]],
    ids: Sequence[Hashable],
    max_new_tokens: int,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> list[str]:
    """The greedy text continuation of each prompt (image tokens masked), `batch_size` prompts decoded together."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    options = {"checkpoint": str(loaded.checkpoint), "mode": "text", "max_new_tokens": max_new_tokens}
    options["text"] = {"temperature": 0.0, "repetition_penalty": 1.0}  # greedy, as benchmarks decode
    config = validate_config(GenerateConfig, options, "generation options")
    generator = Generator(loaded.model, loaded.vocab, config, guidance=False)

    def answer(chunk: Sequence[Sequence[Any]]) -> list[str]:
        responses = respond_batch(loaded, generator, chunk, "text", max_new_tokens, [0] * len(chunk), chat=False)
        return ["".join(s for s in r.segments if isinstance(s, str)) for r in responses]

    texts: list[str] = []
    for first in range(0, len(prompts), batch_size):
        chunk = prompts[first : first + batch_size]
        try:
            texts += answer(chunk)
        except (PromptError, OSError, ValueError):
            for k, prompt in enumerate(chunk):  # again one by one, so the error names the query
                try:
                    texts += answer([prompt])
                except (PromptError, OSError, ValueError) as err:
                    raise BenchmarkError(f"query {ids[first + k]!r}: {err}") from None
        if progress is not None:
            progress(len(texts), len(prompts))
    return texts


def caption_pools(
    kind: str, images: Sequence[CaptionImage], split: str, support: Sequence[CaptionImage] | None = None
) -> tuple[list[CaptionImage], list[CaptionImage]]:
    """(queries, support pool): a Karpathy file's `split` and its train + restval images; for COCO annotations,
    every image, with examples from `support` when given, else from the file's other images."""
    if kind == "karpathy":
        queries = [i for i in images if i.split == split]
        if not queries:
            splits = sorted({str(i.split) for i in images})
            raise BenchmarkError(f"no image of the split {split!r} (the file has {', '.join(splits)})")
    else:
        queries = list(images)
    if support is not None:
        pool = [i for i in support if i.split is None or i.split in KARPATHY_SUPPORT_SPLITS]
    elif kind == "karpathy":
        pool = [i for i in images if i.split in KARPATHY_SUPPORT_SPLITS]
    else:
        pool = list(images)
    return queries, pool


def _need_files(items: Sequence[CaptionImage | VQAQuestion], what: str) -> None:
    if any(i.file is None for i in items):
        raise BenchmarkError(f"the {what} were read without an image folder")


def run_captioning(
    loaded: InferenceModel,
    queries: Sequence[CaptionImage],
    pool: Sequence[CaptionImage],
    shots: int = 2,
    seed: int = 0,
    max_new_tokens: int = 30,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Caption every query with `shots` examples from `pool` and score the captions (CIDEr-D, BLEU)."""
    _need_files([*queries, *pool], "images")
    prompts, chosen = [], []
    for query in queries:
        rng = shot_rng(seed, query.image_id)
        examples = [(image, rng.choice(image.captions)) for image in choose_shots(pool, shots, rng, query.image_id)]
        prompts.append(caption_prompt(examples, query))
        chosen.append([image.image_id for image, _ in examples])
    started = time.perf_counter()
    raw = generate_texts(loaded, prompts, [q.image_id for q in queries], max_new_tokens, batch_size, progress)
    seconds = time.perf_counter() - started
    captions = {q.image_id: first_line(text) for q, text in zip(queries, raw, strict=True)}
    result = caption_scores(queries, captions)
    for prediction, text, examples in zip(result["predictions"], raw, chosen, strict=True):
        prediction.update({"generated": text, "shots": examples})
    return {**_model_fields(loaded, shots, seed, max_new_tokens, seconds), **result}


def caption_scores(images: Sequence[CaptionImage], captions: dict[Hashable, str]) -> dict[str, Any]:
    """The scores of one caption per image against the images' references, and each image's prediction."""
    missing = [i.image_id for i in images if i.image_id not in captions]
    if missing:
        raise BenchmarkError(f"{len(missing)} images have no caption, e.g. {missing[0]!r}")
    scores = score_captions(
        {i.image_id: i.captions for i in images}, {i.image_id: captions[i.image_id] for i in images}
    )
    predictions = [
        {
            "image_id": i.image_id,
            "file": str(i.file) if i.file is not None else None,
            "caption": captions[i.image_id],
            **scores["per_image"][i.image_id],
        }
        for i in images
    ]
    return {
        "benchmark": "captioning",
        "items": len(images),
        "cider": scores["cider"],
        "bleu_4": scores["bleu_4"],
        "bleu": scores["bleu"],
        "predictions": predictions,
    }


def vqa_pool(questions: Sequence[VQAQuestion], support: Sequence[VQAQuestion] | None = None) -> list[VQAQuestion]:
    """The questions few-shot examples are drawn from: `support` when given, else the evaluated questions (never
    one about the query's image); they need answers."""
    pool = list(support if support is not None else questions)
    unanswered = [q.question_id for q in pool if not q.answers and not q.multiple_choice_answer]
    if unanswered:
        raise BenchmarkError(f"support question {unanswered[0]!r} has no answers (give its annotations file)")
    return pool


def run_vqa(
    loaded: InferenceModel,
    questions: Sequence[VQAQuestion],
    pool: Sequence[VQAQuestion],
    shots: int = 2,
    seed: int = 0,
    max_new_tokens: int = 10,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Answer every question with `shots` examples from `pool` and score the answers (VQAv2 accuracy)."""
    _need_files([*questions, *pool], "questions")
    prompts, chosen = [], []
    for question in questions:
        examples = choose_shots(pool, shots, shot_rng(seed, question.question_id), question.image_id)
        prompts.append(vqa_prompt(examples, question))
        chosen.append([q.question_id for q in examples])
    started = time.perf_counter()
    raw = generate_texts(loaded, prompts, [q.question_id for q in questions], max_new_tokens, batch_size, progress)
    seconds = time.perf_counter() - started
    answers = {q.question_id: first_line(text).lower() for q, text in zip(questions, raw, strict=True)}
    result = vqa_scores(questions, answers)
    for prediction, text, examples in zip(result["predictions"], raw, chosen, strict=True):
        prediction.update({"generated": text, "shots": examples})
    return {**_model_fields(loaded, shots, seed, max_new_tokens, seconds), **result}


def vqa_scores(questions: Sequence[VQAQuestion], answers: dict[Hashable, str]) -> dict[str, Any]:
    """The official accuracy (percent) of the answers, overall, per answer and question type, and per question."""
    if any(not q.answers for q in questions):
        raise BenchmarkError("the questions were read without their annotations file: nothing to score against")
    annotated = [
        {
            "question_id": q.question_id,
            "answers": [{"answer": a} for a in q.answers],
            "answer_type": q.answer_type,
            "question_type": q.question_type,
        }
        for q in questions
    ]
    try:
        scores = score_vqa(annotated, answers)
    except ValueError as err:
        raise BenchmarkError(str(err)) from None
    predictions = [
        {
            "question_id": q.question_id,
            "image_id": q.image_id,
            "question": q.question,
            "answer": answers[q.question_id],
            "accuracy": scores["per_question"][q.question_id],
        }
        for q in questions
    ]
    return {
        "benchmark": "vqav2",
        "items": len(questions),
        "accuracy": scores["accuracy"],
        "by_answer_type": scores["by_answer_type"],
        "by_question_type": scores["by_question_type"],
        "predictions": predictions,
    }


def _model_fields(loaded: InferenceModel, shots: int, seed: int, max_new_tokens: int, seconds: float) -> dict:
    return {
        "checkpoint": str(loaded.checkpoint),
        "step": loaded.step,
        "shots": shots,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
        "seconds": round(seconds, 3),
    }


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    """The result as indented JSON, written atomically."""
    write_atomic(Path(path), json.dumps(result, indent=2) + "\n")

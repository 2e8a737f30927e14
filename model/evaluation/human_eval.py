"""The mixed-modal prompt harness: a prompt file -> one response per prompt -> pages for human annotators.

Files: prompts.jsonl (schemas/eval_prompts.py) -> FOLDER/responses.jsonl + images/ + annotate.html; two response
files -> a blinded comparison page + blinding.json, which the scorer (model/evaluation/annotation_score.py)
un-blinds with.
"""

from __future__ import annotations

import json
import random
import shutil
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from model.evaluation.annotation_page import absolute_page, comparison_page
from model.files.atomic import write_atomic
from model.generation.generator import Generator
from model.generation.inference import InferenceModel
from model.generation.prompting import PromptError, Response, respond, respond_batch
from model.generation.segment_output import save_segments, save_thumbnail
from schemas.config_base import ConfigError, validate_config
from schemas.eval_prompts import EvalPrompt
from schemas.generate_config import GenerateConfig, GenerationMode

RESPONSES_FILE, ANNOTATE_PAGE = "responses.jsonl", "annotate.html"
COMPARE_PAGE, BLINDING_FILE = "compare.html", "blinding.json"
RESPONSE_KEYS = ("id", "category", "prompt", "prompt_images", "response")
M = TypeVar("M", bound=BaseModel)


class EvalFileError(ValueError):
    """A prompt, responses, annotation or blinding file that cannot be used; the message names file:line and why."""


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for every non-blank line; EvalFileError naming file:line on the first bad one."""
    if not path.is_file():
        raise EvalFileError(f"{path}: file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise EvalFileError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as err:
            raise EvalFileError(f"{path}:{n}: not valid JSON ({err.msg} at column {err.colno})") from None


def read_jsonl(path: str | Path, cls: type[M]) -> list[tuple[int, M]]:
    """(line number, record) for every non-blank line, each validated as `cls`; EvalFileError on the first bad one."""
    path = Path(path)
    records = []
    for n, data in _json_lines(path):
        try:
            records.append((n, validate_config(cls, data, f"{path}:{n}", check_paths=False)))
        except ConfigError as err:
            raise EvalFileError(str(err)) from None
    if not records:
        raise EvalFileError(f"{path}: no records (one JSON object per line expected)")
    return records


def read_prompts(path: str | Path) -> list[EvalPrompt]:
    """The prompts of a prompt file, image paths made absolute (relative ones are from the file's folder)."""
    path = Path(path)
    prompts, seen = [], {}
    for n, prompt in read_jsonl(path, EvalPrompt):
        if prompt.id in seen:
            raise EvalFileError(f"{path}:{n}: id: {prompt.id!r} is already used on line {seen[prompt.id]}")
        seen[prompt.id] = n
        images = []
        for k, image in enumerate(prompt.images):
            file = (path.parent / image).resolve()
            if not file.is_file():
                raise EvalFileError(f"{path}:{n}: images[{k}]: no such image file {file}")
            images.append(str(file))
        prompts.append(prompt.model_copy(update={"images": images}))
    return prompts


def prompt_seed(seed: int, prompt_id: str) -> int:
    """The sampling seed of one prompt: from its id, so adding prompts to a file leaves other responses as they were."""
    return (seed + zlib.crc32(prompt_id.encode())) % 2**31


def _copy_image(source: Path, folder: Path, relative: str, thumb: bool) -> str:
    target = folder / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    if thumb:
        save_thumbnail(source, target, EvalFileError)
    else:
        try:
            shutil.copyfile(source, target)
        except FileNotFoundError:
            raise EvalFileError(f"{source}: image missing (moved since the responses were written?)") from None
    return relative


def run_prompts(
    loaded: InferenceModel,
    prompts: Sequence[EvalPrompt],
    out: str | Path,
    mode: GenerationMode = "mixed",
    max_new_tokens: int = 1024,
    seed: int = 0,
    guidance: bool = True,
    chat: bool | None = None,
    on_response: Callable[[dict[str, Any]], None] | None = None,
    batch_size: int = 1,
) -> list[dict[str, Any]]:
    """Answer every prompt; writes out/responses.jsonl, out/images/ and out/annotate.html, returns the records.

    `batch_size` prompts are decoded together; each samples with its own seed (from its id), so the responses are
    those of one at a time up to floating-point rounding (left padding changes summation order, which can flip a
    near-tie). The default, 1, keeps each response independent of the other prompts in the file.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    options = {"checkpoint": str(loaded.checkpoint), "mode": mode, "max_new_tokens": max_new_tokens, "seed": seed}
    config = validate_config(GenerateConfig, options, "generation options")
    generator = Generator(loaded.model, loaded.vocab, config, guidance=guidance)
    records: list[dict[str, Any]] = []

    def answer(chunk: Sequence[EvalPrompt]) -> list[Response]:
        segments = [[Path(p) for p in q.images] + ([q.prompt] if q.prompt else []) for q in chunk]
        seeds = [prompt_seed(seed, q.id) for q in chunk]
        if len(chunk) > 1:
            try:
                return respond_batch(loaded, generator, segments, mode, max_new_tokens, seeds, chat)
            except (PromptError, ValueError):
                pass  # one of them cannot be answered: one at a time, so the error names it and the rest are kept
        responses = []
        for q, s, this_seed in zip(chunk, segments, seeds, strict=True):
            try:
                responses.append(respond(loaded, generator, s, mode, max_new_tokens, this_seed, chat))
            except (PromptError, ValueError) as err:
                done = len(records) + len(responses)
                for prompt, response in zip(chunk, responses, strict=False):
                    keep(prompt, response)
                kept = f"; the {done} responses before it are in {out / RESPONSES_FILE}" if done else ""
                raise PromptError(f"prompt {q.id!r}: {err}{kept}") from None
        return responses

    def keep(prompt: EvalPrompt, response: Response) -> None:
        record = {
            "id": prompt.id,
            "category": prompt.category,
            "prompt": prompt.prompt,
            "prompt_images": [
                _copy_image(Path(p), out, f"images/prompts/{prompt.id}-{k}.png", thumb=True)
                for k, p in enumerate(prompt.images)
            ],
            "response": save_segments(response.segments, out, prompt.id),
            "new_tokens": response.new_tokens,
            "prompt_tokens": response.prompt_tokens,
            "seconds": round(response.seconds, 3),
            "seed": prompt_seed(seed, prompt.id),
            "mode": mode,
            "checkpoint": str(loaded.checkpoint),
            "step": loaded.step,
        }
        records.append(record)
        # Written after every prompt: hours of generation survive a later prompt's failure or a kill.
        write_atomic(out / RESPONSES_FILE, "".join(json.dumps(r) + "\n" for r in records))
        if on_response is not None:
            on_response(record)

    for first in range(0, len(prompts), batch_size):
        chunk = prompts[first : first + batch_size]
        for prompt, response in zip(chunk, answer(chunk), strict=True):
            keep(prompt, response)
    write_atomic(out / ANNOTATE_PAGE, absolute_page(records, title=f"Task fulfillment: {loaded.checkpoint.name}"))
    return records


def read_responses(path: str | Path) -> list[dict[str, Any]]:
    """The records of a responses.jsonl written by `run_prompts`; EvalFileError naming file:line if one is not."""
    path = Path(path)
    records, seen = [], set()
    for n, record in _json_lines(path):
        missing = [k for k in RESPONSE_KEYS if not isinstance(record, dict) or k not in record]
        if missing:
            raise EvalFileError(f"{path}:{n}: missing {', '.join(missing)} (not a `cham eval prompts` responses file?)")
        if record["id"] in seen:
            raise EvalFileError(f"{path}:{n}: id: {record['id']!r} appears twice")
        seen.add(record["id"])
        records.append(record)
    if not records:
        raise EvalFileError(f"{path}: no responses")
    return records


def _relocate(records: list[dict[str, Any]], source: Path, out: Path, stem: str) -> list[dict[str, Any]]:
    """Segment records with their images copied under `out` as images/{stem}-{k}.png (names that reveal no system)."""
    moved = []
    for k, record in enumerate(records):
        if record.get("kind") == "image" and "path" in record:
            record = {**record, "path": _copy_image(source / record["path"], out, f"images/{stem}-{k}.png", False)}
        moved.append(record)
    return moved


def make_comparison(
    responses_a: str | Path, responses_b: str | Path, out: str | Path, seed: int | None = None
) -> dict[str, Any]:
    """Write out/compare.html (each item's two responses in a random order) and out/blinding.json; returns the map."""
    paths = Path(responses_a), Path(responses_b)
    a, b = (read_responses(p) for p in paths)
    by_id_b = {r["id"]: r for r in b}
    only_a, only_b = [r["id"] for r in a if r["id"] not in by_id_b], sorted(set(by_id_b) - {r["id"] for r in a})
    if only_a or only_b:
        raise EvalFileError(
            f"{paths[0]} and {paths[1]} answer different prompts (only in A: {only_a[:5]}, only in "
            f"B: {only_b[:5]}); compare responses to the same prompt file"
        )

    def asked(r: dict[str, Any]) -> tuple[str, str, int]:
        return r["prompt"], r["category"], len(r["prompt_images"])

    for ra in a:
        if asked(ra) != asked(by_id_b[ra["id"]]):
            raise EvalFileError(f"item {ra['id']!r}: the prompt differs between {paths[0]} and {paths[1]}")
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items, blinding = [], {}
    for ra in a:
        rb = by_id_b[ra["id"]]
        first = rng.choice("AB")  # which system is shown as response 1
        shown = (ra, rb) if first == "A" else (rb, ra)
        roots = (paths[0].parent, paths[1].parent) if first == "A" else (paths[1].parent, paths[0].parent)
        items.append(
            {
                "id": ra["id"],
                "category": ra["category"],
                "prompt": ra["prompt"],
                "prompt_images": [
                    _copy_image(paths[0].parent / p, out, f"images/prompts/{ra['id']}-{k}.png", False)
                    for k, p in enumerate(ra["prompt_images"])
                ],
                "responses": [
                    _relocate(r["response"], root, out, f"{ra['id']}-{slot}")
                    for slot, (r, root) in enumerate(zip(shown, roots, strict=True), 1)
                ],
            }
        )
        blinding[ra["id"]] = {"category": ra["category"], "first": first}
    mapping = {"seed": seed, "systems": {"A": str(paths[0]), "B": str(paths[1])}, "items": blinding}
    write_atomic(out / BLINDING_FILE, json.dumps(mapping, indent=2) + "\n")
    write_atomic(out / COMPARE_PAGE, comparison_page(items, title="Which response is better?"))
    return mapping

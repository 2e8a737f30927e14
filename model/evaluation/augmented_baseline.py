"""Augmented baselines (Chameleon, section 4.2): a text-only model told to write `<caption>...</caption>` where an
image belongs, each caption then drawn by an image generator and spliced into its answer in place of the tag.

Files: prompts.jsonl -> `baseline_prompts` (the instruction appended) -> the user's answers.jsonl (`BaselineAnswer`
lines, e.g. from an API model) -> out/captions.jsonl (every caption and the image name it needs) -> images by our
model (`caption_images`) or from a folder the user fills -> out/responses.jsonl in `run_prompts`' format, which
`cham eval compare` puts against our model's, and out/annotate.html.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from model.evaluation.annotation_page import absolute_page
from model.evaluation.human_eval import ANNOTATE_PAGE, RESPONSES_FILE, EvalFileError, prompt_seed, read_jsonl
from model.files.atomic import write_atomic
from model.generation.generator import Generator
from model.generation.inference import InferenceModel
from model.generation.prompting import respond
from model.generation.segment_output import save_thumbnail
from model.tokenizers.mixed_tokenizer import ImageSegment
from schemas.config_base import validate_config
from schemas.eval_prompts import BaselineAnswer, EvalPrompt
from schemas.generate_config import GenerateConfig

# Our wording of the paper's instruction; appended to every prompt of the baseline's prompt file.
CAPTION_INSTRUCTION = (
    "If your answer should show an image, you cannot draw it: write a caption describing the image instead, "
    "enclosed in a pair of <caption> and </caption> tags, at the place in your answer where the image belongs. "
    "Use one pair of tags per image."
)
CAPTIONS_FILE = "captions.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
TAG = re.compile(r"<\s*(/?)\s*caption\s*>", re.IGNORECASE)
# What extraction counts: captions kept, and the irregular tags it repaired or dropped.
CAPTION_COUNTS = ("captions", "empty", "unclosed", "nested", "stray_close")


def baseline_prompts(prompts: Sequence[EvalPrompt], instruction: str = CAPTION_INSTRUCTION) -> list[EvalPrompt]:
    """The prompts with the caption-tag instruction after their text (a blank line between)."""
    return [
        p.model_copy(update={"prompt": f"{p.prompt}\n\n{instruction}" if p.prompt else instruction}) for p in prompts
    ]


@dataclass
class Extraction:
    """An answer cut into text and captions: segments ("text" | "caption", text), and what was counted."""

    segments: list[tuple[str, str]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    @property
    def captions(self) -> list[str]:
        return [text for kind, text in self.segments if kind == "caption"]


def extract_captions(answer: str) -> Extraction:
    """Split an answer at its caption tags (case and spaces inside the tag ignored).

    A caption's text has its whitespace collapsed. Irregular tags are repaired and counted: an unclosed caption runs
    to the end of the answer (`unclosed`); a caption opened inside another is merged into it, the inner tags dropped
    (`nested`, per inner tag); a closing tag with no caption open is dropped (`stray_close`); a caption with no text
    leaves no image (`empty`). Text around a dropped caption joins up.
    """
    result = Extraction()
    text: list[str] = []
    caption: list[str] = []
    depth, pos = 0, 0

    def put_text() -> None:
        joined = "".join(text)
        text.clear()
        if not joined:
            return
        if result.segments and result.segments[-1][0] == "text":
            result.segments[-1] = ("text", result.segments[-1][1] + joined)
        else:
            result.segments.append(("text", joined))

    def put_caption() -> None:
        words = " ".join("".join(caption).split())
        caption.clear()
        if words:
            put_text()
            result.segments.append(("caption", words))
            result.counts["captions"] += 1
        else:
            result.counts["empty"] += 1

    for match in TAG.finditer(answer):
        (caption if depth else text).append(answer[pos : match.start()])
        pos = match.end()
        if not match.group(1):  # an opening tag
            if depth:
                result.counts["nested"] += 1
            depth += 1
        elif depth == 0:
            result.counts["stray_close"] += 1
        else:
            depth -= 1
            if depth == 0:
                put_caption()
    (caption if depth else text).append(answer[pos:])
    if depth:
        result.counts["unclosed"] += 1
        put_caption()
    put_text()
    return result


def read_answers(path: str | Path, prompts: Sequence[EvalPrompt]) -> dict[str, BaselineAnswer]:
    """The answers file, one per prompt; EvalFileError naming file:line for a bad line, an unknown or repeated id,
    and naming the prompts without an answer."""
    known = {p.id for p in prompts}
    answers: dict[str, tuple[BaselineAnswer, int]] = {}
    for n, answer in read_jsonl(path, BaselineAnswer):
        if answer.id not in known:
            raise EvalFileError(f"{path}:{n}: id {answer.id!r} is not a prompt of the prompt file")
        if answer.id in answers:
            raise EvalFileError(f"{path}:{n}: id {answer.id!r} already answered on line {answers[answer.id][1]}")
        answers[answer.id] = (answer, n)
    missing = [p.id for p in prompts if p.id not in answers]
    if missing:
        raise EvalFileError(f"{path}: no answer for {len(missing)} prompt(s): {', '.join(missing[:5])}")
    return {k: v[0] for k, v in answers.items()}


def image_name(prompt_id: str, index: int) -> str:
    """The file stem of a prompt's index-th caption's image: `<id>-<index>` (index from 0, empty captions skipped)."""
    return f"{prompt_id}-{index}"


def caption_list(extractions: dict[str, Extraction]) -> list[dict[str, Any]]:
    """Every caption in prompt order: {"id", "index", "caption", "image": the file stem its image needs}."""
    return [
        {"id": pid, "index": k, "caption": caption, "image": image_name(pid, k)}
        for pid, extraction in extractions.items()
        for k, caption in enumerate(extraction.captions)
    ]


def folder_images(captions: Sequence[dict[str, Any]], folder: str | Path) -> dict[str, Path]:
    """{image stem: file} for every caption from a folder of `<id>-<index>.png` (or .jpg/.jpeg/.webp) files;
    EvalFileError naming the images missing or given twice."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalFileError(f"{folder}: not a folder of images")
    found, missing = {}, []
    for item in captions:
        files = [folder / f"{item['image']}{s}" for s in IMAGE_SUFFIXES if (folder / f"{item['image']}{s}").is_file()]
        if len(files) > 1:
            raise EvalFileError(
                f"{folder}: {len(files)} images for {item['image']} ({', '.join(f.name for f in files)})"
            )
        if not files:
            missing.append(item["image"])
        else:
            found[item["image"]] = files[0]
    if missing:
        raise EvalFileError(
            f"{folder}: no image for {len(missing)} caption(s): {', '.join(missing[:5])} "
            f"(name each <id>-<index>.png as {CAPTIONS_FILE} lists them)"
        )
    return found


def caption_images(
    loaded: InferenceModel,
    captions: Sequence[dict[str, Any]],
    out: str | Path,
    seed: int = 0,
    guidance: bool = True,
    on_image: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Draw each caption with our model (image mode, the caption as the prompt, seeded per caption from
    `seed` and its image name); writes out/images/<stem>.png and returns {stem: {"path", "codes"}}."""
    if loaded.tokenizer.image is None:
        raise EvalFileError(f"{loaded.checkpoint}: no image tokenizer to draw the captions with")
    budget = loaded.vocab.tokens_per_image + 2
    options = {"checkpoint": str(loaded.checkpoint), "mode": "image", "max_new_tokens": budget, "seed": seed}
    generator = Generator(
        loaded.model, loaded.vocab, validate_config(GenerateConfig, options, "image options"), guidance
    )
    out, made = Path(out), {}
    for item in captions:
        this_seed = prompt_seed(seed, item["image"])
        response = respond(loaded, generator, [item["caption"]], "image", budget, this_seed)
        image = next(s for s in response.segments if isinstance(s, ImageSegment))
        path = f"images/{item['image']}.png"
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.pixels).save(out / path)
        made[item["image"]] = {"path": path, "codes": image.codes.reshape(-1).tolist(), "seed": this_seed}
        if on_image is not None:
            on_image({**item, **made[item["image"]]})
    return made


def _response(extraction: Extraction, prompt_id: str, images: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    segments, k = [], 0
    for kind, text in extraction.segments:
        if kind == "text":
            segments.append({"kind": "text", "text": text})
        else:
            segments.append({"kind": "image", **images[image_name(prompt_id, k)], "caption": text})
            k += 1
    return segments


def augment_baseline(
    prompts: Sequence[EvalPrompt],
    answers_path: str | Path,
    out: str | Path,
    images: str | Path | None = None,
    draw: Callable[[list[dict[str, Any]], Path], dict[str, dict[str, Any]]] | None = None,
    source: str = "",
) -> dict[str, Any]:
    """Extract the captions of a baseline's answers (out/captions.jsonl) and, with images from the folder `images`
    or from `draw(captions, out)` (e.g. `caption_images` of our model), write out/responses.jsonl and
    out/annotate.html: each answer with its images in place of its caption tags. Returns the counts; with no
    image source only captions.jsonl is written (fill a folder as it names the images, and run again)."""
    answers = read_answers(answers_path, prompts)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    extractions = {p.id: extract_captions(answers[p.id].answer) for p in prompts}
    captions = caption_list(extractions)
    write_atomic(out / CAPTIONS_FILE, "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in captions))
    totals = sum((e.counts for e in extractions.values()), Counter())
    summary: dict[str, Any] = {
        "answers": len(prompts),
        **{k: totals[k] for k in CAPTION_COUNTS},
        "answers_with_images": sum(bool(e.captions) for e in extractions.values()),
        "captions_file": str(out / CAPTIONS_FILE),
        "responses": None,
    }
    if images is None and draw is None:
        return summary
    if images is not None:
        made = {}
        for stem, file in folder_images(captions, images).items():
            made[stem] = {"path": f"images/{stem}.png"}
            save_thumbnail(file, out / made[stem]["path"], EvalFileError)
        source = source or f"images from {images}"
    else:
        made = draw(captions, out)
    records = []
    for prompt in prompts:
        answer, extraction = answers[prompt.id], extractions[prompt.id]
        prompt_images = []
        for k, file in enumerate(prompt.images):
            prompt_images.append(f"images/prompts/{prompt.id}-{k}.png")
            save_thumbnail(file, out / prompt_images[-1], EvalFileError)
        record = {
            "id": prompt.id,
            "category": prompt.category,
            "prompt": prompt.prompt,  # the prompt as asked of our model: `cham eval compare` checks they match
            "prompt_images": prompt_images,
            "response": _response(extraction, prompt.id, made),
            "system": answer.system or str(answers_path),
            "augmented_with": source,
            "caption_counts": {k: extraction.counts[k] for k in CAPTION_COUNTS},
        }
        if prompt.expects is not None:
            record["expects"] = prompt.expects
        records.append(record)
    write_atomic(out / RESPONSES_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    title = f"Task fulfillment: {records[0]['system']} (augmented)"
    write_atomic(out / ANNOTATE_PAGE, absolute_page(records, title=title))
    summary["responses"] = str(out / RESPONSES_FILE)
    return summary

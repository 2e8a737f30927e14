"""The `evaluate` and `generate` flows: `cham eval` and `cham generate` as subprocesses, results as artifacts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import flow, task
from pydantic import Field

from flows.artifacts import markdown_artifact, png_markdown, table_artifact
from flows.markup import Markdown, code, md
from flows.subprocess_task import cham, run_command

CHECKPOINT = Field(description="a training out_dir, its checkpoints/ folder, or one step-NNNNNNNN folder")
PROMPT_IMAGES = Field(None, description="prompt images (files), placed before the text")
TEXT_TASKS = Field(
    None,
    description="text benchmarks: task files in their published formats, or bundled samples (hellaswag, arc, piqa, "
    "winogrande, boolq, mmlu, gsm8k)",
)
SHOWN_RESPONSES = 20  # rows of the prompts table; the rest stay in responses.jsonl


def loss_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """`cham eval loss` output as rows: all tokens, then each source, then each modality."""

    def row(scope: str, r: dict[str, Any]) -> dict[str, Any]:
        return {
            "scope": scope,
            "loss": round(r["loss"], 4),
            "perplexity": round(r["perplexity"], 2),
            "tokens": r["tokens"],
        }

    # A scope with no supervised targets (e.g. a source outside the first --max-batches) has no loss to show.
    scoped = [(f"source: {n}", r) for n, r in result.get("by_source", {}).items()]
    scoped += [(f"modality: {n}", r) for n, r in result.get("by_modality", {}).items()]
    return [row("all", result)] + [row(scope, r) for scope, r in scoped if r.get("tokens")]


@task(name="eval-loss", retries=1)
def eval_loss_task(checkpoint: str, stage: str, max_batches: int, out: Path) -> dict[str, Any]:
    """Held-out loss and perplexity of a checkpoint on a stage, overall, by source and by modality."""
    run_command(
        cham(
            "eval",
            "loss",
            "--checkpoint",
            checkpoint,
            "--stage",
            stage,
            "--max-batches",
            str(max_batches),
            "--out",
            str(out),
        )
    )
    return json.loads(out.read_text())


@task(name="eval-prompts", retries=1)
def eval_prompts_task(checkpoint: str, prompts: str, mode: str, max_new_tokens: int, out: Path) -> list[dict]:
    """Answers of a checkpoint to a prompt set: responses.jsonl and a page to annotate them."""
    run_command(
        cham(
            "eval",
            "prompts",
            "--checkpoint",
            checkpoint,
            "--prompts",
            prompts,
            "--mode",
            mode,
            "--max-new-tokens",
            str(max_new_tokens),
            "--out",
            str(out),
        )
    )
    lines = (out / "responses.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _response_row(record: dict[str, Any]) -> dict[str, Any]:
    def short(value: Any) -> str:
        text = value if isinstance(value, str) else json.dumps(value)
        return text if len(text) <= 300 else text[:300] + "…"

    keys = [k for k in ("id", "category", "prompt", "response") if k in record] or list(record)[:4]
    return {k: short(record[k]) for k in keys}


def _options(**values: Any) -> list[str]:
    """`--name value` for every value given (None left out), names with dashes."""
    return [a for k, v in values.items() if v is not None for a in (f"--{k.replace('_', '-')}", str(v))]


@task(name="eval-captioning", retries=1)
def eval_captioning_task(
    checkpoint: str, data: str, images: str | None, shots: int, limit: int | None, out: Path
) -> dict[str, Any]:
    """`cham eval captioning`: few-shot captions of a COCO-Karpathy (or COCO captions) set, CIDEr-D and BLEU."""
    run_command(
        cham(
            "eval",
            "captioning",
            *_options(checkpoint=checkpoint, data=data, images=images, shots=shots, limit=limit, out=out),
        )
    )
    return json.loads(out.read_text())


@task(name="eval-vqa", retries=1)
def eval_vqa_task(
    checkpoint: str,
    questions: str,
    annotations: str,
    images: str | None,
    shots: int,
    limit: int | None,
    out: Path,
) -> dict[str, Any]:
    """`cham eval vqa`: few-shot answers to VQAv2 questions, the official accuracy."""
    options = _options(
        checkpoint=checkpoint,
        questions=questions,
        annotations=annotations,
        images=images,
        shots=shots,
        limit=limit,
        out=out,
    )
    run_command(cham("eval", "vqa", *options))
    return json.loads(out.read_text())


@task(name="eval-text-benchmark", retries=1)
def eval_text_task(checkpoint: str, task_name: str, shots: int, limit: int | None, out: Path) -> dict[str, Any]:
    """`cham eval benchmark`: a text benchmark (multiple choice by log-likelihood, or GSM8K by exact match)."""
    run_command(
        cham("eval", "benchmark", *_options(checkpoint=checkpoint, task=task_name, shots=shots, limit=limit, out=out))
    )
    return json.loads(out.read_text())


def text_rows(name: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric of a text benchmark, with its standard error."""
    metrics = result["metrics"]
    return [
        {"task": name, "metric": m, "value": round(v, 4), "stderr": _round(metrics.get(f"{m}_stderr"))}
        for m, v in metrics.items()
        if not m.endswith("_stderr") and v is not None
    ]


HEADLINE_METRICS = ("acc_norm", "acc", "exact_match,strict-match")  # what the paper's tables report, in this order


def headline_metric(metrics: dict[str, Any]) -> str:
    """The metric a benchmark's summary row shows: length-normalised accuracy where there is one (as the paper's
    multiple-choice numbers), else accuracy, else GSM8K's strict exact match, else the first."""
    found = [m for m in HEADLINE_METRICS if metrics.get(m) is not None]
    return found[0] if found else next(m for m in metrics if not m.endswith("_stderr"))


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def captioning_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The captioning scores, then the first captions with their image."""
    return [
        {
            "images": result["items"],
            "CIDEr-D": round(result["cider"], 4),
            "BLEU-4": round(result["bleu_4"], 4),
            "BLEU-1": round(result["bleu"][0], 4),
            "shots": result.get("shots"),
        }
    ]


def vqa_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """VQAv2 accuracy overall and per answer type (yes/no, number, other)."""
    rows = [{"answers": "all", "accuracy": round(result["accuracy"], 2)}]
    return rows + [{"answers": name, "accuracy": round(v, 2)} for name, v in result["by_answer_type"].items()]


def _shown(predictions: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{k: p.get(k) for k in keys} for p in predictions[:SHOWN_RESPONSES]]


@flow(name="evaluate")
def evaluate(
    checkpoint: str = CHECKPOINT,
    out_dir: str = Field(description="folder for eval-loss.json and prompts/"),
    stage: str | None = Field(None, description="a held-out stage folder (from `cham mix`) to measure loss on"),
    prompts: str | None = Field(None, description="a prompt set (jsonl) to answer, for people to annotate"),
    max_batches: Annotated[int, Field(ge=1)] = Field(8, description="batches of the stage to evaluate"),
    mode: Literal["text", "image", "mixed"] = Field("mixed", description="what the model may answer with"),
    max_new_tokens: Annotated[int, Field(ge=1)] = Field(256, description="at most this many new tokens per response"),
    captioning: str | None = Field(None, description="a COCO-Karpathy or COCO captions JSON: few-shot captioning"),
    captioning_images: str | None = Field(None, description="its image folder (default: the JSON's folder)"),
    vqa_questions: str | None = Field(None, description="VQAv2 questions JSON: few-shot visual question answering"),
    vqa_annotations: str | None = Field(None, description="the VQAv2 annotations JSON of those questions"),
    vqa_images: str | None = Field(None, description="their image folder (default: the questions' folder)"),
    text_tasks: list[str] | None = TEXT_TASKS,
    shots: Annotated[int, Field(ge=0)] = Field(2, description="examples before each benchmark query (paper: 2)"),
    benchmark_limit: int | None = Field(None, ge=1, description="score only the first N items of each benchmark"),
) -> dict[str, Any]:
    """Held-out loss and perplexity (by source and modality), answers to a prompt set, and benchmarks (captioning
    CIDEr-D / BLEU-4, VQAv2 accuracy), each as a table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"checkpoint": checkpoint}
    if stage:
        result = eval_loss_task(checkpoint, stage, max_batches, out / "eval-loss.json")
        table_artifact(loss_rows(result), key="evaluate-loss", description=f"held-out loss of {checkpoint} on {stage}")
        summary |= {k: result[k] for k in ("loss", "perplexity", "tokens")}
    if prompts:
        responses = eval_prompts_task(checkpoint, prompts, mode, max_new_tokens, out / "prompts")
        rows = [_response_row(r) for r in responses[:SHOWN_RESPONSES]]
        table_artifact(
            rows,
            key="evaluate-prompts",
            description=(
                f"{len(responses)} responses (first {len(rows)} shown); annotate in {out / 'prompts' / 'annotate.html'}"
            ),
        )
        summary["responses"] = len(responses)
        summary["annotate_page"] = str(out / "prompts" / "annotate.html")
    benchmarks: list[dict[str, Any]] = []
    if captioning:
        result = eval_captioning_task(
            checkpoint, captioning, captioning_images, shots, benchmark_limit, out / "captioning.json"
        )
        table_artifact(captioning_rows(result), key="evaluate-captioning", description=f"captioning: {captioning}")
        shown = _shown(result.get("predictions", []), ("image_id", "caption"))
        if shown:
            table_artifact(shown, key="evaluate-captioning-samples", description="the first captions")
        benchmarks.append(
            {"benchmark": "captioning", "metric": "CIDEr-D", "score": result["cider"], "items": result["items"]}
        )
    if vqa_questions:
        if not vqa_annotations:
            raise ValueError("vqa_questions needs vqa_annotations (the answers to score against)")
        result = eval_vqa_task(
            checkpoint, vqa_questions, vqa_annotations, vqa_images, shots, benchmark_limit, out / "vqa.json"
        )
        table_artifact(vqa_rows(result), key="evaluate-vqa", description=f"VQAv2 accuracy: {vqa_questions}")
        shown = _shown(result.get("predictions", []), ("question", "answer", "accuracy"))
        table_artifact(shown, key="evaluate-vqa-samples", description="the first answers")
        benchmarks.append(
            {"benchmark": "vqav2", "metric": "accuracy", "score": result["accuracy"], "items": result["items"]}
        )
    for i, task_name in enumerate(text_tasks or []):
        result = eval_text_task(
            checkpoint, task_name, shots, benchmark_limit, out / f"text-{i}-{Path(task_name).stem}.json"
        )
        name = result.get("task") or Path(task_name).stem
        table_artifact(text_rows(name, result), key=f"evaluate-text-{i}", description=f"text benchmark: {task_name}")
        metric = headline_metric(result["metrics"])
        benchmarks.append(
            {"benchmark": name, "metric": metric, "score": result["metrics"][metric], "items": result["questions"]}
        )
    if benchmarks:
        table_artifact(
            [{**b, "score": round(b["score"], 4), "shots": shots} for b in benchmarks],
            key="evaluate-benchmarks",
            description=f"benchmarks of {checkpoint}",
        )
        summary["benchmarks"] = {b["benchmark"]: b["score"] for b in benchmarks}
    return summary


def generation_markdown(folder: Path, result: dict[str, Any]) -> Markdown:
    """The prompt and the generated segments: text quoted, images inline (PNG data URIs, which the UI keeps).
    The prompt and the model's text are escaped: shown as written, never as HTML, links or images."""
    parts = [md("## {} generation", result["mode"]), md("**Prompt:** {}", result["prompt"]), ""]
    for segment in result["segments"]:
        if segment["kind"] == "text":
            lines = (segment["text"].strip() or "(empty)").splitlines()
            parts.append("\n".join(md("> {}", line) for line in lines))
        else:
            parts.append(png_markdown(folder / segment["path"], segment["path"]))
        parts.append("")
    page = folder / "generation.html"
    parts.append(md("{} new tokens in {:.1f} s; page: {}", result["new_tokens"], result["seconds"], code(page)))
    return Markdown("\n".join(parts))


@task(name="generate", retries=1)
def generate_task(
    checkpoint: str, prompt: str, mode: str, images: list[str], max_new_tokens: int, seed: int, out: Path
) -> dict[str, Any]:
    """`cham generate` into `out`; returns generation.json (segments, with image paths relative to `out`)."""
    args = [
        "generate",
        "--checkpoint",
        checkpoint,
        "--prompt",
        prompt,
        "--mode",
        mode,
        "--max-new-tokens",
        str(max_new_tokens),
        "--seed",
        str(seed),
        "--out",
        str(out),
    ]
    for image in images:
        args += ["--image", image]
    run_command(cham(*args))
    return json.loads((out / "generation.json").read_text())


@flow(name="generate")
def generate(
    checkpoint: str = CHECKPOINT,
    prompt: str = Field(description="the prompt text"),
    out_dir: str = Field(description="folder for generation.html, generation.json and images/"),
    mode: Literal["text", "image", "mixed"] = Field("mixed", description="what the model may produce"),
    images: list[str] | None = PROMPT_IMAGES,
    max_new_tokens: Annotated[int, Field(ge=1)] = Field(256, description="at most this many new tokens"),
    seed: int = Field(0, description="sampling seed"),
) -> dict[str, Any]:
    """Prompt a checkpoint for text, an image or both; the answer is shown as an artifact (images inline)."""
    out = Path(out_dir)
    result = generate_task(checkpoint, prompt, mode, list(images or []), max_new_tokens, seed, out)
    markdown_artifact(
        generation_markdown(out, result), key=f"generate-{mode}", description=f"{mode} generation from {checkpoint}"
    )
    text = "".join(s["text"] for s in result["segments"] if s["kind"] == "text")
    return {
        "out_dir": str(out),
        "mode": mode,
        "text": text,
        "new_tokens": result["new_tokens"],
        "images": [str(out / s["path"]) for s in result["segments"] if s["kind"] == "image"],
    }

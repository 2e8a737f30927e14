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


@flow(name="evaluate")
def evaluate(
    checkpoint: str = CHECKPOINT,
    out_dir: str = Field(description="folder for eval-loss.json and prompts/"),
    stage: str | None = Field(None, description="a held-out stage folder (from `cham mix`) to measure loss on"),
    prompts: str | None = Field(None, description="a prompt set (jsonl) to answer, for people to annotate"),
    max_batches: Annotated[int, Field(ge=1)] = Field(8, description="batches of the stage to evaluate"),
    mode: Literal["text", "image", "mixed"] = Field("mixed", description="what the model may answer with"),
    max_new_tokens: Annotated[int, Field(ge=1)] = Field(256, description="at most this many new tokens per response"),
) -> dict[str, Any]:
    """Held-out loss and perplexity (by source and modality) and answers to a prompt set, as artifacts."""
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

"""The `end-to-end` flow: the whole pipeline on the bundled sample corpus in minutes, ending in an HTML report."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, task
from pydantic import Field

from flows.artifacts import loss_points, markdown_artifact, plot_loss_curves, read_metrics, table_artifact
from flows.build_dataset import build_dataset, mix_task
from flows.demo import demo_mixture, demo_prepare_config, demo_sft_config, demo_train_config
from flows.evaluation_flows import evaluate, generate
from flows.html_report import write_report
from flows.markup import Markdown, code, md
from flows.subprocess_task import cham, run_command
from flows.training_flows import sft, train
from pipelines.mix_report import plot_shares
from schemas import dump_config
from schemas.vocab import TINY

REPO = Path(__file__).resolve().parents[1]
EVAL_PROMPTS = REPO / "sample" / "eval" / "prompts.jsonl"
SAMPLE_EVAL, SAMPLE_IMAGES = REPO / "sample" / "eval", REPO / "sample" / "images"  # bundled benchmark samples
SAMPLE_PHOTO = "sample/images"


def prefect_console_logging() -> None:
    """Let Prefect format the console log of a run started from the CLI: Beam's import adds a plain root handler,
    which Prefect would otherwise defer to; and keep the temporary local API quiet (no telemetry)."""
    from prefect.logging.configuration import setup_logging

    for handler in list(logging.root.handlers):
        logging.root.removeHandler(handler)
    setup_logging(incremental=False)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@task(name="sample-data")
def sample_data_task(raw: Path) -> Path:
    """`cham sample-data`: the bundled corpus in every raw format the prepare job reads."""
    run_command(cham("sample-data", str(raw), "--force"))
    return raw


@task(name="train-tokenizers")
def tokenizers_task(raw: Path, out: Path, vq_steps: int) -> list[dict[str, Any]]:
    """A SentencePiece text tokenizer (tiny layout) and a tiny VQGAN image tokenizer, trained on the corpus."""
    run_command(
        cham(
            "text-tokenizer",
            "train",
            "--input",
            str(raw / "text"),
            "--layout",
            "tiny",
            "--vocab-size",
            str(TINY.vocab_size),
            "--out",
            str(out / "text"),
        )
    )
    run_command(
        cham(
            "image-tokenizer",
            "train",
            "--images",
            str(raw / "image_text"),
            "--preset",
            "tiny",
            "--steps",
            str(vq_steps),
            "--batch-size",
            "8",
            "--out",
            str(out / "vq"),
        )
    )
    return [
        {"tokenizer": "text (SentencePiece BPE)", "vocabulary": TINY.vocab_size, "folder": str(out / "text")},
        {"tokenizer": f"image (VQGAN, {vq_steps} steps)", "vocabulary": TINY.image_codes, "folder": str(out / "vq")},
    ]


def _prompt_subset(out: Path, n: int) -> Path:
    lines = EVAL_PROMPTS.read_text().splitlines()[:n]
    path = out / "eval-prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def training_row(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """One run's row of the training table: a CE the run has no value for (null in metrics.jsonl: no targets of that
    modality at its last step) stays None, an empty cell, never 0."""
    final = result["final"]
    return {
        "run": name,
        "steps": result["steps"],
        "final loss": _rounded(final.get("loss")),
        "text CE": _rounded(final.get("ce_text")),
        "image CE": _rounded(final.get("ce_image")),
        "checkpoint": result["checkpoint"],
    }


def summary_markdown(page: Path, seconds: float, generations: list[dict[str, Any]]) -> Markdown:
    """Where the report is, and the start of each generated answer (the model's text, escaped)."""
    lines = [md("- **{}**: {}, {} image(s)", g["mode"], repr(g["text"][:200]), len(g["images"])) for g in generations]
    return md("# End-to-end run\n\nReport: {} ({} s).\n\n{}", code(page), seconds, Markdown("\n".join(lines)))


def write_summary(out: Path, report: dict[str, Any], evaluated: dict[str, Any]) -> Path:
    """OUT/demo-report.json: raw counts, prepared totals and stage manifests by name, runs, evaluation, timing."""
    raw = json.loads((out / "raw" / "manifest.json").read_text())
    prepared = {
        row["source"]: json.loads((out / "prepared" / row["source"] / "manifest.json").read_text())["totals"]
        for row in report["prepared"]
    }
    summary = {
        "out": str(out),
        "raw": {k: raw[k]["records"] for k in ("text", "image_text", "interleaved", "sft")},
        "prepared": prepared,
        "mixed": report["mixed"],
        "training": report["training"],
        "evaluation": evaluated,
        "report": str(out / "report.html"),
        "seconds": report["seconds"],
    }
    path = out / "demo-report.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    return path


@flow(name="end-to-end")
def end_to_end(
    out_dir: str = Field("data/demo", description="folder for everything the run writes"),
    vq_steps: Annotated[int, Field(ge=1)] = Field(150, description="training steps of the tiny VQ image tokenizer"),
    train_steps: Annotated[int, Field(ge=2)] = Field(
        30, description="pretraining steps on stage 1 (stage 2 gets half more, in the same run)"
    ),
    sft_steps: Annotated[int, Field(ge=1)] = Field(12, description="fine-tuning steps"),
    max_new_tokens: Annotated[int, Field(ge=8)] = Field(96, description="new tokens per generated answer"),
    eval_prompts: Annotated[int, Field(ge=0)] = Field(3, description="prompts of sample/eval/prompts.jsonl to answer"),
    benchmark_items: Annotated[int, Field(ge=0)] = Field(
        2, description="items of the bundled ARC, captioning and VQAv2 samples to score, 2-shot (0: none)"
    ),
) -> dict[str, Any]:
    """Sample data -> tokenizers -> prepare -> mix -> pretrain (stage 1 then 2, one run) -> SFT -> generate -> evaluate
    -> report."""
    started = time.perf_counter()
    out = Path(out_dir).resolve()
    raw = sample_data_task(out / "raw")
    tokenizers = tokenizers_task(raw, out / "tokenizers", vq_steps)

    prepare_config = demo_prepare_config(out)
    dump_config(prepare_config, out / "prepare.yaml")  # for `cham prepare` by hand
    built = build_dataset(config=prepare_config)
    spec = demo_mixture(out / "prepared")
    stages = mix_task(dump_config(spec, out / "mixture.yaml"), out / "mixed")
    shares_png = plot_shares(stages, out / "mixed" / "report.png")

    runs = out / "runs"
    pretrained = train(config=demo_train_config(out / "mixed", runs / "pretrain", train_steps))
    tuned = sft(
        config=demo_sft_config(out / "mixed" / "sft", runs / "sft", sft_steps, runs / "pretrain" / "checkpoints")
    )
    checkpoint = tuned["out_dir"]

    samples = out / "samples"
    generations = [
        generate(
            checkpoint=checkpoint,
            prompt="How do I",
            out_dir=str(samples / "text"),
            mode="text",
            max_new_tokens=max_new_tokens,
            seed=1,
        ),
        generate(
            checkpoint=checkpoint,
            prompt="A photo of a bird",
            out_dir=str(samples / "image"),
            mode="image",
            max_new_tokens=max_new_tokens,
            seed=1,
        ),
        generate(
            checkpoint=checkpoint,
            prompt="What is in this picture?",
            out_dir=str(samples / "mixed"),
            mode="mixed",
            images=[str(sorted((REPO / SAMPLE_PHOTO).glob("*.jpg"))[0])],
            max_new_tokens=max_new_tokens,
            seed=1,
        ),
    ]
    evaluated = evaluate(
        checkpoint=checkpoint,
        out_dir=str(out / "eval"),
        stage=str(out / "mixed" / "stage2"),
        prompts=str(_prompt_subset(out, eval_prompts)) if eval_prompts else None,
        max_batches=4,
        mode="mixed",
        max_new_tokens=max_new_tokens,
        **(
            {
                "text_tasks": ["arc"],
                "captioning": str(SAMPLE_EVAL / "coco_karpathy.json"),
                "captioning_images": str(SAMPLE_IMAGES),
                "vqa_questions": str(SAMPLE_EVAL / "vqav2_questions.json"),
                "vqa_annotations": str(SAMPLE_EVAL / "vqav2_annotations.json"),
                "vqa_images": str(SAMPLE_IMAGES),
                "shots": 2,
                "benchmark_limit": benchmark_items,
            }
            if benchmark_items
            else {}
        ),
    )

    runs_done = {"pretrain (stage 1, 2)": pretrained, "sft": tuned}
    pretrain_metrics = read_metrics(Path(pretrained["out_dir"]))
    curves = {  # the pretraining run's curve in two colours, one per stage
        f"stage {stage + 1}": loss_points([m for m in pretrain_metrics if m.get("stage", 0) == stage])
        for stage in (0, 1)
    }
    curves["sft"] = loss_points(read_metrics(Path(tuned["out_dir"])))
    loss_png = plot_loss_curves(curves, out / "loss-curves.png", "loss by step: stage 1, stage 2, SFT")
    training_rows = [training_row(name, r) for name, r in runs_done.items()]
    evaluation_rows = [
        {
            "data": "stage 2 (seen in training: the sample corpus is small)",
            "loss": round(evaluated["loss"], 4),
            "perplexity": round(evaluated["perplexity"], 2),
            "tokens": evaluated["tokens"],
        }
    ]
    report = {
        "out_dir": str(out),
        "tokenizers": tokenizers,
        "prepared": built["sources"],
        "mixed": stages,
        "shares_png": str(shares_png),
        "loss_png": str(loss_png),
        "training": training_rows,
        "evaluation": evaluation_rows,
        "annotate_page": evaluated.get("annotate_page"),
        "benchmarks": [
            {"benchmark": name, "score": round(score, 4), "items": benchmark_items, "shots": 2}
            for name, score in evaluated.get("benchmarks", {}).items()
        ],
        "generations": [
            (g["out_dir"], json.loads((Path(g["out_dir"]) / "generation.json").read_text())) for g in generations
        ],
    }
    report["seconds"] = round(time.perf_counter() - started, 1)
    page = write_report(out / "report.html", report)
    table_artifact(training_rows, key="end-to-end-training", description="final metrics of every run")
    markdown_artifact(
        summary_markdown(page, report["seconds"], generations),
        key="end-to-end-summary",
        description="where the report is, and what was generated",
    )
    write_summary(out, report, evaluated)
    return {
        "report": str(page),
        "seconds": report["seconds"],
        "prepared": built["sources"],
        "training": training_rows,
        "evaluation": evaluation_rows,
        "benchmarks": report["benchmarks"],
        "generations": generations,
        "mixed_dir": str(out / "mixed"),
    }

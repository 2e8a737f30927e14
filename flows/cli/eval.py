"""`cham eval`: held-out loss on stage shards, the human-evaluation harness (prompts, compare, score), and the
image-to-text benchmarks (captioning, vqa)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from flows.cli.output import console, fail, output_file, output_folder
from schemas.config_base import ConfigError
from schemas.generate_config import GenerationMode

if TYPE_CHECKING:
    from model.generation.inference import InferenceModel

app = typer.Typer(
    help="Evaluate a checkpoint: held-out loss, mixed-modal prompts for human annotators, image-to-text benchmarks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SHORT = {"partially_fulfills": "partly", "does_not_fulfill": "not", "win": "A wins", "loss": "B wins"}
CHECKPOINT = typer.Option("--checkpoint", help="a run's out_dir, its checkpoints/ or a step folder")


def _load(checkpoint: Path, text_tokenizer: Path | None = None, image_tokenizer: Path | None = None) -> InferenceModel:
    from model.generation.inference import load_inference_model
    from model.training.checkpointing import CheckpointError

    try:
        return load_inference_model(checkpoint, text_tokenizer, image_tokenizer)
    except CheckpointError as err:
        raise fail(str(err)) from None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


@app.command("loss")
def loss(
    checkpoint: Annotated[str, CHECKPOINT],
    stage: Annotated[
        str, typer.Option("--stage", help="a stage folder written by `cham mix` (held-out data): a path or s3:// etc.")
    ],
    out: Annotated[Path, typer.Option("--out", help="the JSON file to write the results to")],
    max_batches: Annotated[int | None, typer.Option(help="evaluate only the first N batches")] = None,
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass")] = 8,
    document_masking: Annotated[
        bool, typer.Option("--document-masking/--no-document-masking", help="attend within documents, as in training")
    ] = True,
) -> None:
    """Held-out loss and perplexity of a checkpoint on stage shards, per source and per modality."""
    from model.files.storage import is_url

    if not is_url(stage) and not (Path(stage) / "manifest.json").is_file():
        raise fail(f"{stage}: not a stage folder (no manifest.json; write one with `cham mix`)")
    from model.generation.inference import load_trained_model
    from model.training.checkpointing import CheckpointError
    from model.training.held_out import heldout_loss
    from model.training.stage_loader import CorruptShardError

    try:  # held-out loss needs the model only, not its tokenizers (a converted folder has none)
        model, folder, step = load_trained_model(checkpoint)
    except CheckpointError as err:
        raise fail(str(err)) from None
    output_file(out)  # before the evaluation, not after it
    columns = (TextColumn("held-out loss"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("batches", total=None)

            def advance(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            result = heldout_loss(
                model,
                stage,
                batch_size=batch_size,
                max_batches=max_batches,
                document_masking=document_masking,
                progress=advance,
            )
    except (ValueError, FileNotFoundError, CorruptShardError) as err:
        raise fail(str(err)) from None
    result = {"checkpoint": str(folder), "step": step, **result}
    title = f"held-out loss: {folder} on {result['stage']} ({result['sequences']} sequences)"
    table = Table("", "tokens", "loss", "perplexity", title=title)
    rows = [
        ("all", result),
        *((f"source {k}", v) for k, v in result["by_source"].items()),
        *((f"modality {k}", v) for k, v in result["by_modality"].items()),
    ]
    for name, r in rows:
        table.add_row(name, f"{r['tokens']:,}", _fmt(r["loss"]), _fmt(r["perplexity"], 2))
    console.print(table)
    _write_json(out, result)
    console.print(f"wrote {out}")


@app.command("prompts")
def prompts(
    checkpoint: Annotated[str, CHECKPOINT],
    prompts_file: Annotated[Path, typer.Option("--prompts", help="a prompt file (jsonl: id, prompt, images, ...)")],
    out: Annotated[Path, typer.Option("--out", help="folder for responses.jsonl, annotate.html and images/")],
    mode: Annotated[GenerationMode, typer.Option(help="text, image or mixed")] = "mixed",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="at most this many new tokens per response")] = 1024,
    seed: Annotated[int, typer.Option(help="base seed; each prompt samples with a seed derived from its id")] = 0,
    guidance: Annotated[bool, typer.Option("--cfg/--no-cfg", help="classifier-free guidance for images")] = True,
    batch_size: Annotated[
        int,
        typer.Option(
            min=1,
            help="prompts decoded together: faster; responses equal to one at a time up to "
            "floating-point rounding (padding changes summation order)",
        ),
    ] = 1,
    text_tokenizer: Annotated[Path | None, typer.Option(help="override the text tokenizer the run recorded")] = None,
    image_tokenizer: Annotated[Path | None, typer.Option(help="override the image tokenizer the run recorded")] = None,
) -> None:
    """Answer every prompt of a prompt file and write the page annotators judge task fulfillment on."""
    from model.evaluation.human_eval import ANNOTATE_PAGE, RESPONSES_FILE, EvalFileError, read_prompts, run_prompts
    from model.generation.prompting import PromptError

    try:
        items = read_prompts(prompts_file)
    except EvalFileError as err:
        raise fail(str(err)) from None
    loaded = _load(checkpoint, text_tokenizer, image_tokenizer)
    output_folder(out)
    console.print(f"[dim]{loaded.checkpoint} (step {loaded.step}), {mode} mode, {len(items)} prompts[/dim]")

    def show(record: dict[str, Any]) -> None:
        images = sum(s["kind"] == "image" for s in record["response"])
        console.print(f"{record['id']}: {record['new_tokens']} tokens, {images} images, {record['seconds']:.1f} s")

    try:
        run_prompts(
            loaded,
            items,
            out,
            mode=mode,
            max_new_tokens=max_new_tokens,
            seed=seed,
            guidance=guidance,
            on_response=show,
            batch_size=batch_size,
        )
    except (PromptError, EvalFileError, ConfigError) as err:
        raise fail(str(err)) from None
    console.print(f"wrote {out / RESPONSES_FILE}; annotators open {out / ANNOTATE_PAGE}")


@app.command("compare")
def compare(
    responses_a: Annotated[Path, typer.Argument(help="responses.jsonl of system A")],
    responses_b: Annotated[Path, typer.Argument(help="responses.jsonl of system B (same prompt file)")],
    out: Annotated[Path, typer.Option("--out", help="folder for compare.html, images/ and blinding.json")],
    seed: Annotated[int | None, typer.Option(help="seed of the per-item order (default: random, recorded)")] = None,
) -> None:
    """A blinded A-vs-B page (order random per item) and the map that un-blinds the annotations."""
    from model.evaluation.human_eval import BLINDING_FILE, COMPARE_PAGE, EvalFileError, make_comparison

    output_folder(out)
    try:
        mapping = make_comparison(responses_a, responses_b, out, seed=seed)
    except EvalFileError as err:
        raise fail(str(err)) from None
    console.print(
        f"{len(mapping['items'])} items (seed {mapping['seed']}): annotators open {out / COMPARE_PAGE}; "
        f"keep {out / BLINDING_FILE} from them and pass it to `cham eval score --blinding`"
    )


@app.command("score")
def score(
    annotations: Annotated[list[Path], typer.Argument(help="annotation jsonl file(s), e.g. one per annotator")],
    out: Annotated[Path, typer.Option("--out", help="the JSON file to write the scores to")],
    blinding: Annotated[Path | None, typer.Option(help="blinding.json of `cham eval compare` (relative)")] = None,
    responses: Annotated[Path | None, typer.Option(help="responses.jsonl: check every item is one of them")] = None,
    prompts_file: Annotated[
        Path | None,
        typer.Option("--prompts", help="the prompt file: check every item is one of its prompts; adds its statistics"),
    ] = None,
) -> None:
    """Task fulfillment or win/tie/loss rates (majority of three annotators) and the agreement shares; with
    --prompts or --responses also the prompt set's statistics (mixed-modal vs text-only prompts)."""
    from model.evaluation.annotation_score import read_annotations, read_blinding, score_annotations
    from model.evaluation.human_eval import EvalFileError, read_prompts, read_responses
    from model.evaluation.prompt_statistics import statistics_of_prompts, statistics_of_responses

    output_file(out)
    try:
        mapping = read_blinding(blinding) if blinding is not None else None
        records = read_responses(responses) if responses is not None else None
        asked = read_prompts(prompts_file) if prompts_file is not None else None
        known = {r["id"] for r in records} if records is not None else None
        if asked is not None:
            known = {p.id for p in asked} if known is None else known & {p.id for p in asked}
        result = score_annotations(read_annotations(annotations), mapping, known)
    except EvalFileError as err:
        raise fail(str(err)) from None
    if asked is not None or records is not None:
        result["prompt_set"] = statistics_of_prompts(asked) if asked is not None else statistics_of_responses(records)
    outcomes = list(result["rates"])
    title = f"{result['task']} evaluation, {result['items']} items"
    if result["task"] == "relative":
        title += f": A = {result['systems'].get('A')} vs B = {result['systems'].get('B')}"
    # Short headers so the table fits 80 columns; the JSON has the full names.
    table = Table(
        "category",
        "items",
        *(SHORT.get(k, k) for k in outcomes),
        "3/3",
        "2/3",
        "none",
        box=box.SIMPLE_HEAD,
        title=title,
        caption="annotators who agree: all three (3/3), two (2/3), none",
    )
    for name, summary in [("overall", result), *result["by_category"].items()]:
        shares = [f"{summary['rates'][k]:.1%}" for k in outcomes]
        agree = [f"{v:.1%}" for v in summary["agreement"].values()]
        table.add_row(name, str(summary["items"]), *shares, *agree)
    console.print(table)
    if "prompt_set" in result:
        console.print(_prompt_set_table(result["prompt_set"], "the prompt set"))
    _write_json(out, result)
    console.print(f"wrote {out}")


def _progress_bar(label: str) -> Progress:
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, console=console, transient=True)


def _one_source(checkpoint: str | None, results: Path | None) -> None:
    if (checkpoint is None) == (results is None):
        raise fail("give either --checkpoint (generate and score) or --results (score a results file)")


@app.command("captioning")
def captioning(
    data: Annotated[
        Path,
        typer.Option("--data", help="COCO-Karpathy dataset_coco.json, or COCO caption annotations (captions_*.json)"),
    ],
    out: Annotated[Path, typer.Option("--out", help="the JSON file to write the scores and captions to")],
    checkpoint: Annotated[str | None, CHECKPOINT] = None,
    results: Annotated[
        Path | None, typer.Option(help="score this COCO results file ([{image_id, caption}]) instead of a checkpoint")
    ] = None,
    images: Annotated[Path | None, typer.Option(help="the image folder (default: the data file's folder)")] = None,
    split: Annotated[str, typer.Option(help="the Karpathy split to caption (test, val, ...)")] = "test",
    support: Annotated[
        Path | None, typer.Option(help="a caption file to draw the examples from (default: train + restval)")
    ] = None,
    support_images: Annotated[
        Path | None, typer.Option(help="the support file's image folder (default: --images)")
    ] = None,
    shots: Annotated[int, typer.Option(min=0, help="examples (image and caption) before each query")] = 2,
    seed: Annotated[int, typer.Option(help="seed of the examples' choice")] = 0,
    limit: Annotated[int | None, typer.Option(min=1, help="caption only the first N images")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="at most this many tokens per caption")] = 30,
    batch_size: Annotated[int, typer.Option(min=1, help="prompts decoded together")] = 8,
    text_tokenizer: Annotated[Path | None, typer.Option(help="override the text tokenizer the run recorded")] = None,
    image_tokenizer: Annotated[Path | None, typer.Option(help="override the image tokenizer the run recorded")] = None,
) -> None:
    """Few-shot COCO captioning: caption each image greedily and score CIDEr-D and BLEU-4 (or score a results file)."""
    from model.evaluation.benchmarks import image_to_text as i2t
    from model.evaluation.benchmarks.image_to_text_data import (
        BenchmarkFileError,
        read_caption_results,
        read_caption_set,
    )

    _one_source(checkpoint, results)
    output_file(out)
    folder = images if images is not None else (data.parent if checkpoint is not None else None)
    try:
        kind, items = read_caption_set(data, folder)
        pool_items = None
        if support is not None and checkpoint is not None:
            pool_items = read_caption_set(support, support_images or images or support.parent)[1]
        queries, pool = i2t.caption_pools(kind, items, split, pool_items)
        queries = queries[:limit] if limit is not None else queries
        if results is not None:
            result = {**i2t.caption_scores(queries, read_caption_results(results)), "results": str(results)}
        else:
            assert checkpoint is not None
            loaded = _load(Path(checkpoint), text_tokenizer, image_tokenizer)
            with _progress_bar("captioning") as bar:
                task = bar.add_task("images", total=len(queries))
                result = i2t.run_captioning(
                    loaded,
                    queries,
                    pool,
                    shots=shots,
                    seed=seed,
                    max_new_tokens=max_new_tokens,
                    batch_size=batch_size,
                    progress=lambda done, total: bar.update(task, completed=done, total=total),
                )
    except (BenchmarkFileError, i2t.BenchmarkError) as err:
        raise fail(str(err)) from None
    result = {**result, "data": str(data), "format": kind, **({"split": split} if kind == "karpathy" else {})}
    table = Table("images", "CIDEr-D", "BLEU-4", "BLEU-1", title=f"captioning: {data.name}", box=box.SIMPLE_HEAD)
    table.add_row(str(result["items"]), _fmt(result["cider"]), _fmt(result["bleu_4"]), _fmt(result["bleu"][0]))
    console.print(table)
    i2t.write_result(out, result)
    console.print(f"wrote {out}")


@app.command("vqa")
def vqa(
    questions: Annotated[
        Path, typer.Option("--questions", help="VQAv2 questions (v2_OpenEnded_mscoco_*_questions.json)")
    ],
    annotations: Annotated[
        Path, typer.Option("--annotations", help="VQAv2 annotations (v2_mscoco_*_annotations.json)")
    ],
    out: Annotated[Path, typer.Option("--out", help="the JSON file to write the scores and answers to")],
    checkpoint: Annotated[str | None, CHECKPOINT] = None,
    results: Annotated[
        Path | None, typer.Option(help="score this results file ([{question_id, answer}]) instead of a checkpoint")
    ] = None,
    images: Annotated[Path | None, typer.Option(help="the image folder (default: the questions file's folder)")] = None,
    support_questions: Annotated[
        Path | None, typer.Option(help="questions to draw the examples from (default: the evaluated ones)")
    ] = None,
    support_annotations: Annotated[Path | None, typer.Option(help="the support questions' annotations")] = None,
    support_images: Annotated[Path | None, typer.Option(help="the support questions' image folder")] = None,
    shots: Annotated[int, typer.Option(min=0, help="examples (image, question and answer) before each query")] = 2,
    seed: Annotated[int, typer.Option(help="seed of the examples' choice")] = 0,
    limit: Annotated[int | None, typer.Option(min=1, help="answer only the first N questions")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="at most this many tokens per answer")] = 10,
    batch_size: Annotated[int, typer.Option(min=1, help="prompts decoded together")] = 8,
    text_tokenizer: Annotated[Path | None, typer.Option(help="override the text tokenizer the run recorded")] = None,
    image_tokenizer: Annotated[Path | None, typer.Option(help="override the image tokenizer the run recorded")] = None,
) -> None:
    """Few-shot VQAv2: answer each question greedily and score the official accuracy (or score a results file)."""
    from model.evaluation.benchmarks import image_to_text as i2t
    from model.evaluation.benchmarks.image_to_text_data import BenchmarkFileError, read_vqa, read_vqa_results

    _one_source(checkpoint, results)
    if (support_questions is None) != (support_annotations is None):
        raise fail("give --support-questions and --support-annotations together")
    output_file(out)
    folder = images if images is not None else (questions.parent if checkpoint is not None else None)
    try:
        every = read_vqa(questions, annotations, folder)
        items = every[:limit] if limit is not None else every
        if results is not None:
            result = {**i2t.vqa_scores(items, read_vqa_results(results)), "results": str(results)}
        else:
            assert checkpoint is not None
            support = None
            if support_questions is not None:
                support = read_vqa(support_questions, support_annotations, support_images or support_questions.parent)
            pool = i2t.vqa_pool(every, support)  # --limit shortens the queries, not the examples
            loaded = _load(Path(checkpoint), text_tokenizer, image_tokenizer)
            with _progress_bar("vqa") as bar:
                task = bar.add_task("questions", total=len(items))
                result = i2t.run_vqa(
                    loaded,
                    items,
                    pool,
                    shots=shots,
                    seed=seed,
                    max_new_tokens=max_new_tokens,
                    batch_size=batch_size,
                    progress=lambda done, total: bar.update(task, completed=done, total=total),
                )
    except (BenchmarkFileError, i2t.BenchmarkError) as err:
        raise fail(str(err)) from None
    result = {**result, "questions": str(questions), "annotations": str(annotations)}
    table = Table("", "questions", "accuracy", title=f"VQAv2: {questions.name}", box=box.SIMPLE_HEAD)
    table.add_row("all", str(result["items"]), f"{result['accuracy']:.2f}")
    counts: dict[str, int] = {}
    for q in items:
        counts[str(q.answer_type)] = counts.get(str(q.answer_type), 0) + 1
    for name, accuracy in result["by_answer_type"].items():
        table.add_row(name, str(counts.get(name, "")), f"{accuracy:.2f}")
    console.print(table)
    i2t.write_result(out, result)
    console.print(f"wrote {out}")


# --- the paper's human-evaluation steps: prompt filtering, augmented baselines, prompt-set statistics ----------


def _prompt_set_table(stats: dict[str, Any], title: str) -> Table:
    """Per category: the shares of mixed-modal / text-only (/ image-only, when any) prompts and of expected answers."""
    kinds = [k for k in stats["prompt_modality"] if k != "image_only" or stats["prompt_modality"][k]]
    table = Table(
        "category",
        "prompts",
        *(k.split("_")[0] for k in kinds),
        "ans mixed",
        "ans text",
        "ans ?",
        box=box.SIMPLE_HEAD,
        title=f"{title}: {stats['prompts']} prompts",
        caption="prompts that hold text and images (mixed), text only, images only; ans: what the answer "
        "is expected to hold (`expects`: mixed, text, or not given)",
    )
    for name, s in [("overall", stats), *stats["by_category"].items()]:
        shares = [s["prompt_modality_shares"][k] for k in kinds] + list(s["expected_answer_shares"].values())
        table.add_row(name, str(s["prompts"]), *(f"{v:.0%}" for v in shares))
    return table


@app.command("prompt-stats")
def prompt_stats(
    prompts_file: Annotated[Path, typer.Argument(help="a prompt file (jsonl: id, prompt, images, category, ...)")],
    out: Annotated[Path | None, typer.Option("--out", help="also write the statistics to this JSON file")] = None,
) -> None:
    """The prompt set as the paper reports it: the share of mixed-modal and text-only prompts, and of prompts whose
    answer is expected to hold images (`expects`, set by `cham eval filter`), overall and per category."""
    from model.evaluation.human_eval import EvalFileError, read_prompts
    from model.evaluation.prompt_statistics import statistics_of_prompts

    if out is not None:
        output_file(out)
    try:
        stats = statistics_of_prompts(read_prompts(prompts_file))
    except EvalFileError as err:
        raise fail(str(err)) from None
    console.print(_prompt_set_table(stats, str(prompts_file)))
    if out is not None:
        _write_json(out, stats)
        console.print(f"wrote {out}")


@app.command("filter-pages")
def filter_pages(
    prompts_file: Annotated[Path, typer.Option("--prompts", help="the prompt file to filter")],
    annotators: Annotated[
        list[str], typer.Option("--annotator", help="an annotator's name (repeat: one page each, e.g. three)")
    ],
    out: Annotated[Path, typer.Option("--out", help="folder for filter-<annotator>.html and images/")],
) -> None:
    """One filtering page per annotator: each prompt to label keep / unclear / needs no images."""
    from model.evaluation.human_eval import EvalFileError, read_prompts
    from model.evaluation.prompt_filtering import write_filter_pages

    try:
        items = read_prompts(prompts_file)
        output_folder(out)
        pages = write_filter_pages(items, annotators, out)
    except EvalFileError as err:
        raise fail(str(err)) from None
    console.print(f"{len(items)} prompts, {len(pages)} pages: " + ", ".join(str(p) for p in pages))
    console.print("each annotator's page saves annotations-filter-<name>.jsonl; pass them to `cham eval filter`")


@app.command("filter")
def filter_command(
    labels: Annotated[list[Path], typer.Argument(help="filtering label files, e.g. one per annotator")],
    prompts_file: Annotated[Path, typer.Option("--prompts", help="the prompt file the labels are of")],
    out: Annotated[Path, typer.Option("--out", help="the prompt file of the kept prompts to write")],
    rule: Annotated[
        str, typer.Option(help="keep a prompt when most annotators say keep (majority) or all do (unanimous)")
    ] = "majority",
    report: Annotated[
        Path | None, typer.Option(help="the JSON report to write (default: beside --out, <name>-report.json)")
    ] = None,
) -> None:
    """Keep the prompts the annotators found clear and calling for a mixed-modal answer; report their agreement."""
    from model.evaluation.human_eval import EvalFileError, read_prompts
    from model.evaluation.prompt_files import write_prompts
    from model.evaluation.prompt_filtering import RULES, filter_prompts, read_filter_labels

    if rule not in RULES:
        raise fail(f"--rule {rule}: one of {', '.join(RULES)}")
    report = report if report is not None else out.with_name(f"{out.stem}-report.json")
    output_file(out)
    output_file(report)
    try:
        kept, result = filter_prompts(read_prompts(prompts_file), read_filter_labels(labels), rule)
    except EvalFileError as err:
        raise fail(str(err)) from None
    table = Table(
        "category",
        "prompts",
        "kept",
        "unclear",
        "no images",
        "all",
        "most",
        "none",
        box=box.SIMPLE_HEAD,
        title=f"prompt filtering ({rule}, {len(result['annotators'])} annotators): {result['kept']} of "
        f"{result['prompts']} kept",
        caption="annotators who agree: all, most, none; Fleiss' kappa: labels {}, keep or drop {}".format(
            *(_fmt(result["fleiss_kappa"][k], 3) for k in ("labels", "keep_or_drop"))
        ),
    )
    for name, s in [("overall", result), *result["by_category"].items()]:
        dropped = [str(s["dropped"][k]) for k in ("unclear", "not_mixed_modal")]
        table.add_row(name, str(s["prompts"]), str(s["kept"]), *dropped, *(f"{v:.0%}" for v in s["agreement"].values()))
    console.print(table)
    if kept:
        write_prompts(kept, out)
        console.print(_prompt_set_table(result["prompt_set"]["kept"], "the kept prompts"))
    _write_json(report, result)
    console.print(f"wrote {out if kept else 'no prompt file (no prompt was kept)'} and {report}")


@app.command("baseline-prompts")
def baseline_prompts_command(
    prompts_file: Annotated[Path, typer.Option("--prompts", help="the prompt file our model answers")],
    out: Annotated[Path, typer.Option("--out", help="the baseline's prompt file to write")],
) -> None:
    """The prompt file for a text-only baseline: each prompt followed by the caption-tag instruction."""
    from model.evaluation.augmented_baseline import CAPTION_INSTRUCTION, baseline_prompts
    from model.evaluation.human_eval import EvalFileError, read_prompts
    from model.evaluation.prompt_files import write_prompts

    output_file(out)
    try:
        items = read_prompts(prompts_file)
    except EvalFileError as err:
        raise fail(str(err)) from None
    write_prompts(baseline_prompts(items), out)
    console.print(f"instruction: {CAPTION_INSTRUCTION}", highlight=False)
    console.print(
        f"wrote {out} ({len(items)} prompts); answer them with the baseline and bring one line per prompt: "
        '{"id": ..., "answer": ..., "system": ...}'
    )


@app.command("augment")
def augment(
    answers: Annotated[Path, typer.Argument(help="the baseline's answers (jsonl: id, answer, system)")],
    prompts_file: Annotated[Path, typer.Option("--prompts", help="the prompt file our model answered")],
    out: Annotated[Path, typer.Option("--out", help="folder for captions.jsonl, responses.jsonl and images/")],
    checkpoint: Annotated[str | None, typer.Option(help="draw the captions with this checkpoint (image mode)")] = None,
    images: Annotated[
        Path | None, typer.Option(help="or take them from this folder: <id>-<index>.png as captions.jsonl names them")
    ] = None,
    seed: Annotated[int, typer.Option(help="base seed; each caption samples with a seed from its image name")] = 0,
    guidance: Annotated[bool, typer.Option("--cfg/--no-cfg", help="classifier-free guidance")] = True,
    text_tokenizer: Annotated[Path | None, typer.Option(help="override the text tokenizer the run recorded")] = None,
    image_tokenizer: Annotated[Path | None, typer.Option(help="override the image tokenizer the run recorded")] = None,
) -> None:
    """A text-only baseline's answers with an image in place of each <caption> tag: a responses.jsonl that
    `cham eval compare` puts against ours. Without --checkpoint or --images only captions.jsonl is written."""
    from model.evaluation.augmented_baseline import CAPTION_COUNTS, augment_baseline, caption_images
    from model.evaluation.human_eval import ANNOTATE_PAGE, EvalFileError, read_prompts
    from model.generation.prompting import PromptError

    if checkpoint is not None and images is not None:
        raise fail("give --checkpoint (our model draws the captions) or --images (a folder of them), not both")
    try:
        items = read_prompts(prompts_file)
    except EvalFileError as err:
        raise fail(str(err)) from None
    output_folder(out)
    draw = None
    if checkpoint is not None:
        loaded = _load(checkpoint, text_tokenizer, image_tokenizer)

        def draw(captions: list[dict[str, Any]], folder: Path) -> dict[str, dict[str, Any]]:
            columns = (TextColumn("drawing captions"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            with Progress(*columns, console=console, transient=True) as bar:
                task = bar.add_task("captions", total=len(captions))
                return caption_images(loaded, captions, folder, seed, guidance, on_image=lambda _: bar.advance(task))

    try:
        summary = augment_baseline(items, answers, out, images=images, draw=draw, source=checkpoint or "")
    except (EvalFileError, PromptError) as err:
        raise fail(str(err)) from None
    counts = ", ".join(f"{summary[k]} {k.replace('_', ' ')}" for k in CAPTION_COUNTS)
    console.print(f"{summary['answers']} answers, {summary['answers_with_images']} with images: {counts}")
    if summary["responses"] is None:
        console.print(
            f"wrote {summary['captions_file']}; draw each caption as the image it names, then run again with "
            "--images FOLDER (or --checkpoint to draw them with our model)"
        )
    else:
        console.print(f"wrote {summary['responses']} and {out / ANNOTATE_PAGE}; compare it with `cham eval compare`")


@app.command("benchmark")
def benchmark(
    checkpoint: Annotated[str, CHECKPOINT],
    task: Annotated[
        str,
        typer.Option(
            "--task",
            help="a task file in its published format (HellaSwag, ARC, PIQA, WinoGrande, BoolQ jsonl, MMLU csv or "
            "jsonl, GSM8K jsonl) or a bundled sample: hellaswag, arc, piqa, winogrande, boolq, mmlu, gsm8k",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="the JSON file to write the scores to")],
    shots: Annotated[int, typer.Option(min=0, help="solved examples before each question (k-shot)")] = 0,
    task_format: Annotated[
        str | None, typer.Option("--format", help="the task file's format (default: from its name or fields)")
    ] = None,
    fewshot_file: Annotated[
        Path | None,
        typer.Option(help="draw the shots from this file (MMLU's dev split, a train split) instead of the task's own"),
    ] = None,
    seed: Annotated[int, typer.Option(help="few-shot seed (lm-evaluation-harness's default: 1234)")] = 1234,
    limit: Annotated[int | None, typer.Option(min=1, help="score only the first N questions")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="questions scored together")] = 8,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="generation tasks (GSM8K): at most this many")] = 256,
    lm_eval_task: Annotated[
        Path | None,
        typer.Option(help="also write the task into this folder as an lm-evaluation-harness task (--include_path)"),
    ] = None,
    text_tokenizer: Annotated[Path | None, typer.Option(help="override the text tokenizer the run recorded")] = None,
) -> None:
    """A text benchmark as lm-evaluation-harness scores it: multiple choice by log-likelihood (acc, acc_norm,
    acc_bytes) or GSM8K by exact match, k-shot with a fixed seed."""
    from model.evaluation.benchmarks.text_tasks import TaskFileError, read_task, resolve_task

    try:
        path, bundled_fewshot = resolve_task(task)
        text_task = read_task(path, task_format)
        pool_path = fewshot_file or bundled_fewshot
        pool = list(read_task(pool_path, text_task.format).docs) if pool_path is not None else None
    except TaskFileError as err:
        raise fail(str(err)) from None
    output_file(out)
    loaded = _load(checkpoint, text_tokenizer)
    from model.evaluation.benchmarks.text_benchmarks import run_text_benchmark

    console.print(f"[dim]{loaded.checkpoint} (step {loaded.step}): {text_task.name}, {shots}-shot, {path}[/dim]")
    columns = (TextColumn(text_task.name), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console, transient=True) as bar:
            progress_task = bar.add_task("questions", total=None)
            result = run_text_benchmark(
                loaded.model,
                loaded.tokenizer.text,
                text_task,
                shots=shots,
                seed=seed,
                limit=limit,
                fewshot_pool=pool,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                progress=lambda done, total: bar.update(progress_task, completed=done, total=total),
            )
    except (TaskFileError, ValueError) as err:
        raise fail(str(err)) from None
    result = {"checkpoint": str(loaded.checkpoint), "step": loaded.step, **result}
    title = f"{text_task.name}: {result['questions']} questions, {shots}-shot, {result['seconds']:.1f} s"
    table = Table("metric", "value", "stderr", title=title)
    for name, value in result["metrics"].items():
        if not name.endswith("_stderr"):
            table.add_row(name, _fmt(value), _fmt(result["metrics"][f"{name}_stderr"]))
    console.print(table)
    _write_json(out, result)
    console.print(f"wrote {out}")
    if lm_eval_task is not None:
        from model.evaluation.benchmarks.lm_eval_harness import write_lm_eval_task

        name = write_lm_eval_task(text_task, lm_eval_task, pool)
        console.print(f"wrote the lm-evaluation-harness task {name} into {lm_eval_task} (docs/evaluation.md)")

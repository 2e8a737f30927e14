"""The `train` and `sft` flows: torchrun (or one process) as a subprocess, logs streamed, resumed on retry."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from pydantic import Field

from flows.artifacts import (
    loss_points,
    markdown_artifact,
    mermaid_lines,
    plot_loss_curves,
    png_markdown,
    read_metrics,
    table_artifact,
)
from flows.markup import Markdown, code, escape_cell, md
from flows.subprocess_task import cham, run_command
from flows.train_launcher import Nodes, launcher_command
from model.files.storage import join, local_mirror
from model.training.checkpointing import latest_checkpoint
from model.training.memory_plan import GiB, MemoryPlan, parse_memory, plan_memory, planned_seq_len
from model.training.training_eval import EVAL_FILE
from schemas import SFTConfig, TrainConfig, dump_config

NPROC = Field(1, description="processes (ranks) on this machine; more than 1 launches torchrun (DDP or FSDP)")
RUN_NAME = Field(None, description="train into OUT_DIR/RUN_NAME (e.g. one folder per dataset build)")
RETRIES = Field(2, description="relaunches after a failure; each resumes from the latest checkpoint")
NNODES = Field(1, description="machines of the run: start this flow on each, with its node_rank (torchrun, c10d)")
NODE_RANK = Field(0, description="this machine's place among nnodes; node 0 hosts the rendezvous")
RDZV_ENDPOINT = Field(None, description="HOST:PORT of node 0, the same on every node; needed when nnodes > 1")
GPU_MEMORY = Field(None, description="each GPU's memory (e.g. 80GB): the memory plan then says whether the run fits")


def read_eval_records(out_dir: Path) -> list[dict[str, Any]]:
    """The run's held-out evaluations so far (eval.jsonl); a line cut short while being written is skipped."""
    path = Path(out_dir) / EVAL_FILE
    records = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return [r for r in records if isinstance(r, dict) and isinstance(r.get("step"), int)]


def report_eval(kind: str, out_dir: Path) -> bool:
    """Artifacts of the held-out evaluations so far: a table (step, stage, loss, text, image, each source) and the
    loss by step per held-out stage; False when there is none yet."""
    found = read_eval_records(out_dir)
    records = [r for r in found if "heldout" in r]
    scored = [r for r in found if "benchmark" in r]
    if scored:
        table_artifact(
            [
                {"step": r["step"], "benchmark": r["benchmark"], "questions": r.get("questions"), **r["metrics"]}
                for r in scored
            ],
            key=f"{kind}-benchmark-eval",
            description=f"{kind}: benchmarks during training",
        )
    if not records:
        return bool(scored)
    rows = [
        {
            "step": r["step"],
            "held-out stage": r["heldout"],
            "loss": r["loss"],
            "text": r["text"],
            "image": r["image"],
            **{f"source {s}": v for s, v in (r.get("by_source") or {}).items()},
        }
        for r in records
    ]
    table_artifact(rows, key=f"{kind}-heldout-eval", description=f"{kind}: held-out loss during training")
    series = {
        f"{name} {part}": [(r["step"], r[part]) for r in records if r["heldout"] == name]
        for name in dict.fromkeys(r["heldout"] for r in records)
        for part in ("loss", "text", "image")
    }
    series = {k: v for k, v in series.items() if any(y is not None for _, y in v)}
    markdown_artifact(
        md("## {}: held-out loss during training\n\n{}", kind, mermaid_lines(f"{kind} held-out loss", series)),
        key=f"{kind}-heldout-eval-curve",
        description=f"{kind}: held-out loss by step",
    )
    return True


def eval_watcher(kind: str, out_dir: Path) -> Callable[[], None]:
    """A `run_command` poll that republishes the held-out artifacts whenever eval.jsonl grows (live in the UI)."""
    path, seen = Path(out_dir) / EVAL_FILE, [-1]

    def poll() -> None:
        size = path.stat().st_size if path.is_file() else -1
        if size != seen[0]:
            seen[0] = size
            report_eval(kind, out_dir)

    return poll


def training_command(kind: str, config_file: Path, nproc_per_node: int, nodes: Nodes | None = None) -> list[str]:
    """`cham train|sft CONFIG` for one process; flows.train_launcher (torchrun with N processes running
    flows.train_worker, meeting the other nodes' at a c10d rendezvous when there are several) otherwise."""
    nodes = nodes or Nodes()
    if nproc_per_node == 1 and nodes.standalone:
        return cham(kind, str(config_file))
    return launcher_command(nproc_per_node, kind, config_file, nodes)


@task(name="launch-training", retry_delay_seconds=10)
def launch_training(kind: str, config: TrainConfig, nproc_per_node: int, nodes: Nodes | None = None) -> dict[str, Any]:
    """Run the trainer to config.steps; a relaunch (a retry) resumes from out_dir/checkpoints/latest by itself."""
    # A run into an object store keeps its config and metrics in a local mirror (storage.local_mirror), as the trainer.
    out_dir = local_mirror(config.out_dir)
    config_file = dump_config(config, out_dir / f"{kind}-config.yaml")
    watch = eval_watcher(kind, out_dir) if config.eval is not None else None
    run_command(training_command(kind, config_file, nproc_per_node, nodes), poll=watch, poll_every=2.0)
    if watch is not None:
        watch()
    metrics = read_metrics(out_dir)
    checkpoint = latest_checkpoint(config.checkpoint.dir or join(config.out_dir, "checkpoints"))
    return {
        "out_dir": str(out_dir),
        "run": str(config.out_dir),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "steps": metrics[-1]["step"] if metrics else 0,
        "final": metrics[-1] if metrics else {},
        "loss_curve": loss_points(metrics),
    }


def report_stages(kind: str, config: TrainConfig) -> None:
    """A table of the run's stages and the steps each is trained on (one row for a run on one stage)."""
    rows = [
        {
            "stage": p.index + 1,
            "data": str(p.data),
            "steps": f"{p.first_step + 1}-{p.end_step}",
            "share": round((p.end_step - p.first_step) / config.steps, 4),
        }
        for p in config.stage_plan()
    ]
    table_artifact(rows, key=f"{kind}-stages", description=f"{kind}: the stages of the run, in order, one lr schedule")


def report_training(kind: str, result: dict[str, Any]) -> None:
    """Artifacts: the loss curve (mermaid chart and PNG) and a table of the final metrics."""
    out_dir = Path(result["out_dir"])
    metrics = read_metrics(out_dir)
    series = {
        "loss": loss_points(metrics),
        "text CE": loss_points(metrics, "ce_text"),
        "image CE": loss_points(metrics, "ce_image"),
    }
    # A CE with no value at any step (null: no targets of that modality; 0.0 from older trainers) is not drawn.
    series = {k: v for k, v in series.items() if any(y for _, y in v)}
    png = plot_loss_curves(series, out_dir / "loss.png", title=f"{kind}: {out_dir.name}")
    markdown_artifact(
        md(
            "## {}: loss by step\n\n{}\n\n{}\n\nRun folder: {}; metrics: {}.",
            kind,
            mermaid_lines(f"{kind} loss", series),
            png_markdown(png, "loss curves"),
            code(out_dir),
            code(out_dir / "metrics.jsonl"),
        ),
        key=f"{kind}-loss-curve",
        description=f"{kind} loss curves",
    )
    final = result["final"]
    rows = [{"metric": k, "value": v} for k, v in final.items() if v is not None]
    rows.append({"metric": "checkpoint", "value": result["checkpoint"]})
    table_artifact(rows, key=f"{kind}-final-metrics", description=f"{kind}: metrics of the last step")


def plan_markdown(plan: MemoryPlan) -> Markdown:
    """The memory plan as markdown: its verdict, then a table of the parts in GiB per rank."""
    rows = [
        md("| {} | {} | {} |", escape_cell(part), Markdown(f"{size / GiB:.2f}"), escape_cell(what))
        for part, size, what in plan.rows()
    ]
    return md(
        "## Memory per rank\n\n{}\n\n| part | GiB | what |\n| --- | ---: | --- |\n{}",
        plan.verdict(),
        Markdown("\n".join(rows)),
    )


def report_plan(kind: str, config: TrainConfig, world_size: int, gpu_memory: str | None) -> MemoryPlan:
    """Publish the run's memory plan (model/training/memory_plan.py) before it launches; warn if it does not fit."""
    import torch

    memory = parse_memory(gpu_memory) if gpu_memory else None
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the trainer runs here: its precision and kernels
    plan = plan_memory(config, world_size, seq_len=planned_seq_len(config), device=device, gpu_memory=memory)
    markdown_artifact(plan_markdown(plan), key=f"{kind}-memory-plan", description=f"{kind}: memory per rank")
    if plan.fits is False:
        get_run_logger().warning("the memory plan says this run does not fit: %s", plan.verdict())
    return plan


def _train(
    kind: str,
    config: TrainConfig,
    nproc_per_node: int,
    run_name: str | None,
    retries: int,
    nodes: Nodes | None = None,
    gpu_memory: str | None = None,
) -> dict:
    nodes = nodes or Nodes()
    if run_name:
        config = config.model_copy(update={"out_dir": join(config.out_dir, run_name)})
    if not config.logging.jsonl:  # the flow's result and artifacts are read from metrics.jsonl
        get_run_logger().warning("logging.jsonl is off in the config; the flow turns it on for its loss curves")
        config = config.model_copy(update={"logging": config.logging.model_copy(update={"jsonl": True})})
    report_plan(kind, config, nproc_per_node * nodes.nnodes, gpu_memory)
    report_stages(kind, config)
    result = launch_training.with_options(retries=retries)(kind, config, nproc_per_node, nodes)
    report_training(kind, result)
    return {k: v for k, v in result.items() if k != "loss_curve"}


@flow(name="train")
def train(
    config: TrainConfig,
    nproc_per_node: Annotated[int, Field(ge=1)] = NPROC,
    run_name: str | None = RUN_NAME,
    retries: Annotated[int, Field(ge=0)] = RETRIES,
    nnodes: Annotated[int, Field(ge=1)] = NNODES,
    node_rank: Annotated[int, Field(ge=0)] = NODE_RANK,
    rdzv_endpoint: str | None = RDZV_ENDPOINT,
    gpu_memory: str | None = GPU_MEMORY,
) -> dict[str, Any]:
    """Pretrain on a stage written by the mix job; artifacts: the memory plan, loss curves and final metrics."""
    nodes = Nodes(nnodes, node_rank, rdzv_endpoint)
    return _train("train", config, nproc_per_node, run_name, retries, nodes, gpu_memory)


@flow(name="sft")
def sft(
    config: SFTConfig,
    nproc_per_node: Annotated[int, Field(ge=1)] = NPROC,
    run_name: str | None = RUN_NAME,
    retries: Annotated[int, Field(ge=0)] = RETRIES,
    nnodes: Annotated[int, Field(ge=1)] = NNODES,
    node_rank: Annotated[int, Field(ge=0)] = NODE_RANK,
    rdzv_endpoint: str | None = RDZV_ENDPOINT,
    gpu_memory: str | None = GPU_MEMORY,
) -> dict[str, Any]:
    """Supervised fine-tuning from a pretrained checkpoint; artifacts: the memory plan, loss curves, final metrics."""
    nodes = Nodes(nnodes, node_rank, rdzv_endpoint)
    return _train("sft", config, nproc_per_node, run_name, retries, nodes, gpu_memory)

"""`cham train CONFIG` and `cham sft CONFIG`: in this process, or under torchrun with --nproc-per-node N."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Annotated

import typer

from flows.cli.output import console, fail
from schemas import ConfigError, SFTConfig, TrainConfig, load_config

NPROC = typer.Option("--nproc-per-node", help="processes (ranks) on this machine; > 1 launches torchrun (DDP)")
NNODES = typer.Option("--nnodes", min=1, help="machines of the run; > 1 needs --rdzv-endpoint (torchrun on each)")
NODE_RANK = typer.Option("--node-rank", min=0, help="this machine's place among --nnodes (0 hosts the rendezvous)")
RDZV = typer.Option("--rdzv-endpoint", metavar="HOST:PORT", help="node 0's address and a free port, on every node")
PLAN = typer.Option("--plan", help="print the per-rank memory plan and exit (0: it fits, 1: it does not)")
GPU_MEMORY = typer.Option("--gpu-memory", metavar="SIZE", help="with --plan: each GPU's memory, e.g. 80GB")


def _run(
    kind: str,
    config_file: Path,
    nproc: int,
    nodes: tuple[int, int, str | None],
    plan: bool = False,
    gpu_memory: str | None = None,
) -> None:
    try:
        config = load_config(SFTConfig if kind == "sft" else TrainConfig, config_file)
    except ConfigError as err:
        raise fail(str(err)) from None
    if plan:
        _print_plan(config, nproc * nodes[0], gpu_memory)
    from flows.train_launcher import Nodes

    try:
        machines = Nodes(*nodes)
    except ValueError as err:
        raise fail(str(err)) from None
    if nproc > 1 or not machines.standalone:
        from flows.process_lifetime import tied_to_this_process
        from flows.train_launcher import launcher_command

        # The launcher, and through it every rank, ends with this process; it prints one line if a rank fails.
        command = launcher_command(nproc, kind, config_file, machines)
        raise typer.Exit(subprocess.call(tied_to_this_process(command)))
    import torch

    from model.evaluation.benchmarks.during_training import attach_benchmarks
    from model.training.cpu_memory import keep_freed_memory
    from model.training.trainer import INPUT_ERRORS, Trainer

    if not torch.cuda.is_available():
        keep_freed_memory()  # this process only trains: no fresh page faults for each step's large temporaries
    try:
        trainer = Trainer(config, log=lambda line: console.print(line, markup=False, highlight=False))
        attach_benchmarks(trainer)  # eval.benchmarks, scored with the held-out loss
        history = trainer.train()
    except INPUT_ERRORS as err:
        raise fail(str(err)) from None
    if history:
        last = history[-1]
        console.print(f"done: step {last.step}, loss {last.loss:.4f}; checkpoints in {trainer.ckpt_dir}")
    else:
        console.print(f"nothing to do: already at step {trainer.step}")


def _print_plan(config: TrainConfig, world_size: int, gpu_memory: str | None) -> None:
    """The memory plan as a table, then one line: fits or not; exits 0 if it fits (or no GPU memory was given)."""
    from rich.table import Table

    from model.training.memory_plan import GiB, parse_memory, plan_memory, planned_seq_len

    try:
        memory = parse_memory(gpu_memory) if gpu_memory is not None else None
    except ValueError as err:
        raise fail(f"--gpu-memory: {err}") from None
    plan = plan_memory(config, world_size, seq_len=planned_seq_len(config), gpu_memory=memory)
    title = (
        f"memory per rank: {plan.preset}, {plan.world_size} ranks ({plan.parallelism}, {plan.precision}), micro-batch "
        f"{plan.micro_batch_size} x {plan.seq_len}, {plan.accumulation} per step, checkpointing {plan.checkpointing}"
    )
    table = Table("part", "GiB", "what", title=title)
    for part, size, what in plan.rows():
        table.add_row(part, f"{size / GiB:.2f}", what)
    console.print(table)
    console.print(plan.verdict(), markup=False, highlight=False)
    raise typer.Exit(0 if plan.fits is not False else 1)


def train(
    config_file: Annotated[Path, typer.Argument(metavar="CONFIG", help="a TrainConfig YAML file")],
    nproc_per_node: Annotated[int, NPROC] = 1,
    nnodes: Annotated[int, NNODES] = 1,
    node_rank: Annotated[int, NODE_RANK] = 0,
    rdzv_endpoint: Annotated[str | None, RDZV] = None,
    plan: Annotated[bool, PLAN] = False,
    gpu_memory: Annotated[str | None, GPU_MEMORY] = None,
) -> None:
    """Pretrain on a stage written by `cham mix`; resumes from the latest checkpoint in out_dir."""
    _run("train", config_file, nproc_per_node, (nnodes, node_rank, rdzv_endpoint), plan, gpu_memory)


def sft(
    config_file: Annotated[Path, typer.Argument(metavar="CONFIG", help="an SFTConfig YAML file")],
    nproc_per_node: Annotated[int, NPROC] = 1,
    nnodes: Annotated[int, NNODES] = 1,
    node_rank: Annotated[int, NODE_RANK] = 0,
    rdzv_endpoint: Annotated[str | None, RDZV] = None,
    plan: Annotated[bool, PLAN] = False,
    gpu_memory: Annotated[str | None, GPU_MEMORY] = None,
) -> None:
    """Supervised fine-tuning from a pretrained checkpoint (init_from); prompts masked, dropout 0.05."""
    _run("sft", config_file, nproc_per_node, (nnodes, node_rank, rdzv_endpoint), plan, gpu_memory)

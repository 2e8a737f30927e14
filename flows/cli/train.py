"""`cham train CONFIG` and `cham sft CONFIG`: in this process, or under torchrun with --nproc-per-node N."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Annotated

import typer

from flows.cli.output import console, fail
from schemas import ConfigError, SFTConfig, TrainConfig, load_config

NPROC = typer.Option("--nproc-per-node", help="processes (ranks) on this machine; > 1 launches torchrun (DDP)")


def _run(kind: str, config_file: Path, nproc: int) -> None:
    try:
        config = load_config(SFTConfig if kind == "sft" else TrainConfig, config_file)
    except ConfigError as err:
        raise fail(str(err)) from None
    if nproc > 1:
        from flows.process_lifetime import tied_to_this_process
        from flows.train_launcher import launcher_command

        # The launcher, and through it every rank, ends with this process; it prints one line if a rank fails.
        raise typer.Exit(subprocess.call(tied_to_this_process(launcher_command(nproc, kind, config_file))))
    import torch

    from model.training.cpu_memory import keep_freed_memory
    from model.training.trainer import INPUT_ERRORS, Trainer

    if not torch.cuda.is_available():
        keep_freed_memory()  # this process only trains: no fresh page faults for each step's large temporaries
    try:
        trainer = Trainer(config, log=lambda line: console.print(line, markup=False, highlight=False))
        history = trainer.train()
    except INPUT_ERRORS as err:
        raise fail(str(err)) from None
    if history:
        last = history[-1]
        console.print(f"done: step {last.step}, loss {last.loss:.4f}; checkpoints in {trainer.ckpt_dir}")
    else:
        console.print(f"nothing to do: already at step {trainer.step}")


def train(
    config_file: Annotated[Path, typer.Argument(metavar="CONFIG", help="a TrainConfig YAML file")],
    nproc_per_node: Annotated[int, NPROC] = 1,
) -> None:
    """Pretrain on a stage written by `cham mix`; resumes from the latest checkpoint in out_dir."""
    _run("train", config_file, nproc_per_node)


def sft(
    config_file: Annotated[Path, typer.Argument(metavar="CONFIG", help="an SFTConfig YAML file")],
    nproc_per_node: Annotated[int, NPROC] = 1,
) -> None:
    """Supervised fine-tuning from a pretrained checkpoint (init_from); prompts masked, dropout 0.05."""
    _run("sft", config_file, nproc_per_node)

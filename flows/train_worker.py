"""The process `torchrun` starts for `cham train` / `cham sft`: load the config, train, print on rank 0 only."""

from __future__ import annotations

import os
import sys

import torch

from model.cpu_memory import keep_freed_memory
from model.trainer import INPUT_ERRORS, Trainer
from schemas import SFTConfig, TrainConfig, load_config


def main(argv: list[str] | None = None) -> None:
    """Usage: python -m flows.train_worker train|sft CONFIG.yaml"""
    kind, path = (argv or sys.argv[1:])[:2]
    rank = int(os.environ.get("RANK", 0))
    if not torch.cuda.is_available():
        keep_freed_memory()  # as `cham train` does in one process
    try:
        config = load_config(SFTConfig if kind == "sft" else TrainConfig, path)
        trainer = Trainer(config, log=lambda line: print(line, flush=True) if rank == 0 else None)
        trainer.train()
    except INPUT_ERRORS as err:  # one line per rank, not a traceback per rank
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()

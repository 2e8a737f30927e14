"""The process `torchrun` starts for `cham train` / `cham sft`: load the config, train, print on rank 0 only.

Under flows.train_launcher a rank dies with the launcher (SIGKILL when it ends) and reports a failure to it in a
file rather than on stderr, so that the launcher prints one line for all ranks. Under a plain torchrun each rank
prints its own `error:` line.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

from flows.process_lifetime import die_with_parent
from flows.train_launcher import LAUNCHER_PID_ENV, write_worker_error
from model.evaluation.benchmarks.during_training import attach_benchmarks
from model.training.cpu_memory import keep_freed_memory
from model.training.trainer import INPUT_ERRORS, Trainer
from schemas import SFTConfig, TrainConfig, load_config


def main(argv: list[str] | None = None) -> None:
    """Usage: python -m flows.train_worker train|sft CONFIG.yaml"""
    kind, path = (argv or sys.argv[1:])[:2]
    rank = int(os.environ.get("RANK", 0))
    # torchrun starts each rank in a session of its own: nothing sent to the launcher's group reaches it.
    die_with_parent(int(os.environ.get(LAUNCHER_PID_ENV, os.getppid())), signal.SIGKILL)
    if not torch.cuda.is_available():
        keep_freed_memory()  # as `cham train` does in one process
    try:
        config = load_config(SFTConfig if kind == "sft" else TrainConfig, path)
        trainer = attach_benchmarks(Trainer(config, log=lambda line: print(line, flush=True) if rank == 0 else None))
        trainer.train()
    except INPUT_ERRORS as err:  # one line, not a traceback per rank
        if not write_worker_error(rank, err, input_error=True):
            print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Exception as err:
        if not write_worker_error(rank, err, input_error=False):
            raise
        sys.exit(1)


if __name__ == "__main__":
    main()

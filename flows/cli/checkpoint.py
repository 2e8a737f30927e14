"""`cham checkpoint`: commands over training checkpoints (consolidate a sharded one into a single-file step folder)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from flows.cli.output import console, fail

app = typer.Typer(help="Work with training checkpoints.", no_args_is_help=True)


@app.command("consolidate")
def consolidate(
    checkpoint: Annotated[
        Path, typer.Argument(help="a sharded step folder, or a run's out_dir / checkpoints/ (its latest step)")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="the single-file step folder to write (default: beside it, -full)")
    ] = None,
) -> None:
    """Gather a sharded checkpoint (every rank's shards) into one step folder: model.pt, trainer.pt with the
    optimizer, the records and state.json. It loads, converts and resumes like a checkpoint saved whole. Generate,
    eval and convert read sharded folders as they are: this is for tools that want one file."""
    from model.training.checkpointing import CheckpointError, resolve_checkpoint
    from model.training.sharded_checkpoint import consolidate_checkpoint

    started = time.perf_counter()
    try:
        folder = resolve_checkpoint(checkpoint)
        with console.status(f"gathering the shards of {folder}"):
            written = consolidate_checkpoint(folder, out)
    except (CheckpointError, OSError) as err:
        raise fail(str(err)) from None
    size = sum(f.stat().st_size for f in written.iterdir() if f.is_file())
    console.print(
        f"consolidated {folder} into {written} ({size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s"
    )

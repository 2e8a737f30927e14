"""`cham convert`: a thin shell over model/convert.py (ours <-> Meta consolidated.NN.pth <-> Hugging Face)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Literal

import typer

from flows.cli_output import console, fail
from model.convert import ConversionError, convert_checkpoint


def convert(
    src: Annotated[Path, typer.Argument(help="folder to read the weights from")],
    out: Annotated[Path, typer.Argument(help="folder to write the converted weights into")],
    from_format: Annotated[
        Literal["meta", "hf", "ours"], typer.Option("--from", help="source format: meta, hf or ours")
    ] = "meta",
    to_format: Annotated[
        Literal["ours", "meta", "hf"], typer.Option("--to", help="target format: ours, meta or hf")
    ] = "ours",
    model_parallel: Annotated[int, typer.Option(help="model-parallel shards to write (--to meta only)")] = 1,
) -> None:
    """Convert transformer weights between our format (model.pt + model_config.json), Meta's and HF's."""
    if not src.is_dir():
        raise fail(f"{src} is not a folder")
    started = time.perf_counter()
    try:
        with console.status(f"converting {src} ({from_format}) to {out} ({to_format})"):
            config = convert_checkpoint(src, out, from_format, to_format, model_parallel=model_parallel)
    except (ConversionError, ValueError, OSError) as err:
        raise fail(str(err)) from None
    console.print(
        f"converted in {time.perf_counter() - started:.1f} s: dim {config.dim}, {config.n_layers} layers, "
        f"vocab {config.vocab_size}, written to {out} as {to_format}"
    )

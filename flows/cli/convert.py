"""`cham convert`: a thin shell over model/lm/convert.py (ours <-> Meta consolidated.NN.pth <-> Hugging Face)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Literal

import typer

from flows.cli.output import console, fail

Format = Literal["ours", "meta", "hf"]


def convert(
    src: Annotated[Path, typer.Argument(help="folder to read the weights from")],
    out: Annotated[Path, typer.Argument(help="folder to write the converted weights into")],
    to_format: Annotated[Format, typer.Option("--to", help="target format: ours, meta or hf")],
    from_format: Annotated[
        Format | None,
        typer.Option("--from", help="source format: ours, meta or hf (default: found from the folder's files)"),
    ] = None,
    model_parallel: Annotated[int, typer.Option(help="model-parallel shards to write (--to meta only)")] = 1,
    text_tokenizer: Annotated[
        Path | None, typer.Option(help="--to hf: the text tokenizer (default: the one SRC's tokenizers.json names)")
    ] = None,
    image_tokenizer: Annotated[
        Path | None, typer.Option(help="--to hf: the VQ image tokenizer (default: the one SRC's tokenizers.json names)")
    ] = None,
) -> None:
    """Convert transformer weights between our format (model.pt + model_config.json), Meta's and HF's; --to hf
    writes a whole Hugging Face Chameleon (weights, VQ, tokenizer and processor files)."""
    from model.lm.convert import ConversionError, convert_checkpoint, detect_format  # torch: only when converting

    if not src.is_dir():
        raise fail(f"{src} is not a folder")
    started = time.perf_counter()
    try:
        from_format = from_format or detect_format(src)
        with console.status(f"converting {src} ({from_format}) to {out} ({to_format})"):
            config = convert_checkpoint(
                src,
                out,
                from_format,
                to_format,
                model_parallel=model_parallel,
                text_tokenizer=text_tokenizer,
                image_tokenizer=image_tokenizer,
            )
    except (ConversionError, ValueError, OSError) as err:
        raise fail(str(err)) from None
    console.print(
        f"converted {from_format} in {time.perf_counter() - started:.1f} s: dim {config.dim}, {config.n_layers} "
        f"layers, vocab {config.vocab_size}, written to {out} as {to_format}"
    )

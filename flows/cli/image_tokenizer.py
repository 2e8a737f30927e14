"""`cham image-tokenizer train|encode|decode`: thin shells over model/tokenizers/vq_training.py and
model/tokenizers/image_tokenizer.py."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from flows.cli.output import console, err_console, fail, output_file, output_folder
from schemas.vq_config import VQ_PRESETS, VQConfig

if TYPE_CHECKING:
    from model.tokenizers.image_tokenizer import ImageTokenizer

app = typer.Typer(help="Train and use the VQ image tokenizer.", no_args_is_help=True)


@app.command()
def train(
    images: Annotated[list[str], typer.Option("--images", "-i", help="image folders, files, globs or WebDataset tars")],
    out: Annotated[Path, typer.Option(help="folder for vqgan.ckpt, vqgan.yaml, metrics and the resume state")],
    preset: Annotated[str, typer.Option(help=f"model size: {', '.join(VQ_PRESETS)}")] = "tiny",
    steps: Annotated[int, typer.Option(min=1, help="optimizer steps")] = 600,
    batch_size: Annotated[int, typer.Option(min=1, help="images per step")] = 16,
    lr: Annotated[float, typer.Option(help="Adam learning rate")] = 1e-3,
    perceptual_model: Annotated[
        Path | None, typer.Option(help="a feature network for a perceptual loss (.pt2 from torch.export)")
    ] = None,
    resume: Annotated[bool, typer.Option(help="continue from OUT/train_state.pt when it exists")] = True,
    seed: int = 0,
) -> None:
    """Train a VQ tokenizer; resumable; saved in Meta's format (vqgan.ckpt + vqgan.yaml)."""
    if preset not in VQ_PRESETS:
        raise fail(f"unknown preset {preset!r}; allowed: {', '.join(VQ_PRESETS)}")
    from model.tokenizers.vq_training import VQTrainer, VQTrainSettings, find_images, load_perceptual_model

    try:
        found = find_images(images)
        output_folder(out)
        settings = VQTrainSettings(steps=steps, batch_size=batch_size, lr=lr, seed=seed)
        perceptual = load_perceptual_model(perceptual_model) if perceptual_model else None
        trainer = VQTrainer(VQConfig.from_preset(preset), found, out, settings, perceptual)
    except (FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from None
    for skipped in trainer.skipped:
        err_console.print(f"[yellow]skipped[/yellow] {escape(skipped)}")
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[metrics]}"),
    ]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"VQ {preset}", total=steps, metrics="")

        def report(m: dict[str, float]) -> None:
            text = f"loss {m['loss']:.4f}  PSNR {m['psnr']:.2f} dB  codebook {m['codebook_usage']:.0%}"
            progress.update(task, completed=int(m["step"]), metrics=text)

        try:
            result = trainer.run(resume=resume, progress=report)
        except ValueError as err:
            raise fail(str(err)) from None
        progress.update(task, completed=steps)
    console.print(
        f"held-out PSNR {result.initial_psnr:.2f} -> {result.final_psnr:.2f} dB "
        f"(MSE {result.initial_mse:.4f} -> {result.final_mse:.4f}), codebook used {result.codebook_usage:.0%}, "
        f"{result.n_train} train / {result.n_holdout} held-out images, {result.seconds:.0f} s; saved to {out}"
    )


def _load(tokenizer: Path) -> ImageTokenizer:
    from model.tokenizers.image_tokenizer import ImageTokenizer
    from model.tokenizers.vq_checkpoint import VQCheckpointError

    try:
        return ImageTokenizer.load(tokenizer)
    except (FileNotFoundError, VQCheckpointError) as err:
        raise fail(str(err)) from None


@app.command()
def encode(
    tokenizer: Annotated[Path, typer.Option(help="a folder with vqgan.ckpt + vqgan.yaml, or a HF checkpoint")],
    images: Annotated[list[Path], typer.Argument(help="image files")],
    mode: Annotated[Literal["crop", "pad"], typer.Option(help="crop (pretraining) or pad (SFT)")] = "crop",
    out: Annotated[Path | None, typer.Option(help="write the codes as one .npy [n, codes] instead of printing")] = None,
) -> None:
    """Print (or save) the VQ codes of images, one line per image."""
    import numpy as np

    from model.tokenizers.image_preprocess import ImageError

    tok = _load(tokenizer)
    if out is not None:
        out = output_file(out if out.suffix == ".npy" else out.with_name(out.name + ".npy"))  # np.save's name
    pixels = []
    for path in images:
        try:
            pixels.append(tok.pixels(path, mode))
        except ImageError as err:
            raise fail(f"{path}: {err}") from None
    codes = tok.encode_pixels(pixels)
    if out is not None:
        np.save(out, codes)
        console.print(f"{len(codes)} images x {codes.shape[1]} codes -> {out}")
        return
    for path, row in zip(images, codes, strict=True):
        print(f"{path}\t{' '.join(map(str, row.tolist()))}")


@app.command()
def decode(
    tokenizer: Annotated[Path, typer.Option(help="a folder with vqgan.ckpt + vqgan.yaml (needs the decoder)")],
    codes: Annotated[Path, typer.Argument(help="a .npy of codes [n, grid*grid] (from encode --out)")],
    out: Annotated[Path, typer.Option(help="folder to write image-NNNN.png into")],
) -> None:
    """Decode VQ codes into PNG images."""
    from PIL import Image

    from model.files.reading import read_npy

    tok = _load(tokenizer)
    try:
        array = read_npy(codes.read_bytes(), str(codes))
    except OSError as err:
        raise fail(f"{codes}: cannot read its codes ({err.strerror or err})") from None
    except ValueError as err:
        raise fail(f"{err} (codes come from `cham image-tokenizer encode --out`)") from None
    if array.ndim != 2 or not len(array) or array.shape[1] != tok.tokens_per_image:
        raise fail(f"{codes}: codes of shape {array.shape}; expected [n >= 1, {tok.tokens_per_image}]")
    output_folder(out)
    try:
        images = tok.decode(array)
    except (ValueError, RuntimeError) as err:
        raise fail(str(err)) from None
    for n, image in enumerate(images):
        Image.fromarray(image).save(out / f"image-{n:04d}.png")
    console.print(f"{len(images)} images written to {out}")

"""The `cham` command line: thin shells over the jobs in pipelines/, model/ and flows/."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.markup import escape
from rich.table import Table

from flows.cli_convert import convert
from flows.cli_generate import generate
from flows.cli_image_tokenizer import app as image_tokenizer_app
from flows.cli_mix import mix
from flows.cli_output import console, fail
from flows.cli_prepare import prepare
from flows.cli_text_tokenizer import app as text_tokenizer_app
from flows.cli_train import sft, train
from pipelines.mix_report import ROW_FIELDS, report_rows
from schemas import CONFIG_KINDS, ConfigError, load_config

app = typer.Typer(
    help="chameleon-pipeline: data, training and generation for early-fusion mixed-modal models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Check and show config files.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(text_tokenizer_app, name="text-tokenizer")
app.add_typer(image_tokenizer_app, name="image-tokenizer")
app.command("prepare")(prepare)
app.command("mix")(mix)
app.command("train")(train)
app.command("sft")(sft)
app.command("convert")(convert)
app.command("generate")(generate)


@app.command("sample-data")
def sample_data(
    out: Annotated[Path, typer.Argument(help="folder to write the corpus into")],
    force: Annotated[bool, typer.Option("--force", help="overwrite sample data already there")] = False,
) -> None:
    """Write the bundled sample corpus in the formats the prepare job reads."""
    from pipelines.sample_corpus import write_sample_data

    try:
        manifest = write_sample_data(out, overwrite=force)
    except FileExistsError as err:
        raise fail(str(err)) from None
    table = Table("kind", "records", "files", title=f"sample data in {out}")
    for kind in ("text", "image_text", "interleaved", "sft"):
        files = manifest[kind]["files"]
        table.add_row(kind, str(manifest[kind]["records"]), f"{len(files)} ({', '.join(files[:3])}, ...)")
    console.print(table)


@config_app.command("check")
def config_check(
    kind: Annotated[str, typer.Argument(help=f"one of: {', '.join(CONFIG_KINDS)}")],
    file: Annotated[Path, typer.Argument(help="the YAML file")],
    show: Annotated[bool, typer.Option("--show", help="print the config with every default filled in")] = False,
) -> None:
    """Validate a config file; on error, name the file, each bad field and what is allowed."""
    if kind not in CONFIG_KINDS:
        raise fail(f"unknown config kind {kind!r}; allowed: {', '.join(CONFIG_KINDS)}", code=2)
    try:
        config = load_config(CONFIG_KINDS[kind], file)
    except ConfigError as err:
        raise fail(str(err)) from None
    if show:
        console.print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), markup=False)
    console.print(f"{file}: valid {kind} config (fingerprint {config.fingerprint()})")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="folder for everything the demo writes")] = Path("data/demo"),
    vq_steps: Annotated[int, typer.Option(help="training steps of the tiny VQ image tokenizer")] = 200,
) -> None:
    """Run the main job on the bundled sample corpus and report what it did."""
    from flows.demo import run_demo

    report = run_demo(out, vq_steps=vq_steps, log=lambda line: console.print(escape(line)))
    table = Table("source", "records in", "samples", "tokens", "images", "faces", "rejects",
                  title=f"cham demo: the sample corpus prepared into {out / 'prepared'}")  # fmt: skip
    for name, t in report["prepared"].items():
        table.add_row(name, *(f"{t[k]:,}" for k in ("records_in", "samples", "tokens", "images", "faces", "rejects")))
    console.print(table)
    for stage, manifest in report["mixed"].items():
        mix_table = Table(*ROW_FIELDS, title=f"{stage}: {manifest['sequences']} sequences of {manifest['seq_len']}")
        for row in report_rows(manifest):
            mix_table.add_row(*row)
        console.print(mix_table)
    vq = report["vq_tokenizer"]
    console.print(
        f"text tokenizer: {report['text_tokenizer']['vocab_size']} ids; VQ tokenizer: held-out PSNR "
        f"{vq['heldout_psnr_before']} -> {vq['heldout_psnr_after']} dB, codebook used {vq['codebook_usage']:.0%}; "
        f"{report['seconds']} s; report: {out / 'demo-report.json'}"
    )

"""The `cham` command line: thin shells over the jobs in pipelines/, model/ and flows/.

Every command imports what it needs (torch, Beam, Prefect, and the modules of model/, pipelines/ and flows/
that import them) when it runs: `cham --help` and a config error answer in well under a second."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.markup import escape
from rich.table import Table

from flows.cli.checkpoint import app as checkpoint_app
from flows.cli.convert import convert
from flows.cli.eval import app as eval_app
from flows.cli.generate import generate
from flows.cli.image_tokenizer import app as image_tokenizer_app
from flows.cli.mix import mix
from flows.cli.mixture import app as mixture_app
from flows.cli.output import console, fail
from flows.cli.prepare import prepare
from flows.cli.serve import serve
from flows.cli.text_tokenizer import app as text_tokenizer_app
from flows.cli.train import sft, train
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
app.add_typer(eval_app, name="eval")
app.add_typer(checkpoint_app, name="checkpoint")
app.add_typer(mixture_app, name="mixture")
app.command("prepare")(prepare)
app.command("mix")(mix)
app.command("train")(train)
app.command("sft")(sft)
app.command("convert")(convert)
app.command("serve")(serve)
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
    vq_steps: Annotated[int, typer.Option(help="training steps of the tiny VQ image tokenizer")] = 150,
    train_steps: Annotated[int, typer.Option(help="pretraining steps on stage 1 (stage 2 gets half)")] = 30,
    sft_steps: Annotated[int, typer.Option(help="fine-tuning steps")] = 12,
) -> None:
    """Run the end-to-end flow on the sample corpus (Prefect, no server needed) and write an HTML report."""
    from flows.end_to_end import end_to_end, prefect_console_logging
    from pipelines.mix_report import ROW_FIELDS, report_rows

    prefect_console_logging()

    result = end_to_end(out_dir=str(out), vq_steps=vq_steps, train_steps=train_steps, sft_steps=sft_steps)
    table = Table(
        "source",
        "records in",
        "samples out",
        "rejects",
        "tokens",
        "images",
        "faces",
        title=f"cham demo: the sample corpus prepared into {out / 'prepared'}",
    )
    for row in result["prepared"]:
        table.add_row(
            row["source"],
            *(f"{row[k]:,}" for k in ("records in", "samples out", "rejects", "tokens", "images", "faces")),
        )
    console.print(table)
    for manifest_file in sorted(Path(result["mixed_dir"]).glob("*/manifest.json")):
        manifest = json.loads(manifest_file.read_text())
        mix_table = Table(
            *ROW_FIELDS, title=f"{manifest['stage']}: {manifest['sequences']} sequences of {manifest['seq_len']}"
        )
        for row in report_rows(manifest):
            mix_table.add_row(*row)
        console.print(mix_table)
    runs = Table("run", "steps", "final loss", "text CE", "image CE", title="training")
    for row in result["training"]:
        runs.add_row(row["run"], str(row["steps"]), *(f"{row[k]:.4f}" for k in ("final loss", "text CE", "image CE")))
    console.print(runs)
    for g in result["generations"]:
        console.print(f"{g['mode']}: {escape(g['text'][:120])!r} + {len(g['images'])} image(s)", highlight=False)
    console.print(f"held-out loss {result['evaluation'][0]['loss']}; {result['seconds']} s; report: {result['report']}")

"""`cham mix SPEC --out DIR`: a thin shell over pipelines/mix_job.py; prints the mixture table, writes a PNG."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flows.cli.output import console, fail, output_folder
from schemas import ConfigError, MixtureSpec, load_config
from schemas.prepare_config import RunnerConfig


def mix(
    spec_file: Annotated[Path, typer.Argument(metavar="SPEC", help="a MixtureSpec YAML file")],
    out: Annotated[
        str, typer.Option(help="folder for the stage shards (one sub-folder per stage): a path or an s3:// etc. URL")
    ],
    runner: Annotated[str, typer.Option(help="Beam runner: embedded, local or dask")] = "embedded",
    workers: Annotated[int | None, typer.Option(help="local runner: worker processes")] = None,
) -> None:
    """Mix prepared sources into stage shards of packed sequences with exact, reproducible shares."""
    from model.files.storage import is_url, join, upload
    from pipelines.mix_job import run_mix
    from pipelines.mix_plan import MixPlanError
    from pipelines.mix_report import (
        FILTER_FIELDS,
        MODALITY_FIELDS,
        ROW_FIELDS,
        filter_rows,
        modality_rows,
        plot_shares,
        report_rows,
    )

    try:
        spec = load_config(MixtureSpec, spec_file)
        if not is_url(out):
            output_folder(Path(out))
        # A damaged input sample fails the job with our MixPlanError, printed below in one line; Beam would log it
        # first with its traceback.
        logging.getLogger("apache_beam.runners.common").setLevel(logging.CRITICAL)
        with console.status("planning and writing the stage shards"):
            result = run_mix(spec, out, RunnerConfig(kind=runner, workers=workers))  # type: ignore[arg-type]
    except (ConfigError, MixPlanError, ValueError, OSError) as err:
        raise fail(str(err)) from None
    for stage, manifest in result["manifests"].items():
        table = Table(
            *ROW_FIELDS,
            title=(
                f"{stage}: {manifest['sequences']:,} sequences of {manifest['seq_len']}, {manifest['tokens']:,} tokens "
                f"({manifest['modality']['image_share']:.1%} image, {manifest['padding']:,} padding)"
            ),
        )
        for row in report_rows(manifest):
            table.add_row(*row)
        console.print(table)
        if filter_rows(manifest):  # curation: what each source's filters removed
            filters = Table(*FILTER_FIELDS, title=f"{stage}: filters")
            for row in filter_rows(manifest):
                filters.add_row(*row)
            console.print(filters)
    proportion = Table(*MODALITY_FIELDS, title="text : image tokens by stage")
    for row in modality_rows(result["manifests"]):
        proportion.add_row(*row)
    console.print(proportion)
    if is_url(out):  # the plot is drawn in a temporary folder, then put beside the stages
        with tempfile.TemporaryDirectory(prefix="cham-mix-report-") as folder:
            upload(plot_shares(result["manifests"], Path(folder) / "report.png"), join(out, "report.png"))
        plot = join(out, "report.png")
    else:
        plot = plot_shares(result["manifests"], Path(out) / "report.png")
    console.print(f"fingerprint {result['fingerprint']}; {result['seconds']} s; plot: {plot}")

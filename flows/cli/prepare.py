"""`cham prepare CONFIG`: a thin shell over pipelines/prepare_job.py with a live progress bar and a summary."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flows.cli.output import console, fail, output_folder
from schemas import ConfigError, PrepareConfig, load_config
from schemas.prepare_config import RunnerConfig


def prepare(
    config_file: Annotated[Path, typer.Argument(metavar="CONFIG", help="a PrepareConfig YAML file")],
    runner: Annotated[str | None, typer.Option(help="override the config's runner: embedded, local, dask")] = None,
    workers: Annotated[int | None, typer.Option(help="local runner: worker processes")] = None,
    address: Annotated[str | None, typer.Option(help="dask runner: scheduler address")] = None,
) -> None:
    """Tokenize raw sources into WebDataset shards (Apache Beam); complete shards are skipped on re-runs."""
    try:
        config = load_config(PrepareConfig, config_file)
        if runner or workers or address:
            base = config.runner.model_dump()
            changes = {k: v for k, v in {"kind": runner, "workers": workers, "address": address}.items() if v}
            config = config.model_copy(update={"runner": RunnerConfig.model_validate(base | changes)})
    except (ConfigError, ValueError) as err:
        raise fail(str(err)) from None
    from model.files.storage import is_url, local_mirror

    if not is_url(config.output_dir):
        output_folder(Path(config.output_dir), f"{config_file}: output_dir")
    from model.tokenizers.text_tokenizer import TokenizerError
    from model.tokenizers.vq_checkpoint import VQCheckpointError
    from pipelines.prepare_job import PrepareError, run_prepare

    columns = [
        TextColumn("prepare ({task.fields[runner]})"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("shards"),
        TimeElapsedColumn(),
    ]
    from pipelines.job_logs import job_log_file

    logs = local_mirror(config.output_dir, "prepare-logs") / "_logs"  # on this machine, also for an output on a store
    log_path = logs / f"prepare-{time.strftime('%Y%m%d-%H%M%S')}.log"
    with job_log_file(log_path), Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("prepare", total=None, runner=config.runner.kind)
        try:
            result = run_prepare(
                config, progress=lambda done, total: progress.update(task, completed=done, total=total)
            )
        except (PrepareError, TokenizerError, VQCheckpointError, FileNotFoundError) as err:
            raise fail(f"{err} (the job's log: {log_path})") from None
    table = Table(
        "source",
        "records in",
        "samples",
        "rejects",
        "tokens",
        "images",
        "faces",
        "shards (new/skipped)",
        title=f"prepared into {config.output_dir} in {result['seconds']} s",
    )
    reasons = []
    for name, manifest in result["manifests"].items():
        t = manifest["totals"]
        shards = f"{result['shards_written'][name]}/{result['shards_skipped'][name]}"
        table.add_row(
            name, *(f"{t[k]:,}" for k in ("records_in", "samples", "rejects", "tokens", "images", "faces")), shards
        )
        reasons += [f"{name}: {reason} x{n}" for reason, n in t["rejects_by_reason"].items()]
    console.print(table)
    if reasons:
        console.print("rejects by reason: " + "; ".join(reasons))
    console.print(f"the job's log (Beam's and its workers' lines): {log_path}")

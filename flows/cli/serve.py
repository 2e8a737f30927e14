"""`cham serve`: serve every deployment from this process (no work pool needed) against a Prefect server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli.output import console, fail
from schemas import ConfigError


def serve(
    prepare_config: Annotated[Path | None, typer.Option(help="PrepareConfig: the nightly build")] = None,
    train_config: Annotated[Path | None, typer.Option(help="TrainConfig: the train form's default")] = None,
    sft_config: Annotated[Path | None, typer.Option(help="SFTConfig: the sft form's default")] = None,
    build_cron: Annotated[str, typer.Option(help="cron of the dataset build ('' for none)")] = "0 3 * * *",
    timezone: Annotated[str, typer.Option(help="time zone of the cron")] = "UTC",
    train_after_build: Annotated[bool, typer.Option(help="start training when a dataset build completes")] = False,
    limit: Annotated[int | None, typer.Option(help="most flow runs at once (1 on a single-GPU machine)")] = None,
    pause_on_shutdown: Annotated[bool, typer.Option(help="pause the schedules when this process stops")] = True,
) -> None:
    """Serve the flows as deployments: build-dataset on a cron, the others runnable from the UI."""
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise fail("no Prefect server: run `prefect server start --host 127.0.0.1` and set "
                   "PREFECT_API_URL=http://127.0.0.1:4200/api (schedules and triggers need a server)")  # fmt: skip
    from flows.deployments import ServeSettings, build_deployments

    try:
        settings = ServeSettings(prepare_config, train_config, sft_config, build_cron or None, timezone,
                                 train_after_build)  # fmt: skip
        deployments = build_deployments(settings)
    except (ConfigError, ValueError) as err:
        raise fail(str(err)) from None
    console.print(f"serving {len(deployments)} deployments against {PREFECT_API_URL.value()}")
    prefect_serve(*deployments, limit=limit, pause_on_shutdown=pause_on_shutdown)

"""`cham serve`: serve every deployment from this process (no work pool needed) against a Prefect server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli.output import console, fail
from schemas import ConfigError

START_SERVER = "run `prefect server start --host 127.0.0.1` and set PREFECT_API_URL=http://127.0.0.1:4200/api"


def server_unreachable(api_url: str, timeout: float = 5.0) -> str | None:
    """Why nothing answers HTTP at a Prefect API URL, or None when something does (any HTTP status counts: Prefect
    Cloud answers its health check only with a key, and Prefect itself says so better)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as err:
        return str(err.reason)
    except (OSError, ValueError) as err:  # a timeout while reading; a URL urllib cannot open
        return str(err)


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
    from prefect.settings import PREFECT_API_URL

    from flows.serve_settings import ServeSettings

    api_url = PREFECT_API_URL.value()
    if not api_url:
        raise fail(f"no Prefect server: {START_SERVER} (schedules and triggers need a server)")
    try:
        settings = ServeSettings(
            prepare_config, train_config, sft_config, build_cron or None, timezone, train_after_build
        )
    except ValueError as err:
        raise fail(str(err)) from None
    # Before the deployments are built (every flow imported: torch, Beam): a missing server is said in seconds.
    why = server_unreachable(api_url)
    if why:
        raise fail(f"no Prefect server answers at {api_url} ({why}): {START_SERVER}")
    from prefect import serve as prefect_serve

    from flows.deployments import build_deployments

    try:
        deployments = build_deployments(settings)
    except (ConfigError, ValueError) as err:
        raise fail(str(err)) from None
    console.print(f"serving {len(deployments)} deployments against {api_url}")
    prefect_serve(*deployments, limit=limit, pause_on_shutdown=pause_on_shutdown)

"""What `cham serve` was given, checked at its start: importing this module costs no flow, torch or Beam, so a bad
setting (and then a missing server) is reported before the deployments are built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


@dataclass
class ServeSettings:
    """What `cham serve` was given: default configs for the forms, the build's schedule, the trigger switch."""

    prepare_config: Path | None = None
    train_config: Path | None = None
    sft_config: Path | None = None
    build_cron: str | None = "0 3 * * *"
    timezone: str = "UTC"
    train_after_build: bool = False
    tags: tuple[str, ...] = ("chameleon",)

    def __post_init__(self) -> None:
        # Checked here, at `cham serve`'s start: Prefect takes any string and only fails when it schedules a run.
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {self.timezone!r}: give an IANA name such as 'UTC' or 'Europe/Paris'"
            ) from None
        if self.build_cron:
            from prefect.schedules import Cron

            Cron(self.build_cron, timezone=self.timezone)  # raises ValueError naming a bad cron string

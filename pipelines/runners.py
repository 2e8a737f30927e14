"""Beam pipeline options for each runner kind of PrepareConfig; the runner is always named explicitly.

Beam's implicit default (Prism) downloads a binary at run time, which fails offline, so we never rely on it.
"""

from __future__ import annotations

import os
from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions

from schemas.prepare_config import RunnerConfig


def pipeline_options(runner: RunnerConfig) -> PipelineOptions:
    """Beam options for `runner`: embedded (FnApiRunner), local (DirectRunner processes), dask, or any runner."""
    options: dict[str, Any] = {}
    if runner.kind == "embedded":
        options["runner"] = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"
    elif runner.kind == "local":
        options |= {
            "runner": "DirectRunner",
            "direct_running_mode": "multi_processing",
            "direct_num_workers": runner.workers or os.cpu_count() or 1,
        }
    elif runner.kind == "dask":
        options["runner"] = "apache_beam.runners.dask.dask_runner.DaskRunner"
        if runner.address:
            options["dask_client_address"] = runner.address
    options |= runner.options  # "beam": options.runner names it (checked by the config)
    return PipelineOptions.from_dictionary({k: v for k, v in options.items() if v is not None})

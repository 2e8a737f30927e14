"""The `cham` command line: one module per command group, each importing torch, Beam or Prefect only when it runs."""

from flows.cli.app import app

__all__ = ["app"]

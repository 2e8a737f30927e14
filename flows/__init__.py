"""Prefect flows and deployments, and the `cham` command line."""

import logging


class _HideBeamImportNoise(logging.Filter):
    # Beam warns about an optional Google Cloud client when it is imported; it means nothing to our users.
    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


logging.getLogger().addFilter(_HideBeamImportNoise())

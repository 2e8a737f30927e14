"""Prefect flows and deployments, and the `cham` command line."""

import logging

# Beam warns, on the root logger, about an optional Google Cloud client when imported and about a memory probe
# RunInference cannot use here; neither means anything to our users.
_BEAM_NOISE = ("apitools not found", "memory usage cannot be fetched")


class _HideBeamNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in _BEAM_NOISE)


logging.getLogger().addFilter(_HideBeamNoise())

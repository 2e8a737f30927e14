"""Where a data job's log lines go: everything to a log file, only our own warnings and errors to the terminal.

Beam's worker processes (the local runner's SDK harnesses) log at INFO to the stderr they inherit, and forward their
log records to the launching process, which logs them again; pyvips logs every resize. A 200-file prepare printed 576
INFO lines that buried the progress bar. During a job, file descriptor 2 points at the log file (so the workers, and
C libraries, write there), the root logger writes INFO and up there too, and a handler on the terminal's original
stderr shows WARNING and up from our packages (pipelines, model, flows, schemas).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

OUR_PACKAGES = ("pipelines", "model", "flows", "schemas")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _OursOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] in OUR_PACKAGES


@contextlib.contextmanager
def job_log_file(path: str | Path) -> Iterator[Path]:
    """Route the process's log lines (and its children's stderr) to `path` (appended) while the block runs; our own
    warnings still reach the terminal. Yields the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    sys.stderr.flush()
    with open(path, "a", encoding="utf-8") as log_file:
        saved_fd = os.dup(2)
        terminal = os.fdopen(os.dup(saved_fd), "w", buffering=1, encoding="utf-8", errors="replace")
        to_file = logging.StreamHandler(log_file)
        to_file.setFormatter(logging.Formatter(FORMAT))
        to_terminal = logging.StreamHandler(terminal)
        to_terminal.setLevel(logging.WARNING)
        to_terminal.addFilter(_OursOnly())
        to_terminal.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        # Handlers already on the root logger (Beam adds one to stderr) would print to the terminal: they now write
        # to fd 2, the file, like everything else.
        level = root.level
        os.dup2(log_file.fileno(), 2)
        root.addHandler(to_file)
        root.addHandler(to_terminal)
        root.setLevel(logging.INFO)
        try:
            yield path
        finally:
            sys.stderr.flush()
            root.removeHandler(to_file)
            root.removeHandler(to_terminal)
            root.setLevel(level)
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            terminal.close()

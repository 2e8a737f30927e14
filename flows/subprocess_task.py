"""Run a job as a subprocess from a Prefect task: stream its output to the run's logger, poll while it runs."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from flows.process_lifetime import tied_to_this_process


class CommandError(RuntimeError):
    """A job exited with a non-zero status; the message names the command and ends with its last lines."""


def cham(*args: str) -> list[str]:
    """The command line of `cham ARGS` run by this interpreter (same venv, no PATH lookup)."""
    return [sys.executable, "-m", "flows", *args]


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow or task; a plain logger outside one (e.g. in a CLI)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("flows")


# A Python exception's last line or our CLI's `error: ...`, possibly behind torchrun's `[rank0]:` prefix.
_ERROR_LINE = re.compile(r"^(\[(default)?rank\d+\]:\s*)?(error: |([A-Za-z_][\w.]*)?(Error|Exception): )")


def _display(command: list[str]) -> str:
    if command[:3] == [sys.executable, "-m", "flows.process_lifetime"]:
        command = command[5:]  # PARENT_PID -- COMMAND...
    if command[:3] == [sys.executable, "-m", "flows"]:
        command = ["cham", *command[3:]]
    elif command[:1] == [sys.executable]:
        command = ["python", *command[1:]]
    return " ".join(command)


def run_command(
    command: list[str],
    cwd: Path | None = None,
    poll: Callable[[], None] | None = None,
    poll_every: float = 1.0,
    tail_lines: int = 40,
) -> list[str]:
    """Run `command`, log each output line as it comes, call `poll()` every `poll_every` s; return the last lines.

    Raises CommandError on a non-zero exit. The job ends with this process: when it is interrupted or cancelled
    (the job is terminated), and when it is killed (the job gets SIGTERM from the kernel: see
    flows/process_lifetime.py).
    """
    logger = run_logger()
    logger.info("$ %s", _display(command))
    # Unbuffered, plain output: lines reach the logger as they are printed, without colour codes.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "160"}
    # Popen in this thread, which waits for the job: the death signal fires when the thread ends, not before.
    process = subprocess.Popen(
        tied_to_this_process(command),
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
    )
    tail: deque[str] = deque(maxlen=tail_lines)
    errors: list[str] = []  # the first error lines: under torchrun the last lines are its own summary, not the cause

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                logger.info(line)
                error = _ERROR_LINE.match(line)
                if error:
                    cause = line[error.end(1) :] if error.group(1) else line  # without `[rankN]:`: once for all ranks
                    if len(errors) < 3 and cause not in errors:
                        errors.append(cause)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        while process.poll() is None:
            if poll:
                poll()
            time.sleep(poll_every if poll else 0.2)
        reader.join()
    finally:
        if process.poll() is None:  # interrupted or cancelled: do not leave the job running
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
    if process.returncode != 0:
        last = "\n".join(list(tail)[-12:])
        cause = "".join(f"\n  {e}" for e in errors if e not in last)
        raise CommandError(
            f"`{_display(command)}` exited with status {process.returncode}"
            f"{'; error:' + cause if cause else ''}; last lines:\n{last}"
        )
    return list(tail)

"""One writer per output folder (a trainer's run, a prepare or mix job's output): an exclusive lock on OUT_DIR/.lock
that the kernel drops when its holder dies.

A POSIX record lock (`lockf`) belongs to the process: a trainer killed by any signal (SIGKILL included) leaves
nothing to clean up, a file left by a dead holder blocks nobody, and the DataLoader workers the trainer forks do not
inherit it (an flock would stay held by them). The file also records the holder's pid and host, for the error a
second trainer gets at once. (A second lock in the same process does not conflict: one process, one trainer.)
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import IO

LOCK_FILE = ".lock"


class RunLockedError(RuntimeError):
    """Another live process writes into this folder."""


class RunLock:
    """`with RunLock(out_dir):` holds the folder's lock, or raises RunLockedError naming the holder's pid; `writer`
    `what` and `instead` word the error for the kind of job (a trainer's run by default)."""

    def __init__(
        self,
        out_dir: str | Path,
        writer: str = "trainer",
        what: str = "run",
        instead: str = "train into another out_dir",
    ):
        self.path = Path(out_dir) / LOCK_FILE
        self.writer, self.what, self.instead = writer, what, instead
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock now (never waits); raises RunLockedError when a live process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")  # noqa: SIM115 - held open for as long as the lock is
        try:
            fcntl.lockf(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES, as the system says it
            file.seek(0)
            holder = file.read(200).strip() or "another process"
            file.close()
            raise RunLockedError(
                f"{self.path.parent}: another {self.writer} writes this {self.what} ({holder}); stop it first, "
                f"or {self.instead}"
            ) from None
        except BaseException:
            file.close()
            raise
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        file.flush()
        self._file = file

    def release(self) -> None:
        """Drop the lock (closing the file drops it); the file stays, naming the last holder."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def check(self) -> None:
        """Raise RunLockedError at once if another process holds the lock; take nothing."""
        self.acquire()
        self.release()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

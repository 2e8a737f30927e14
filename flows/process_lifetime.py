"""Processes that die with their parent: a job, torchrun and its ranks never outlive what started them.

torchrun starts each rank in a session of its own, so a signal to the launcher's process group (a `kill -9` of the
group, Prefect's cancellation) never reaches the ranks; and a parent killed by SIGKILL cannot stop its children.
On Linux the kernel does it: prctl(PR_SET_PDEATHSIG) has a signal delivered to a process when the thread that
started it ends, whatever ended it, and the setting survives exec. A watchdog thread that polls the parent's pid
covers systems without prctl.

`python -m flows.process_lifetime PARENT_PID -- COMMAND...` sets the death signal (SIGTERM, so the command can stop
its own children) and execs COMMAND: `tied_to_this_process(command)` builds that line for `subprocess`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def set_parent_death_signal(sig: int) -> bool:
    """Have the kernel send `sig` to this process when its parent ends; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM, poll_s: float = 1.0) -> None:
    """Receive `sig` when `parent_pid` (this process's parent) ends, or at once if it already has; a daemon thread
    checks the parent every `poll_s` seconds as well (for systems without prctl)."""
    set_parent_death_signal(sig)
    if os.getppid() != parent_pid:  # it ended before the death signal was set: nobody would send it
        os.kill(os.getpid(), sig)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def tied_to_this_process(command: list[str]) -> list[str]:
    """`command` run so that it gets SIGTERM when this process (or the thread that starts it) ends."""
    return [sys.executable, "-m", "flows.process_lifetime", str(os.getpid()), "--", *command]


def main(argv: list[str]) -> None:
    """PARENT_PID -- COMMAND...: set the parent death signal, check the parent still lives, exec COMMAND."""
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: python -m flows.process_lifetime PARENT_PID -- COMMAND...")
    parent, command = int(argv[0]), argv[2:]
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:
        sys.exit(143)  # the parent is gone already: do not start the job
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])

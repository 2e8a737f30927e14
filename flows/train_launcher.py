"""`python -m flows.train_launcher N train|sft CONFIG`: torchrun (in this process) with N ranks of flows.train_worker.

What it adds to `torchrun --standalone`: the ranks die with this launcher (see flows/process_lifetime.py), and a
failure is one line on stderr, `error: ...`, from the rank that failed first (an input error before the errors it
caused on the other ranks), instead of each rank's line plus torchrun's traceback and failure table. Each rank writes
its error into a file of a folder this launcher names (WORKER_ERRORS_ENV); torchrun's own logging is kept quiet.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

WORKER_ERRORS_ENV = "CHAM_WORKER_ERRORS"  # the folder where each rank writes rank-N.json when it fails
LAUNCHER_PID_ENV = "CHAM_LAUNCHER_PID"  # the ranks' parent: they die with it


def write_worker_error(rank: int, err: BaseException, input_error: bool) -> bool:
    """Record a rank's failure for the launcher; False when no launcher asked for it (plain torchrun)."""
    folder = os.environ.get(WORKER_ERRORS_ENV)
    if not folder:
        return False
    record = {
        "rank": rank,
        "time": time.time(),
        "input_error": input_error,
        "message": str(err),
        "type": type(err).__name__,
        "traceback": "" if input_error else traceback.format_exc(),
    }
    from model.files.atomic import write_atomic

    write_atomic(Path(folder) / f"rank-{rank}.json", json.dumps(record))
    return True


def read_worker_errors(folder: Path) -> list[dict[str, Any]]:
    """The ranks' failure records, the cause first: input errors before others, each kind by time."""
    records = []
    for path in sorted(folder.glob("rank-*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # a rank killed while writing it: the other ranks' records, or torchrun's, say enough
    return sorted(records, key=lambda r: (not r.get("input_error"), r.get("time", 0.0)))


def launcher_command(nproc_per_node: int, kind: str, config_file: str | Path) -> list[str]:
    """The command line of this launcher, run by this interpreter."""
    return [sys.executable, "-m", "flows.train_launcher", str(nproc_per_node), kind, str(config_file)]


def torchrun_arguments(nproc_per_node: int, kind: str, config_file: str) -> list[str]:
    """torchrun's command line (without `torchrun`) for N ranks of flows.train_worker on this machine."""
    return [
        "--standalone",
        f"--nproc_per_node={nproc_per_node}",
        "--max_restarts=0",
        "-m",
        "flows.train_worker",
        kind,
        config_file,
    ]


def launch(nproc_per_node: int, kind: str, config_file: str) -> int:
    """Run the ranks; returns the exit status, having printed one `error:` line when they failed."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torchrun's banner, restarts and failure tables (see above); each of its modules' loggers has a level of its own.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="cham-ranks-") as folder:
        os.environ[WORKER_ERRORS_ENV] = folder
        os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
        try:
            run(get_args_parser().parse_args(torchrun_arguments(nproc_per_node, kind, config_file)))
            return 0
        except ChildFailedError as err:
            return _report(read_worker_errors(Path(folder)), err)
        except SignalException as err:  # SIGTERM or SIGINT: torchrun stopped the ranks first
            print(
                f"error: stopped by {signal.Signals(err.sigval).name}; the {nproc_per_node} ranks were stopped",
                file=sys.stderr,
                flush=True,
            )
            return 128 + int(err.sigval)
        except Exception as err:  # torchrun itself (rendezvous, a bad argument): its ranks are stopped already
            message = (str(err).splitlines() or [type(err).__name__])[0]
            print(f"error: torchrun: {type(err).__name__}: {message}", file=sys.stderr, flush=True)
            return 1


def _report(records: list[dict[str, Any]], err: Any) -> int:
    if records:
        cause = records[0]
        if cause.get("traceback"):  # not an input error but a bug: its traceback (one rank's) is worth reading
            print(cause["traceback"].rstrip(), file=sys.stderr, flush=True)
        else:
            print(f"error: {' '.join(cause['message'].split())}", file=sys.stderr, flush=True)
        return 1
    # No rank said why: killed by a signal, or it exited without a word. torchrun knows which and how.
    rank, failure = min(err.failures.items(), key=lambda item: item[1].timestamp)
    how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit status {failure.exitcode}"
    print(f"error: rank {rank} (pid {failure.pid}) ended with {how}", file=sys.stderr, flush=True)
    return 1


def main(argv: list[str]) -> None:
    """Usage: python -m flows.train_launcher N train|sft CONFIG.yaml"""
    from flows.process_lifetime import die_with_parent

    nproc, kind, config_file = argv[:3]
    die_with_parent(os.getppid())  # a watchdog besides the death signal flows.process_lifetime set
    sys.exit(launch(int(nproc), kind, config_file))


if __name__ == "__main__":
    main(sys.argv[1:])

"""`python -m flows.train_launcher N train|sft CONFIG [NODE OPTIONS]`: torchrun (in this process) with N ranks of
flows.train_worker.

For one machine it runs `torchrun --standalone`; for several (`--nnodes K --node-rank R --rdzv-endpoint HOST:PORT`,
the same on every node but the rank) a c10d rendezvous at node 0. What it adds to torchrun: the ranks die with this
launcher (see flows/process_lifetime.py), and a failure is one line on stderr, `error: ...`, from the rank that failed
first (an input error before the errors it caused on the other ranks), instead of each rank's line plus torchrun's
traceback and failure table. Each rank writes its error into a file of a folder this launcher names
(WORKER_ERRORS_ENV); torchrun's own logging is kept quiet.
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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Nodes:
    """The machines of one run: `nnodes` of them, this one `node_rank`, meeting at `rdzv_endpoint` (HOST:PORT on node
    0, which hosts torchrun's c10d rendezvous store). One node and no endpoint is `torchrun --standalone`."""

    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    rdzv_id: str = "cham"

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise ValueError(f"--nnodes must be at least 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(
                f"--node-rank {self.node_rank} is not one of the {self.nnodes} nodes (0 to {self.nnodes - 1})"
            )
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(
                f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT (node 0's address, the same on every node)"
            )
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"--rdzv-endpoint {self.rdzv_endpoint!r} is not HOST:PORT")

    @property
    def standalone(self) -> bool:
        return self.nnodes == 1 and self.rdzv_endpoint is None

    def options(self) -> list[str]:
        """This launcher's own options for these nodes (none for one standalone node)."""
        if self.standalone:
            return []
        return [
            f"--nnodes={self.nnodes}",
            f"--node-rank={self.node_rank}",
            f"--rdzv-endpoint={self.rdzv_endpoint}",
            f"--rdzv-id={self.rdzv_id}",
        ]


def launcher_command(nproc_per_node: int, kind: str, config_file: str | Path, nodes: Nodes | None = None) -> list[str]:
    """The command line of this launcher, run by this interpreter."""
    options = (nodes or Nodes()).options()
    return [sys.executable, "-m", "flows.train_launcher", str(nproc_per_node), kind, str(config_file), *options]


def torchrun_arguments(nproc_per_node: int, kind: str, config_file: str, nodes: Nodes | None = None) -> list[str]:
    """torchrun's command line (without `torchrun`) for N ranks of flows.train_worker on this machine: standalone
    for one node; for several, a c10d rendezvous at the endpoint, whose store node 0 hosts (is_host: a node never
    has to guess it from its host name, and two "nodes" on one machine work)."""
    nodes = nodes or Nodes()
    if nodes.standalone:
        where = ["--standalone"]
    else:
        where = [
            f"--nnodes={nodes.nnodes}",
            f"--node_rank={nodes.node_rank}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={nodes.rdzv_endpoint}",
            f"--rdzv_id={nodes.rdzv_id}",
            f"--rdzv_conf=is_host={'true' if nodes.node_rank == 0 else 'false'}",
        ]
    return [
        *where,
        f"--nproc_per_node={nproc_per_node}",
        "--max_restarts=0",
        "-m",
        "flows.train_worker",
        kind,
        config_file,
    ]


def launch(nproc_per_node: int, kind: str, config_file: str, nodes: Nodes | None = None) -> int:
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
            run(get_args_parser().parse_args(torchrun_arguments(nproc_per_node, kind, config_file, nodes)))
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
    """Usage: python -m flows.train_launcher N train|sft CONFIG.yaml [--nnodes K --node-rank R --rdzv-endpoint H:P
    --rdzv-id ID]"""
    import argparse

    from flows.process_lifetime import die_with_parent

    parser = argparse.ArgumentParser(prog="python -m flows.train_launcher")
    parser.add_argument("nproc", type=int)
    parser.add_argument("kind", choices=["train", "sft"])
    parser.add_argument("config_file")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--rdzv-endpoint", default=None)
    parser.add_argument("--rdzv-id", default="cham")
    args = parser.parse_args(argv)
    try:
        nodes = Nodes(args.nnodes, args.node_rank, args.rdzv_endpoint, args.rdzv_id)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    die_with_parent(os.getppid())  # a watchdog besides the death signal flows.process_lifetime set
    sys.exit(launch(args.nproc, args.kind, args.config_file, nodes))


if __name__ == "__main__":
    main(sys.argv[1:])

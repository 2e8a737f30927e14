"""Prepare of image-text pairs on 1 and 2 workers side by side: seconds, pairs/s and the ratio, best of N.

The pairs are bench_prepare's (the sample photos at long sides of 1024-2048 px, JPEG q90, img2dataset-style tars of
32) with the tiny tokenizers. Runners: `local` (Beam's DirectRunner, worker processes), and `dask`: a cluster of a
separate `dask scheduler` process and `dask worker --nworkers N --nthreads 1` on 127.0.0.1, as a user's cluster
would be, started fresh for each run and timed from job submission (its start-up is not the job's). Runs of 1 and 2
workers alternate so that load from elsewhere falls on both; the load average is printed before each run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench_prepare import make_pairs, time_pipeline, tokenizers  # bench/ is on sys.path when this file is run


@contextmanager
def dask_cluster(workers: int) -> Iterator[str]:
    """A `dask scheduler` and `dask worker` (N processes of one thread) on 127.0.0.1; yields the address."""
    from distributed import Client

    from flows.process_lifetime import tied_to_this_process

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    scheduler = ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port)]
    worker = ["distributed.cli.dask_worker", address, "--nworkers", str(workers), "--nthreads", "1"]
    processes = []
    try:
        for command in ([*scheduler, "--dashboard-address", ":0"], [*worker, "--no-dashboard"]):
            processes.append(
                subprocess.Popen(
                    tied_to_this_process([sys.executable, "-m", *command]),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            time.sleep(1)  # the worker needs the scheduler up
        with Client(address, timeout=60) as client:
            client.wait_for_workers(workers, timeout=120)
        yield address
    finally:
        for process in processes[::-1]:
            process.terminate()
            process.wait(timeout=30)


class OthersCpu(threading.Thread):
    """The CPU time that processes outside this one's tree use while a run goes (Linux /proc; 0 elsewhere): the share
    of the machine a measurement lost to others."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.seconds = 0.0
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @staticmethod
    def _busy_ticks() -> int:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values) - values[3] - values[4]  # all but idle and iowait

    def _tree_ticks(self) -> dict[int, int]:
        """CPU ticks (user + system) of this process and its descendants, by pid."""
        parents, ticks = {}, {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:  # ended meanwhile
                    continue
                parents[int(entry)], ticks[int(entry)] = int(fields[1]), int(fields[11]) + int(fields[12])
        mine, me = {}, os.getpid()
        for pid in ticks:
            p = pid
            while p > 1 and p != me:
                p = parents.get(p, 0)
            if p == me:
                mine[pid] = ticks[pid]
        return mine

    def run(self) -> None:
        if not os.path.exists("/proc/stat"):
            return
        busy, tree = self._busy_ticks(), self._tree_ticks()
        while not self.stop.wait(0.5):
            now_busy, now_tree = self._busy_ticks(), self._tree_ticks()
            ours = sum(max(0, t - tree.get(pid, 0)) for pid, t in now_tree.items())
            self.seconds += max(0, now_busy - busy - ours) / self.tick
            busy, tree = now_busy, now_tree


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def one_run(pairs: Path, toks: dict[str, Path], out: Path, kind: str, workers: int) -> tuple[float, float]:
    """Seconds for one prepare of the pairs on `workers` workers of `kind` (local or dask), and the share of the
    machine that other processes took meanwhile."""
    others = OthersCpu()
    others.start()
    try:
        if kind == "local":
            seconds = time_pipeline(pairs, toks, out, {"kind": "local", "workers": workers})
        else:
            with dask_cluster(workers) as address:
                seconds = time_pipeline(pairs, toks, out, {"kind": "dask", "address": address})
    finally:
        others.stop.set()
        others.join()
    share = others.seconds / seconds / (os.cpu_count() or 1)
    print(f"    {seconds:.1f} s; others used {others.seconds:.1f} core-s ({share:.0%} of the machine)", flush=True)
    return seconds, share


def wait_for_quiet(most_s: float, share: float = 0.1) -> None:
    """Wait (at most `most_s`) until other processes use under `share` of the machine for 3 s running."""
    deadline = time.monotonic() + most_s
    while time.monotonic() < deadline:
        others = OthersCpu()
        others.start()
        time.sleep(3)
        others.stop.set()
        others.join()
        if others.seconds / 3 / (os.cpu_count() or 1) < share:
            return
        time.sleep(5)


def shard_digest(out: Path) -> str:
    """One hash of every shard's bytes, to check that all runs wrote the same shards."""
    digest = hashlib.sha256()
    for path in sorted(out.rglob("shard-*.tar")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def scaling(
    pairs: Path, toks: dict[str, Path], base: Path, kind: str, repeats: int, digests: set[str], wait_s: float
) -> dict[int, list[tuple[float, float]]]:
    """(seconds, others' share) of each run, by number of workers; 1 and 2 workers alternate, each after waiting
    up to `wait_s` for the machine to be quiet. Adds each run's shard digest."""
    times: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    for repeat in range(repeats):
        for workers in (1, 2):
            wait_for_quiet(wait_s)
            print(f"  {kind}, {workers} worker(s), run {repeat + 1}: {load()}", flush=True)
            out = base / f"{kind}-{workers}-{repeat}"
            times[workers].append(one_run(pairs, toks, out, kind, workers))
            digests.add(shard_digest(out))
            shutil.rmtree(out)
    return times


def report(kind: str, n: int, runs: dict[int, list[tuple[float, float]]]) -> dict[str, Any]:
    times = {w: [seconds for seconds, _ in r] for w, r in runs.items()}
    best = {w: min(t) for w, t in times.items()}
    for workers, each in runs.items():
        listed = ", ".join(f"{seconds:.1f} (others {share:.0%})" for seconds, share in each)
        print(f"{kind:5} {workers} worker(s): best {best[workers]:.1f} s ({n / best[workers]:.1f} pairs/s); {listed}")
    ratio = best[1] / best[2]
    print(f"scaling, {kind} 2 workers / 1: {ratio:.2f}x (best of {len(times[1])})")
    return {"best": best, "ratio": ratio, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--copies", type=int, default=60, help="copies of the 24 sample photos (60: 1,440 pairs)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each; the best counts")
    parser.add_argument("--runners", default="local,dask", help="comma-separated: local, dask")
    parser.add_argument("--quick", action="store_true", help="48 pairs, one run each (a smoke test)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--wait-quiet", type=float, default=0, help="seconds to wait for a quiet machine before a run")
    args = parser.parse_args()
    copies, repeats = (2, 1) if args.quick else (args.copies, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        n = len(make_pairs(base / "pairs", copies))
        toks = tokenizers(base / "tok")
        print(
            f"{n} image-text pairs in {-(-n // 32)} tars (32 a tar), tiny tokenizers; {os.cpu_count()} cores; {load()}"
        )
        results, digests = {}, set()
        for kind in args.runners.split(","):
            times = scaling(base / "pairs", toks, base, kind, repeats, digests, args.wait_quiet)
            results[kind] = report(kind, n, times)
        assert len(digests) == 1, "the runs wrote different shards"
        print("every run wrote the same shards, byte for byte")
        for kind, result in results.items():
            one, two = result["best"][1], result["best"][2]
            print(f"{kind}: 1 worker {one:.1f} s, 2 workers {two:.1f} s, {result['ratio']:.2f}x")
        if args.json:
            args.json.write_text(json.dumps({"pairs": n, "runners": results}, indent=1))


if __name__ == "__main__":
    main()

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


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def one_run(pairs: Path, toks: dict[str, Path], out: Path, kind: str, workers: int) -> float:
    """Seconds for one prepare of the pairs on `workers` workers of `kind` (local or dask)."""
    if kind == "local":
        return time_pipeline(pairs, toks, out, {"kind": "local", "workers": workers})
    with dask_cluster(workers) as address:
        return time_pipeline(pairs, toks, out, {"kind": "dask", "address": address})


def shard_digest(out: Path) -> str:
    """One hash of every shard's bytes, to check that all runs wrote the same shards."""
    digest = hashlib.sha256()
    for path in sorted(out.rglob("shard-*.tar")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def scaling(
    pairs: Path, toks: dict[str, Path], base: Path, kind: str, repeats: int, digests: set[str]
) -> dict[int, list[float]]:
    """Seconds of each run, by number of workers; 1 and 2 workers alternate. Adds each run's shard digest."""
    times: dict[int, list[float]] = {1: [], 2: []}
    for repeat in range(repeats):
        for workers in (1, 2):
            print(f"  {kind}, {workers} worker(s), run {repeat + 1}: {load()}", flush=True)
            out = base / f"{kind}-{workers}-{repeat}"
            times[workers].append(one_run(pairs, toks, out, kind, workers))
            digests.add(shard_digest(out))
            shutil.rmtree(out)
    return times


def report(kind: str, n: int, times: dict[int, list[float]]) -> dict[str, Any]:
    best = {w: min(t) for w, t in times.items()}
    for workers, seconds in times.items():
        runs = ", ".join(f"{s:.1f}" for s in seconds)
        print(
            f"{kind:5} {workers} worker(s): best {best[workers]:.1f} s ({n / best[workers]:.1f} pairs/s); runs {runs}"
        )
    ratio = best[1] / best[2]
    print(f"scaling, {kind} 2 workers / 1: {ratio:.2f}x (best of {len(times[1])})")
    return {"best": best, "ratio": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--copies", type=int, default=60, help="copies of the 24 sample photos (60: 1,440 pairs)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each; the best counts")
    parser.add_argument("--runners", default="local,dask", help="comma-separated: local, dask")
    parser.add_argument("--quick", action="store_true", help="48 pairs, one run each (a smoke test)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
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
            times = scaling(base / "pairs", toks, base, kind, repeats, digests)
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

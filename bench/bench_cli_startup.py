"""How long `cham` takes to answer: `--help`, a sub-command's `--help`, a missing config file and `cham serve` with
no server, against `python -c pass` (the interpreter's own start) and `prefect --help` (a CLI that imports Prefect),
all in one run on the same machine.

Each command runs in a fresh subprocess (`python -m flows ARGS`, which is `cham ARGS` without the console script,
so any checkout can be timed: `--repo` points at one, e.g. a `git worktree` of an older commit). The figure is the
median wall time of `--runs` runs; the ratio is to `python -c pass`. One more run under `-X importtime` names the
heavy libraries (torch, Apache Beam, Prefect, transformers) each command imported. The results also go, as JSON, to
`--json` and to $OUT/bench_cli_startup.json when $OUT is set.

    .venv/bin/python bench/bench_cli_startup.py [--runs 5] [--every-help] [--before PATH] [--quick] [--json PATH]

`--before PATH` times a second checkout in the same rounds (each run of a command alternates between the two), for a
before/after comparison that sees the same load: `git worktree add /tmp/before COMMIT`, then
`--before /tmp/before`, then `git worktree remove /tmp/before`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "apache_beam", "prefect", "transformers")
BASELINE = "python -c pass"
LIST_COMMANDS = """
import json, typer
from flows.cli import app

def walk(group, prefix):
    for name, command in sorted(group.commands.items()):
        yield [*prefix, name]
        if hasattr(command, "commands"):
            yield from walk(command, [*prefix, name])

print(json.dumps(list(walk(typer.main.get_command(app), []))))
"""


def closed_port() -> int:
    """A port of 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def commands(every_help: bool, repo: Path, env: dict[str, str]) -> dict[str, list[str]]:
    """Name -> the arguments after `python`; `cham X` runs as `python -m flows X`."""
    cham = ["-m", "flows"]
    found = {
        BASELINE: ["-c", "pass"],
        "prefect --help": ["-m", "prefect", "--help"],
        "cham --help": [*cham, "--help"],
        "cham prepare --help": [*cham, "prepare", "--help"],
        "cham train missing.yaml": [*cham, "train", "missing.yaml"],
        "cham serve (no server)": [*cham, "serve"],
    }
    if every_help:
        for words in every_command(repo, env):
            found[f"cham {' '.join(words)} --help"] = [*cham, *words, "--help"]
    return found


def every_command(repo: Path, env: dict[str, str]) -> list[list[str]]:
    """Every command and sub-command of `cham`, as the words that name it (read from the timed checkout's app)."""
    done = subprocess.run(
        [sys.executable, "-c", LIST_COMMANDS],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(done.stdout)


def run_once(args: list[str], repo: Path, env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    return time.perf_counter() - started, done


def heavy_imports(args: list[str], repo: Path, env: dict[str, str]) -> list[str]:
    """The heavy libraries a command imports, from one run under `-X importtime` (top-level packages only)."""
    _, done = run_once(["-X", "importtime", *args], repo, env)
    names = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return [name for name in HEAVY if name in names]


def measure(argv: list[str], repo: Path, env: dict[str, str], times: list[float]) -> dict:
    """One checkout's figures for a command, from its run times; the last run's exit and last line of output."""
    seconds, done = run_once(argv, repo, env)
    times.append(seconds)
    last_line = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or [""]
    return {"exit": done.returncode, "last_line": last_line[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs per command; the median is reported")
    parser.add_argument("--quick", action="store_true", help="one run per command (a smoke test)")
    parser.add_argument("--every-help", action="store_true", help="also time `--help` of every (sub-)command")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout to time (default: this one)")
    parser.add_argument("--before", type=Path, default=None, help="another checkout, timed in the same rounds")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args()
    runs = 1 if args.quick else args.runs
    api_url = f"http://127.0.0.1:{closed_port()}/api"
    checkouts = {"this": args.repo.resolve(), **({"before": args.before.resolve()} if args.before else {})}
    envs = {
        label: {**os.environ, "PYTHONPATH": str(repo), "PREFECT_API_URL": api_url, "COLUMNS": "100"}
        for label, repo in checkouts.items()
    }
    print(
        f"{os.cpu_count()} cores, median of {runs} run(s); PREFECT_API_URL={api_url} (closed); "
        + ", ".join(f"{label}: {repo}" for label, repo in checkouts.items())
    )
    header = f"{'command':<44}" + "".join(f" {label + ' s':>9} {'x pass':>7}" for label in checkouts)
    print(header + ("  before/this" if args.before else "") + "  exit  heavy imports")
    rows, base = [], {}
    for name, argv in commands(args.every_help, checkouts["this"], envs["this"]).items():
        times: dict[str, list[float]] = {label: [] for label in checkouts}
        last: dict[str, dict] = {}
        for _ in range(runs):  # the checkouts take turns, so both see the same load on a shared machine
            for label, repo in checkouts.items():
                last[label] = measure(argv, repo, envs[label], times[label])
        row: dict = {"command": name}
        for label, repo in checkouts.items():
            median = statistics.median(times[label])
            base.setdefault(label, median)
            heavy = heavy_imports(argv, repo, envs[label]) if name != BASELINE else []
            row[label] = {
                "median_s": round(median, 3),
                "times_s": [round(t, 3) for t in times[label]],
                "ratio": round(median / base[label], 1),
                "heavy": heavy,
                **last[label],
            }
        rows.append(row)
        line = f"{name:<44}" + "".join(f" {row[k]['median_s']:>9.2f} {row[k]['ratio']:>6.0f}x" for k in checkouts)
        if args.before:
            line += f"  {row['before']['median_s'] / row['this']['median_s']:>10.1f}x"
        heavy_text = " | ".join(", ".join(row[k]["heavy"]) or "-" for k in checkouts)
        print(f"{line}  {row['this']['exit']:>4}  {heavy_text}")
    for row in rows:
        if row["command"] in ("cham train missing.yaml", "cham serve (no server)"):
            for label in checkouts:
                print(f"{row['command']} ({label}): {row[label]['last_line'][:160]}")
    result = {
        "checkouts": {k: str(v) for k, v in checkouts.items()},
        "cores": os.cpu_count(),
        "runs": runs,
        "rows": rows,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    targets = [Path(args.json)] if args.json else []
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]) / "bench_cli_startup.json")
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

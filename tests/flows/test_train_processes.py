"""A training run's processes: killing the launcher ends every rank, one trainer per run folder (a lock a dead holder
does not keep), and a failure under torchrun is one line naming the file."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(scope="module")
def stage(make_stage) -> Path:
    return make_stage(12_000, sequences_per_shard=32)


def write_config(stage: Path, out: Path, steps: int, **extra) -> Path:
    data = {
        "model": {"preset": "tiny"},
        "data": str(stage),
        "out_dir": str(out),
        "seq_len": 128,
        "steps": steps,
        "global_batch_size": 8,
        "micro_batch_size": 2,
        "schedule": {"warmup_steps": 1},
        "checkpoint": {"every_steps": 2},
        "logging": {"every_steps": 1, "tensorboard": False},
        **extra,
    }
    path = out.with_name(out.name + ".yaml")
    path.write_text(yaml.safe_dump(data))
    return path


def processes_naming(marker: str) -> list[psutil.Process]:
    """Live processes (zombies aside) whose command line holds `marker`, e.g. a run's config file."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


def wait_for(check, what: str, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def kill_all(marker: str) -> None:
    for proc in processes_naming(marker):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def metric_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL to the launcher's process group", "SIGTERM to the launcher alone"])
def test_killing_the_launcher_ends_every_rank(stage: Path, tmp_path: Path, how: str) -> None:
    out = tmp_path / "run"
    config = write_config(stage, out, 100_000)
    log = (tmp_path / "train.log").open("w")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "flows", "train", str(config), "--nproc-per-node", "2"],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(lambda: metric_steps(out) >= 3, "the ranks to train (step 2 checkpointed)", 180)
        ranks = [p for p in processes_naming(str(config)) if "flows.train_worker" in p.info["cmdline"]]
        assert len(ranks) >= 2  # two ranks (and their DataLoader workers), each in a session of its own
        if how.startswith("SIGKILL"):
            os.killpg(launcher.pid, signal.SIGKILL)
        else:
            launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=30)
        # DataLoader workers notice their rank is gone within a few seconds (PyTorch's own watchdog).
        wait_for(lambda: not processes_naming(str(config)), "every process of the run to end", 60)
        steps = metric_steps(out)
        time.sleep(2)
        assert metric_steps(out) == steps  # nothing writes the run any more
        # The run lock went with its holder: a new trainer takes the run over at once.
        # (another `steps` than the killed run's: its schedule is planned again, as the config asks)
        result = runner.invoke(app, ["train", str(write_config(stage, out, steps + 1, replan_on_resume=True))])
        assert result.exit_code == 0, result.output
        assert "resumed from" in result.output and f"done: step {steps + 1}" in result.output
    finally:
        kill_all(str(config))
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        log.close()


def hold_run_lock(out: Path) -> subprocess.Popen:
    """A process holding the run lock of `out` (as a live trainer's rank 0 does) until it is killed."""
    code = (
        "import sys, time; from model.files.run_lock import RunLock; lock = RunLock(sys.argv[1]); "
        "lock.acquire(); print('held', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_one_trainer_per_run_folder(stage: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = write_config(stage, out, 2)
    holder = hold_run_lock(out)
    try:
        result = runner.invoke(app, ["train", str(config)])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 1 and len(lines) == 1, result.output
        assert lines[0].startswith(f"error: {out}: another trainer writes this run (pid {holder.pid} on ")
        assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()  # refused before writing
        # A lock whose holder was killed (SIGKILL: no clean-up ran) blocks nobody.
        holder.kill()
        holder.wait()
        result = runner.invoke(app, ["train", str(config)])
        assert result.exit_code == 0 and "done: step 2" in result.output, result.output
    finally:
        holder.kill()
        holder.wait()


def cham_lines(*args: str) -> tuple[int, list[str]]:
    """Exit status and non-empty output lines (stdout and stderr, every process's) of `cham ARGS` in a subprocess."""
    done = subprocess.run(
        [sys.executable, "-m", "flows", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_COLOR": "1"},
    )
    return done.returncode, [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]


def test_a_damaged_latest_pointer_is_one_line_naming_it(stage: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    pointer = out / "checkpoints" / "latest"
    pointer.write_bytes(b"\x00\xff\xfe garbage")
    result = runner.invoke(app, ["train", str(write_config(stage, out, 2))])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {pointer}: not a checkpoint pointer (not UTF-8 text")


@pytest.mark.slow
def test_a_failure_under_torchrun_is_one_line(stage: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = write_config(stage, out, 2)
    (out / "checkpoints").mkdir(parents=True)
    pointer = out / "checkpoints" / "latest"
    pointer.write_bytes(b"\x00\xff\xfe garbage")  # every rank fails on it
    status, lines = cham_lines("train", str(config), "--nproc-per-node", "2")
    assert status == 1 and len(lines) == 1, "\n".join(lines)
    assert lines[0].startswith(f"error: {pointer}: not a checkpoint pointer (not UTF-8 text")
    pointer.unlink()
    holder = hold_run_lock(out)  # only rank 0 fails (it writes the run); rank 1 is stopped
    try:
        status, lines = cham_lines("train", str(config), "--nproc-per-node", "2")
    finally:
        holder.kill()
        holder.wait()
    assert status == 1 and len(lines) == 1, "\n".join(lines)
    assert lines[0].startswith(f"error: {out}: another trainer writes this run (pid {holder.pid} on ")
    assert not processes_naming(str(config))
    assert not (out / "metrics.jsonl").exists()


def test_worker_errors_name_the_cause_first(tmp_path: Path) -> None:
    from flows.train_launcher import read_worker_errors

    records = [
        {"rank": 1, "time": 1.0, "input_error": False, "message": "Connection closed by peer"},
        {"rank": 0, "time": 2.0, "input_error": True, "message": "config.yaml: bad"},
        {"rank": 2, "time": 0.5, "input_error": True, "message": "shard-00001.tar: damaged"},
    ]
    for r in records:
        (tmp_path / f"rank-{r['rank']}.json").write_text(json.dumps(r))
    (tmp_path / "rank-3.json").write_text('{"rank": 3, "ti')  # cut short: ignored
    assert [r["rank"] for r in read_worker_errors(tmp_path)] == [2, 0, 1]

"""A prepare job killed midway and run again: no duplicates, no half-written files, the same shards as a clean run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines.prepare_job import run_prepare
from schemas import PrepareConfig, load_config


@pytest.mark.slow
def test_kill_and_rerun(tmp_path: Path, sample_data, tiny_tokenizers) -> None:
    raw = sample_data[0]

    def write_config(out: Path) -> Path:
        config = {
            "output_dir": str(out),
            "image_size": 64,
            "samples_per_shard": 2,
            "tokenizers": {k: str(v) for k, v in tiny_tokenizers.items()},
            "sources": [{"name": "prose", "kind": "text", "format": "jsonl", "paths": [str(raw / "text/*.jsonl")]}],
        }
        path = out.parent / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    killed_cfg = write_config(tmp_path / "killed")
    process = subprocess.Popen(
        [sys.executable, "-c", "from flows.cli import app; app()", "prepare", str(killed_cfg)],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "killed" / "prose").glob("*.stats.json")):
        time.sleep(0.002)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(list((tmp_path / "killed" / "prose").glob("*.stats.json")))
    assert done_before >= 1  # it was killed after writing some shards ...

    result = run_prepare(load_config(PrepareConfig, killed_cfg))
    tasks = result["shards_written"]["prose"] + result["shards_skipped"]["prose"]
    assert result["shards_skipped"]["prose"] == done_before < tasks  # ... and before writing all of them
    clean = run_prepare(load_config(PrepareConfig, write_config(tmp_path / "clean")))
    assert result["manifests"]["prose"]["totals"] == clean["manifests"]["prose"]["totals"]
    assert result["manifests"]["prose"]["totals"]["samples"] == 130  # no duplicates, nothing lost

    def outputs(folder: Path) -> list[Path]:  # the job's files; `cham prepare` also keeps its log under _logs/
        return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and p.parts[-2] != "_logs")

    killed_files, clean_files = outputs(tmp_path / "killed"), outputs(tmp_path / "clean")
    assert killed_files == clean_files  # no temporary or half-written files left
    assert len(list((tmp_path / "killed" / "_logs").glob("prepare-*.log"))) == 1  # the killed command's log
    for rel in clean_files:
        if rel.name.endswith(".tar"):
            assert (tmp_path / "killed" / rel).read_bytes() == (tmp_path / "clean" / rel).read_bytes()

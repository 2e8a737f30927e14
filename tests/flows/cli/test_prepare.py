"""`cham prepare CONFIG` end to end on two sample sources."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def test_prepare_command(tmp_path: Path, sample_data, tiny_tokenizers) -> None:
    raw = sample_data[0]
    config = {
        "output_dir": str(tmp_path / "out"),
        "image_size": 64,
        "tokenizers": {k: str(v) for k, v in tiny_tokenizers.items()},
        "sources": [
            {"name": "code", "kind": "text", "format": "parquet", "paths": [str(raw / "text/*.parquet")]},
            {"name": "photos", "kind": "image_text", "format": "webdataset", "paths": [str(raw / "image_text")]},
        ],
    }
    path = tmp_path / "prepare.yaml"
    path.write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["prepare", str(path)])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "│ code │ 70 │ 70 │ 0 │" in output and "│ photos │ 24 │ 24 │ 0 │" in output
    assert json.loads((tmp_path / "out/photos/manifest.json").read_text())["totals"]["images"] == 24
    again = runner.invoke(app, ["prepare", str(path), "--runner", "embedded"])
    assert "│ 0/1 │" in " ".join(again.output.split())  # nothing new, one shard skipped

    path.write_text(yaml.safe_dump(config | {"image_size": 48}))
    result = runner.invoke(app, ["prepare", str(path)])
    assert result.exit_code == 1 and "image_size 48 does not match the VQ tokenizer's 64 px" in result.output
    path.write_text(yaml.safe_dump(config | {"runner": {"kind": "prism"}}))
    result = runner.invoke(app, ["prepare", str(path)])
    assert result.exit_code == 1 and "runner.kind: Input should be 'embedded', 'local', 'dask' or 'beam'" in (
        " ".join(result.output.split())
    )
    (tmp_path / "file").write_text("x")
    path.write_text(yaml.safe_dump(config | {"output_dir": str(tmp_path / "file")}))
    result = runner.invoke(app, ["prepare", str(path)])
    assert result.exit_code == 1 and "a file is in the way" in result.output and "Traceback" not in result.output


def test_a_local_runner_prepare_shows_progress_and_logs_the_rest_to_a_file(
    tmp_path: Path, sample_data, tiny_tokenizers
) -> None:
    """Beam's worker processes log at INFO to the stderr they inherit, and pyvips logs every resize: 576 lines on
    the terminal before. Now the terminal gets the progress bar, the table and the log's path; the file the rest."""
    import subprocess
    import sys

    raw = sample_data[0]
    config = {
        "output_dir": str(tmp_path / "out"),
        "image_size": 64,
        "tokenizers": {k: str(v) for k, v in tiny_tokenizers.items()},
        "runner": {"kind": "local", "workers": 2},
        "sources": [
            {"name": "photos", "kind": "image_text", "format": "webdataset", "paths": [str(raw / "image_text")]}
        ],
    }
    path = tmp_path / "prepare.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, "-m", "flows", "prepare", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[3],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    terminal = done.stdout + done.stderr
    assert "INFO" not in terminal and "sdk_worker" not in terminal, terminal
    assert len(terminal.splitlines()) < 40, terminal
    logs = list((tmp_path / "out" / "_logs").glob("prepare-*.log"))
    assert len(logs) == 1, logs
    assert f"the job's log (Beam's and its workers' lines): {logs[0]}" in " ".join(terminal.split()), terminal
    log = logs[0].read_text()
    assert "sdk_worker" in log and "Python sdk harness starting" in log  # the workers' lines went to the file
    assert "VIPS:" not in log  # pyvips' per-resize INFO lines are off

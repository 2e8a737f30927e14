"""`cham mix SPEC --out DIR` prints the mixture table and writes the plot."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def test_mix_command(tmp_path: Path, prepared_sources: Path) -> None:
    spec = {
        "seq_len": 256,
        "tokens_per_image": 64,
        "max_repetitions": 16,
        "stages": {
            "stage1": {
                "tokens": 20_000,
                "sources": [
                    {"name": "prose", "path": str(prepared_sources / "prose"), "weight": 2.9},
                    {"name": "photos", "path": str(prepared_sources / "photos"), "weight": 1.5},
                ],
            }
        },
    }
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["mix", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "stage1:" in text and "│ prose │ 2.9 │ 65.9% │" in text and "│ photos │ 1.5 │ 34.1% │" in text
    assert (tmp_path / "out" / "report.png").is_file() and (tmp_path / "out" / "stage1" / "manifest.json").is_file()

    spec["seq_len"] = 32
    path.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["mix", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "seq_len: 32 is too short for one image block" in " ".join(result.output.split())

    (tmp_path / "file").write_text("x")
    spec["seq_len"] = 256
    path.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["mix", str(path), "--out", str(tmp_path / "file")])
    assert result.exit_code == 1 and "--out " in result.output and "a file is in the way" in result.output

"""The `cham` command line, run in process: help, config check, sample-data (the demo: test_end_to_end_flow)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from flows.cli import app
from tests.conftest import EXAMPLES

runner = CliRunner()


def test_help_lists_only_working_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    group = typer.main.get_command(app)
    # Every listed command is one this file exercises below; later issues add theirs with their tests.
    assert set(group.commands) == {
        "demo",
        "sample-data",
        "config",
        "text-tokenizer",
        "image-tokenizer",
        "prepare",
        "mix",
        "train",
        "sft",
        "convert",
        "generate",
        "eval",
        "serve",
        "checkpoint",  # tests/flows/cli/test_checkpoint.py
        "mixture",  # tests/flows/test_mixture_search.py
    }
    assert set(group.commands["mixture"].commands) == {"search", "proxy"}
    assert set(group.commands["checkpoint"].commands) == {"consolidate"}
    assert set(group.commands["image-tokenizer"].commands) == {"train", "encode", "decode"}
    assert set(group.commands["config"].commands) == {"check"}
    assert set(group.commands["text-tokenizer"].commands) == {"train", "encode", "decode"}
    for name in group.commands:
        assert name in result.output


def test_config_check_good_and_bad(example_base: Path, monkeypatch) -> None:
    monkeypatch.chdir(example_base)
    result = runner.invoke(app, ["config", "check", "mixture", str(EXAMPLES / "mixture.yaml"), "--show"])
    assert result.exit_code == 0, result.output
    assert "valid mixture config (fingerprint" in result.output
    assert "face_weight: 2.0" in result.output

    bad = example_base / "bad.yaml"
    bad.write_text((EXAMPLES / "mixture.yaml").read_text().replace("seq_len: 4096", "seq_len: 512"))
    result = runner.invoke(app, ["config", "check", "mixture", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}: seq_len: 512 is too short for one image block" in " ".join(result.output.split())

    result = runner.invoke(app, ["config", "check", "dataset", str(bad)])
    assert result.exit_code == 2
    assert "unknown config kind 'dataset'; allowed: prepare, mixture, model, train, sft, generate" in result.output


def test_sample_data_command(tmp_path: Path) -> None:
    result = runner.invoke(app, ["sample-data", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["text"]["records"] == 200 and manifest["sft"]["records"] == 30
    result = runner.invoke(app, ["sample-data", str(tmp_path / "s")])
    assert result.exit_code == 1 and "--force" in result.output


def test_serve_refuses_a_bad_time_zone_or_cron_at_start() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # A server URL that nothing listens on: the settings must fail before anything contacts it.
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        result = runner.invoke(app, ["serve", "--timezone", "Mars/Olympus"])
        assert result.exit_code == 1
        assert "unknown time zone 'Mars/Olympus'" in result.output
        result = runner.invoke(app, ["serve", "--build-cron", "0 3 * * 9"])
        assert result.exit_code == 1 and "Invalid cron string" in result.output


def test_config_check_names_odd_files(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "deep.yaml").write_text("[" * 5000 + "]" * 5000)
    cases = {
        str(tmp_path): "a folder, not a config file",
        str(tmp_path / "empty.yaml"): "the file is empty",
        str(tmp_path / "deep.yaml"): "nested too deeply to be a config",
    }
    for path, message in cases.items():
        result = runner.invoke(app, ["config", "check", "mixture", path])
        assert result.exit_code == 1 and f"{path}: {message}" in " ".join(result.output.split()), result.output

"""`cham` answers without paying for torch, Apache Beam, Prefect or transformers: `--help` of every command, and a
config error, run in a fresh interpreter (`python -X importtime -m flows ...`) import none of them, nor the modules
of model/ and pipelines/ that do. Only `cham serve` imports Prefect, and it says there is no server before it imports
the flows (and with them torch and Beam)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO

HEAVY = {"torch", "apache_beam", "prefect", "transformers"}
OURS_HEAVY = {"model", "pipelines"}  # our packages whose modules import torch or Beam


def run_cham(*args: str, **env: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run `python -X importtime -m flows ARGS` in a fresh interpreter; the result and every module it imported."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "flows", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }
    assert imported, "no -X importtime output"
    return done, imported


def top_level(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def messages(done: subprocess.CompletedProcess[str]) -> str:
    """stderr without the -X importtime lines."""
    return "\n".join(line for line in done.stderr.splitlines() if not line.startswith("import time:"))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("args", [["--help"], ["prepare", "--help"], ["eval", "loss", "--help"]])
def test_help_imports_nothing_heavy(args: list[str]) -> None:
    done, imported = run_cham(*args)
    assert done.returncode == 0, messages(done)
    assert "Usage: cham" in done.stdout
    assert top_level(imported) & (HEAVY | OURS_HEAVY) == set()


def test_a_missing_config_file_is_reported_without_importing_anything_heavy() -> None:
    done, imported = run_cham("train", "no-such-config.yaml")
    assert done.returncode == 1
    assert messages(done).strip() == "error: no-such-config.yaml: file not found"
    assert top_level(imported) & (HEAVY | OURS_HEAVY) == set()


def test_every_help_imports_nothing_heavy() -> None:
    """Every command's and sub-command's `--help`, in one interpreter: what they imported, all together."""
    probe = """
import json, sys, typer
from flows.cli import app

def walk(group, prefix):
    for name, command in sorted(group.commands.items()):
        yield [*prefix, name]
        if hasattr(command, "commands"):
            yield from walk(command, [*prefix, name])

helped = []
for words in walk(typer.main.get_command(app), []):
    try:
        app([*words, "--help"], prog_name="cham")
    except SystemExit as exit:
        assert exit.code == 0, (words, exit.code)
    helped.append(" ".join(words))
print(json.dumps({"helped": helped, "modules": sorted(sys.modules)}), file=sys.stderr)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stderr.strip().splitlines()[-1])
    assert {"prepare", "serve", "eval loss", "image-tokenizer encode", "config check"} <= set(result["helped"])
    assert len(result["helped"]) >= 20
    assert top_level(set(result["modules"])) & (HEAVY | OURS_HEAVY) == set()


def test_serve_without_a_server_says_so_before_importing_the_flows() -> None:
    url = f"http://127.0.0.1:{closed_port()}/api"
    done, imported = run_cham("serve", PREFECT_API_URL=url)
    assert done.returncode == 1
    error = messages(done).strip()
    assert error.startswith(f"error: no Prefect server answers at {url} (")
    assert "prefect server start --host 127.0.0.1" in error and "Traceback" not in error
    assert "prefect" in top_level(imported)  # serve needs Prefect's settings; nothing that trains or mixes
    assert top_level(imported) & {"torch", "apache_beam", "transformers", *OURS_HEAVY} == set()
    assert "flows.deployments" not in imported

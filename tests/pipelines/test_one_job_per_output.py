"""Two jobs never write one output: while a live process holds an output's lock, a second `cham prepare` or `cham mix`
into it fails at once, naming the holder, and writes nothing; a holder killed with SIGKILL blocks nobody."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from flows.cli import app
from tests.flows.test_train_processes import hold_run_lock


def refused_then_run(args: list[str], out: Path, job: str) -> None:
    holder = hold_run_lock(out)
    try:
        refused = CliRunner().invoke(app, args)
        said = " ".join(refused.output.split())
        assert refused.exit_code == 1, refused.output
        assert f"{out}: another {job} writes this output (pid {holder.pid} on " in said, said
        written = sorted(p.name for p in out.iterdir() if p.name not in (".lock", "_logs"))  # the log says why
        assert written == [], written  # refused before writing anything
        holder.kill()  # SIGKILL: no clean-up ran
        holder.wait()
        done = CliRunner().invoke(app, args)
        assert done.exit_code == 0, done.output
    finally:
        holder.kill()
        holder.wait()


def test_one_prepare_job_per_output(sample_data, tiny_tokenizers, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    config = {
        "output_dir": str(out),
        "image_size": 64,
        "tokenizers": {k: str(v) for k, v in tiny_tokenizers.items()},
        "sources": [{"name": "prose", "kind": "text", "format": "jsonl", "paths": [str(sample_data[0] / "text")]}],
    }
    (tmp_path / "prepare.yaml").write_text(yaml.safe_dump(config))
    refused_then_run(["prepare", str(tmp_path / "prepare.yaml")], out, "prepare job")
    assert (out / "prose" / "manifest.json").is_file()


def test_one_mix_job_per_output(prepared_sources: Path, tmp_path: Path) -> None:
    out = tmp_path / "mixed"
    spec = {
        "seq_len": 128,
        "tokens_per_image": 64,
        "stages": {
            "stage1": {
                "tokens": 2_000,
                "sources": [{"name": "prose", "path": str(prepared_sources / "prose"), "weight": 1.0}],
            }
        },
    }
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(spec))
    refused_then_run(["mix", str(tmp_path / "mix.yaml"), "--out", str(out)], out, "mix job")
    assert (out / "stage1" / "manifest.json").is_file()

"""`cham train` in process and under torchrun (2 ranks, gloo), then `cham sft` from the pretrained checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def stages(train_and_sft_stages: Path) -> Path:
    return train_and_sft_stages


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def train_config(stages: Path, out: Path, steps: int) -> dict:
    return {
        "model": {"preset": "tiny"},
        "data": str(stages / "stage1"),
        "out_dir": str(out),
        "seq_len": 128,
        "steps": steps,
        "global_batch_size": 8,
        "micro_batch_size": 2,
        "optimizer": {"lr": 3e-3},
        "schedule": {"warmup_steps": 1},
        "checkpoint": {"every_steps": 2},
    }


def test_train_then_sft(stages: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "train.yaml", train_config(stages, tmp_path / "pretrain", 4))
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    assert "done: step 4" in result.output
    again = runner.invoke(app, ["train", str(path)])
    assert "resumed from" in again.output and "nothing to do: already at step 4" in again.output

    sft = {
        "model": {"preset": "tiny"},
        "data": str(stages / "sft"),
        "out_dir": str(tmp_path / "sft"),
        "seq_len": 128,
        "steps": 3,
        "global_batch_size": 4,
        "micro_batch_size": 2,
        "init_from": str(tmp_path / "pretrain/checkpoints/latest"),
    }
    result = runner.invoke(app, ["sft", str(write(tmp_path / "sft.yaml", sft))])
    assert result.exit_code == 0, result.output
    assert "initialised from" in result.output and "step-00000004" in result.output
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "sft/metrics.jsonl").read_text().splitlines()]
    assert lrs[0] == pytest.approx(1e-5)  # cosine from 1e-5


@pytest.mark.slow
def test_torchrun_two_ranks(stages: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "train.yaml", train_config(stages, tmp_path / "ddp", 4))
    result = runner.invoke(app, ["train", str(path), "--nproc-per-node", "2"])
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "ddp/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]  # rank 0 writes, once per step
    assert json.loads(lines[0])["tokens"] > 0
    weights = torch.load(tmp_path / "ddp/checkpoints/step-00000004/model.pt", weights_only=True)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_bad_config_is_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(write(tmp_path / "t.yaml", {"model": {"preset": "tiny"}}))])
    assert (
        result.exit_code == 1
        and "out_dir: Field required" in result.output
        and "steps: Field required" in (result.output)
    )


def test_bad_checkpoints_data_and_paths_are_one_line(stages: Path, tmp_path: Path, damage_stage) -> None:
    def one_error_line(config: dict, message: str) -> None:
        result = runner.invoke(app, ["train", str(write(tmp_path / "t.yaml", config))])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output

    config = train_config(stages, tmp_path / "run", 2)
    assert runner.invoke(app, ["train", str(write(tmp_path / "t.yaml", config))]).exit_code == 0
    state = tmp_path / "run" / "checkpoints" / "step-00000002" / "state.json"
    good = state.read_text()
    state.write_text("[]")
    one_error_line(config | {"steps": 4}, "state.json: not a checkpoint state (a JSON list, expected an object)")
    state.write_text(good)
    lost = tmp_path / "lost"
    (lost / "checkpoints").mkdir(parents=True)
    (lost / "checkpoints" / "latest").write_text("step-00000002\n")  # its checkpoints deleted: no silent restart
    one_error_line(train_config(stages, lost, 2), "names a checkpoint that is not there, and no other is complete")
    damaged = tmp_path / "damaged"
    damage_stage(stages / "stage1", damaged)  # read by the default DataLoader worker: one line all the same
    one_error_line(train_config(stages, tmp_path / "run2", 2) | {"data": str(damaged)}, "at byte")
    (tmp_path / "file").write_text("x")
    one_error_line(train_config(stages, tmp_path / "file" / "run", 2), "Not a directory")

    # The stage re-mixed since the checkpoint (another fingerprint): refused, unless allow_data_change.
    remixed = tmp_path / "remixed"
    remixed.mkdir()
    for f in (stages / "stage1").iterdir():
        (remixed / f.name).symlink_to(f)
    manifest = json.loads((stages / "stage1" / "manifest.json").read_text())
    (remixed / "manifest.json").unlink()
    (remixed / "manifest.json").write_text(json.dumps(manifest | {"fingerprint": "0123456789abcdef"}))
    one_error_line(
        config | {"data": str(remixed)},
        "re-mixed since. Point it at the stage the run trained on, or set allow_data_change: true",
    )
    moved = config | {"steps": 4, "data": str(remixed), "replan_on_resume": True}
    result = runner.invoke(app, ["train", str(write(tmp_path / "t.yaml", moved | {"allow_data_change": True}))])
    assert result.exit_code == 0, result.output
    assert (
        "resumed from" in result.output
        and "step-00000002 at step 2" in result.output
        and "done: step 4" in result.output
    )
    # Raising steps on resume: refused (the schedule would change under the run), unless asked to re-plan.
    one_error_line(config | {"steps": 6}, "is from a run of 4 steps, whose lr schedule ends at step 4")


def plan_config(tmp_path: Path, preset: str, **fields) -> Path:
    """A config to plan (never trained): its stage folder holds only a manifest naming the sequence length."""
    stage = tmp_path / "stage"
    stage.mkdir(exist_ok=True)
    (stage / "manifest.json").write_text(json.dumps({"seq_len": 4096}))
    data = {"model": {"preset": preset}, "data": str(stage), "out_dir": str(tmp_path / "out"), "steps": 100}
    data |= {"global_batch_size": 512, "schedule": {"warmup_steps": 10}, "parallelism": "fsdp"} | fields
    return write(tmp_path / "plan.yaml", data)


def test_plan_fits_or_not(tmp_path: Path) -> None:
    config = plan_config(tmp_path, "7b", activation_checkpointing={"mode": "full"})
    result = runner.invoke(app, ["train", str(config), "--plan", "--nproc-per-node", "8", "--gpu-memory", "80GB"])
    assert result.exit_code == 0, result.output
    assert "1 x 4096" in result.output and "optimizer state" in result.output and "checkpoint (host)" in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("7b (7.01B parameters) on 8 ranks, fsdp, bf16") and "fits in 72.0 GiB" in last
    assert not (tmp_path / "out").exists()  # planned, not trained

    big = plan_config(tmp_path, "34b")
    result = runner.invoke(app, ["train", str(big), "--plan", "--nproc-per-node", "8", "--gpu-memory", "80GB"])
    assert result.exit_code == 1 and "does not fit in 72.0 GiB" in result.output.strip().splitlines()[-1]
    # 4 nodes of 8, every block checkpointed: the states sharded 32 ways fit (no rendezvous endpoint to plan).
    big = plan_config(tmp_path, "34b", activation_checkpointing={"mode": "full"})
    args = ["train", str(big), "--plan", "--nproc-per-node", "8", "--nnodes", "4", "--gpu-memory", "80GB"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "on 32 ranks" in result.output, result.output
    result = runner.invoke(app, ["train", str(big), "--plan", "--gpu-memory", "lots"])
    assert result.exit_code == 1 and "--gpu-memory: not a memory size: 'lots'" in result.output


def test_plan_imports_no_torch(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    command = [sys.executable, "-X", "importtime", "-m", "flows", "train", str(plan_config(tmp_path, "7b")), "--plan"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "peak" in done.stdout, done.stderr[-2000:]
    imported = {
        line.rsplit("|", 1)[1].strip().split(".")[0] for line in done.stderr.splitlines() if line.count("|") == 2
    }
    assert "torch" not in imported and "schemas" in imported

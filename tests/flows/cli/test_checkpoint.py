"""`cham checkpoint consolidate`, and generate / convert reading a sharded checkpoint as it is."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from typer.testing import CliRunner

from flows.cli import app
from model.files import step_folder
from model.training.checkpointing import CheckpointError

runner = CliRunner()


def test_a_sharded_run_generates_converts_and_consolidates(train_and_sft_stages: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = {
        "model": {"preset": "tiny"},
        "data": str(train_and_sft_stages / "stage1"),
        "out_dir": str(run),
        "steps": 4,
        "global_batch_size": 4,
        "micro_batch_size": 2,
        "schedule": {"warmup_steps": 1},
        "checkpoint": {"every_steps": 2, "format": "sharded", "async_save": True},
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    trained = runner.invoke(app, ["train", str(tmp_path / "train.yaml")])
    assert trained.exit_code == 0, trained.output
    sharded = run / "checkpoints" / "step-00000004"
    assert step_folder.is_sharded(sharded) and not (sharded / step_folder.WEIGHTS).exists()

    args = ["--prompt", "The function", "--mode", "text", "--max-new-tokens", "12", "--seed", "3"]
    on_demand = runner.invoke(app, ["generate", "--checkpoint", str(run), "--out", str(tmp_path / "g1"), *args])
    assert on_demand.exit_code == 0, on_demand.output
    first = json.loads((tmp_path / "g1" / "generation.json").read_text())
    assert first["step"] == 4

    done = runner.invoke(app, ["checkpoint", "consolidate", str(run)])
    assert done.exit_code == 0, done.output
    full = run / "checkpoints" / "step-00000004-full"
    assert f"consolidated {sharded} into {full}" in " ".join(done.output.split())
    weights = torch.load(full / step_folder.WEIGHTS, weights_only=True)
    assert all(torch.equal(weights[k], v) for k, v in step_folder.read_weights(sharded, CheckpointError).items())
    assert "optimizer" in torch.load(full / step_folder.TRAINER, weights_only=True)
    # The consolidated folder sits beside the run's checkpoints without being taken for one of them.
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    again = runner.invoke(app, ["generate", "--checkpoint", str(full), "--out", str(tmp_path / "g2"), *args])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "g2" / "generation.json").read_text())["segments"] == first["segments"]

    converted = runner.invoke(app, ["convert", str(sharded), str(tmp_path / "meta"), "--to", "meta"])
    assert converted.exit_code == 0, converted.output
    meta = torch.load(tmp_path / "meta" / "consolidated.pth", weights_only=True)
    assert torch.equal(meta["tok_embeddings.weight"], weights["tok_embeddings.weight"])

    refused = runner.invoke(app, ["checkpoint", "consolidate", str(full), "--out", str(tmp_path / "x")])
    assert refused.exit_code == 1 and "not a sharded checkpoint" in refused.output

"""Checkpoints on an object store (a real S3 API: moto's server on 127.0.0.1), full and sharded: written with
state.json last (a store has no rename), `latest` and keep-last as on disk, a killed save passed over, and a resume
from the store as exact as from a local folder."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest
import torch

from model.files import step_folder
from model.training.checkpointing import CheckpointError, latest_checkpoint, list_checkpoints
from model.training.trainer import Trainer
from schemas import TrainConfig, validate_config


@pytest.fixture(scope="module")
def stage(make_stage) -> Path:
    return make_stage(12_000)


def config(stage: Path, out: Path, checkpoints: str | Path, fmt: str) -> TrainConfig:
    fields = {
        "model": {"preset": "tiny"},
        "data": str(stage),
        "out_dir": str(out),
        "steps": 6,
        "global_batch_size": 4,
        "micro_batch_size": 2,
        "schedule": {"warmup_steps": 1},
        "checkpoint": {"every_steps": 2, "keep_last": 2, "format": fmt, "dir": str(checkpoints)},
    }
    return validate_config(TrainConfig, fields)


def weights(folder) -> dict[str, torch.Tensor]:
    from model.lm.transformer import Transformer
    from model.training.checkpointing import load_checkpoint
    from schemas.model_config import ModelConfig

    model = Transformer(ModelConfig.from_preset("tiny"))
    load_checkpoint(folder, model, restore_rng=False)
    return model.state_dict()


@pytest.mark.parametrize("fmt", ["full", "sharded"])
def test_a_run_checkpoints_to_the_store_and_resumes_from_it_exactly(
    stage: Path, s3_bucket: str, tmp_path: Path, fmt: str
) -> None:
    quiet = {"log": lambda _: None}
    Trainer(config(stage, tmp_path / "local", tmp_path / "local" / "checkpoints", fmt), **quiet).train()
    root = f"{s3_bucket}/run/checkpoints"
    Trainer(config(stage, tmp_path / "store", root, fmt), **quiet).train(stop_at=5)  # step 5 is lost
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    assert [str(p).rsplit("/", 1)[-1] for p in list_checkpoints(root)] == ["step-00000002", "step-00000004"]
    assert fs.cat_file(f"{root}/latest") == b"step-00000004\n"
    # A save killed midway on a store leaves a step folder without state.json: it is passed over.
    fs.pipe_file(f"{root}/step-00000006/trainer.pt", b"partial")
    assert str(latest_checkpoint(root)).endswith("step-00000004")
    resumed = Trainer(config(stage, tmp_path / "store", root, fmt), **quiet)
    assert resumed.step == 4
    resumed.train()
    assert [str(p).rsplit("/", 1)[-1] for p in list_checkpoints(root)] == ["step-00000004", "step-00000006"]
    final = f"{root}/step-00000006"
    assert step_folder.is_sharded(final) == (fmt == "sharded")
    expected = weights(tmp_path / "local" / "checkpoints" / "step-00000006")
    got = weights(final)
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_a_missing_checkpoint_on_the_store_is_named(s3_bucket: str) -> None:
    from model.lm.transformer import Transformer
    from model.training.checkpointing import load_checkpoint
    from schemas.model_config import ModelConfig

    with pytest.raises(CheckpointError, match=f"{s3_bucket}/nothing: "):
        load_checkpoint(f"{s3_bucket}/nothing", Transformer(ModelConfig.from_preset("tiny")))


def test_generate_reads_a_checkpoint_on_the_store(tiny_run: Path, s3_bucket: str, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from flows.cli import app

    url = f"{s3_bucket}/tiny"
    fsspec.filesystem("s3", skip_instance_cache=True).put(
        str(tiny_run / "checkpoints"), f"{url}/checkpoints", recursive=True
    )
    args = ["--prompt", "The function", "--mode", "text", "--max-new-tokens", "12", "--seed", "3"]
    runs = {}
    for name, where in [("local", str(tiny_run)), ("store", url)]:
        done = CliRunner().invoke(app, ["generate", "--checkpoint", where, "--out", str(tmp_path / name), *args])
        assert done.exit_code == 0, done.output
        runs[name] = json.loads((tmp_path / name / "generation.json").read_text())
    assert runs["store"]["segments"] == runs["local"]["segments"] and runs["store"]["step"] == 30


def test_a_run_into_the_store_keeps_its_metrics_there_and_resumes_on_another_machine(
    stage: Path, s3_bucket: str, tmp_path: Path, monkeypatch
) -> None:
    out = f"{s3_bucket}/runs/pretrain"
    fields = {
        "model": {"preset": "tiny"},
        "data": str(stage),
        "out_dir": out,
        "steps": 6,
        "global_batch_size": 4,
        "micro_batch_size": 2,
        "schedule": {"warmup_steps": 1},
        "checkpoint": {"every_steps": 2},
        "logging": {"every_steps": 1},
    }
    cfg = validate_config(TrainConfig, fields)
    monkeypatch.setenv("CHAM_CACHE_DIR", str(tmp_path / "machine-a"))
    Trainer(cfg, log=lambda _: None).train(stop_at=3)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    steps = [json.loads(line)["step"] for line in fs.cat_file(f"{out}/metrics.jsonl").decode().splitlines()]
    assert steps == [1, 2, 3]  # uploaded with the step-2 checkpoint, and when the run stopped
    # Another machine (an empty cache) resumes from the store at step 2: metrics.jsonl comes back, step 3 is redone,
    # and each step is recorded once.
    monkeypatch.setenv("CHAM_CACHE_DIR", str(tmp_path / "machine-b"))
    resumed = Trainer(cfg, log=lambda _: None)
    assert resumed.step == 2
    resumed.train()
    records = [json.loads(line) for line in fs.cat_file(f"{out}/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert fs.exists(f"{out}/checkpoints/step-00000006/state.json") and fs.ls(f"{out}/tensorboard")
    assert not fs.exists(f"{out}/.lock")  # the lock is the machine's own
    local = validate_config(TrainConfig, fields | {"out_dir": str(tmp_path / "local")})
    expected = [m.loss for m in Trainer(local, log=lambda _: None).train()]
    assert [r["loss"] for r in records] == expected

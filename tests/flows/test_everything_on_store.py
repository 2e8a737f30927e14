"""The whole road with every path on an object store (a real S3 API: moto's server on 127.0.0.1): `cham prepare`
reads raw files from the bucket and writes there, `cham mix` reads those and writes the stage there, and the trainer
reads the stage and writes its run and checkpoints there, killed after step 3 and resumed on another machine (an
empty cache) to the losses of a run that never stopped."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import yaml
from typer.testing import CliRunner

from flows.cli import app
from model.training.trainer import Trainer
from schemas import TrainConfig, validate_config


def test_prepare_mix_train_and_resume_with_every_path_on_s3(
    sample_data, tiny_tokenizers, s3_bucket: str, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("CHAM_CACHE_DIR", str(tmp_path / "machine-a"))
    raw = sample_data[0]
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.put(str(raw / "text"), f"{s3_bucket}/raw/text", recursive=True)
    fs.put(str(raw / "image_text"), f"{s3_bucket}/raw/image_text", recursive=True)
    prepare = {
        "output_dir": f"{s3_bucket}/prepared",
        "image_size": 64,
        "tokenizers": {k: str(v) for k, v in tiny_tokenizers.items()},
        "sources": [
            {"name": "prose", "kind": "text", "format": "jsonl", "paths": [f"{s3_bucket}/raw/text/*.jsonl"]},
            {"name": "photos", "kind": "image_text", "format": "webdataset", "paths": [f"{s3_bucket}/raw/image_text"]},
        ],
    }
    (tmp_path / "prepare.yaml").write_text(yaml.safe_dump(prepare))
    done = CliRunner().invoke(app, ["prepare", str(tmp_path / "prepare.yaml")])
    assert done.exit_code == 0, done.output
    sources = [{"name": name, "path": f"{s3_bucket}/prepared/{name}", "weight": 1.0} for name in ("prose", "photos")]
    spec = {
        "seq_len": 128,
        "tokens_per_image": 64,
        "seed": 1,
        "stages": {"stage1": {"tokens": 8_000, "sources": sources}},
    }
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(spec))
    done = CliRunner().invoke(app, ["mix", str(tmp_path / "mix.yaml"), "--out", f"{s3_bucket}/mixed"])
    assert done.exit_code == 0, done.output
    assert fs.exists(f"{s3_bucket}/mixed/stage1/manifest.json")

    def config(out: str) -> TrainConfig:
        return validate_config(
            TrainConfig,
            {
                "model": {"preset": "tiny"},
                "data": f"{s3_bucket}/mixed/stage1",
                "out_dir": out,
                "steps": 6,
                "global_batch_size": 4,
                "micro_batch_size": 2,
                "schedule": {"warmup_steps": 1},
                "checkpoint": {"every_steps": 2, "format": "sharded"},
                "logging": {"every_steps": 1, "tensorboard": False},
            },
        )

    straight = [m.loss for m in Trainer(config(f"{s3_bucket}/runs/straight"), log=lambda _: None).train()]
    Trainer(config(f"{s3_bucket}/runs/killed"), log=lambda _: None).train(stop_at=3)
    monkeypatch.setenv("CHAM_CACHE_DIR", str(tmp_path / "machine-b"))
    resumed = Trainer(config(f"{s3_bucket}/runs/killed"), log=lambda _: None)
    assert resumed.step == 2
    resumed.train()
    records = [json.loads(line) for line in fs.cat_file(f"{s3_bucket}/runs/killed/metrics.jsonl").splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7)) and [r["loss"] for r in records] == straight
    assert fs.exists(f"{s3_bucket}/runs/killed/checkpoints/step-00000006/sharded/.metadata")

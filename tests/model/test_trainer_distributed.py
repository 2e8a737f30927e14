"""Two gloo processes under torchrun, DDP and FSDP2, match one process at the same global batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from model.trainer import Trainer
from schemas import TrainConfig, load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stage(make_stage) -> Path:
    return make_stage(12_000, sequences_per_shard=32)


def config_file(stage: Path, out: Path, parallelism: str) -> Path:
    data = {"model": {"preset": "tiny"}, "data": str(stage), "out_dir": str(out), "seq_len": 128, "steps": 3,
            "global_batch_size": 8, "micro_batch_size": 2, "optimizer": {"lr": 3e-3}, "schedule": {"warmup_steps": 1},
            "checkpoint": {"every_steps": 3}, "parallelism": parallelism}  # fmt: skip
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(data))
    return path


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "step-00000003" / "model.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_processes_match_one(stage: Path, tmp_path: Path, parallelism: str) -> None:
    single = tmp_path / "single"
    Trainer(load_config(TrainConfig, config_file(stage, single, parallelism)), log=lambda _: None).train()
    multi = tmp_path / parallelism
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "flows.train_worker", "train", str(config_file(stage, multi, parallelism))]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = final_weights(single), final_weights(multi)
    assert one.keys() == two.keys()  # FSDP's gathered checkpoint keeps Meta's names
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-4, rtol=1e-3), name

"""Two gloo processes under torchrun, DDP and FSDP2, match one process at the same global batch; FSDP2 resumes
exactly from a gathered checkpoint and starts from init_from's weights loaded into its shards. (Sharded checkpoints
and resuming on other numbers of ranks: test_elastic_resume.py.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from model.files import step_folder
from model.files.step_folder import WEIGHTS
from model.lm.transformer import Transformer
from model.training.checkpointing import CheckpointError
from model.training.trainer import Trainer
from schemas import TrainConfig, load_config
from schemas.model_config import ModelConfig

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def stage(make_stage) -> Path:
    return make_stage(12_000, sequences_per_shard=32)


def config_file(
    stage: Path, out: Path, parallelism: str, every_steps: int = 3, checkpoint_format: str = "auto", **extra
) -> Path:
    data = {
        "model": {"preset": "tiny"},
        "data": str(stage),
        "out_dir": str(out),
        "seq_len": 128,
        "steps": 3,
        "global_batch_size": 8,
        "micro_batch_size": 2,
        "optimizer": {"lr": 3e-3},
        "schedule": {"warmup_steps": 1},
        "checkpoint": {"every_steps": every_steps, "keep_last": 3, "format": checkpoint_format},
        "parallelism": parallelism,
        **extra,
    }
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(data))
    return path


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    """The step-3 weights, from a full or a sharded checkpoint (FSDP2's default)."""
    return step_folder.read_weights(out / "checkpoints" / "step-00000003", CheckpointError)


def torchrun(config: Path, succeed: bool = True) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "flows.train_worker",
        "train",
        str(config),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    if succeed:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_fsdp_resume_is_exact(stage: Path, tmp_path: Path) -> None:
    out = tmp_path / "fsdp"
    config = config_file(stage, out, "fsdp", every_steps=1, checkpoint_format="full")
    torchrun(config)
    straight = final_weights(out)
    # As if both ranks died after the step-2 checkpoint: the rerun loads the gathered model and optimizer states
    # into the shards (set_model_state_dict / set_optimizer_state_dict), then redoes step 3.
    shutil.rmtree(out / "checkpoints" / "step-00000003")
    (out / "checkpoints" / "latest").write_text("step-00000002\n")
    rerun = torchrun(config)
    assert f"resumed from {out / 'checkpoints' / 'step-00000002'} at step 2" in rerun.stdout  # not from scratch
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # step 3 redone, recorded once
    resumed = final_weights(out)
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor), name
    # A checkpoint that does not fit the model fails naming the tensor and both shapes, as without FSDP.
    weights = out / "checkpoints" / "step-00000003" / "model.pt"
    torch.save({**resumed, "output.weight": torch.zeros(5, 7)}, weights)
    done = torchrun(config, succeed=False)
    assert done.returncode != 0
    shape = tuple(resumed["output.weight"].shape)
    assert f"tensor output.weight: checkpoint shape (5, 7) != model shape {shape}" in done.stderr + done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_processes_match_one(stage: Path, tmp_path: Path, parallelism: str) -> None:
    single = tmp_path / "single"
    Trainer(load_config(TrainConfig, config_file(stage, single, parallelism)), log=lambda _: None).train()
    multi = tmp_path / parallelism
    torchrun(config_file(stage, multi, parallelism))
    one, two = final_weights(single), final_weights(multi)
    assert one.keys() == two.keys()  # FSDP's gathered checkpoint keeps Meta's names
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-4, rtol=1e-3), name


@pytest.mark.slow
def test_fsdp_init_from_loads_into_the_shards(stage: Path, tmp_path: Path) -> None:
    """FSDP2 builds on the meta device and loads init_from's weights into each rank's shards (rank 0 reads them):
    the run continues from those weights as one process does."""
    start = tmp_path / "start"
    start.mkdir()
    torch.manual_seed(123)  # weights no seed of the run would give
    torch.save(Transformer(ModelConfig.from_preset("tiny")).state_dict(), start / WEIGHTS)
    single = tmp_path / "single"
    config = load_config(TrainConfig, config_file(stage, single, "fsdp", init_from=str(start)))
    Trainer(config, log=lambda _: None).train()
    multi = tmp_path / "fsdp"
    done = torchrun(config_file(stage, multi, "fsdp", init_from=str(start)))
    assert f"initialised from {start}" in done.stdout
    one, two = final_weights(single), final_weights(multi)
    assert one.keys() == two.keys()
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-4, rtol=1e-3), name

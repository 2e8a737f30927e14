"""Sharded checkpoints in one process: the folder they make, an exact resume (synchronous and asynchronous), a save
killed before it finished never looks complete, on-demand reading of the weights, and `consolidate`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from model.files import step_folder
from model.training.checkpointing import CheckpointError, latest_checkpoint, load_checkpoint, resolve_checkpoint
from model.training.sharded_checkpoint import consolidate_checkpoint, temporary_dir
from model.training.trainer import Trainer
from schemas import TrainConfig, validate_config


@pytest.fixture(scope="module")
def stage(make_stage) -> Path:
    return make_stage(12_000)


def config(stage: Path, out: Path, steps: int = 6, **checkpoint) -> TrainConfig:
    data = {
        "model": {"preset": "tiny"},
        "data": str(stage),
        "out_dir": str(out),
        "steps": steps,
        "global_batch_size": 4,
        "micro_batch_size": 2,
        "optimizer": {"lr": 3e-3},
        "schedule": {"warmup_steps": 2},
        "checkpoint": {"every_steps": 2, "keep_last": 2, "format": "sharded", **checkpoint},
    }
    return validate_config(TrainConfig, data)


def quiet(cfg: TrainConfig) -> Trainer:
    return Trainer(cfg, log=lambda _: None)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return step_folder.read_weights(folder, CheckpointError)


@pytest.fixture(scope="module")
def straight(stage: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 6-step run with sharded checkpoints every 2 steps: its out_dir."""
    out = tmp_path_factory.mktemp("straight")
    quiet(config(stage, out)).train()
    return out


def test_a_sharded_step_folder_holds_shards_and_records(straight: Path) -> None:
    ckpts = straight / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000004", "step-00000006"]  # keep_last 2
    folder = ckpts / "step-00000006"
    assert step_folder.is_sharded(folder) and not (folder / step_folder.WEIGHTS).exists()
    assert {p.name for p in (folder / "sharded").iterdir()} == {".metadata", "__0_0.distcp"}
    trainer = torch.load(folder / step_folder.TRAINER, weights_only=True)
    assert set(trainer) == {"rng", "step", "scheduler"}  # the optimizer is in the shards
    assert step_folder.has_model(folder) and resolve_checkpoint(straight) == folder
    shapes = step_folder.sharded_shapes(folder, "model", CheckpointError)
    model = weights(folder)  # gathered on demand, as generate, eval and convert read it
    assert {k: tuple(v.shape) for k, v in model.items()} == shapes and len(shapes) > 10
    assert step_folder.read_model_config(folder, CheckpointError).n_layers == 2


@pytest.mark.parametrize("async_save", [False, True])
def test_resume_from_a_sharded_checkpoint_is_exact(stage: Path, straight: Path, tmp_path: Path, async_save) -> None:
    out = tmp_path / "run"
    quiet(config(stage, out, async_save=async_save)).train(stop_at=3)  # checkpoints at 2; step 3 is lost
    assert latest_checkpoint(out / "checkpoints").name == "step-00000002"
    trainer = quiet(config(stage, out, async_save=async_save))
    assert trainer.step == 2
    trainer.train()
    last = Path("checkpoints") / "step-00000006"
    final, expected = weights(out / last), weights(straight / last)
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), name
    # The optimizer's state came back too: the moments are equal, by name.
    got = step_folder.read_sharded(out / "checkpoints" / "step-00000006", "optimizer", CheckpointError)
    want = step_folder.read_sharded(straight / "checkpoints" / "step-00000006", "optimizer", CheckpointError)
    for name, moments in want["state"].items():
        assert torch.equal(got["state"][name]["exp_avg_sq"], moments["exp_avg_sq"]), name


def test_a_save_killed_midway_never_looks_complete(stage: Path, straight: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    ckpts = out / "checkpoints"
    shutil.rmtree(ckpts / "step-00000006")
    # What a save killed after the shards but before state.json leaves: the hidden temporary, shards in it.
    partial = temporary_dir(ckpts, 6)
    shutil.copytree(straight / "checkpoints" / "step-00000006" / "sharded", partial / "sharded")
    assert latest_checkpoint(ckpts).name == "step-00000004"  # `latest` still names the last whole one
    trainer = quiet(config(stage, out))
    assert trainer.step == 4
    trainer.train()
    assert not partial.exists()  # the next save removed it
    final, expected = weights(ckpts / "step-00000006"), weights(straight / "checkpoints" / "step-00000006")
    assert all(torch.equal(final[k], v) for k, v in expected.items())


def test_consolidate_writes_a_full_step_folder_that_resumes_alike(stage: Path, straight: Path, tmp_path: Path) -> None:
    sharded = straight / "checkpoints" / "step-00000004"
    full = consolidate_checkpoint(sharded, tmp_path / "full")
    assert (full / step_folder.WEIGHTS).is_file() and not step_folder.is_sharded(full)
    assert step_folder.read_step(full, CheckpointError) == 4
    assert all(torch.equal(weights(full)[k], v) for k, v in weights(sharded).items())
    # The full folder resumes to the same weights as the sharded one, into a fresh trainer's model and optimizer.
    a, b = quiet(config(stage, tmp_path / "a")), quiet(config(stage, tmp_path / "b"))
    load_checkpoint(sharded, a.model, a.optimizer, a.scheduler)
    load_checkpoint(full, b.model, b.optimizer, b.scheduler)
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)
    assert a.scheduler.state_dict()["last_epoch"] == b.scheduler.state_dict()["last_epoch"] == 4
    with pytest.raises(CheckpointError, match="not a sharded checkpoint"):
        consolidate_checkpoint(full, tmp_path / "again")


def test_a_sharded_checkpoint_of_another_model_is_refused_naming_the_tensor(straight: Path, tmp_path: Path) -> None:
    from model.lm.transformer import Transformer
    from schemas.model_config import ModelConfig

    narrow = {"dim": 32, "n_heads": 2, "n_kv_heads": 1}
    other = Transformer(ModelConfig.from_preset("tiny").model_copy(update=narrow))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    shapes = r"checkpoint shape \(\d+, 64\) != model shape \(\d+, 32\)"
    with pytest.raises(CheckpointError, match=rf"tok_embeddings.weight: {shapes}"):
        load_checkpoint(straight / "checkpoints" / "step-00000006", other)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())  # nothing was loaded


def test_a_damaged_shard_file_is_named(straight: Path, tmp_path: Path) -> None:
    folder = tmp_path / "step"
    shutil.copytree(straight / "checkpoints" / "step-00000006", folder)
    data = folder / "sharded" / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read its model"):
        weights(folder)
    (folder / "sharded" / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=r"\.metadata: not a readable sharded checkpoint"):
        step_folder.sharded_shapes(folder, "model", CheckpointError)

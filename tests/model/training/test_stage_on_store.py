"""Training from a stage on an object store (a real S3 API: moto's server on 127.0.0.1): the same batches as the
local stage, shards fetched once each into a bounded cache, ahead of need, and a resumed run as exact as today's."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest
import torch

from model.training.stage_loader import StageLoader, StoreCache
from model.training.trainer import Trainer
from schemas import TrainConfig, validate_config


@pytest.fixture(scope="module")
def stage(make_stage) -> Path:
    return make_stage(12_000, sequences_per_shard=16)


def upload(stage: Path, url: str) -> str:
    fsspec.filesystem("s3", skip_instance_cache=True).put(str(stage), url, recursive=True)
    return url


def shard_bytes(stage: Path) -> int:
    return max(p.stat().st_size for p in stage.glob("*.tar"))


def test_batches_come_from_a_bounded_cache_fetched_ahead(stage: Path, s3_bucket: str, tmp_path: Path) -> None:
    url = upload(stage, f"{s3_bucket}/mixed/stage1")
    budget = 3 * shard_bytes(stage)  # the shard in use and the next two
    cache = StoreCache(tmp_path / "cache", max_bytes=budget, read_ahead=1)
    remote = StageLoader(url, batch_size=4, cache=cache)
    local = StageLoader(stage, batch_size=4)
    assert remote.fingerprint == local.fingerprint and len(remote) == len(local)
    shards = sorted(p.name for p in stage.glob("*.tar"))
    largest = 0
    for got, want in zip(remote, local, strict=True):
        assert torch.equal(got["tokens"], want["tokens"]) and torch.equal(got["loss_mask"], want["loss_mask"])
        largest = max(largest, remote.shard_cache.cached_bytes())
    assert largest <= budget + shard_bytes(stage)  # within the budget, plus the one being fetched
    read = len(remote) * 4  # the epoch's sequences (the tail past the last whole global batch is not read)
    counts = [s["sequences"] for s in local.manifest["shards"]]
    needed = sum(1 for i in range(len(counts)) if sum(counts[:i]) < read)
    fetched = remote.shard_cache.fetched
    # Each shard it reads was fetched once, in order; the read-ahead may have fetched one past the last it read.
    assert fetched[:needed] == shards[:needed] and fetched == shards[: len(fetched)] and len(fetched) <= needed + 1
    assert len(list(remote.shard_cache.folder.glob("*.tar"))) < len(shards)  # the oldest were evicted
    # DataLoader workers read the cache too (one of them fetches a shard, the others wait for it).
    workers = StageLoader(url, batch_size=4, num_workers=2, cache=cache)
    for got, want in zip(workers, StageLoader(stage, batch_size=4), strict=True):
        assert torch.equal(got["tokens"], want["tokens"])


def test_a_missing_stage_on_the_store_is_named(s3_bucket: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"{s3_bucket}/nothing is not a stage folder"):
        StageLoader(f"{s3_bucket}/nothing", batch_size=4, cache=StoreCache(tmp_path))


def config(data: str | Path, out: Path, cache: Path) -> TrainConfig:
    fields = {
        "model": {"preset": "tiny"},
        "data": str(data),
        "out_dir": str(out),
        "steps": 6,
        "global_batch_size": 4,
        "micro_batch_size": 2,
        "schedule": {"warmup_steps": 1},
        "checkpoint": {"every_steps": 2},
        "data_cache": {"dir": str(cache), "max_bytes": 10**7, "read_ahead_shards": 1},
    }
    return validate_config(TrainConfig, fields)


def test_training_on_a_stage_on_the_store_equals_training_on_it_locally(
    stage: Path, s3_bucket: str, tmp_path: Path
) -> None:
    url = upload(stage, f"{s3_bucket}/stage1")
    local = Trainer(config(stage, tmp_path / "local", tmp_path / "cache"), log=lambda _: None).train()
    # On the store, killed after step 3 (the step-2 checkpoint is the last), then resumed.
    Trainer(config(url, tmp_path / "store", tmp_path / "cache"), log=lambda _: None).train(stop_at=3)
    resumed = Trainer(config(url, tmp_path / "store", tmp_path / "cache"), log=lambda _: None)
    assert resumed.step == 2
    history = resumed.train()
    assert [m.loss for m in history] == [m.loss for m in local[2:]]
    training = (tmp_path / "store" / "checkpoints" / "step-00000006" / "training.json").read_text()
    assert url in training  # the step folder names the stage on the store


def test_held_out_loss_of_a_stage_on_the_store(stage: Path, s3_bucket: str, tiny_run: Path, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from flows.cli import app

    url = upload(stage, f"{s3_bucket}/heldout")
    results = {}
    for name, where in [("local", str(stage)), ("store", url)]:
        out = tmp_path / f"{name}.json"
        done = CliRunner().invoke(
            app, ["eval", "loss", "--checkpoint", str(tiny_run), "--stage", where, "--out", str(out)]
        )
        assert done.exit_code == 0, done.output
        results[name] = json.loads(out.read_text())
    assert results["store"]["loss"] == results["local"]["loss"] and results["store"]["tokens"] > 0

"""Checkpoints: exact round trip (weights, optimizer, schedule, RNG, loader state), keep-last-k, latest, errors."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from model.lm.transformer import Transformer
from model.training.checkpointing import (
    CheckpointError,
    TrainState,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from schemas.model_config import ModelConfig

CONFIG = ModelConfig.from_preset("tiny", n_layers=1)


def trained(steps: int = 3) -> tuple[Transformer, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s))
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 16))
    for _ in range(steps):
        loss = model(tokens).logsumexp(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler


def test_round_trip_is_exact(tmp_path: Path) -> None:
    model, optimizer, scheduler = trained()
    loader_state = {"fingerprint": "abc", "epoch": 0, "sequences_consumed": 96}
    save_checkpoint(tmp_path, TrainState(3, loader_state, {"tokens_seen": 1234}), model, optimizer, scheduler)
    expected_draws = (torch.rand(3), random.random())

    torch.manual_seed(123)
    random.seed(5)
    fresh = Transformer(CONFIG)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 1 / (1 + s))
    state = load_checkpoint(latest_checkpoint(tmp_path), fresh, fresh_opt, fresh_sched)
    assert (state.step, state.loader, state.extra) == (3, loader_state, {"tokens_seen": 1234})
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(optimizer.state_dict()["state"].values(), fresh_opt.state_dict()["state"].values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr()
    assert torch.equal(torch.rand(3), expected_draws[0]) and random.random() == expected_draws[1]  # RNG restored


def test_keep_last_and_latest(tmp_path: Path) -> None:
    model, optimizer, _ = trained(1)
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, TrainState(step), model, optimizer, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000030", "step-00000040"]
    assert latest_checkpoint(tmp_path).name == "step-00000040"
    (tmp_path / ".step-00000050.tmp").mkdir()  # a save interrupted by a crash is never picked up
    assert latest_checkpoint(tmp_path).name == "step-00000040"
    (tmp_path / "latest").write_text("step-00000099\n")  # a stale pointer falls back to the newest complete one
    assert latest_checkpoint(tmp_path).name == "step-00000040"
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_weights_only_and_clear_errors(tmp_path: Path) -> None:
    model, optimizer, _ = trained(1)
    path = save_checkpoint(tmp_path, TrainState(1), model, optimizer)
    other = Transformer(CONFIG)
    load_weights(path, other)
    assert torch.equal(other.output.weight, model.output.weight)
    torch.save({"evil": object.__new__(TrainState)}, path / "trainer.pt")  # not plain tensors and containers
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path, other)
    wrong = Transformer(ModelConfig.from_preset("tiny", n_layers=2))
    missing = r"cannot load its weights: .*missing \['layers\.1\..*'... 5 more'\], unexpected \[\]"
    with pytest.raises(CheckpointError, match=missing):
        load_weights(path, wrong)
    # A shape that does not fit names the tensor and both shapes, on resume and on init_from alike.
    path = save_checkpoint(tmp_path / "again", TrainState(1), model, optimizer)
    wider = Transformer(CONFIG.model_copy(update={"ffn_dim": CONFIG.ffn_dim + 16}))
    shapes = (
        rf"layers\.0\.feed_forward\.w1\.weight: checkpoint shape \({CONFIG.ffn_dim}, 64\) != model shape "
        rf"\({CONFIG.ffn_dim + 16}, 64\)"
    )
    with pytest.raises(CheckpointError, match=shapes):
        load_checkpoint(path, wider)
    with pytest.raises(CheckpointError, match=shapes):
        load_weights(path, wider)


def test_damaged_checkpoint_files_are_named(tmp_path: Path) -> None:
    model, optimizer, scheduler = trained(1)
    path = save_checkpoint(tmp_path, TrainState(1, {"fingerprint": "f"}), model, optimizer, scheduler)
    other = Transformer(CONFIG)
    original = {name: (path / name).read_bytes() for name in ("model.pt", "trainer.pt", "state.json")}
    cases = [
        ("state.json", b"[]", r"state\.json: not a checkpoint state \(a JSON list"),
        ("state.json", b'{"step": 1, "extra": {}}', r"state\.json: not a complete checkpoint state \(no loader\)"),
        ("state.json", b'{"step": "one", "loader": {}, "extra": {}}', r"state\.json: step must be an integer"),
        ("state.json", b'{"step": 1,', r"state\.json: not valid JSON"),
        ("model.pt", original["model.pt"][:300], r"model\.pt: truncated or damaged PyTorch file"),
        ("trainer.pt", b"garbage" * 20, r"trainer\.pt: not a weights-only PyTorch file"),
    ]
    for name, payload, message in cases:
        (path / name).write_bytes(payload)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path, other, torch.optim.AdamW(other.parameters()))
        (path / name).write_bytes(original[name])
    torch.save({"rng": torch.load(path / "trainer.pt", weights_only=True)["rng"]}, path / "trainer.pt")
    with pytest.raises(CheckpointError, match=r"trainer\.pt: no optimizer state to resume from"):
        load_checkpoint(path, other, torch.optim.AdamW(other.parameters()))
    assert load_checkpoint(path, other).step == 1  # weights (and RNG) only: nothing else is needed


def test_a_stale_latest_pointer_is_reported(tmp_path: Path, caplog) -> None:
    model, _, _ = trained(1)
    save_checkpoint(tmp_path, TrainState(2), model)
    (tmp_path / "latest").write_text("step-00000099\n")  # a lost checkpoint
    with caplog.at_level("WARNING", logger="model.training.checkpointing"):
        assert latest_checkpoint(tmp_path).name == "step-00000002"
    assert "names step-00000099, which is not a complete checkpoint; using step-00000002" in caplog.text
    only = tmp_path / "only-pointer"
    only.mkdir()
    (only / "latest").write_text("step-00000099\n")
    with caplog.at_level("WARNING", logger="model.training.checkpointing"):
        assert latest_checkpoint(only) is None
    assert "names step-00000099, which is not a complete checkpoint; no other is" in caplog.text


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"\x00\xff\xfe garbage", "not UTF-8 text (invalid start byte at byte 1)"),
        (b"../../elsewhere\n", "it holds '../../elsewhere'"),
        (b"/etc\n", "it holds '/etc'"),
        (b"", "it holds ''"),
        (b"step-00000002\n" * 100, "more than one short line"),
    ],
)
def test_a_damaged_latest_pointer_is_one_error_naming_it(tmp_path: Path, content: bytes, why: str) -> None:
    model, _, _ = trained(1)
    save_checkpoint(tmp_path, TrainState(2), model)
    (tmp_path / "latest").write_bytes(content)
    with pytest.raises(CheckpointError) as caught:
        latest_checkpoint(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'latest'}: not a checkpoint pointer ({why};") and "\n" not in message


def test_a_checkpoint_is_checked_whole_before_anything_is_loaded(tmp_path: Path) -> None:
    model, _, _ = trained(1)
    path = save_checkpoint(tmp_path, TrainState(1), model)  # no optimizer state saved
    other = Transformer(CONFIG)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"trainer\.pt: no optimizer state to resume from"):
        load_checkpoint(path, other, torch.optim.AdamW(other.parameters()))
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # the weights were not loaded


def test_a_killed_save_leaves_nothing_the_next_save_keeps(tmp_path: Path) -> None:
    model, _, _ = trained(1)
    (tmp_path / ".step-00000002.1234.abcd1234.tmp").mkdir(parents=True)  # a writer killed mid-save
    save_checkpoint(tmp_path, TrainState(2), model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000002"]

"""The step folder: written whole or not at all, every file read back, and each damaged file named in its caller's
error type."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.files import step_folder
from model.files.step_folder import StepRecords
from schemas.model_config import ModelConfig

CONFIG = ModelConfig.from_preset("tiny", n_layers=1)


class FolderError(ValueError):
    pass


def records() -> StepRecords:
    return StepRecords(
        model_config=CONFIG,
        tokenizers={"text": "/t/text.json", "image": "/t/vq", "vocab_layout": {"preset": "tiny"}},
        training={"kind": "sft", "data": "/d/sft", "stage": "sft"},
    )


def write(folder: Path) -> Path:
    weights = {"w": torch.arange(6.0).view(2, 3)}
    trainer = {"rng": {"torch": torch.get_rng_state()}, "step": 7, "optimizer": {"state": {}}}
    state = {"step": 7, "loader": {"epoch": 0}, "extra": {"skipped_steps": 1}}
    return step_folder.write_step_folder(folder, weights, trainer, state, records())


def test_round_trip(tmp_path: Path) -> None:
    folder = write(tmp_path / "step-00000007")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["model.pt", "model_config.json", "tokenizers.json", "training.json", "trainer.pt", "state.json"]
    )
    assert step_folder.is_complete(folder) and step_folder.has_model(folder)
    assert torch.equal(step_folder.read_weights(folder, FolderError)["w"], torch.arange(6.0).view(2, 3))
    assert step_folder.read_model_config(folder, FolderError) == CONFIG
    assert step_folder.read_tokenizers_record(folder, FolderError)["image"] == "/t/vq"
    assert step_folder.read_training_record(folder, FolderError)["kind"] == "sft"
    assert step_folder.read_step(folder, FolderError) == 7
    assert step_folder.read_state(folder, FolderError)["extra"] == {"skipped_steps": 1}
    assert step_folder.read_trainer(folder, FolderError)["step"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000007"]  # no temporary left


def test_a_folder_is_replaced_whole_and_a_failed_write_changes_nothing(tmp_path: Path) -> None:
    folder = write(tmp_path / "step-00000007")
    (folder / "leftover.txt").write_text("from an older write")
    write(folder)
    assert not (folder / "leftover.txt").exists()
    before = (folder / "model.pt").read_bytes()
    with pytest.raises(TypeError):
        step_folder.write_step_folder(folder, {"w": torch.zeros(1)}, {"rng": {}}, {"step": object()})
    assert (folder / "model.pt").read_bytes() == before and step_folder.is_complete(folder)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000007"]


def test_our_convert_format_is_the_model_part(tmp_path: Path) -> None:
    step_folder.write_model(tmp_path / "ours", {"w": torch.ones(2)}, CONFIG)
    assert step_folder.has_model(tmp_path / "ours") and not step_folder.is_complete(tmp_path / "ours")
    assert step_folder.read_model_config(tmp_path / "ours", FolderError) == CONFIG
    # A converted folder records no tokenizers, training or step: readers say so with empty values.
    assert step_folder.read_tokenizers_record(tmp_path / "ours", FolderError) == {}
    assert step_folder.read_training_record(tmp_path / "ours", FolderError) == {}
    assert step_folder.read_step(tmp_path / "ours", FolderError) is None


def test_a_config_from_before_qk_norm_eps_keeps_its_function(tmp_path: Path) -> None:
    raw = json.loads(CONFIG.model_dump_json())
    del raw["qk_norm_eps"]
    (tmp_path / "model_config.json").write_text(json.dumps(raw | {"norm_eps": 1e-6}))
    assert step_folder.read_model_config(tmp_path, FolderError).qk_norm_eps == 1e-6


@pytest.mark.parametrize(
    ("name", "payload", "reader", "message"),
    [
        ("model_config.json", b'{"dim": "wide"}', "read_model_config", r"model_config\.json: not a model config \(dim"),
        ("tokenizers.json", b"[1]", "read_tokenizers_record", r"tokenizers\.json: not a tokenizer record"),
        ("training.json", b"{", "read_training_record", r"training\.json: not valid JSON"),
        ("state.json", b'{"step": "7", "loader": {}, "extra": {}}', "read_state", r"state\.json: step must be an int"),
        ("state.json", b'{"loader": {}}', "read_step", r"state\.json: not a complete checkpoint state \(no step\)"),
        ("trainer.pt", b"garbage", "read_trainer", r"trainer\.pt: not a weights-only PyTorch file"),
        ("model.pt", b"", "read_weights", r"model\.pt: truncated or damaged PyTorch file"),
    ],
)
def test_a_damaged_file_is_named_in_the_callers_error(
    tmp_path: Path, name: str, payload: bytes, reader: str, message: str
) -> None:
    folder = write(tmp_path / "step")
    (folder / name).write_bytes(payload)
    with pytest.raises(FolderError, match=message):
        getattr(step_folder, reader)(folder, FolderError)

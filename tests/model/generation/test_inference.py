"""Loading a trained checkpoint for inference: from any of its paths, with its tokenizers, or a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from model.generation.inference import load_inference_model, load_trained_model
from model.lm.convert import load_ours, save_ours
from model.training.checkpointing import CheckpointError, resolve_checkpoint


def test_every_path_of_a_run_resolves_to_its_latest_step(tiny_run: Path) -> None:
    step = tiny_run / "checkpoints" / "step-00000030"
    assert resolve_checkpoint(tiny_run) == step
    assert resolve_checkpoint(tiny_run / "checkpoints") == step
    assert resolve_checkpoint(step) == step
    assert resolve_checkpoint(tiny_run / "checkpoints" / "latest") == step  # the pointer file itself
    assert resolve_checkpoint(step / "model.pt") == step


def test_loads_model_and_tokenizers_recorded_with_the_checkpoint(tiny_run: Path, tiny_tokenizers) -> None:
    loaded = load_inference_model(tiny_run, device="cpu")
    assert loaded.step == 30 and not loaded.model.training
    assert loaded.config.dropout == 0.0 and loaded.vocab.size == loaded.config.vocab_size == 2048
    recorded = json.loads((loaded.checkpoint / "tokenizers.json").read_text())
    assert Path(recorded["text"]) == Path(tiny_tokenizers["text"]).resolve()
    # The weights are the trained ones, not a fresh init.
    saved = torch.load(loaded.checkpoint / "model.pt", weights_only=True)
    assert torch.equal(saved["output.weight"], loaded.model.output.weight)
    ids = loaded.tokenizer.encode(["Hello world"], eos=False)
    assert loaded.tokenizer.decode(ids.tolist())[0] == "Hello world"
    assert loaded.tokenizer.image is not None and loaded.tokenizer.image.tokens_per_image == 64


def test_errors_name_the_problem(tiny_run: Path, tmp_path: Path, tiny_tokenizers) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_inference_model(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        load_inference_model(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run / "checkpoints" / "step-00000030", copy)
    record = json.loads((copy / "tokenizers.json").read_text())
    (copy / "tokenizers.json").write_text(json.dumps(record | {"image": str(tmp_path / "moved")}))
    with pytest.raises(CheckpointError, match=r"image tokenizer .* does not exist; pass its new path"):
        load_inference_model(copy)
    assert load_inference_model(copy, image_tokenizer=tiny_tokenizers["image"]).step == 30
    (copy / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot load"):
        load_inference_model(copy)


def test_damaged_records_and_tokenizers_are_named(tiny_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run / "checkpoints" / "step-00000030", copy)
    good = (copy / "tokenizers.json").read_text()
    (copy / "tokenizers.json").write_text(good[:20])
    with pytest.raises(CheckpointError, match=r"tokenizers\.json: not valid JSON"):
        load_inference_model(copy)
    (copy / "tokenizers.json").write_text(good)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=rf"cannot load the tokenizers of {copy}: .*empty"):
        load_inference_model(copy, text_tokenizer=tmp_path / "empty")
    (copy / "model_config.json").write_text('{"dim": "wide"}')
    with pytest.raises(CheckpointError, match=r"model_config\.json: not a model config \(dim: "):
        load_inference_model(copy)


def test_a_model_without_tokenizer_record_loads_for_loss(tiny_run: Path, tmp_path: Path) -> None:
    converted = tmp_path / "converted"
    config, state = load_ours(tiny_run / "checkpoints" / "step-00000030")
    save_ours(state, config, converted)  # what `cham convert --to ours` writes: no tokenizers.json, no step
    with pytest.raises(CheckpointError, match=r"no tokenizers\.json names its tokenizers; pass .*--text-tokenizer"):
        load_inference_model(converted)
    model, folder, step = load_trained_model(converted)
    assert folder == converted and step is None and not model.training
    assert torch.equal(model.output.weight, state["output.weight"])

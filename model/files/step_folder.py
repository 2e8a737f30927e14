"""The step folder: what the trainer writes for each checkpoint, and what inference, `cham convert` and resuming read.

    model.pt            the model's state dict (Meta's names)           } our `convert` format: a step folder
    model_config.json   its ModelConfig (dropout 0: for inference)      } converts and loads as it is
    tokenizers.json     the paths of its text and image tokenizers and the vocabulary layout
    training.json       pretrain or sft, the stage folder and its name
    trainer.pt          optimizer, schedule and RNG states (resuming only)
    state.json          step, loader position and run counters; written last, so its presence marks a whole folder

A sharded step folder (model/training/sharded_checkpoint.py writes it) has `sharded/` instead of model.pt, and its
trainer.pt has no optimizer: `sharded/` is a torch.distributed.checkpoint folder whose keys are `model.<name>` and
`optimizer.<...>`, each rank's shards in a file of their own. Every reader of weights here takes either form: a
sharded folder's model is gathered into full tensors in this process on demand (what `generate`, `eval` and
`convert` need); `cham checkpoint consolidate` writes the single-file form once.

This module owns those names and how each file is read and written. A step folder is written under a temporary
name and renamed into place (model/files/atomic.py), so a crash never leaves half of one that looks complete. Readers
take the error type to raise (each caller has its own: CheckpointError, ConversionError) and name the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from model.files import storage
from model.files.atomic import atomic_path, write_atomic
from model.files.reading import first_line, load_state_dict_file, load_tensor_file, read_json, read_json_object
from schemas.model_config import ModelConfig

WEIGHTS = "model.pt"
MODEL_CONFIG = "model_config.json"
TOKENIZERS = "tokenizers.json"
TRAINING = "training.json"
TRAINER = "trainer.pt"
STATE = "state.json"
SHARDED = "sharded"


@dataclass(frozen=True)
class StepRecords:
    """What makes a step folder self-describing: generation and evaluation need nothing else to load it."""

    model_config: ModelConfig
    tokenizers: Mapping[str, Any]  # {"text": path, "image": path, "vocab_layout": {...}}
    training: Mapping[str, Any]  # {"kind": "pretrain" | "sft", "data": path, "stage": name}


def write_step_folder(
    folder: str | Path,
    weights: Mapping[str, torch.Tensor],
    trainer: Mapping[str, Any],
    state: Mapping[str, Any],
    records: StepRecords | None = None,
) -> Path:
    """Write a whole step folder at `folder` (replacing one already there): weights, trainer state, the records,
    then state.json. Returns `folder`."""
    folder = Path(folder)
    with atomic_path(folder, replace_folder=True) as tmp:
        tmp.mkdir()
        torch.save(dict(weights), tmp / WEIGHTS)
        torch.save(dict(trainer), tmp / TRAINER)
        write_step_state(tmp, state, records)
    return folder


def write_step_state(folder: Path, state: Mapping[str, Any], records: StepRecords | None = None) -> None:
    """The records, then state.json (last: its presence marks the folder whole), into a folder being written."""
    if records is not None:
        _write_records(folder, records)
    (folder / STATE).write_text(json.dumps(dict(state)))


def _write_records(folder: Path, records: StepRecords) -> None:
    (folder / MODEL_CONFIG).write_text(records.model_config.model_dump_json(indent=2) + "\n")
    (folder / TOKENIZERS).write_text(json.dumps(dict(records.tokenizers), indent=2))
    (folder / TRAINING).write_text(json.dumps(dict(records.training)))


def write_model(folder: str | Path, weights: Mapping[str, torch.Tensor], config: ModelConfig) -> None:
    """Write our `convert` format into `folder`: model.pt and model_config.json (each atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / WEIGHTS) as tmp:
        torch.save(dict(weights), tmp)
    write_atomic(folder / MODEL_CONFIG, config.model_dump_json(indent=2) + "\n")


def has_model(folder: str | Path) -> bool:
    """Whether `folder` holds our `convert` format (model.pt, or a sharded model, and model_config.json)."""
    folder = Path(folder)
    return ((folder / WEIGHTS).is_file() or is_sharded(folder)) and (folder / MODEL_CONFIG).is_file()


def has_weights(folder: str | Path) -> bool:
    """Whether `folder` holds model weights in either form (model.pt or sharded/)."""
    return (Path(folder) / WEIGHTS).is_file() or is_sharded(folder)


def is_sharded(folder: str | Path) -> bool:
    """Whether `folder` (a path or a store's URL) is a sharded step folder (its sharded/ has torch.distributed
    .checkpoint's metadata)."""
    if storage.is_url(folder):
        return storage.exists(storage.join(folder, SHARDED, ".metadata"))
    return (Path(folder) / SHARDED / ".metadata").is_file()


def read_weights(folder: str | Path, error: type[Exception]) -> dict[str, torch.Tensor]:
    """The model's state dict of `folder`: model.pt, or the model of its sharded/ gathered into full tensors here;
    a missing or damaged file raises `error` naming it."""
    if is_sharded(folder):
        state = read_sharded(folder, "model", error)
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise error(f"{Path(folder) / SHARDED}: its model part is not a state dict of tensors")
        return state
    return load_state_dict_file(Path(folder) / WEIGHTS, error)


def sharded_shapes(folder: str | Path, part: str, error: type[Exception]) -> dict[str, tuple[int, ...]]:
    """Name -> full shape of every tensor of one part ('model', 'optimizer') of a sharded folder, from its metadata
    alone (nothing else is read)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = storage.join(folder, SHARDED)
    try:
        metadata = sharded_reader(folder).read_metadata()
    except _dcp_errors() as err:  # pickle, EOF and OS errors alike for a damaged file
        raise error(f"{path}/.metadata: not a readable sharded checkpoint ({dcp_failure(err)})") from None
    prefix = part + "."
    return {
        key[len(prefix) :]: tuple(item.size)
        for key, item in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(item, TensorStorageMetadata)
    }


def dcp_failure(err: BaseException) -> str:
    """One line for a torch.distributed.checkpoint failure: each failed rank's own exception, not DCP's traceback."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        return "; ".join(
            f"rank {rank}: {type(exc).__name__}: {first_line(exc) or 'truncated or damaged file'}"
            for rank, (exc, _) in sorted(failures.items())
        )
    return f"{type(err).__name__}: {first_line(err)}"


def _dcp_errors() -> tuple[type[BaseException], ...]:
    from torch.distributed.checkpoint.api import CheckpointException

    # CheckpointException derives from BaseException; the rest is what a damaged metadata file raises.
    return (CheckpointException, Exception)


def read_sharded(folder: str | Path, part: str, error: type[Exception]) -> dict[str, Any]:
    """One part ('model', 'optimizer') of a sharded folder, every shard gathered into full tensors in this process
    (its whole size in host memory: for consolidating or inference, not for resuming a sharded run)."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = storage.join(folder, SHARDED)
    state: dict[str, Any] = {}
    try:
        # DCP's own way of reading a checkpoint without a model (format_utils.dcp_to_torch_save): the planner builds
        # the tensors from the metadata; no_dist, so one rank of a distributed run may call it alone.
        planner = _EmptyStateDictLoadPlanner(keys={part})
        _load_state_dict(state, storage_reader=sharded_reader(folder), planner=planner, no_dist=True)
    except _dcp_errors() as err:
        raise error(f"{path}: cannot read its {part} ({dcp_failure(err)})") from None
    if part not in state:
        raise error(f"{path}: no {part} in this sharded checkpoint")
    return state[part]


def read_model_config(folder: str | Path, error: type[Exception]) -> ModelConfig:
    """model_config.json of `folder` as a ModelConfig, or `error` naming the file and every problem in one line."""
    path = Path(folder) / MODEL_CONFIG
    raw = read_json(path, error)
    if isinstance(raw, dict) and "norm_eps" in raw and "qk_norm_eps" not in raw:
        # Written before qk_norm_eps existed, when QK-norm used norm_eps: keep the function it was trained as.
        raw = {**raw, "qk_norm_eps": raw["norm_eps"]}
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in err.errors())
        raise error(f"{path}: not a model config ({problems})") from None


def read_tokenizers_record(folder: str | Path, error: type[Exception]) -> dict[str, Any]:
    """tokenizers.json of `folder` ({} when there is none, as in converted weights), or `error` naming it."""
    path = Path(folder) / TOKENIZERS
    return read_json_object(path, (), error, "tokenizer record") if path.is_file() else {}


def read_training_record(folder: str | Path, error: type[Exception]) -> dict[str, Any]:
    """training.json of `folder` ({} when there is none), or `error` naming it."""
    path = Path(folder) / TRAINING
    return read_json_object(path, (), error) if path.is_file() else {}


def read_step(folder: str | Path, error: type[Exception]) -> int | None:
    """The step state.json records, or None for a folder without one (converted weights)."""
    path = Path(folder) / STATE
    return read_json_object(path, ("step",), error, "checkpoint state")["step"] if path.is_file() else None


def read_state(folder: str | Path, error: type[Exception]) -> dict[str, Any]:
    """state.json of `folder`: an integer step, loader and extra objects; anything else raises `error` naming it."""
    path = Path(folder) / STATE
    state = read_json_object(path, ("step", "loader", "extra"), error, "checkpoint state")
    if (
        not isinstance(state["step"], int)
        or not isinstance(state["loader"], dict)
        or not isinstance(state["extra"], dict)
    ):
        raise error(f"{path}: step must be an integer, loader and extra objects")
    return state


def read_trainer(folder: str | Path, error: type[Exception]) -> dict[str, Any]:
    """trainer.pt of `folder` (optimizer, scheduler and RNG states), or `error` naming it."""
    path = Path(folder) / TRAINER
    trainer = load_tensor_file(path, error)
    if not isinstance(trainer, dict) or "rng" not in trainer:
        raise error(f"{path}: not a trainer state (no rng)")
    return trainer


def is_complete(folder: str | Path) -> bool:
    """Whether `folder` (a path or a store's URL) is a whole step folder (state.json is written last)."""
    if storage.is_url(folder):
        return storage.exists(storage.join(folder, STATE))
    return (Path(folder) / STATE).is_file()


def sharded_reader(folder: str | Path) -> Any:
    """torch.distributed.checkpoint's reader of `folder`'s sharded/ (a local folder or a store's URL)."""
    from torch.distributed.checkpoint import FileSystemReader

    location = storage.join(folder, SHARDED)
    if storage.is_url(location):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(str(location))
    return FileSystemReader(str(location))

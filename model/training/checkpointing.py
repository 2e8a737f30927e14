"""Training checkpoints: model, optimizer, schedule, step, loader state and RNG, written whole, the last k kept.

A checkpoint is a folder `step-NNNNNNNN/` written under a temporary name and renamed, so a crash never leaves a
half checkpoint that looks complete; `latest` (a one-line text file, replaced atomically) names the newest.
Everything is read back with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.files.reading import load_state_dict_file, load_tensor_file, read_json_object

log = logging.getLogger(__name__)
LATEST = "latest"
WEIGHTS = "model.pt"  # also the weights file of our `convert` format
TRAINER = "trainer.pt"
STATE = "state.json"
PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be used, with its path."""


@dataclass
class TrainState:
    """What a resumed run needs besides the module states: the step, the loader's position, anything else small."""

    step: int
    loader: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()[1]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(state["python"]), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"{PREFIX}{step:08d}"


def save_checkpoint(
    root: str | Path,
    state: TrainState,
    model: torch.nn.Module | dict[str, Any],
    optimizer: torch.optim.Optimizer | dict[str, Any] | None = None,
    scheduler: Any = None,
    keep_last: int = 3,
    files: dict[str, str] | None = None,
) -> Path:
    """Write checkpoint `step-NNNNNNNN` under `root`, point `latest` at it, and delete all but the last `keep_last`.

    `model` / `optimizer` may be modules or already gathered state dicts (FSDP gathers them on every rank first).
    `files` are small text files (name -> content) written into the folder, e.g. the model config.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, state.step)
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(model if isinstance(model, dict) else model.state_dict(), tmp / WEIGHTS)
    trainer = {"rng": _rng_state(), "step": state.step}
    if optimizer is not None:
        trainer["optimizer"] = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    if scheduler is not None:
        trainer["scheduler"] = scheduler.state_dict()
    torch.save(trainer, tmp / TRAINER)
    for name, content in (files or {}).items():
        (tmp / name).write_text(content)
    (tmp / STATE).write_text(json.dumps({"step": state.step, "loader": state.loader, "extra": state.extra}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / LATEST)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE).exists())


# `latest` holds one short line; a larger file is not a pointer we wrote (read no more than this to say so).
_POINTER_MAX_BYTES = 256


def read_latest_pointer(pointer: Path) -> str:
    """The folder name the `latest` file names; a file that is not one line naming a step folder (binary, damaged,
    a path elsewhere) raises CheckpointError naming it."""
    try:
        with open(pointer, "rb") as f:
            data = f.read(_POINTER_MAX_BYTES + 1)
    except OSError as err:
        raise CheckpointError(f"{pointer}: cannot read it ({err.strerror or err})") from None
    try:
        name = data.decode("utf-8").strip()
    except UnicodeDecodeError as err:
        name = None
        why = f"not UTF-8 text ({err.reason} at byte {err.start})"
    else:
        why = "more than one short line" if len(data) > _POINTER_MAX_BYTES else f"it holds {name[:40]!r}"
    if name is None or len(data) > _POINTER_MAX_BYTES or not _is_step_name(name):
        raise CheckpointError(f"{pointer}: not a checkpoint pointer ({why}; expected one line naming a "
                              f"{PREFIX}NNNNNNNN folder): fix it, or delete it to resume from the newest complete "
                              f"checkpoint")  # fmt: skip
    return name


def _is_step_name(name: str) -> bool:
    return name.startswith(PREFIX) and name[len(PREFIX) :].isdigit() and name.isascii()


def latest_checkpoint(root: str | Path) -> Path | None:
    """The folder `latest` names, else the newest complete one, else None. A damaged `latest` raises
    CheckpointError naming it."""
    root = Path(root)
    pointer = root / LATEST
    found = list_checkpoints(root)
    if pointer.is_file():
        named = root / read_latest_pointer(pointer)
        if (named / STATE).is_file():
            return named
        # A checkpoint was lost (or `latest` edited): say so rather than quietly go back further.
        log.warning("%s names %s, which is not a complete checkpoint; %s", pointer, named.name,
                    f"using {found[-1].name}" if found else "no other is")  # fmt: skip
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """The folder holding the weights for `path`, or a CheckpointError saying why not.

    `path` may be a training run's `out_dir`, its `checkpoints/` folder or the `latest` file there (the newest step
    is used), one `step-NNNNNNNN` folder, or any folder with a `model.pt` (our `convert` format), or that file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if path.is_file() and path.name in (LATEST, WEIGHTS):  # a file of the folder meant
        path = path.parent
    if (path / WEIGHTS).is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise CheckpointError(f"{path}: no checkpoint here (expected {WEIGHTS}, step-NNNNNNNN folders or checkpoints/)")


def state_dict_mismatch(expected: Mapping[str, tuple[int, ...]], state: Mapping[str, torch.Tensor]) -> str | None:
    """Why `state` does not fit a model of `expected` names and shapes, naming the tensor and both shapes; or None."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        return (f"state dict does not match the model: missing {_first(missing)}, "
                f"unexpected {_first(unexpected)}")  # fmt: skip
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            return f"tensor {name}: checkpoint shape {tuple(state[name].shape)} != model shape {tuple(shape)}"
    return None


def _first(names: list[str], most: int = 8) -> list[str]:
    return names[:most] + ([f"... {len(names) - most} more"] if len(names) > most else [])


def _load_model_state(path: Path, model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    problem = state_dict_mismatch({k: tuple(v.shape) for k, v in model.state_dict().items()}, state)
    if problem:
        raise CheckpointError(f"{path}: cannot load {what}: {problem}")
    model.load_state_dict(state)


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any], TrainState]:
    """The model state dict, the trainer dict (optimizer, scheduler, rng) and the TrainState of a folder; a missing,
    damaged or incomplete file raises CheckpointError naming it."""
    path = Path(path)
    model = load_state_dict_file(path / WEIGHTS, CheckpointError)
    trainer = load_tensor_file(path / TRAINER, CheckpointError)
    if not isinstance(trainer, dict) or "rng" not in trainer:
        raise CheckpointError(f"{path / TRAINER}: not a trainer state (no rng)")
    state = read_json_object(path / STATE, ("step", "loader", "extra"), CheckpointError, "checkpoint state")
    if (
        not isinstance(state["step"], int)
        or not isinstance(state["loader"], dict)
        or not isinstance(state["extra"], dict)
    ):
        raise CheckpointError(f"{path / STATE}: step must be an integer, loader and extra objects")
    return model, trainer, TrainState(step=state["step"], loader=state["loader"], extra=state["extra"])


def trainer_state_part(path: Path, trainer: dict[str, Any], key: str) -> Any:
    """trainer[key] ('optimizer', 'scheduler') of the checkpoint at `path`, or a CheckpointError naming the file."""
    if key not in trainer:
        raise CheckpointError(f"{path / TRAINER}: no {key} state to resume from")
    return trainer[key]


def apply_rng_state(trainer: dict[str, Any]) -> None:
    """Put the RNG states a checkpoint saved back in place."""
    _set_rng_state(trainer["rng"])


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
) -> TrainState:
    """Load a checkpoint folder into the given objects (weights only) and return its TrainState."""
    model_state, trainer, state = read_checkpoint(path)
    _load_model_state(Path(path), model, model_state, "this checkpoint")
    if optimizer is not None:
        optimizer.load_state_dict(trainer_state_part(Path(path), trainer, "optimizer"))
    if scheduler is not None:
        scheduler.load_state_dict(trainer_state_part(Path(path), trainer, "scheduler"))
    if restore_rng:
        _set_rng_state(trainer["rng"])
    return state


def load_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Only the model's weights of a checkpoint folder (to start SFT from a pretrained run)."""
    path = Path(path)
    _load_model_state(path, model, load_state_dict_file(path / WEIGHTS, CheckpointError), "its weights")

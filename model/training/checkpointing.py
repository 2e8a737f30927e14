"""Training checkpoints: model, optimizer, schedule, step, loader state and RNG, written whole, the last k kept.

A checkpoint is a step folder `step-NNNNNNNN/` (its files: model/files/step_folder.py) written under a temporary name
and renamed, so a crash never leaves a half checkpoint that looks complete; `latest` (a one-line text file, replaced
atomically) names the newest. Everything is read back with `torch.load(..., weights_only=True)`. `load_checkpoint`
is the one way back in, for a plain module and an FSDP-sharded one alike.
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.files import step_folder, storage
from model.files.state_dicts import model_mismatch
from model.files.step_folder import TRAINER, WEIGHTS, StepRecords

log = logging.getLogger(__name__)
LATEST = "latest"
PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be used, with its path."""


@dataclass
class TrainState:
    """What a resumed run needs besides the module states: the step, the loader's position, anything else small."""

    step: int
    loader: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    """This process's torch, Python (and CUDA) RNG states, as a checkpoint keeps them."""
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


def checkpoint_dir(root: str | Path, step: int) -> Path | str:
    """`root`'s folder of checkpoint `step` (a Path, or a URL for a root on an object store)."""
    return storage.join(root, f"{PREFIX}{step:08d}")


def save_checkpoint(
    root: str | Path,
    state: TrainState,
    model: torch.nn.Module | dict[str, Any],
    optimizer: torch.optim.Optimizer | dict[str, Any] | None = None,
    scheduler: Any = None,
    keep_last: int = 3,
    records: StepRecords | None = None,
) -> Path:
    """Write checkpoint `step-NNNNNNNN` under `root`, point `latest` at it, and delete all but the last `keep_last`.

    `model` / `optimizer` may be modules or already gathered state dicts (FSDP gathers them on every rank first).
    `records` make the folder self-describing (model config, tokenizers, training kind): see StepRecords.
    """
    trainer: dict[str, Any] = {"rng": rng_state(), "step": state.step}
    if optimizer is not None:
        trainer["optimizer"] = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    if scheduler is not None:
        trainer["scheduler"] = scheduler.state_dict()
    weights = model if isinstance(model, dict) else model.state_dict()
    saved = {"step": state.step, "loader": state.loader, "extra": state.extra}
    final = checkpoint_dir(root, state.step)
    if storage.is_url(root):
        # No rename on a store: the folder is written locally, then uploaded with state.json last (its marker).
        with tempfile.TemporaryDirectory(prefix="cham-checkpoint-") as staging:
            local = step_folder.write_step_folder(
                Path(staging) / f"{PREFIX}{state.step:08d}", weights, trainer, saved, records
            )
            storage.remove(final)  # a partial folder of this step, from a save that was killed
            storage.upload_folder(local, final, last=step_folder.STATE)
    else:
        Path(root).mkdir(parents=True, exist_ok=True)
        # A writer killed mid-save leaves its hidden temporary; one run writes here at a time (RunLock): any is stale.
        for stale in Path(root).glob(f".{PREFIX}*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        step_folder.write_step_folder(final, weights, trainer, saved, records)
    finish_checkpoint(root, final, keep_last)
    return final


def finish_checkpoint(root: str | Path, final: str | Path, keep_last: int) -> None:
    """Point `latest` at the whole checkpoint `final` and delete all but the last `keep_last`."""
    storage.write_text(storage.join(root, LATEST), f"{folder_name(final)}\n")
    for old in list_checkpoints(root)[:-keep_last]:
        storage.remove(old)


def folder_name(folder: str | Path) -> str:
    return str(folder).rstrip("/").rsplit("/", 1)[-1]


def list_checkpoints(root: str | Path) -> list[Path | str]:
    """Complete checkpoint folders under `root` (a path or a store's URL), oldest first."""
    folders = [storage.join(root, name) for name in storage.list_names(root) if _is_step_name(name)]
    return [f for f in folders if step_folder.is_complete(f)]


# `latest` holds one short line; a larger file is not a pointer we wrote (read no more than this to say so).
_POINTER_MAX_BYTES = 256


def read_latest_pointer(pointer: str | Path) -> str:
    """The folder name the `latest` file names; a file that is not one line naming a step folder (binary, damaged,
    a path elsewhere) raises CheckpointError naming it."""
    try:
        data = storage.read_head(pointer, _POINTER_MAX_BYTES)
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
        raise CheckpointError(
            f"{pointer}: not a checkpoint pointer ({why}; expected one line naming a "
            f"{PREFIX}NNNNNNNN folder): fix it, or delete it to resume from the newest complete "
            f"checkpoint"
        )
    return name


def _is_step_name(name: str) -> bool:
    return name.startswith(PREFIX) and name[len(PREFIX) :].isdigit() and name.isascii()


def latest_checkpoint(root: str | Path) -> Path | str | None:
    """The folder `latest` names, else the newest complete one, else None. A damaged `latest` raises
    CheckpointError naming it."""
    pointer = storage.join(root, LATEST)
    found = list_checkpoints(root)
    if storage.exists(pointer):
        named = storage.join(root, read_latest_pointer(pointer))
        if step_folder.is_complete(named):
            return named
        # A checkpoint was lost (or `latest` edited): say so rather than quietly go back further.
        log.warning(
            "%s names %s, which is not a complete checkpoint; %s",
            pointer,
            folder_name(named),
            f"using {folder_name(found[-1])}" if found else "no other is",
        )
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """The folder holding the weights for `path`, or a CheckpointError saying why not. On a store (a URL) the
    folder is copied into this machine's cache and the copy returned.

    `path` may be a training run's `out_dir`, its `checkpoints/` folder or the `latest` file there (the newest step
    is used), one `step-NNNNNNNN` folder, or any folder with a `model.pt` (our `convert` format), or that file.
    """
    if storage.is_url(path):
        return _resolve_on_store(str(path))
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if path.is_file() and path.name in (LATEST, WEIGHTS):  # a file of the folder meant
        path = path.parent
    if step_folder.has_weights(path):
        return path
    for root in (path, path / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise CheckpointError(f"{path}: no checkpoint here (expected {WEIGHTS}, step-NNNNNNNN folders or checkpoints/)")


def _check_model_state(path: Path, model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    # A sharded (FSDP2) model's state dict holds DTensors of the full shapes, so one check serves both.
    problem = model_mismatch({k: tuple(v.shape) for k, v in model.state_dict().items()}, state)
    if problem:
        raise CheckpointError(f"{path}: cannot load {what}: {problem}")


def _trainer_part(path: Path, trainer: dict[str, Any], key: str) -> Any:
    """trainer[key] ('optimizer', 'scheduler') of the checkpoint at `path`, or a CheckpointError naming the file."""
    if key not in trainer:
        raise CheckpointError(f"{path / TRAINER}: no {key} state to resume from")
    return trainer[key]


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
    sharded: bool = False,
) -> TrainState:
    """Load a checkpoint folder into the given objects and return its TrainState. Everything is read and checked
    before anything is loaded, so a bad checkpoint changes nothing.

    `sharded`: `model` (and `optimizer`) are FSDP2-sharded (every rank calls this). A gathered checkpoint's full
    states are scattered into the shards; a sharded one (sharded_checkpoint.py) is read by each rank for its own
    shards, whatever number of ranks wrote it."""
    remote = path if storage.is_url(path) else None
    if remote is not None:
        # A step folder on a store: its small files (and a full checkpoint's model.pt) are copied here and read as
        # a local folder; a sharded one's shards are read from the store by every rank, each what it needs.
        path = fetch_step_folder(remote)
    path = Path(path)
    trainer = step_folder.read_trainer(path, CheckpointError)
    saved = step_folder.read_state(path, CheckpointError)
    state = TrainState(step=saved["step"], loader=saved["loader"], extra=saved["extra"])
    scheduler_state = _trainer_part(path, trainer, "scheduler") if scheduler is not None else None
    if step_folder.is_sharded(remote or path):
        from model.training.sharded_checkpoint import load_sharded_states

        load_sharded_states(remote or path, model, optimizer)
    else:
        model_state = step_folder.read_weights(path, CheckpointError)
        _check_model_state(path, model, model_state, "this checkpoint")
        optimizer_state = _trainer_part(path, trainer, "optimizer") if optimizer is not None else None
        _load_full_states(model, optimizer, model_state, optimizer_state, sharded)
    if scheduler is not None:
        scheduler.load_state_dict(scheduler_state)
    if restore_rng:
        _set_rng_state(trainer["rng"])
    return state


def fetch_step_folder(location: str, shards: bool = False) -> Path:
    """A local copy of the files of a step folder on a store, in this machine's cache; its sharded/ too with
    `shards` (to gather the model in one process: inference, conversion), not otherwise (a resuming rank reads its
    own shards from the store)."""
    folder = storage.default_cache_root() / "checkpoints" / storage.cache_key(location)
    storage.remove(folder)  # a copy of an older folder of the same name (a step saved again)
    try:
        storage.download_folder(location, folder)
        if shards and step_folder.is_sharded(location):
            storage.download_folder(storage.join(location, step_folder.SHARDED), folder / step_folder.SHARDED)
    except FileNotFoundError:
        raise CheckpointError(f"{location}: no such checkpoint folder") from None
    return folder


def _resolve_on_store(location: str) -> Path:
    """resolve_checkpoint of a URL: the step folder it names (or the latest under it, or under its checkpoints/),
    copied into the local cache whole."""
    location = location.rstrip("/")
    if folder_name(location) == LATEST:
        location = location.rsplit("/", 1)[0]
    if step_folder.is_complete(location):
        return fetch_step_folder(location, shards=True)
    for root in (location, storage.join(location, "checkpoints")):
        found = latest_checkpoint(root)
        if found is not None:
            return fetch_step_folder(str(found), shards=True)
    raise CheckpointError(f"{location}: no checkpoint here (expected step-NNNNNNNN folders or checkpoints/)")


def _load_full_states(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    model_state: dict[str, Any],
    optimizer_state: dict[str, Any] | None,
    sharded: bool,
) -> None:
    # An optimizer state keyed by parameter names (a gathered FSDP2 save, a consolidated sharded one) goes through
    # set_optimizer_state_dict; one keyed by parameter indices (optimizer.state_dict()) loads as it is.
    by_name = optimizer_state is not None and any(isinstance(k, str) for k in optimizer_state.get("state", {}))
    if sharded or by_name:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        if sharded:
            set_model_state_dict(model, model_state, options=options)
        else:
            model.load_state_dict(model_state)
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
        return
    model.load_state_dict(model_state)
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state)


def gathered_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The full (unsharded) model and optimizer state dicts of an FSDP2-sharded model, on the CPU, as a checkpoint
    holds them (every rank calls this: it communicates)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Only the model's weights of a checkpoint folder (to start SFT from a pretrained run)."""
    path = Path(path)
    weights = step_folder.read_weights(path, CheckpointError)
    _check_model_state(path, model, weights, "its weights")
    model.load_state_dict(weights)

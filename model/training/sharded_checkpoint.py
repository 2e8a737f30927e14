"""Sharded training checkpoints: every rank writes its own shards (torch.distributed.checkpoint), in the background if
asked, and a checkpoint counts only once it is whole.

A save writes the model and optimizer states (`get_state_dict`: each rank's DTensor shards under FSDP2, the replicated
tensors once under DDP) into `.step-NNNNNNNN.sharded.tmp/sharded/`, every rank in parallel. DCP's coordinator writes
`.metadata` only after every rank has reported its files, so when rank 0's save is done the data is all there; rank 0
then writes the small files (trainer.pt: schedule and RNG; the records; state.json last) and renames the folder to
`step-NNNNNNNN`, points `latest` at it and prunes to the last k, as for a gathered checkpoint (checkpointing.py). A
killed save leaves only the hidden temporary, never a folder that looks complete; the next save removes it.

Asynchronous saves copy this rank's shards to host memory (the only host memory a save needs: one rank's shard, never
the full model) and write them from a thread while training goes on, on a gloo group of their own so their
collectives never interleave with the step's. At most one is in flight: the next save, or the end of training, waits
for it. Loading (`load_sharded_states`) reads on every rank only what its shards need, on any number of ranks.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from model.files import step_folder, storage
from model.files.state_dicts import model_mismatch
from model.files.step_folder import SHARDED, StepRecords
from model.training.checkpointing import (
    PREFIX,
    CheckpointError,
    TrainState,
    checkpoint_dir,
    finish_checkpoint,
    rng_state,
)

log = logging.getLogger(__name__)
# DCP warns on every single-process save and load that it assumes one process; for a 1-rank run that is the intent.
warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized", UserWarning)
TMP_SUFFIX = ".sharded.tmp"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def temporary_dir(root: Path, step: int) -> Path:
    """Where every rank writes checkpoint `step` before rank 0 renames it into place."""
    return root / f".{checkpoint_dir(root, step).name}{TMP_SUFFIX}"


@dataclass
class _Pending:
    """A save whose shards are being written: what rank 0 finishes it with once they are."""

    future: Future | None
    tmp: Path | str
    step: int
    trainer: dict[str, Any]
    state: dict[str, Any]
    records: StepRecords | None
    started: float


class ShardedCheckpointer:
    """Writes sharded step folders under `root` (a run's checkpoints/); every rank calls `save`, `poll` and `wait`.

    `async_save`: `save` returns once this rank's shards are copied to host memory; `poll` (each step) finishes a
    save whose writes are done, `wait` blocks until it is."""

    def __init__(self, root: str | Path, keep_last: int, async_save: bool = False, log_fn=print):
        self.root: Path | str = root if storage.is_url(root) else Path(root)
        self.keep_last, self.async_save, self.log = keep_last, async_save, log_fn
        self.distributed = _distributed()
        self.rank = dist.get_rank() if self.distributed else 0
        # Background saves talk over a gloo group of their own: a collective from the writer thread on the training
        # group could interleave with the step's all-reduces in another order on another rank.
        self.group = dist.new_group(backend="gloo") if async_save and self.distributed else None
        self.pending: _Pending | None = None

    def save(
        self,
        state: TrainState,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        records: StepRecords | None = None,
    ) -> None:
        """Start writing checkpoint `state.step` (and finish it unless asynchronous); waits for the one in flight."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.wait()
        # On a store (no rename) the ranks write into the step folder itself, which counts once state.json is there.
        tmp = (
            checkpoint_dir(self.root, state.step) if storage.is_url(self.root) else temporary_dir(self.root, state.step)
        )
        if self.rank == 0:
            if storage.is_url(self.root):
                storage.remove(tmp)  # a partial folder of this step, from a save that was killed
            else:
                self.root.mkdir(parents=True, exist_ok=True)
                # A save killed before it finished leaves its temporary; one run writes here at a time (RunLock).
                for stale in self.root.glob(f".{PREFIX}*.tmp"):
                    shutil.rmtree(stale, ignore_errors=True)
                (tmp / SHARDED).mkdir(parents=True)
        if self.distributed:
            dist.barrier()  # no rank writes into the temporary before it is there, and clean
        model_state, optimizer_state = get_state_dict(model, optimizer)
        payload = {"model": model_state, "optimizer": optimizer_state}
        trainer: dict[str, Any] = {"rng": rng_state(), "step": state.step}
        if scheduler is not None:
            trainer["scheduler"] = scheduler.state_dict()
        pending = _Pending(
            None,
            tmp,
            state.step,
            trainer,
            {"step": state.step, "loader": state.loader, "extra": state.extra},
            records,
            time.perf_counter(),
        )
        checkpoint_id = str(storage.join(tmp, SHARDED))
        if self.async_save:
            pending.future = dcp.async_save(
                payload, checkpoint_id=checkpoint_id, process_group=self.group, no_dist=not self.distributed
            )
            self.pending = pending
        else:
            dcp.save(payload, checkpoint_id=checkpoint_id, no_dist=not self.distributed)
            self._finish(pending)

    def poll(self) -> None:
        """Finish the save in flight if its writes are done (never blocks)."""
        if self.pending is not None and self.pending.future is not None and self.pending.future.done():
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight is written and finished (a failed write raises here)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        if pending.future is not None:
            pending.future.result()
        self._finish(pending)

    def _finish(self, pending: _Pending) -> None:
        if self.rank != 0:
            return
        final = checkpoint_dir(self.root, pending.step)
        if storage.is_url(self.root):
            with tempfile.TemporaryDirectory(prefix="cham-checkpoint-") as staging:
                torch.save(pending.trainer, Path(staging) / step_folder.TRAINER)
                step_folder.write_step_state(Path(staging), pending.state, pending.records)
                storage.upload_folder(Path(staging), final, last=step_folder.STATE)
        else:
            torch.save(pending.trainer, pending.tmp / step_folder.TRAINER)
            step_folder.write_step_state(pending.tmp, pending.state, pending.records)
            if final.exists():  # a folder of this step from a run that died after it: this one replaces it
                shutil.rmtree(final)
            pending.tmp.rename(final)
        finish_checkpoint(self.root, final, self.keep_last)
        log.info("checkpoint %s written in %.2f s", final, time.perf_counter() - pending.started)


def load_sharded_states(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a sharded step folder's model (and optimizer) into `model` (and `optimizer`), on any number of ranks:
    each rank reads what its own shards (or replicas) need. The model's names and shapes are checked against the
    checkpoint's metadata first, so a checkpoint of another model changes nothing and names the first difference."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    shapes = step_folder.sharded_shapes(path, "model", CheckpointError)
    problem = model_mismatch({k: tuple(v.shape) for k, v in model.state_dict().items()}, shapes)
    if problem:
        raise CheckpointError(f"{storage.join(path, SHARDED)}: cannot load this checkpoint: {problem}")
    if optimizer is not None and not step_folder.sharded_shapes(path, "optimizer", CheckpointError):
        raise CheckpointError(f"{storage.join(path, SHARDED)}: no optimizer state to resume from")
    if optimizer is None:
        payload: dict[str, Any] = {"model": get_model_state_dict(model)}
    else:
        # get_state_dict creates AdamW's (empty) state first, so there are tensors to read into.
        model_state, optimizer_state = get_state_dict(model, optimizer)
        payload = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(payload, checkpoint_id=str(storage.join(path, SHARDED)), no_dist=not _distributed())
    except CheckpointException as err:  # every rank's failure (a missing or truncated file), gathered
        raise CheckpointError(
            f"{storage.join(path, SHARDED)}: cannot read it ({step_folder.dcp_failure(err)})"
        ) from None
    if optimizer is None:
        set_model_state_dict(model, payload["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=payload["model"], optim_state_dict=payload["optimizer"])


def consolidate_checkpoint(folder: str | Path, out: str | Path | None = None) -> Path:
    """Write the single-file step folder of sharded step folder `folder` at `out` (default: `folder` + '-full'):
    model.pt, trainer.pt with the optimizer, the records and state.json, as a gathered save writes them. It loads
    and resumes like one (on any number of ranks). Needs the full model and optimizer in this process's memory."""
    folder = Path(folder)
    if not step_folder.is_complete(folder):
        raise CheckpointError(f"{folder}: not a complete step folder (no {step_folder.STATE})")
    if not step_folder.is_sharded(folder):
        raise CheckpointError(f"{folder}: not a sharded checkpoint (no {SHARDED}/.metadata): nothing to consolidate")
    out = Path(out) if out is not None else folder.with_name(folder.name + "-full")
    if out.resolve() == folder.resolve():
        raise CheckpointError(f"{out}: the consolidated folder must be another folder than the sharded one")
    trainer = step_folder.read_trainer(folder, CheckpointError)
    weights = step_folder.read_sharded(folder, "model", CheckpointError)
    optimizer = step_folder.read_sharded(folder, "optimizer", CheckpointError)
    state = step_folder.read_state(folder, CheckpointError)
    records = None
    if (folder / step_folder.MODEL_CONFIG).is_file():
        records = StepRecords(
            model_config=step_folder.read_model_config(folder, CheckpointError),
            tokenizers=step_folder.read_tokenizers_record(folder, CheckpointError),
            training=step_folder.read_training_record(folder, CheckpointError),
        )
    return step_folder.write_step_folder(out, weights, {**trainer, "optimizer": optimizer}, state, records)

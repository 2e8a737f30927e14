"""The trainer for pretraining and SFT: Chameleon's recipe on stage shards, resumable exactly, DDP under torchrun.

One optimizer step = `global_batch_size` sequences: each rank runs `accumulation` micro-batches of
`micro_batch_size`, and the step's loss is the mean over all its supervised targets, on all ranks. A step whose
gradients are not finite, or that has no supervised target, is not applied (and counted). Checkpoints hold the
model, optimizer, schedule, step, loader position and RNG; a run resumes from the latest one by itself.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from model.files.step_folder import StepRecords
from model.lm.document_attention import resolve_document_attention
from model.tokenizers.vocabulary import Modality, Vocabulary
from model.training.checkpointing import (
    LATEST,
    CheckpointError,
    TrainState,
    gathered_states,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from model.training.lr_schedule import make_scheduler
from model.training.metrics import MetricsSink, StepMetrics, close_sinks, open_sinks
from model.training.mfu import device_peak_flops, flops_per_token, matmul_params
from model.training.optim import clip_and_check, make_optimizer
from model.training.parallelize import build_model
from model.training.run_lock import RunLock, RunLockedError
from model.training.sharded_checkpoint import ShardedCheckpointer
from model.training.stage_loader import CorruptShardError, ResumeMismatchError, StageLoader
from schemas.train_config import SFTConfig, TrainConfig
from schemas.vocab import VocabLayout

# What bad configs, data, checkpoints or output paths raise: reported as one line by `cham train` and its workers.
INPUT_ERRORS = (ValueError, OSError, CheckpointError, CorruptShardError, ResumeMismatchError, RunLockedError)


class Trainer:
    """Pretraining (TrainConfig) or SFT (SFTConfig) of the Chameleon transformer on one stage."""

    def __init__(self, config: TrainConfig, log: Callable[[str], None] = print):
        self.config, self.log = config, log
        self.rank, self.world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.out_dir = Path(config.out_dir)
        # Rank 0 writes the run (checkpoints, metrics): another live trainer of this out_dir is refused at once,
        # before the model is built; train() holds the lock while it writes.
        self.run_lock = RunLock(self.out_dir) if self.rank == 0 else None
        if self.run_lock is not None:
            self.run_lock.check()
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        local = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        per_step = config.micro_batch_size * self.world_size
        if config.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size {config.global_batch_size} is not a multiple of micro_batch_size "
                f"{config.micro_batch_size} x {self.world_size} ranks"
            )
        self.accumulation = config.global_batch_size // per_step
        model_config = config.model
        if isinstance(config, SFTConfig):
            model_config = model_config.model_copy(update={"dropout": config.dropout})
        # One code path: DDP replicates the model, FSDP2 shards each block (built on the meta device, initialised per
        # shard: for models that don't fit one device); init_from's weights loaded, blocks checkpointed and compiled.
        built = build_model(config, model_config, self.device, self.world_size, log)
        self.model, self.module, self.fsdp = built.model, built.module, built.fsdp
        self.autocast_dtype = built.autocast_dtype
        if config.document_masking:
            if config.document_attention == "flex" and self.device.type != "cuda":
                raise ValueError(
                    "document_attention 'flex' needs a CUDA device (FlexAttention has no CPU backward); "
                    "use 'auto' or 'sdpa'"
                )
            kernel = resolve_document_attention(config.document_attention, self.device, model_config.head_dim)
            self.model.document_attention = config.document_attention
            if kernel == "flex":  # the first step is slow while it compiles: say so
                log("document masking through FlexAttention (compiled on the first step)")
        self.optimizer = make_optimizer(self.model, config.optimizer)
        self.scheduler = make_scheduler(self.optimizer, config.steps, config.schedule)
        self.loader = StageLoader(
            config.data,
            batch_size=config.micro_batch_size,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=config.loader_workers,
            skip_corrupt=config.skip_corrupt_shards,
            global_batch_size=config.global_batch_size,
        )
        self.seq_len = stage_seq_len(config, self.loader.seq_len, model_config.max_seq_len)
        layout = VocabLayout.model_validate(self.loader.manifest["vocab_layout"])
        if layout.vocab_size != model_config.vocab_size:
            raise ValueError(f"the stage's vocabulary has {layout.vocab_size} ids, the model {model_config.vocab_size}")
        self.image_mask = Vocabulary(layout).mask(Modality.IMAGE, Modality.BOI, Modality.EOI).to(self.device)
        # A step folder is self-describing (our `convert` format plus the tokenizers): generate/eval need nothing else.
        manifest = self.loader.manifest
        self.records = StepRecords(
            model_config=model_config.model_copy(update={"dropout": 0.0}),
            tokenizers={**manifest.get("tokenizers", {}), "vocab_layout": manifest["vocab_layout"]},
            training={
                "kind": "sft" if isinstance(config, SFTConfig) else "pretrain",
                "data": str(config.data),
                "stage": manifest.get("stage"),
            },
        )
        self.ckpt_dir = self.out_dir / "checkpoints"
        checkpoint = config.checkpoint
        sharded = checkpoint.format == "sharded" or (checkpoint.format == "auto" and self.fsdp)
        if checkpoint.async_save and not sharded:
            raise ValueError("checkpoint.async_save needs sharded checkpoints: set checkpoint.format to sharded")
        self.checkpointer = (
            ShardedCheckpointer(self.ckpt_dir, checkpoint.keep_last, checkpoint.async_save) if sharded else None
        )
        self.step, self.skipped, self.damaged = 0, 0, 0
        self.flops_per_token = flops_per_token(
            matmul_params(self.model), model_config.n_layers, model_config.dim, self.seq_len
        )
        self.peak = device_peak_flops(self.device)
        self._resume()

    def _resume(self) -> None:
        found = latest_checkpoint(self.ckpt_dir)
        if found is None:
            pointer = self.ckpt_dir / LATEST
            if pointer.is_file():  # starting over would overwrite a run whose checkpoints are lost
                raise CheckpointError(
                    f"{pointer} names a checkpoint that is not there, and no other is complete: "
                    f"restore it, or delete the file to start from step 0"
                )
            return
        state = load_checkpoint(found, self.model, self.optimizer, self.scheduler, sharded=self.fsdp)
        self.step, self.skipped = state.step, int(state.extra.get("skipped_steps", 0))
        self.damaged = int(state.extra.get("damaged_sequences", 0))
        self.loader.load_state_dict(state.loader, allow_fingerprint_change=self.config.allow_data_change)
        self.log(f"resumed from {found} at step {self.step}")

    def _autocast(self) -> Any:
        # bf16 autocast, except under FSDP2's mixed-precision policy on CUDA (model/training/parallelize.py).
        if self.autocast_dtype is not None:
            return torch.autocast(self.device.type, dtype=self.autocast_dtype)
        return nullcontext()

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:  # epochs follow each other; the loader keeps its own position
            yield from self.loader

    def train(self, stop_at: int | None = None, extra_sinks: Sequence[MetricsSink] = ()) -> list[StepMetrics]:
        """Run to `config.steps` (or stop early at `stop_at`), checkpointing as configured; returns the metrics.

        Each step's metrics go to the sinks `config.logging` asks for (model/training/metrics.py) and to
        `extra_sinks`, which the caller opens and closes."""
        config, history = self.config, []
        last = min(config.steps, stop_at) if stop_at is not None else config.steps
        batches = self._batches()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.run_lock is not None:
            self.run_lock.acquire()
        sinks: list[MetricsSink] = []
        try:
            # Rank 0 writes metrics.jsonl and TensorBoard; the steps after the checkpoint resumed from are redone, so
            # the sinks drop what the run that died recorded of them.
            sinks = open_sinks(config.logging, self.out_dir, self.step, config.steps, self.log, self.rank == 0)
            while self.step < last:
                metrics = self._step(batches)
                if self.checkpointer is not None:
                    self.checkpointer.poll()  # a background save whose writes are done becomes a checkpoint
                for sink in (*sinks, *extra_sinks):
                    sink.write(metrics)
                if self.step % config.checkpoint.every_steps == 0 or self.step == config.steps:
                    self.save()
                history.append(metrics)
            if self.checkpointer is not None:
                self.checkpointer.wait()
        finally:
            try:
                close_sinks(sinks)
            finally:
                if self.run_lock is not None:
                    self.run_lock.release()
        return history

    def _step(self, batches: Iterator[dict[str, torch.Tensor]]) -> StepMetrics:
        """One optimizer step over `accumulation` micro-batches; returns what it measured (recording it is the
        sinks' job, in `train`)."""
        config = self.config
        self.module.train()
        started = time.perf_counter()
        waited, micro_batches = 0.0, []
        for _ in range(self.accumulation):
            t = time.perf_counter()
            micro_batches.append({k: v.to(self.device) for k, v in next(batches).items()})
            waited += time.perf_counter() - t
        # Every supervised target of the global batch weighs the same. Each micro-batch's loss is a mean over its
        # own targets, so it is scaled by its share of the step's targets on all ranks; 1/accumulation would make a
        # mean of means, over-weighting micro-batches with few targets (short SFT answers, padding). DDP and FSDP
        # average gradients over ranks, hence the factor world_size.
        counts = torch.stack([b["loss_mask"][:, 1:].sum() for b in micro_batches]).double()
        total = counts.sum()
        if self.world_size > 1:
            dist.all_reduce(total)
        scales = (counts * self.world_size / total.clamp(min=1)).float()
        # Sums over the step's targets, kept on the device (one host sync per step): loss, ce, z, ce_text * n_text,
        # ce_image * n_image, n_text, n_image, and the damaged sequences read as padding (skip_corrupt_shards).
        sums = torch.zeros(8, dtype=torch.float64, device=self.device)
        sums[7] = torch.stack([b["damaged"].sum() for b in micro_batches]).sum()
        for micro, batch in enumerate(micro_batches):
            sync = micro == self.accumulation - 1 or self.world_size == 1 or self.fsdp
            context = nullcontext() if sync else self.module.no_sync()  # DDP: all-reduce once per step
            with context, self._autocast():
                # The loss is fused into the forward (no [B, S, vocab] logits); see Transformer.forward.
                out = self.module(
                    batch["tokens"],
                    positions=batch["positions"],
                    doc_ids=batch["doc_ids"] if config.document_masking else None,
                    loss_mask=batch["loss_mask"],
                    z_loss_weight=config.z_loss,
                    image_token_mask=self.image_mask,
                    loss_chunk_size=config.loss_chunk_size,
                )
            (out.loss * scales[micro]).backward()
            n = counts[micro]
            sums[:7] += torch.stack(
                [
                    out.loss.detach() * n,
                    out.ce * n,
                    out.z_loss * n,
                    out.ce_text * out.n_text,
                    out.ce_image * out.n_image,
                    out.n_text,
                    out.n_image,
                ]
            ).double()
        if self.world_size > 1:
            dist.all_reduce(sums)
        loss, ce, z, text, image, n_text, n_image, damaged = sums.tolist()
        if damaged:
            self.damaged += int(damaged)
            self.log(f"step {self.step + 1}: {int(damaged)} damaged sequences read as padding (no targets)")
        supervised = int(total)
        positions = sum(b["tokens"].numel() for b in micro_batches)
        grad_norm, finite = self._clip()
        if finite and supervised:
            self.optimizer.step()
        else:  # AdamW would still move the weights (momentum, decay) on a batch with nothing to learn from
            self.skipped += 1
            why = f"non-finite gradients (norm {grad_norm})" if not finite else "no supervised targets in the batch"
            self.log(f"step {self.step + 1}: {why}; update skipped")
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        seconds = time.perf_counter() - started
        per_target = max(1, supervised)
        return StepMetrics(
            step=self.step,
            loss=loss / per_target,
            ce=ce / per_target,
            ce_text=text / n_text if n_text else None,
            ce_image=image / n_image if n_image else None,
            z_loss=z / per_target,
            grad_norm=float(grad_norm),
            lr=lr,
            tokens=positions * self.world_size,
            supervised_tokens=supervised,
            tokens_per_s=positions * self.world_size / seconds,
            data_wait_share=waited / seconds,
            # Per device: this rank's positions against this device's peak.
            mfu=(positions / seconds * self.flops_per_token / self.peak) if self.peak else None,
            skipped_steps=self.skipped,
            damaged_sequences=self.damaged,
        )

    def _clip(self) -> tuple[float, bool]:
        if not self.fsdp:
            return clip_and_check(self.model, self.config.optimizer.grad_clip)
        # Sharded gradients: torch computes the global norm across ranks as a DTensor.
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optimizer.grad_clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        return float(norm), bool(torch.isfinite(norm))

    def save(self) -> None:
        """Checkpoint: sharded, every rank its own shards (possibly in the background); or full, on rank 0 (the
        loader position is the same on every rank), FSDP gathering the full states first."""
        extra = {"skipped_steps": self.skipped, "damaged_sequences": self.damaged}
        if self.checkpointer is not None:
            state = TrainState(self.step, self.loader.state_dict(), extra)
            self.checkpointer.save(state, self.model, self.optimizer, self.scheduler, self.records)
            return
        model_state: Any = self.model
        optimizer_state: Any = self.optimizer
        if self.fsdp:
            model_state, optimizer_state = gathered_states(self.model, self.optimizer)
        if self.rank == 0:
            state = TrainState(self.step, self.loader.state_dict(), extra)
            save_checkpoint(
                self.ckpt_dir,
                state,
                model_state,
                optimizer_state,
                self.scheduler,
                keep_last=self.config.checkpoint.keep_last,
                records=self.records,
            )
        if self.world_size > 1:
            dist.barrier()


def stage_seq_len(config: TrainConfig, packed: int, max_seq_len: int) -> int:
    """The run's sequence length: `packed`, the one the stage was packed to (its manifest.json), which
    `config.seq_len` may restate but not change; it must fit the model."""
    if config.seq_len is not None and config.seq_len != packed:
        raise ValueError(
            f"the stage at {config.data} has sequences of {packed}, config.seq_len is "
            f"{config.seq_len}: leave seq_len out to use the stage's"
        )
    if packed > max_seq_len:
        raise ValueError(
            f"the stage at {config.data} has sequences of {packed}, longer than the model's max_seq_len {max_seq_len}"
        )
    return packed

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

from model.files import storage
from model.files.run_lock import LOCK_FILE, RunLock, RunLockedError
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
from model.training.lr_schedule import lr_at, make_scheduler
from model.training.metrics import METRICS_FILE, MetricsSink, StepMetrics, close_sinks, open_sinks
from model.training.mfu import device_peak_flops, flops_per_token, matmul_params
from model.training.optim import clip_and_check, make_optimizer
from model.training.parallelize import build_model
from model.training.sharded_checkpoint import ShardedCheckpointer
from model.training.stage_loader import CorruptShardError, ResumeMismatchError, StageLoader, StoreCache
from model.training.training_eval import HeldOutEvaluator, StepEvaluator
from schemas.train_config import SFTConfig, TrainConfig
from schemas.vocab import VocabLayout

# What bad configs, data, checkpoints or output paths raise: reported as one line by `cham train` and its workers.
INPUT_ERRORS = (ValueError, OSError, CheckpointError, CorruptShardError, ResumeMismatchError, RunLockedError)


class Trainer:
    """Pretraining (TrainConfig) or SFT (SFTConfig) of the Chameleon transformer on one stage."""

    def __init__(self, config: TrainConfig, log: Callable[[str], None] = print):
        self.config, self.log = config, log
        # Evaluations beside held-out loss at config.eval's steps (model/evaluation/benchmarks/during_training.py).
        self.evaluators: list[StepEvaluator] = []
        self.rank, self.world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        # A run into an object store (out_dir: s3://...) keeps its lock, metrics.jsonl and TensorBoard files in a local
        # mirror, uploaded at every checkpoint and at the end; its checkpoints go to the store directly.
        self.remote_out = str(config.out_dir) if storage.is_url(config.out_dir) else None
        self.out_dir = storage.local_mirror(config.out_dir)
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
        # Every stage of the run is indexed now: a stage that does not fit the model or the others fails before step 0.
        self.plan = config.stage_plan()
        self.loaders = [
            StageLoader(
                stage.data,
                batch_size=config.micro_batch_size,
                rank=self.rank,
                world_size=self.world_size,
                num_workers=config.loader_workers,
                skip_corrupt=config.skip_corrupt_shards,
                global_batch_size=config.global_batch_size,
                cache=StoreCache(
                    config.data_cache.dir, config.data_cache.max_bytes, config.data_cache.read_ahead_shards
                ),
            )
            for stage in self.plan
        ]
        self.stage = 0  # the stage whose loader is in use
        self.seq_len = stage_seq_len(config, self.loaders[0], model_config.max_seq_len)
        layout = VocabLayout.model_validate(self.loader.manifest["vocab_layout"])
        if layout.vocab_size != model_config.vocab_size:
            raise ValueError(f"the stage's vocabulary has {layout.vocab_size} ids, the model {model_config.vocab_size}")
        for loader in self.loaders[1:]:
            check_stage_fits(self.loaders[0], loader)
        self.image_mask = Vocabulary(layout).mask(Modality.IMAGE, Modality.BOI, Modality.EOI).to(self.device)
        if config.eval is not None:  # a wrong held-out stage fails now, not at the first evaluation
            HeldOutEvaluator.check(config.eval, model_config.vocab_size)
        self.model_config = model_config
        self.ckpt_dir = config.checkpoint.dir or storage.join(config.out_dir, "checkpoints")
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

    @property
    def loader(self) -> StageLoader:
        """The loader of the stage being trained on."""
        return self.loaders[self.stage]

    @property
    def records(self) -> StepRecords:
        """What makes a step folder self-describing (our `convert` format plus the tokenizers and the stage):
        generate and eval need nothing else."""
        manifest = self.loader.manifest
        return StepRecords(
            model_config=self.model_config.model_copy(update={"dropout": 0.0}),
            tokenizers={**manifest.get("tokenizers", {}), "vocab_layout": manifest["vocab_layout"]},
            training={
                "kind": "sft" if isinstance(self.config, SFTConfig) else "pretrain",
                "data": str(self.plan[self.stage].data),
                "stage": manifest.get("stage"),
            },
        )

    def stage_at(self, step: int) -> int:
        """The stage optimizer step `step` (0-based) reads (the last stage from the last step on)."""
        return next((p.index for p in self.plan if step < p.end_step), len(self.plan) - 1)

    def _plan_record(self) -> dict[str, Any]:
        """What a checkpoint keeps of the plan, to refuse a resume that would not continue it."""
        stages = [
            {
                "data": str(p.data),
                "stage": loader.manifest.get("stage"),
                "fingerprint": loader.fingerprint,
                "first_step": p.first_step,
                "end_step": p.end_step,
            }
            for p, loader in zip(self.plan, self.loaders, strict=True)
        ]
        return {"steps": self.config.steps, "stages": stages}

    def _check_plan(self, found: Path, extra: dict[str, Any], step: int) -> None:
        """Refuse to resume a checkpoint whose run had another schedule (steps) or other stages, unless the config
        asks to re-plan (replan_on_resume); a stage the run has begun must be the same stage, not re-mixed since."""
        config = self.config
        saved_steps = extra.get("steps")
        saved = extra.get("stages")
        now = self._plan_record()["stages"]
        spans_now = [(s["first_step"], s["end_step"]) for s in now]
        spans = [(s["first_step"], s["end_step"]) for s in saved] if saved is not None else spans_now
        changed = (saved_steps is not None and saved_steps != config.steps) or spans != spans_now
        if changed and not config.replan_on_resume:
            if saved_steps is not None and saved_steps != config.steps:
                raise CheckpointError(
                    f"{found} is from a run of {saved_steps} steps, whose lr schedule ends at step {saved_steps}; "
                    f"this config has steps: {config.steps}, which would resume on another schedule (the lr jumping "
                    f"to its value there). Set steps back to {saved_steps}, or set replan_on_resume: true to plan the "
                    f"schedule again over {config.steps} steps from step {step}"
                )
            raise CheckpointError(
                f"{found} is from a run whose stages span steps {spans}, this config's {spans_now}: keep the run's "
                f"stages and shares to resume it, or set replan_on_resume: true"
            )
        if changed:
            peak = config.optimizer.lr
            before = lr_at(step, saved_steps, peak, config.schedule) if saved_steps else None
            after = lr_at(step, config.steps, peak, config.schedule)
            # The optimizer holds the lr the old schedule set for this step: the new schedule's from here on.
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_lr(), strict=True):
                group["lr"] = lr
            self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
            self.log(
                f"re-planned on resume (replan_on_resume): {saved_steps} -> {config.steps} steps, stages {spans} -> "
                f"{spans_now}; the lr at step {step} goes from {before if before is None else f'{before:.3e}'} to "
                f"{after:.3e}"
            )
        if saved is None or config.allow_data_change or len(saved) != len(now):
            return
        for index, (was, is_now) in enumerate(zip(saved, now, strict=True)):
            if min(was["first_step"], is_now["first_step"]) >= step:
                break  # a stage not begun yet may be re-mixed before it starts
            if (was["stage"], was["fingerprint"]) != (is_now["stage"], is_now["fingerprint"]):
                raise CheckpointError(
                    f"{found}: stage {index + 1} of the run was {was['stage']!r} (dataset {was['fingerprint']}, "
                    f"{was['data']}); this config's is {is_now['stage']!r} (dataset {is_now['fingerprint']}, "
                    f"{is_now['data']}): the wrong stage, or re-mixed since. Point it at the stage the run trained "
                    f"on, or set allow_data_change: true"
                )

    def _resume(self) -> None:
        found = latest_checkpoint(self.ckpt_dir)
        if found is None:
            pointer = storage.join(self.ckpt_dir, LATEST)
            if storage.exists(pointer):  # starting over would overwrite a run whose checkpoints are lost
                raise CheckpointError(
                    f"{pointer} names a checkpoint that is not there, and no other is complete: "
                    f"restore it, or delete the file to start from step 0"
                )
            return
        state = load_checkpoint(found, self.model, self.optimizer, self.scheduler, sharded=self.fsdp)
        self._check_plan(found, state.extra, state.step)
        self.step, self.skipped = state.step, int(state.extra.get("skipped_steps", 0))
        self.damaged = int(state.extra.get("damaged_sequences", 0))
        # The saved loader is the one of the last step done; at a stage boundary, train() moves on to the next.
        self.stage = self.stage_at(max(self.step - 1, 0))
        self.loader.load_state_dict(state.loader, allow_fingerprint_change=self.config.allow_data_change)
        self.log(f"resumed from {found} at step {self.step}")

    def _autocast(self) -> Any:
        # bf16 autocast, except under FSDP2's mixed-precision policy on CUDA (model/training/parallelize.py).
        if self.autocast_dtype is not None:
            return torch.autocast(self.device.type, dtype=self.autocast_dtype)
        return nullcontext()

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        loader = self.loader  # this stage's, to the end of the run or of the stage
        while True:  # epochs follow each other; the loader keeps its own position
            yield from loader

    def train(self, stop_at: int | None = None, extra_sinks: Sequence[MetricsSink] = ()) -> list[StepMetrics]:
        """Run to `config.steps` (or stop early at `stop_at`), checkpointing as configured; returns the metrics.

        Each step's metrics go to the sinks `config.logging` asks for (model/training/metrics.py) and to
        `extra_sinks`, which the caller opens and closes."""
        config, history = self.config, []
        last = min(config.steps, stop_at) if stop_at is not None else config.steps
        batches, reading = self._batches(), self.stage
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.run_lock is not None:
            self.run_lock.acquire()
        sinks: list[MetricsSink] = []
        evaluator: HeldOutEvaluator | None = None
        try:
            self._fetch_run_files()
            # Rank 0 writes metrics.jsonl and TensorBoard; the steps after the checkpoint resumed from are redone, so
            # the sinks drop what the run that died recorded of them.
            sinks = open_sinks(config.logging, self.out_dir, self.step, config.steps, self.log, self.rank == 0)
            if config.eval is not None:
                evaluator = HeldOutEvaluator(
                    config.eval,
                    config.micro_batch_size,
                    config.document_masking,
                    self.out_dir,
                    self.step,
                    writes_files=self.rank == 0,
                    tensorboard=config.logging.tensorboard,
                    log=self.log,
                    evaluators=self.evaluators,
                )
            while self.step < last:
                if self.stage_at(self.step) != reading:  # a stage boundary: the next stage, from its start
                    self.stage = reading = self.stage_at(self.step)
                    batches = self._batches()
                    self.log(
                        f"stage {self.stage + 1}/{len(self.plan)} ({self.loader.manifest.get('stage')}) from step "
                        f"{self.step}: {self.plan[self.stage].data}"
                    )
                metrics = self._step(batches)
                if self.checkpointer is not None:
                    self.checkpointer.poll()  # a background save whose writes are done becomes a checkpoint
                for sink in (*sinks, *extra_sinks):
                    sink.write(metrics)
                if evaluator is not None and evaluator.due(self.step, config.steps):
                    evaluator.evaluate(self.module, self.step, self.device)
                if self.step % config.checkpoint.every_steps == 0 or self.step == config.steps:
                    self.save()
                    self._publish_run_files(sinks)
                history.append(metrics)
            if self.checkpointer is not None:
                self.checkpointer.wait()
        finally:
            try:
                close_sinks(sinks)
                if evaluator is not None:
                    evaluator.close()
                self._publish_run_files([])
            finally:
                if self.run_lock is not None:
                    self.run_lock.release()
        return history

    def _fetch_run_files(self) -> None:
        """A run into a store: its metrics.jsonl so far, into the local mirror (the sinks then drop redone steps)."""
        if self.remote_out is None or self.rank != 0:
            return
        remote = storage.join(self.remote_out, METRICS_FILE)
        if storage.exists(remote):
            storage.download(remote, self.out_dir / METRICS_FILE)

    def _publish_run_files(self, sinks: Sequence[MetricsSink]) -> None:
        """A run into a store: upload the local mirror's metrics.jsonl and TensorBoard files (not its lock)."""
        if self.remote_out is None or self.rank != 0:
            return
        for sink in sinks:
            flush = getattr(sink, "flush", None)
            if flush is not None:
                flush()
        for path in sorted(self.out_dir.rglob("*")):
            if path.is_file() and path.name != LOCK_FILE:
                storage.upload(path, storage.join(self.remote_out, *path.relative_to(self.out_dir).parts))

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
            stage=self.stage,
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
        extra = {"skipped_steps": self.skipped, "damaged_sequences": self.damaged, **self._plan_record()}
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


def stage_seq_len(config: TrainConfig, loader: StageLoader, max_seq_len: int) -> int:
    """The run's sequence length: the one `loader`'s stage was packed to (its manifest.json), which
    `config.seq_len` may restate but not change; it must fit the model."""
    packed, data = loader.seq_len, loader.stage_dir
    if config.seq_len is not None and config.seq_len != packed:
        raise ValueError(
            f"the stage at {data} has sequences of {packed}, config.seq_len is "
            f"{config.seq_len}: leave seq_len out to use the stage's"
        )
    if packed > max_seq_len:
        raise ValueError(
            f"the stage at {data} has sequences of {packed}, longer than the model's max_seq_len {max_seq_len}"
        )
    return packed


def check_stage_fits(first: StageLoader, other: StageLoader) -> None:
    """Every stage of one run has the first's sequence length and vocabulary (one model reads them all)."""
    if other.seq_len != first.seq_len:
        raise ValueError(
            f"the stage at {other.stage_dir} has sequences of {other.seq_len}, the run's first stage "
            f"({first.stage_dir}) {first.seq_len}: mix every stage of one run to the same seq_len"
        )
    if other.manifest["vocab_layout"] != first.manifest["vocab_layout"]:
        raise ValueError(
            f"the stage at {other.stage_dir} was tokenized with another vocabulary than the run's first stage "
            f"({first.stage_dir}): prepare and mix every stage with the same tokenizers"
        )

"""TrainConfig (pretraining) and SFTConfig: Chameleon's recipe as defaults, everything overridable."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from schemas.config_base import ExistingLocation, ExistingPath, OutputLocation, OutputPath, StrictModel
from schemas.model_config import ModelConfig

LrSchedule = Literal["warmup_exponential", "cosine", "constant"]
Precision = Literal["auto", "bf16", "fp32"]
Parallelism = Literal["auto", "ddp", "fsdp"]
# auto: FlexAttention on CUDA (fused, skips blocks outside documents), SDPA with a dense mask elsewhere.
DocumentAttention = Literal["auto", "sdpa", "flex"]


class OptimizerConfig(StrictModel):
    """AdamW; weight decay applies to weight matrices only."""

    lr: float = Field(1e-4, gt=0.0, description="peak learning rate")
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-5, gt=0.0)
    weight_decay: float = Field(0.1, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)

    @model_validator(mode="after")
    def _betas(self) -> OptimizerConfig:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must each be in [0, 1), got {list(self.betas)}")
        return self


class ScheduleConfig(StrictModel):
    """Learning-rate schedule: linear warm-up, then exponential decay to 0 at the last step (pretraining)."""

    kind: LrSchedule = "warmup_exponential"
    warmup_steps: int = Field(4000, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="lr at the last step, relative to the peak")


class CheckpointConfig(StrictModel):
    """When to save, how many to keep, and in which form; the trainer resumes from the latest by itself.

    full: rank 0 gathers the whole model and optimizer and writes model.pt and trainer.pt. sharded: every rank writes
    its own shards in parallel (torch.distributed.checkpoint), host memory bounded by one rank's shard; generate, eval
    and convert read either, `cham checkpoint consolidate` turns a sharded one into a full one. auto: sharded under
    FSDP2, full otherwise."""

    every_steps: int = Field(1000, gt=0)
    keep_last: int = Field(3, gt=0)
    dir: OutputLocation | None = Field(
        None, description="where checkpoints go: a path or an s3:// (gs://, az://) URL; default out_dir/checkpoints"
    )
    format: Literal["auto", "full", "sharded"] = "auto"
    async_save: bool = Field(
        False,
        description="sharded only: write each checkpoint in the background while training goes on (at most one in "
        "flight; it counts once its state.json is written)",
    )

    @model_validator(mode="after")
    def _check(self) -> CheckpointConfig:
        if self.async_save and self.format == "full":
            raise ValueError("async_save needs sharded checkpoints: set format to sharded (or auto under FSDP)")
        return self


class ActivationCheckpointConfig(StrictModel):
    """Which transformer blocks recompute their activations in the backward pass instead of keeping them.

    none: keep everything; full: every block; every_k_blocks: one block in every `every_k` (the first of each run of
    k); selective: every block keeps its matmul outputs and recomputes the rest (norms, activations, rotary)."""

    mode: Literal["none", "full", "every_k_blocks", "selective"] = "none"
    every_k: int = Field(2, gt=0, description="for every_k_blocks: one block in every k is checkpointed")


class TrainStage(StrictModel):
    """One stage of a pretraining run that spans several: its stage folder and its share of the run's steps."""

    data: ExistingLocation = Field(description="a stage folder written by `cham mix` (a path or an s3:// etc. URL)")
    share: float = Field(gt=0.0, le=1.0, description="the fraction of the run's steps trained on this stage")


@dataclass(frozen=True)
class PlannedStage:
    """A stage of the run as the trainer takes it: optimizer steps [first_step, end_step) read `data`."""

    index: int
    data: Path | str  # a local folder, or an object store's URL
    first_step: int
    end_step: int


class DataCacheConfig(StrictModel):
    """A stage on an object store (data: s3://...): each shard is copied whole into a local cache when first needed,
    the next ones ahead of need, the least recently used evicted past `max_bytes`."""

    dir: OutputPath | None = Field(None, description="default: $CHAM_CACHE_DIR, else ~/.cache/chameleon-pipeline")
    max_bytes: int = Field(8 * 2**30, gt=0, description="local copies kept at most (plus the shard being fetched)")
    read_ahead_shards: int = Field(2, ge=0, description="shards fetched in the background past the one in use")


class TrainingEval(StrictModel):
    """Evaluation during training: every `every_steps` steps (and at the last), held-out loss on each held-out stage
    (overall, per modality, per source) and small text benchmarks; logged to eval.jsonl, TensorBoard (eval/...) and
    the console."""

    every_steps: int = Field(gt=0)
    heldout: dict[str, ExistingPath] = Field(
        default_factory=dict,
        description="name -> a local held-out stage folder (from `cham mix`), e.g. {val: data/heldout}",
    )
    max_batches: int | None = Field(8, ge=1, description="batches of each held-out stage per evaluation (None: all)")
    batch_size: int | None = Field(None, gt=0, description="sequences per batch (default: micro_batch_size)")
    benchmarks: list[str] = Field(
        default_factory=list,
        description="text benchmarks (task files in their published formats, or bundled samples: arc, hellaswag, ...)",
    )
    benchmark_limit: int = Field(20, ge=1, description="questions of each benchmark per evaluation")
    benchmark_shots: int = Field(0, ge=0, description="solved examples before each benchmark question")

    @model_validator(mode="after")
    def _something_to_evaluate(self) -> TrainingEval:
        if not self.heldout and not self.benchmarks:
            raise ValueError("eval needs held-out stages (heldout) or benchmarks, or both")
        return self


class LoggingConfig(StrictModel):
    every_steps: int = Field(10, gt=0)
    tensorboard: bool = True
    jsonl: bool = True


class TrainConfig(StrictModel):
    """Pretraining on one stage's shards (or SFT, through SFTConfig)."""

    model: ModelConfig
    data: ExistingLocation | None = Field(
        None, description="a stage folder written by `cham mix`, a path or an s3:// (gs://, az://) URL (or: stages)"
    )
    stages: list[TrainStage] | None = Field(
        None,
        min_length=1,
        description="instead of data: the stage folders one run trains on in turn, each with its share of the steps "
        "(Chameleon: stage1 0.8, stage2 0.2); one lr schedule spans them and the optimizer state carries over",
    )
    out_dir: OutputLocation = Field(
        description="checkpoints, metrics and logs go here: a path or an s3:// (gs://, az://) URL"
    )
    seq_len: int | None = Field(
        None,
        gt=0,
        description="the stage's packed sequence length, which its manifest.json records: leave it out to take it "
        "from there; a value given must equal it",
    )
    global_batch_size: int = Field(gt=0, description="sequences per optimizer step, across all ranks")
    micro_batch_size: int = Field(1, gt=0, description="sequences per rank per forward pass")
    steps: int = Field(gt=0, description="optimizer steps")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    z_loss: float = Field(1e-5, ge=0.0, description="weight of log^2 Z")
    loss_chunk_size: int = Field(
        1024, gt=0, description="supervised positions per chunk of the fused output layer + loss (memory vs speed)"
    )
    precision: Precision = "auto"
    compile: bool = Field(False, description="torch.compile each block")
    activation_checkpointing: ActivationCheckpointConfig = Field(default_factory=ActivationCheckpointConfig)
    parallelism: Parallelism = "auto"
    document_masking: bool = Field(True, description="no attention across packed documents")
    document_attention: DocumentAttention = Field(
        "auto", description="kernel for document masking: auto = FlexAttention on CUDA, SDPA + dense mask elsewhere"
    )
    init_from: ExistingLocation | None = Field(
        None, description="a checkpoint to start from (weights only): a path or an s3:// (gs://, az://) URL"
    )
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    eval: TrainingEval | None = Field(None, description="held-out loss every N steps, logged with the metrics")
    loader_workers: int = Field(1, ge=0)
    data_cache: DataCacheConfig = Field(default_factory=DataCacheConfig)
    skip_corrupt_shards: bool = Field(
        False,
        description="leave out unreadable shards and read damaged sequences "
        "as padding without targets, counted, instead of failing",
    )
    allow_data_change: bool = Field(
        False,
        description="resume even though the stage folder was re-mixed since the "
        "checkpoint (another dataset fingerprint), at the same epoch and position",
    )
    replan_on_resume: bool = Field(
        False,
        description="resume although steps (or the stages' shares) changed since the checkpoint: the lr schedule and "
        "the stage boundaries are planned again over the new steps (the lr at the run's step changes; logged); "
        "refused otherwise",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if (self.data is None) == (self.stages is None):
            raise ValueError("give either data (one stage folder) or stages (several, each with its share of steps)")
        if self.stages is not None:
            total = sum(stage.share for stage in self.stages)
            if abs(total - 1.0) > 1e-6:
                raise ValueError(f"the stages' shares must add up to 1, they add up to {total:g}")
            empty = [p.index for p in self.stage_plan() if p.end_step == p.first_step]
            if empty:
                raise ValueError(f"stages {empty} get no step of {self.steps}: raise steps or their shares")
        if self.seq_len is not None and self.seq_len > self.model.max_seq_len:
            raise ValueError(f"seq_len {self.seq_len} exceeds the model's max_seq_len {self.model.max_seq_len}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} must be a multiple of micro_batch_size "
                f"{self.micro_batch_size} (times the number of ranks, checked at launch)"
            )
        if self.schedule.warmup_steps >= self.steps and self.schedule.kind != "constant":
            raise ValueError(f"schedule.warmup_steps {self.schedule.warmup_steps} must be < steps {self.steps}")
        return self

    def stage_plan(self) -> list[PlannedStage]:
        """The stages in order with their steps: stage i ends at round(steps x the shares up to i), the last at
        `steps`. One stage (data) spans the whole run."""
        if self.stages is None:
            return [PlannedStage(0, self.data, 0, self.steps)]
        plan, first, cumulative = [], 0, 0.0
        for index, stage in enumerate(self.stages):
            cumulative += stage.share
            end = self.steps if index == len(self.stages) - 1 else min(self.steps, round(self.steps * cumulative))
            plan.append(PlannedStage(index, stage.data, first, end))
            first = end
        return plan

    def first_stage_data(self) -> Path | str:
        """The stage folder the run starts on (its manifest gives the sequence length and the vocabulary)."""
        return self.stage_plan()[0].data


class SFTConfig(TrainConfig):
    """Supervised fine-tuning from a pretrained checkpoint: cosine from 1e-5, dropout 0.05, batch 128."""

    init_from: ExistingLocation = Field(description="the pretrained checkpoint to fine-tune (a path or a URL)")
    global_batch_size: int = Field(128, gt=0)
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(lr=1e-5))
    schedule: ScheduleConfig = Field(default_factory=lambda: ScheduleConfig(kind="cosine", warmup_steps=0))
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="overrides the model's dropout during SFT")

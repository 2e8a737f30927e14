"""What a training step measured, and where it goes: the trainer's step returns a StepMetrics, and each sink records
it (the console line, metrics.jsonl, TensorBoard). A new destination is one more sink; the step does not change.

A resumed run redoes the steps after its checkpoint: the JSONL sink first drops their records from the run that
died, and the TensorBoard sink purges their events, so each step is recorded once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from model.files.atomic import write_atomic
from schemas.train_config import LoggingConfig

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


@dataclass
class StepMetrics:
    step: int
    loss: float
    ce: float
    ce_text: float | None  # None (null in metrics.jsonl, no TensorBoard point) when the step had no text targets
    ce_image: float | None  # the same for image targets: a mean over nothing is no loss, and 0.0 would read as perfect
    z_loss: float
    grad_norm: float
    lr: float
    tokens: int  # positions the model ran over, all ranks (padding included: it costs compute too)
    supervised_tokens: int  # targets the loss counted, all ranks
    tokens_per_s: float
    data_wait_share: float
    mfu: float | None
    skipped_steps: int  # steps not applied (non-finite gradients, or no targets), so far
    damaged_sequences: int = 0  # sequences read as padding so far (skip_corrupt_shards), all ranks
    stage: int = 0  # which of the run's stages (config.stages, in order) the step read


class MetricsSink(Protocol):
    """Somewhere a step's metrics are recorded."""

    def write(self, metrics: StepMetrics) -> None:
        """Record one step's metrics."""

    def close(self) -> None:
        """Flush and release what the sink holds."""


def console_line(metrics: StepMetrics, total_steps: int) -> str:
    """The console's one line for a step: every figure, '-' for a modality without targets."""
    m = metrics
    return (
        f"step {m.step}/{total_steps} loss {m.loss:.4f} (text {_ce(m.ce_text)}, image {_ce(m.ce_image)}, "
        f"z {m.z_loss:.2e}) grad {m.grad_norm:.2f} lr {m.lr:.2e} {m.tokens_per_s:,.0f} tok/s "
        f"data wait {m.data_wait_share:.0%}"
    )


def _ce(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


class ConsoleSink:
    """A line to `log` every `every_steps` steps and at the last step."""

    def __init__(self, log: Callable[[str], None], every_steps: int, total_steps: int):
        self.log, self.every_steps, self.total_steps = log, every_steps, total_steps

    def write(self, metrics: StepMetrics) -> None:
        if metrics.step % self.every_steps == 0 or metrics.step == self.total_steps:
            self.log(console_line(metrics, self.total_steps))

    def close(self) -> None:
        pass


class JsonlSink:
    """One JSON record per step appended to `path` (None as null), flushed at once; records after `resumed_step`
    (the steps a resumed run redoes) are dropped when it opens."""

    def __init__(self, path: Path, resumed_step: int):
        keep_metrics_until(path, resumed_step)
        self.file = path.open("a")

    def write(self, metrics: StepMetrics) -> None:
        self.file.write(json.dumps(asdict(metrics)) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardSink:
    """Scalars `train/<name>` at each step into `folder`; a None value has no point. Events of the steps after
    `resumed_step` are purged (TensorBoard's purge_step)."""

    def __init__(self, folder: Path, resumed_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder), purge_step=resumed_step + 1)

    def write(self, metrics: StepMetrics) -> None:
        for name, value in asdict(metrics).items():
            if name != "step" and value is not None:
                self.writer.add_scalar(f"train/{name}", value, metrics.step)

    def flush(self) -> None:
        """Write the events so far to disk (before they are uploaded, for a run into a store)."""
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_sinks(
    logging: LoggingConfig,
    out_dir: Path,
    resumed_step: int,
    total_steps: int,
    log: Callable[[str], None],
    writes_files: bool,
) -> list[MetricsSink]:
    """The sinks a run's logging config asks for: the console always, metrics.jsonl and TensorBoard in `out_dir`
    only where `writes_files` (rank 0). What was opened is closed again if a later one fails."""
    sinks: list[MetricsSink] = [ConsoleSink(log, logging.every_steps, total_steps)]
    try:
        if writes_files and logging.jsonl:
            sinks.append(JsonlSink(out_dir / METRICS_FILE, resumed_step))
        if writes_files and logging.tensorboard:
            sinks.append(TensorBoardSink(out_dir / TENSORBOARD_DIR, resumed_step))
    except BaseException:
        close_sinks(sinks)
        raise
    return sinks


def close_sinks(sinks: Iterable[MetricsSink]) -> None:
    """Close every sink, each even if an earlier one fails (the first failure is raised after)."""
    failure: BaseException | None = None
    for sink in sinks:
        try:
            sink.close()
        except Exception as err:
            failure = failure or err
    if failure is not None:
        raise failure


def keep_metrics_until(path: Path, step: int) -> int:
    """Rewrite a metrics file (atomically) with only its records of steps <= `step`: a resumed run redoes the later
    ones, and each step is recorded once. A line cut short by a kill is dropped too. Returns the lines dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
                keep = isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step
            except ValueError:
                keep = False
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            elif line.strip():
                dropped += 1
    if dropped:
        write_atomic(path, "".join(kept))
    return dropped

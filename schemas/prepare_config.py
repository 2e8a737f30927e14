"""PrepareConfig: which raw sources the prepare job reads, how, with which tokenizers, on which runner."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from schemas.config_base import ExistingPath, InputPattern, OutputPath, StrictModel
from schemas.download_config import DownloadConfig
from schemas.records import RecordKind

SourceFormat = Literal["jsonl", "parquet", "webdataset"]

# Which file formats each record kind can be read from (the readers of pipelines/ implement these).
FORMATS_BY_KIND: dict[str, tuple[str, ...]] = {
    "text": ("jsonl", "parquet"),
    "image_text": ("webdataset", "parquet"),  # img2dataset tars or parquet; image-text parquet
    "interleaved": ("parquet", "jsonl"),  # OBELICS-style parquet; MMC4-style jsonl
    "sft": ("jsonl", "parquet"),
}

# embedded: Beam's FnApiRunner in this process; local: DirectRunner with worker processes; dask: Beam's DaskRunner
# on a `distributed` scheduler; beam: any other runner named in `options.runner` (Flink, Spark, Dataflow).
RunnerKind = Literal["embedded", "local", "dask", "beam"]


class SourceConfig(StrictModel):
    """One raw source: a name (used for output folders), its record kind, file format and paths."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$", description="folder-safe name")
    kind: RecordKind
    format: SourceFormat
    paths: list[InputPattern] = Field(min_length=1, description="files, directories or globs")
    # Reader and transform options of this source, e.g. {text_field: content, min_chars: 20}.
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _format_fits_kind(self) -> SourceConfig:
        allowed = FORMATS_BY_KIND[self.kind]
        if self.format not in allowed:
            raise ValueError(f"format {self.format!r} cannot hold {self.kind!r} records; allowed: {', '.join(allowed)}")
        return self


class TokenizerPaths(StrictModel):
    """The trained tokenizers the job encodes with (directories written by `cham ... train` or converted)."""

    text: ExistingPath
    image: ExistingPath


class RunnerConfig(StrictModel):
    """Where the Beam job runs; the runner is always named (Beam's implicit default downloads a binary)."""

    kind: RunnerKind = "embedded"
    workers: int | None = Field(None, ge=1, description="local: worker processes (default: all cores)")
    address: str | None = Field(None, description="dask: scheduler address; none starts a local cluster")
    # Extra Beam pipeline options, e.g. {runner: FlinkRunner, flink_master: "host:8081"} for kind beam.
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _beam_names_its_runner(self) -> RunnerConfig:
        if self.kind == "beam" and not self.options.get("runner"):
            raise ValueError("kind 'beam' needs options.runner, e.g. FlinkRunner, SparkRunner or DataflowRunner")
        return self


class PrepareConfig(StrictModel):
    """The prepare job: raw sources -> tokenized WebDataset shards, one folder per source."""

    sources: list[SourceConfig] = Field(min_length=1)
    output_dir: OutputPath
    tokenizers: TokenizerPaths
    image_size: int = Field(512, ge=16, le=4096, description="square side after resize and crop (pad for SFT)")
    samples_per_shard: int = Field(1000, ge=1)
    detect_faces: bool = True
    fast_image_decode: bool = Field(
        True, description="large JPEGs decoded at reduced scale, then Lanczos (3-5x faster, >= 40 dB from Chameleon's "
        "exact path, typically ~50); false: Chameleon's exact path (full decode, Lanczos, crop) for every image"
    )  # fmt: skip
    write_images: bool = Field(False, description="also store each normalized image as .jpg in the shards")
    caption_first_ratio: float = Field(
        0.5, ge=0.0, le=1.0, description="share of image-text pairs laid out caption first"
    )
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    # Images given only by URL (OBELICS, MMC4): fetched into download.cache_dir when it is set.
    download: DownloadConfig = Field(default_factory=DownloadConfig)

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.name for s in sources]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"source names must be unique; repeated: {', '.join(duplicated)}")
        return sources

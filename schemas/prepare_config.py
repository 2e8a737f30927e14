"""PrepareConfig: which raw sources the prepare job reads, how, with which tokenizers, on which runner."""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)

from schemas.config_base import (
    ExistingLocation,
    OutputLocation,
    StrictModel,
    format_location,
    resolve_path,
)
from schemas.download_config import DownloadConfig
from schemas.record_kinds import RecordKind
from schemas.source_files import source_files

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


DEFAULT_MAX_RECORD_BYTES = 32 << 20
ROW_GROUP_RECORDS = 32  # a parquet row group may be this many times max_record_bytes (uncompressed) before reading


def _source_pattern(value: str, info: ValidationInfo) -> str:
    """Made absolute; when paths are checked, it must hold a file of the source's format, and a file named on its
    own must be of it (refused now, rather than skipped while the job runs)."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value) and not value.startswith("file://"):
        return value  # on an object store: listed when the job plans, read there by its workers
    path = str(resolve_path(value, info))
    fmt = info.data.get("format")
    fits = fmt in FORMATS_BY_KIND.get(info.data.get("kind", ""), ())  # else the kind/format error says enough
    if (info.context or {}).get("check_paths", True) and fits:
        try:
            source_files([path], fmt)
        except FileNotFoundError as err:
            raise ValueError(str(err)) from None
    return path


SourcePattern = Annotated[str, AfterValidator(_source_pattern)]
"""A file, a folder or a glob (`**` allowed) of a source, checked with schemas/source_files.py (not glob.glob,
which follows directory link loops)."""


class SourceOptions(StrictModel):
    """Options every source kind takes; None everywhere means the job's default. Only the keys a config sets are
    kept when it is written out (and fingerprinted), so adding an option never changes existing fingerprints."""

    max_tokens: int | None = Field(None, ge=1, description="longer samples are rejected as too_long")
    max_record_bytes: int | None = Field(
        None,
        ge=1024,
        description="a jsonl line, tar member or parquet row larger than this is rejected as "
        "record_too_large before it is decoded (default 32 MiB)",
    )
    attributes: list[str] | None = Field(
        None,
        description="numeric columns of the input's metadata (a column or field, img2dataset's .json, OBELICS "
        "metadata) stored as sample attributes for mixture filters, e.g. [aesthetic, clip_score]",
    )

    @field_validator("attributes")
    @classmethod
    def _attribute_names(cls, names: list[str] | None) -> list[str] | None:
        from schemas.sample_filters import BUILTIN_ATTRIBUTES

        for name in names or []:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"attribute {name!r}: use letters, digits and '_', not starting with a digit")
            if name in BUILTIN_ATTRIBUTES:
                raise ValueError(f"attribute {name!r} is computed for every sample already; name metadata columns")
        if names and len(set(names)) != len(names):
            raise ValueError(f"attributes named twice: {sorted({n for n in names if names.count(n) > 1})}")
        return names


class _TextLength(SourceOptions):
    max_chars: int | None = Field(None, ge=1, description="longer texts are rejected (default 1,000,000)")


class _ImageLimits(SourceOptions):
    max_pixels: int | None = Field(None, ge=1, description="larger images are rejected from their header (64 MP)")
    min_side: int | None = Field(None, ge=1, description="images with a shorter side are rejected (32 px)")


class TextOptions(_TextLength):
    """Options of a `text` source."""

    text_field: str = Field("text", min_length=1, description="the field (jsonl) or column (parquet) of the text")
    min_chars: int | None = Field(None, ge=0, description="shorter texts are rejected (default 1)")

    @model_validator(mode="after")
    def _bounds(self) -> TextOptions:
        if self.min_chars is not None and self.max_chars is not None and self.min_chars > self.max_chars:
            raise ValueError(f"min_chars {self.min_chars} is above max_chars {self.max_chars}")
        return self


class ImageTextOptions(_TextLength, _ImageLimits):
    """Options of an `image_text` source."""

    text_field: str | None = Field(None, min_length=1, description="caption field, before txt / caption / text")
    image_field: str | None = Field(None, min_length=1, description="image field, before jpg / png / image ...")


class InterleavedOptions(_TextLength, _ImageLimits):
    """Options of an `interleaved` source."""

    images_dir: ExistingLocation | None = Field(
        None, description="MMC4 jsonl: folder of the image_name files (a path, or a store URL)"
    )
    text_separator: str | None = Field(
        None,
        description="put between consecutive texts (default: a space for MMC4 sentences, a blank line for "
        "OBELICS texts)",
    )


class SftOptions(_TextLength, _ImageLimits):
    """Options of an `sft` source."""


OPTIONS_BY_KIND: dict[str, type[SourceOptions]] = {
    "text": TextOptions,
    "image_text": ImageTextOptions,
    "interleaved": InterleavedOptions,
    "sft": SftOptions,
}
AnyOptions = TextOptions | ImageTextOptions | InterleavedOptions | SftOptions


def _options_problem(error: dict[str, Any], cls: type[SourceOptions], kind: str) -> str:
    where = format_location(("options", *error["loc"]))
    if error["type"] == "extra_forbidden":
        key = str(error["loc"][-1])
        close = difflib.get_close_matches(key, cls.model_fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{where}: unknown option for {kind} sources{hint}; valid options: {', '.join(cls.model_fields)}"
    message = error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    got = f" (got {value!r})" if isinstance(value, str | int | float | bool) and error["type"] != "value_error" else ""
    return f"{where}: {message}{got}"


# Per source: `exact` drops records whose normalised text (or decoded pixels) repeats one kept; `on` also drops
# near duplicates (MinHash/LSH for text, a perceptual hash for images); `off` keeps everything (docs/prepare.md).
# Off by default: a config written before deduplication keeps its shards, counts and fingerprints, and content that
# two sources share on purpose (one document in two layouts, SFT answers quoting pretraining text) is not dropped.
DedupMode = Literal["on", "exact", "off"]
DEFAULT_DEDUP: DedupMode = "off"
DEDUP_INDEX_DIR = "dedup-index"  # under output_dir, beside the sources' folders: the kept records' dedup entries


class DedupConfig(StrictModel):
    """Near-duplicate thresholds of the prepare job, for the sources whose `dedup` is `on` (pipelines/dedup.py).

    MinHash as FineWeb's (datatrove): word 5-grams, 14 bands x 8 rows = 112 permutations; candidates sharing a band
    are verified by their estimated Jaccard similarity. Images: a 64-bit DCT perceptual hash within a Hamming distance.
    """

    ngram: int = Field(5, ge=1, le=32, description="words per shingle")
    bands: int = Field(14, ge=1, le=64, description="LSH bands; two records sharing one band are candidates")
    rows: int = Field(8, ge=1, le=64, description="MinHash values per band (bands x rows permutations in all)")
    seed: int = Field(1, ge=0, description="seeds the permutations: signatures of one seed compare only to its own")
    jaccard: float = Field(0.8, gt=0.0, le=1.0, description="a candidate pair is a duplicate at this estimate or above")
    image_distance: int = Field(
        4, ge=0, le=15, description="image_text pairs whose perceptual hashes differ in at most this many bits"
    )

    def settings_for(self, mode: DedupMode) -> dict[str, Any] | None:
        """What a source's fingerprint holds of dedup: nothing for the default `off` (so shards written before
        deduplication existed keep their fingerprints), the mode for `exact`, the mode and every threshold for `on`."""
        if mode == DEFAULT_DEDUP:
            return None
        return {"mode": mode} | (self.model_dump(mode="json") if mode == "on" else {})


class SourceConfig(StrictModel):
    """One raw source: a name (used for output folders), its record kind, file format, paths and options."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$", description="folder-safe name")
    kind: RecordKind
    format: SourceFormat
    paths: list[SourcePattern] = Field(min_length=1, description="files, directories or globs")
    # Reader and transform options, typed per kind (OPTIONS_BY_KIND), e.g. {text_field: content, min_chars: 20}.
    options: AnyOptions = Field(default_factory=SourceOptions)  # replaced by the kind's own class
    dedup: DedupMode = Field(DEFAULT_DEDUP, description="on: exact and near duplicates; exact: exact only; off: none")

    @model_validator(mode="before")
    @classmethod
    def _options_of_kind(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict) or data.get("kind") not in OPTIONS_BY_KIND:
            return data  # field validation reports the bad kind
        options_cls = OPTIONS_BY_KIND[data["kind"]]
        raw = data.get("options")
        if isinstance(raw, options_cls):
            return data
        if isinstance(raw, SourceOptions):
            raw = raw.model_dump(exclude_unset=True)
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ValueError(f"options: should be a mapping of option names to values, got {type(raw).__name__}")
        try:
            options = options_cls.model_validate(raw, context=info.context)
        except ValidationError as err:
            raise ValueError("; ".join(_options_problem(e, options_cls, data["kind"]) for e in err.errors())) from None
        return {**data, "options": options}

    @field_serializer("options")
    def _set_options_only(self, options: SourceOptions) -> dict[str, Any]:
        return options.model_dump(mode="json", exclude_unset=True)

    @model_serializer(mode="wrap")
    def _dedup_when_set(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        # Written out only when set, as options are; fingerprinted apart (DedupConfig.settings_for).
        data = handler(self)
        if "dedup" not in self.model_fields_set:
            data.pop("dedup", None)
        return data

    @model_validator(mode="after")
    def _format_fits_kind(self, info: ValidationInfo) -> SourceConfig:
        allowed = FORMATS_BY_KIND[self.kind]
        if self.format not in allowed:
            raise ValueError(f"format {self.format!r} cannot hold {self.kind!r} records; allowed: {', '.join(allowed)}")
        if isinstance(self.options, InterleavedOptions) and self.options.images_dir and self.format != "jsonl":
            raise ValueError("options.images_dir: only MMC4 jsonl sources look images up by name")
        return self


class TokenizerPaths(StrictModel):
    """The trained tokenizers the job encodes with (directories written by `cham ... train` or converted); a store
    URL too, fetched once into each machine's cache (model/files/storage.py local_copy)."""

    text: ExistingLocation
    image: ExistingLocation


class RunnerConfig(StrictModel):
    """Where the Beam job runs; the runner is always named (Beam's implicit default downloads a binary)."""

    kind: RunnerKind = "embedded"
    workers: int | None = Field(
        None,
        ge=1,
        description="local: worker processes (default: all cores); dask: the cluster's worker threads (default: "
        "asked of the scheduler), which sizes the job's partitions",
    )
    address: str | None = Field(None, description="dask: scheduler address; none starts a local cluster")
    # Extra Beam pipeline options, e.g. {runner: FlinkRunner, flink_master: "host:8081"} for kind beam.
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _beam_names_its_runner(self) -> RunnerConfig:
        if self.kind == "beam" and not self.options.get("runner"):
            raise ValueError("kind 'beam' needs options.runner, e.g. FlinkRunner, SparkRunner or DataflowRunner")
        return self


# PrepareConfig fields that never change what a source's shards hold, so they stay out of its fingerprint and
# manifest: changing one redoes nothing. Every other field is fingerprinted (see PrepareConfig.shard_settings).
NOT_IN_SHARDS: dict[str, str] = {
    "output_dir": "where the shards are written, not what they hold",
    "runner": "where and how parallel the job runs: every runner writes byte-identical shards",
}
# Fields fingerprinted in a way of their own: each source by its own config, the tokenizers by their content's
# fingerprints (not their paths), downloads by the settings that decide which images a record keeps.
FINGERPRINTED_APART: dict[str, str] = {
    "sources": "each source's shards hold its own config (SourceConfig dumped, options as set)",
    "tokenizers": "the text and image tokenizers' fingerprints, so a moved tokenizer redoes nothing",
    "download": "DownloadConfig.outcome_fingerprint(): which images a record keeps, not where or how fast",
    "dedup": "DedupConfig.settings_for(source.dedup): the thresholds count only for the sources whose dedup is on",
}


class PrepareConfig(StrictModel):
    """The prepare job: raw sources -> tokenized WebDataset shards, one folder per source."""

    sources: list[SourceConfig] = Field(min_length=1)
    output_dir: OutputLocation = Field(description="a folder, or an s3:// (gs://, az://) URL")
    tokenizers: TokenizerPaths
    image_size: int = Field(512, ge=16, le=4096, description="square side after resize and crop (pad for SFT)")
    samples_per_shard: int = Field(1000, ge=1)
    detect_faces: bool = True
    fast_image_decode: bool = Field(
        True,
        description="large JPEGs decoded at reduced scale, then Lanczos (3-5x faster, >= 40 dB from Chameleon's "
        "exact path, typically ~50); false: Chameleon's exact path (full decode, Lanczos, crop) for every image",
    )
    write_images: bool = Field(False, description="also store each normalized image as .jpg in the shards")
    caption_first_ratio: float = Field(
        0.5, ge=0.0, le=1.0, description="share of image-text pairs laid out caption first"
    )
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    # Images given only by URL (OBELICS, MMC4): fetched into download.cache_dir when it is set.
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    # Near-duplicate thresholds, one set for the job; each source chooses on / exact / off (SourceConfig.dedup).
    dedup: DedupConfig = Field(default_factory=DedupConfig)

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.name for s in sources]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"source names must be unique; repeated: {', '.join(duplicated)}")
        if DEDUP_INDEX_DIR in names:  # the output folder of such a source would be the dedup index's
            raise ValueError(f"{DEDUP_INDEX_DIR!r} is reserved for the dedup index; name the source otherwise")
        return sources

    def shard_settings(self) -> dict[str, Any]:
        """The job-wide settings that shape every source's shards (image size, shard size, faces, ...), as JSON
        values in field order: every field but those NOT_IN_SHARDS or FINGERPRINTED_APART, so a new field is part
        of the shards' fingerprint and manifest unless it is declared not to change them."""
        names = set(type(self).model_fields) - set(NOT_IN_SHARDS) - set(FINGERPRINTED_APART)
        return self.model_dump(mode="json", include=names)

"""MixtureSpec: named training stages, each a weighted mix of prepared sources, packed to seq_len."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from schemas.config_base import ExistingLocation, StrictModel
from schemas.record_kinds import SftCategory
from schemas.sample_filters import BUILTIN_ATTRIBUTES, FilterError, check_attributes, parse_filter


def _without_unset(data: dict[str, Any], model: StrictModel, names: tuple[str, ...]) -> dict[str, Any]:
    """Drop fields added after mixtures had fingerprints when they were not set, so existing mixes keep theirs."""
    for name in names:
        if name not in model.model_fields_set:
            data.pop(name, None)
    return data


def prepared_attributes(path: Path) -> list[str] | None:
    """The attributes a prepared source's samples have (built-in ones and the metadata columns its prepare config
    named), from its manifest; None when the folder has no readable manifest (the mix job then checks the shards)."""
    try:
        return manifest_attributes(json.loads((Path(path) / "manifest.json").read_text()))
    except (OSError, ValueError):
        return None


def manifest_attributes(manifest: Any) -> list[str] | None:
    """prepared_attributes from a manifest already read (the mix job reads it on disk or on a store)."""
    try:
        options = manifest["config"]["source"].get("options", {})
    except (KeyError, TypeError, AttributeError):
        return None
    extra = options.get("attributes") or [] if isinstance(options, dict) else []
    return [*BUILTIN_ATTRIBUTES, *(n for n in extra if isinstance(n, str) and n not in BUILTIN_ATTRIBUTES)]


class MixSource(StrictModel):
    """A prepared source (a folder the prepare job wrote) and its weight as a share of the stage's tokens."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    path: ExistingLocation = Field(description="a prepared source folder: a path or an s3:// (gs://, az://) URL")
    weight: float = Field(ge=0.0, description="relative token share; normalized over the stage's sources")
    max_repetitions: float | None = Field(None, gt=0.0, description="overrides the spec's max_repetitions")
    # Curation at mix time: only samples passing every filter are drawn (schemas/sample_filters.py), e.g.
    # ["aesthetic >= 6", "0.9 <= aspect <= 1.1"]; a sample without the attribute is excluded.
    filters: list[str] = Field(default_factory=list)

    @field_validator("filters")
    @classmethod
    def _parse_filters(cls, filters: list[str]) -> list[str]:
        problems = []
        for text in filters:
            try:
                parse_filter(text)
            except FilterError as err:
                problems.append(str(err))
        if problems:
            raise ValueError("; ".join(problems))
        return filters

    @model_validator(mode="after")
    def _filters_name_attributes_it_has(self, info: ValidationInfo) -> MixSource:
        # A source on a store is checked by the mix job, which reads its manifest.
        if self.filters and isinstance(self.path, Path) and (info.context or {}).get("check_paths", True):
            available = prepared_attributes(Path(self.path))
            if available is not None:
                try:
                    check_attributes([parse_filter(f) for f in self.filters], available, f"source {self.name!r}")
                except FilterError as err:
                    raise ValueError(str(err)) from None
        return self

    @model_serializer(mode="wrap")
    def _set_new_fields_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _without_unset(handler(self), self, ("filters",))


class Inherit(StrictModel):
    """Take another stage's sources with their weights multiplied by `factor` (Chameleon stage 2: 0.5)."""

    stage: str
    factor: float = Field(gt=0.0)


class StageSpec(StrictModel):
    """One stage: its token budget (absolute or a fraction of the total) and its sources."""

    tokens: int | None = Field(None, gt=0)
    fraction: float | None = Field(None, gt=0.0, le=1.0, description="share of the spec's total_tokens")
    inherit: Inherit | None = None
    sources: list[MixSource] = Field(default_factory=list)
    sft: bool = Field(False, description="pack whole samples best-fit, prompt tokens masked from the loss")
    # SFT only: token shares of the categories (text, code, image_generation, visual_chat, interleaved, safety)
    # within each source, so that none dominates; a category left out gets no tokens.
    category_weights: dict[SftCategory, float] | None = None
    # Chameleon's stage 2: the sources' weights are adjusted so that this stage's text : image token proportion is
    # the named earlier stage's, while it adds higher-quality and instruction data (docs/mixtures.md).
    hold_modality_of: str | None = Field(None, description="an earlier stage whose text : image proportion to keep")

    @model_serializer(mode="wrap")
    def _set_new_fields_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _without_unset(handler(self), self, ("hold_modality_of",))

    @model_validator(mode="after")
    def _one_budget(self) -> StageSpec:
        if (self.tokens is None) == (self.fraction is None):
            raise ValueError("give exactly one of 'tokens' or 'fraction' for the stage's budget")
        names = [s.name for s in self.sources]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"source names must be unique within a stage; repeated: {', '.join(repeated)}")
        if self.category_weights is not None:
            if not self.sft:
                raise ValueError("category_weights apply to SFT stages only (set sft: true)")
            if any(w < 0 for w in self.category_weights.values()) or sum(self.category_weights.values()) <= 0:
                raise ValueError("category_weights must be >= 0 with at least one > 0")
        return self


class WeightedSource(NamedTuple):
    name: str
    path: str
    weight: float
    max_repetitions: float
    filters: tuple[str, ...] = ()


class MixtureSpec(StrictModel):
    """Stages in training order; weights are token shares; faces drawn `face_weight` times as often."""

    # Field order matters: validators of later fields read earlier ones.
    total_tokens: int | None = Field(None, gt=0, description="needed when a stage gives a fraction")
    tokens_per_image: int = Field(1024, gt=0, description="VQ codes per image (grid side squared)")
    seq_len: int = Field(4096, gt=0)
    face_weight: float = Field(2.0, gt=0.0, description="draw rate of a sample with a face vs one without")
    max_repetitions: float = Field(4.0, gt=0.0, description="most times a source's tokens may be repeated")
    seed: int = 0
    stages: dict[str, StageSpec] = Field(min_length=1)

    @property
    def image_block_len(self) -> int:
        return self.tokens_per_image + 2

    @field_validator("seq_len")
    @classmethod
    def _fits_an_image(cls, seq_len: int, info: ValidationInfo) -> int:
        block = info.data.get("tokens_per_image", 1024) + 2
        if seq_len < block:
            raise ValueError(
                f"{seq_len} is too short for one image block of {block} positions "
                f"(BOI + {block - 2} codes + EOI); use seq_len >= {block}"
            )
        return seq_len

    @field_validator("stages")
    @classmethod
    def _check_stages(cls, stages: dict[str, StageSpec], info: ValidationInfo) -> dict[str, StageSpec]:
        for name, stage in stages.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):  # a folder name, and the loader's shard names
                raise ValueError(f"stage name {name!r}: use letters, digits, '_' and '-' (no dots or slashes)")
            if stage.fraction is not None and info.data.get("total_tokens") is None:
                raise ValueError(f"stage {name!r} gives a fraction: set total_tokens")
            if stage.inherit is not None and stage.inherit.stage not in stages:
                raise ValueError(
                    f"stage {name!r} inherits unknown stage {stage.inherit.stage!r}; stages: {', '.join(stages)}"
                )
            held = stage.hold_modality_of
            if held is not None and held not in list(stages)[: list(stages).index(name)]:
                earlier = ", ".join(list(stages)[: list(stages).index(name)]) or "none"
                raise ValueError(
                    f"stage {name!r}: hold_modality_of {held!r} must name an earlier stage; earlier stages: {earlier}"
                )
        fractions = sum(s.fraction or 0.0 for s in stages.values())
        if fractions > 1.0 + 1e-9:
            raise ValueError(f"stage fractions add up to {fractions:g}, more than 1")
        for name in stages:
            _inheritance_chain(stages, name)
            sources = _sources_of(stages, name, 1.0)
            if not sources:
                raise ValueError(f"stage {name!r} has no sources (give 'sources' or 'inherit')")
            if sum(s.weight for s in sources) <= 0.0:
                raise ValueError(f"stage {name!r}: all source weights are zero; at least one must be > 0")
        return stages

    def stage_tokens(self, name: str) -> int:
        """The stage's token budget."""
        stage = self.stages[name]
        if stage.tokens is not None:
            return stage.tokens
        assert self.total_tokens is not None and stage.fraction is not None
        return round(self.total_tokens * stage.fraction)

    def sources_of(self, name: str) -> list[WeightedSource]:
        """The stage's sources with inheritance applied; a stage's own source replaces an inherited namesake."""
        return _sources_of(self.stages, name, self.max_repetitions)


def _inheritance_chain(stages: dict[str, StageSpec], name: str) -> list[str]:
    chain = [name]
    while (inherit := stages[chain[-1]].inherit) is not None:
        if inherit.stage in chain:
            raise ValueError(f"stages inherit in a cycle: {' -> '.join([*chain, inherit.stage])}")
        chain.append(inherit.stage)
    return chain


def _sources_of(stages: dict[str, StageSpec], name: str, default_reps: float) -> list[WeightedSource]:
    stage = stages[name]
    merged: dict[str, WeightedSource] = {}
    if stage.inherit is not None:
        for src in _sources_of(stages, stage.inherit.stage, default_reps):
            merged[src.name] = src._replace(weight=src.weight * stage.inherit.factor)
    for src in stage.sources:
        reps = src.max_repetitions if src.max_repetitions is not None else default_reps
        merged[src.name] = WeightedSource(src.name, str(src.path), src.weight, reps, tuple(src.filters))
    return list(merged.values())

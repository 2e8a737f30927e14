"""The mixture experiment's settings: which mixtures to try (named variants of a spec's weights, or a sweep of one
source's weight) and the short training run each is measured by."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from schemas.config_base import StrictModel
from schemas.model_config import ModelPreset
from schemas.search_config import ProxyTraining

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class MixtureVariant(StrictModel):
    """One mixture of the experiment: the spec with some sources' weights changed."""

    name: str = Field(pattern=NAME, description="folder-safe name of this mixture")
    weights: dict[str, float] = Field(description="source name -> new weight, in every stage that lists the source")
    stages: list[str] | None = Field(None, description="change only these stages (default: all)")


class WeightSweep(StrictModel):
    """A sweep over one source's weight: one mixture per value."""

    source: str = Field(description="the source whose weight is swept")
    weights: list[float] = Field(min_length=1, description="the weights to try")
    stages: list[str] | None = Field(None, description="change only these stages (default: all)")


class ExperimentTraining(StrictModel):
    """A short training run on each mixture, and the held-out stage every run is measured on."""

    stage: str | None = Field(None, description="the stage to train on (default: the spec's first)")
    model_preset: ModelPreset = Field("tiny", description="model shape (or: model)")
    model: dict[str, Any] | None = Field(
        None,
        description="instead of model_preset: a ModelConfig, a preset and any overrides (e.g. {preset: proxy-5m, "
        "n_layers: 4}); vocab_size always comes from the data",
    )
    steps: int = Field(20, gt=0)
    global_batch_size: int = Field(8, gt=0)
    micro_batch_size: int = Field(2, gt=0)
    lr: float = Field(3e-3, gt=0.0)
    warmup_steps: int = Field(2, ge=0)
    heldout: str | None = Field(None, description="a stage folder (from `cham mix`) to measure held-out loss on")
    eval_max_batches: int = Field(8, ge=1)
    nproc_per_node: int = Field(1, ge=1)

    @field_validator("model")
    @classmethod
    def _a_model(cls, model: dict[str, Any] | None) -> dict[str, Any] | None:
        if model is not None:
            ProxyTraining._a_model(model)
        return model

    def model_settings(self) -> dict[str, Any]:
        """The model's preset and overrides, without the vocabulary (the data's)."""
        return self.model if self.model is not None else {"preset": self.model_preset}

    @model_validator(mode="after")
    def _batches(self) -> ExperimentTraining:
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError("global_batch_size must be a multiple of micro_batch_size")
        if self.warmup_steps >= self.steps:
            raise ValueError("warmup_steps must be < steps")
        return self

"""MixtureSearchConfig: a swarm of proxy runs on mixtures drawn around a spec's weights, fits of their held-out
losses, and the proposal the fits predict best under the real run's constraints (docs/mixtures.md, "Mixture search")."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from schemas.config_base import ExistingPath, OutputPath, StrictModel
from schemas.model_config import ModelConfig

FitKind = Literal["loglinear", "powerlaw", "gp", "gbt"]
# An objective names a held-out stage and what to read of its loss: `val.loss` (every supervised token),
# `val.text` / `val.image` (the tokens of one modality), `val.source.<name>` (one source's documents).
OBJECTIVE = re.compile(r"^(?P<heldout>[A-Za-z0-9][A-Za-z0-9_-]*)\.(?P<metric>loss|text|image|source\.[A-Za-z0-9_-]+)$")


def model_for_data(model: dict[str, Any], vocab_size: int, seq_len: int) -> ModelConfig:
    """The model a proxy trains: the given preset and overrides with the data's vocabulary, and a max_seq_len that
    holds the data's sequences (the vocabulary always comes from the data: a preset's would not match it)."""
    data = {**model, "vocab_size": vocab_size}
    config = ModelConfig.model_validate(data)
    if config.max_seq_len < seq_len:
        config = ModelConfig.model_validate({**data, "max_seq_len": seq_len})
    return config


class ProxyTraining(StrictModel):
    """The short pretraining run every mixture of the search gets: same model, same tokens, same settings."""

    model: dict[str, Any] = Field(
        default_factory=lambda: {"preset": "proxy-1m"},
        description="a ModelConfig: a preset (proxy-1m, proxy-5m, proxy-20m, tiny) and any overrides; "
        "vocab_size always comes from the data",
    )
    tokens: int = Field(gt=0, description="training tokens of every proxy run (steps = tokens / (batch x seq_len))")
    global_batch_size: int = Field(8, gt=0)
    micro_batch_size: int = Field(8, gt=0)
    lr: float = Field(3e-3, gt=0.0)
    warmup_steps: int = Field(10, ge=0)
    seed: int = 0
    eval_max_batches: int | None = Field(None, ge=1, description="batches of each held-out stage (default: all)")
    eval_batch_size: int = Field(16, gt=0)

    @field_validator("model")
    @classmethod
    def _a_model(cls, model: dict[str, Any]) -> dict[str, Any]:
        if "vocab_size" in model:
            raise ValueError("leave vocab_size out: a proxy's vocabulary is the data's")
        ModelConfig.model_validate({"vocab_size": 2, **model})  # the shape's own checks, now
        return model

    @model_validator(mode="after")
    def _batches(self) -> ProxyTraining:
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError("global_batch_size must be a multiple of micro_batch_size")
        return self

    def steps(self, seq_len: int) -> int:
        """Optimizer steps that train on `tokens` tokens (at least 1)."""
        return max(1, round(self.tokens / (self.global_batch_size * seq_len)))


class SwarmSettings(StrictModel):
    """Which mixtures get a proxy run."""

    size: int = Field(32, ge=0, description="mixtures drawn from a Dirichlet around the base weights, for the fits")
    test_size: int = Field(0, ge=0, description="more drawn mixtures kept out of the fits, to test them on")
    concentration: float = Field(
        1.0,
        gt=0.0,
        description="Dirichlet concentration: alpha_i = concentration x K x base share_i (1 with equal base weights "
        "is uniform over all mixtures; larger stays nearer the base)",
    )
    mixtures: list[dict[str, float]] = Field(
        default_factory=list, description="given mixtures (source -> weight), run as well as the drawn ones"
    )
    seeds: int = Field(
        1,
        ge=1,
        description="runs of every mixture, with training seeds proxy.seed, +1, ...: a mixture's losses are their "
        "mean, whose noise is a single run's / sqrt(seeds); the proposal's confirmation gets as many",
    )
    noise_seeds: int = Field(
        2, ge=0, description="runs of the base mixture with seeds proxy.seed + 1, +2, ...: the run-to-run noise"
    )
    replicate_tests: int = Field(
        0,
        ge=0,
        description="the first test mixtures run once more, with the next seed (proxy.seed + seeds): the run-to-run "
        "noise pooled over the simplex (each such pair and the base's seeds), not only at the base",
    )
    seed: int = Field(0, description="seed of the draws")
    parallel: int = Field(1, ge=1, description="proxy runs at once (each a process, or a flow run of `deployment`)")
    deployment: str | None = Field(
        None,
        description="run each proxy as a flow run of this deployment (mixture-proxy/on-demand, served by `cham serve` "
        "or deployed to a work pool) instead of a local process; its workers must see out_dir and the data",
    )

    @field_validator("mixtures")
    @classmethod
    def _weights(cls, mixtures: list[dict[str, float]]) -> list[dict[str, float]]:
        for i, m in enumerate(mixtures):
            if any(w < 0 for w in m.values()) or sum(m.values()) <= 0:
                raise ValueError(f"mixture {i}: weights must be >= 0 with at least one > 0, got {m}")
        return mixtures

    @model_validator(mode="after")
    def _replicated_tests_exist(self) -> SwarmSettings:
        if self.replicate_tests > self.test_size:
            raise ValueError(f"replicate_tests ({self.replicate_tests}) exceeds test_size ({self.test_size})")
        return self


class FitSettings(StrictModel):
    kinds: list[FitKind] = Field(
        # powerlaw is opt-in: monotone in its source's share, it led the benchmark's proposal past the photos
        # optimum (docs/performance.md, "Mixture search")
        default_factory=lambda: ["loglinear", "gp", "gbt"],
        min_length=1,
        description="fits tried per objective",
    )
    folds: int = Field(5, ge=2, description="k of the k-fold predicted-vs-actual")


class ProposalSettings(StrictModel):
    """The search for the best predicted mixture, under the real run's constraints."""

    budget_tokens: int | None = Field(
        None, gt=0, description="tokens of the real run's stage (default: the spec's budget for it)"
    )
    min_share: dict[str, float] = Field(default_factory=dict, description="source -> least token share")
    max_share: dict[str, float] = Field(default_factory=dict, description="source -> largest token share")
    candidates: int = Field(100_000, ge=100)
    top_k: int = Field(100, ge=1, description="the proposal averages the best top_k candidates (RegMix)")
    confirm: bool = Field(True, description="train a proxy on the proposal and compare it with the prediction")

    @field_validator("min_share", "max_share")
    @classmethod
    def _shares(cls, shares: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in shares.items() if not 0.0 <= v <= 1.0}
        if bad:
            raise ValueError(f"shares must be within [0, 1]: {bad}")
        return shares


class LaunchSettings(StrictModel):
    """What an approved proposal starts: the real run's training config, its data replaced by the approved mix."""

    train_config: ExistingPath | None = Field(
        None, description="a TrainConfig YAML for the real run; its data becomes the approved mixture's stage"
    )
    deployment: str = Field("train/on-demand", description="the training deployment started with it")


class MixtureSearchConfig(StrictModel):
    """A mixture search: the spec and stage searched, held-out stages, the proxy runs, fits, objective, proposal."""

    spec: ExistingPath = Field(description="the MixtureSpec YAML whose stage's weights are searched")
    stage: str | None = Field(None, description="the stage searched (default: the spec's first)")
    out_dir: OutputPath = Field(description="runs/ (one folder per proxy run, reused by content), fits, proposal")
    heldout: dict[str, ExistingPath] = Field(
        min_length=1, description="name -> a held-out stage folder (from `cham mix`) every proxy is evaluated on"
    )
    objective: dict[str, float] = Field(
        min_length=1,
        description="objective -> weight in the minimised sum; objectives: <heldout>.loss, <heldout>.text, "
        "<heldout>.image, <heldout>.source.<name>",
    )
    proxy: ProxyTraining
    swarm: SwarmSettings = Field(default_factory=SwarmSettings)
    fits: FitSettings = Field(default_factory=FitSettings)
    proposal: ProposalSettings = Field(default_factory=ProposalSettings)
    launch: LaunchSettings = Field(default_factory=LaunchSettings)

    @field_validator("heldout")
    @classmethod
    def _stages(cls, heldout: dict[str, Path]) -> dict[str, Path]:
        for name in heldout:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
                raise ValueError(f"held-out name {name!r}: use letters, digits, '_' and '-'")
        return heldout

    @model_validator(mode="after")
    def _objectives_name_heldout_stages(self) -> MixtureSearchConfig:
        for name, weight in self.objective.items():
            match = OBJECTIVE.match(name)
            if not match:
                raise ValueError(
                    f"objective {name!r}: use <heldout>.loss, <heldout>.text, <heldout>.image or "
                    "<heldout>.source.<name>"
                )
            if match["heldout"] not in self.heldout:
                raise ValueError(f"objective {name!r}: no held-out stage {match['heldout']!r}; {list(self.heldout)}")
            if weight <= 0:
                raise ValueError(f"objective {name!r}: weight must be > 0, got {weight}")
        if self.swarm.size + len(self.swarm.mixtures) < 3:
            raise ValueError("the fits need at least 3 runs: raise swarm.size (or give mixtures)")
        return self

"""The mixture experiment's settings (schemas/experiment_config.py): strict like every config, with the checks the
flow relies on (folder-safe names, batches that divide, warmup shorter than the run)."""

from __future__ import annotations

import pytest

from schemas import ConfigError, ExperimentTraining, MixtureVariant, WeightSweep, validate_config


def error(cls: type, data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(cls, data, "training")
    return str(info.value)


def test_defaults_are_a_short_tiny_run() -> None:
    training = ExperimentTraining()
    shape = {"model_preset": "tiny", "steps": 20, "global_batch_size": 8, "micro_batch_size": 2}
    assert training.model_dump(include=set(shape)) == shape
    assert training.heldout is None and training.nproc_per_node == 1


def test_batches_and_warmup_are_checked() -> None:
    assert "global_batch_size must be a multiple of micro_batch_size" in error(
        ExperimentTraining, {"global_batch_size": 6, "micro_batch_size": 4}
    )
    assert "warmup_steps must be < steps" in error(ExperimentTraining, {"steps": 3, "warmup_steps": 3})
    assert "steps" in error(ExperimentTraining, {"steps": 0})


def test_unknown_keys_and_unsafe_names_are_refused() -> None:
    assert "lr_rate" in error(ExperimentTraining, {"lr_rate": 0.1})
    assert "name" in error(MixtureVariant, {"name": "../up", "weights": {}})
    assert MixtureVariant(name="photos-2.5", weights={"photos": 2.5}).stages is None
    assert "weights" in error(WeightSweep, {"source": "photos", "weights": []})


def test_the_flow_takes_the_settings_from_schemas() -> None:
    import flows.mixture_experiment as experiment

    assert experiment.ExperimentTraining is ExperimentTraining
    assert experiment.MixtureVariant is MixtureVariant and experiment.WeightSweep is WeightSweep

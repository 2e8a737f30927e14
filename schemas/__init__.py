"""The contracts: Arrow schemas of every record, pydantic configs, and the vocabulary layout."""

from schemas.config_base import ConfigError, dump_config, load_config, validate_config
from schemas.experiment_config import ExperimentTraining, MixtureVariant, WeightSweep
from schemas.generate_config import GenerateConfig
from schemas.mixture_spec import MixtureSpec
from schemas.model_config import ModelConfig
from schemas.prepare_config import PrepareConfig
from schemas.search_config import MixtureSearchConfig
from schemas.train_config import SFTConfig, TrainConfig

# Config kinds by the name `cham config check KIND FILE` takes.
CONFIG_KINDS = {
    "prepare": PrepareConfig,
    "mixture": MixtureSpec,
    "model": ModelConfig,
    "train": TrainConfig,
    "sft": SFTConfig,
    "generate": GenerateConfig,
    "mixture-search": MixtureSearchConfig,
}

__all__ = [
    "CONFIG_KINDS",
    "ConfigError",
    "ExperimentTraining",
    "GenerateConfig",
    "MixtureSearchConfig",
    "MixtureSpec",
    "MixtureVariant",
    "ModelConfig",
    "PrepareConfig",
    "SFTConfig",
    "TrainConfig",
    "WeightSweep",
    "dump_config",
    "load_config",
    "validate_config",
]

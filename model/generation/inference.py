"""A trained model ready to prompt: weights, config, vocabulary and tokenizers found from one checkpoint path.

A path is resolved by `model.training.checkpointing.resolve_checkpoint`: a training run's `out_dir`, its
`checkpoints/` folder or `latest` file, one `step-NNNNNNNN` folder, or a folder in our `convert` format. The trainer
writes `model_config.json` and `tokenizers.json` into every step folder (model/files/step_folder.py); folders without
`tokenizers.json` (e.g. converted Meta weights) need the tokenizer paths given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from model.files import step_folder
from model.files.step_folder import MODEL_CONFIG, TOKENIZERS
from model.lm.convert import ConversionError, load_ours
from model.lm.transformer import Transformer
from model.tokenizers.image_tokenizer import ImageTokenizer
from model.tokenizers.mixed_tokenizer import MixedModalTokenizer
from model.tokenizers.text_tokenizer import TokenizerError, load_text_tokenizer
from model.tokenizers.vocabulary import Vocabulary
from model.tokenizers.vq_checkpoint import VQCheckpointError
from model.training.checkpointing import CheckpointError, resolve_checkpoint
from schemas.config_base import ConfigError
from schemas.model_config import ModelConfig


@dataclass
class InferenceModel:
    """A model in eval mode with the vocabulary and the tokenizers it was trained with."""

    model: Transformer
    config: ModelConfig
    vocab: Vocabulary
    tokenizer: MixedModalTokenizer
    checkpoint: Path
    step: int | None
    sft: bool = False  # fine-tuned on `<s> prompt <sep> answer </s>`: prompts should end with the separator


def load_trained_model(
    path: str | Path, device: str | torch.device | None = None
) -> tuple[Transformer, Path, int | None]:
    """The model of the checkpoint at `path` in eval mode (no tokenizers needed), its folder and its step (None for a
    converted folder); any missing or damaged file raises CheckpointError naming it."""
    folder = resolve_checkpoint(path)
    if not (folder / MODEL_CONFIG).is_file():
        raise CheckpointError(
            f"{folder}: no {MODEL_CONFIG}; checkpoints from before it was written can be loaded "
            f"with `cham convert` from the training config's model"
        )
    try:
        config, state = load_ours(folder)
    except ConversionError as err:
        raise CheckpointError(f"cannot load this checkpoint: {err}") from None
    model = Transformer(config)
    model.load_state_dict(state)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    return model, folder, step_folder.read_step(folder, CheckpointError)


def load_inference_model(
    path: str | Path,
    text_tokenizer: str | Path | None = None,
    image_tokenizer: str | Path | None = None,
    device: str | torch.device | None = None,
) -> InferenceModel:
    """Load the checkpoint at `path` in eval mode; tokenizer paths override those recorded with the checkpoint."""
    model, folder, step = load_trained_model(path, device)
    recorded = step_folder.read_tokenizers_record(folder, CheckpointError)
    text_path, image_path = text_tokenizer or recorded.get("text"), image_tokenizer or recorded.get("image")
    if text_path is None:
        raise CheckpointError(
            f"{folder}: no {TOKENIZERS} names its tokenizers; pass the text tokenizer's path (--text-tokenizer)"
        )
    for kind, p in (("text", text_path), ("image", image_path)):
        if p is not None and not Path(p).exists():
            raise CheckpointError(f"{folder}: its {kind} tokenizer {p} does not exist; pass its new path")
    try:
        text = load_text_tokenizer(text_path)
        image = ImageTokenizer.load(image_path) if image_path is not None else None
    except (TokenizerError, VQCheckpointError, ConfigError, OSError) as err:
        raise CheckpointError(f"cannot load the tokenizers of {folder}: {err}") from None
    config = model.config
    if text.vocab.size != config.vocab_size:
        raise CheckpointError(
            f"{folder}: the model has {config.vocab_size} ids but the text tokenizer's vocabulary {text.vocab.size}"
        )
    layout = text.vocab.layout
    if image is not None and (image.config.n_embed, image.tokens_per_image) != (
        layout.image_codes,
        layout.tokens_per_image,
    ):
        raise CheckpointError(
            f"{folder}: the image tokenizer has {image.config.n_embed} codes and "
            f"{image.tokens_per_image} per image, the vocabulary {layout.image_codes} and "
            f"{layout.tokens_per_image}"
        )
    sft = step_folder.read_training_record(folder, CheckpointError).get("kind") == "sft"
    return InferenceModel(model, config, text.vocab, MixedModalTokenizer(text, image), folder, step, sft)

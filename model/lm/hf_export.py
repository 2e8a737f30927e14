"""A whole Hugging Face Chameleon export: what `ChameleonProcessor` / `AutoProcessor` and
`ChameleonForConditionalGeneration.from_pretrained` need to run a trained model on text and images.

The folder holds config.json (the LM, `vq_config` and the `vocabulary_map` of image-code names), model.safetensors
(the LM and the VQ encoder as `model.vqmodel.*`), the tokenizer files in Chameleon's id space
(model/tokenizers/hf_tokenizer.py), preprocessor_config.json (Chameleon's resize, crop and [-1, 1] scaling at the VQ's
resolution) and processor_config.json (codes per image). What HF's format cannot hold is refused by name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from model.files import step_folder
from model.lm.convert import ConversionError, hf_config_dict, save_hf
from model.tokenizers.hf_tokenizer import IMAGE_TOKEN, HFTokenizerError, control_names, write_hf_tokenizer
from model.tokenizers.text_tokenizer import TextTokenizer
from model.tokenizers.vq_checkpoint import hf_vq_config, hf_vq_state_dict
from model.tokenizers.vqgan import VQGAN
from schemas.model_config import ModelConfig

PREPROCESSOR_FILE, PROCESSOR_FILE = "preprocessor_config.json", "processor_config.json"
# Beside a step folder's weights: the paths of its tokenizers (model/files/step_folder.py).
TOKENIZERS_RECORD = step_folder.TOKENIZERS
# PIL's LANCZOS, the filter of Meta's preprocessing (HF's ChameleonImageProcessor default too).
PIL_LANCZOS = 1


def image_processor_config(resolution: int) -> dict[str, Any]:
    """preprocessor_config.json: short side to `resolution` (Lanczos), center crop, then x / 127.5 - 1 as Meta's
    `(x / 255) * 2 - 1` (HF's default rescale_factor 0.0078 would give [-1, 0.989])."""
    return {
        "image_processor_type": "ChameleonImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": resolution},
        "resample": PIL_LANCZOS,
        "default_to_square": False,
        "do_center_crop": True,
        "crop_size": {"height": resolution, "width": resolution},
        "do_rescale": True,
        "rescale_factor": 2 / 255,
        "do_normalize": True,
        "image_mean": [1.0, 1.0, 1.0],
        "image_std": [1.0, 1.0, 1.0],
    }


def processor_config(tokens_per_image: int) -> dict[str, Any]:
    """processor_config.json: how many `<image>` placeholders one image becomes."""
    return {"processor_class": "ChameleonProcessor", "image_seq_length": tokens_per_image, "image_token": IMAGE_TOKEN}


def check_exportable(config: ModelConfig, text: TextTokenizer, vqgan: VQGAN) -> None:
    """Refuse, naming it, what HF's Chameleon cannot hold or what does not fit together."""
    layout, vq = text.vocab.layout, vqgan.config
    if text.vocab.size != config.vocab_size:
        raise ConversionError(
            f"the model has {config.vocab_size} ids but the text tokenizer's vocabulary {text.vocab.size}"
        )
    if (vq.n_embed, vq.tokens_per_image) != (layout.image_codes, layout.tokens_per_image):
        raise ConversionError(
            f"the image tokenizer has {vq.n_embed} codes and {vq.tokens_per_image} per image, the "
            f"vocabulary {layout.image_codes} and {layout.tokens_per_image}"
        )
    if vq.in_channels != 3:
        raise ConversionError(f"HF's image processor gives RGB pixels; this VQ takes {vq.in_channels} channels")


def export_hf(
    state: Mapping[str, torch.Tensor],
    config: ModelConfig,
    folder: str | Path,
    text: TextTokenizer,
    vqgan: VQGAN,
) -> list[Path]:
    """Write the whole HF export of a model and its tokenizers into `folder`; returns the files written."""
    check_exportable(config, text, vqgan)
    try:
        vocabulary_map = {name: i for i, name in control_names(text.vocab).items()}
    except HFTokenizerError as err:
        raise ConversionError(str(err)) from None
    hf_config = hf_config_dict(config, text.vocab.layout, hf_vq_config(vqgan.config))
    folder = Path(folder)
    save_hf(
        state,
        config,
        folder,
        config_dict={**hf_config, "vocabulary_map": vocabulary_map},
        extra_tensors=hf_vq_state_dict(vqgan),
    )
    try:
        written = write_hf_tokenizer(text, folder, config.max_seq_len)
    except HFTokenizerError as err:
        raise ConversionError(str(err)) from None
    for name, content in (
        (PREPROCESSOR_FILE, image_processor_config(vqgan.config.resolution)),
        (PROCESSOR_FILE, processor_config(vqgan.config.tokens_per_image)),
    ):
        (folder / name).write_text(json.dumps(content, indent=2) + "\n")
        written.append(folder / name)
    return [folder / "config.json", folder / "model.safetensors", *written]


def tokenizer_paths(src: Path, text: str | Path | None, image: str | Path | None) -> tuple[Path, Path]:
    """The text and image tokenizer paths of an export: given ones first, else those `src` (one of our step
    folders) records in tokenizers.json; a ConversionError saying what to pass when either is unknown."""
    record = src / TOKENIZERS_RECORD
    recorded: dict[str, Any] = {}
    if text is None or image is None:
        recorded = step_folder.read_tokenizers_record(src, ConversionError)
    text = text or recorded.get("text")
    image = image or recorded.get("image")
    missing = [opt for opt, path in (("--text-tokenizer", text), ("--image-tokenizer", image)) if path is None]
    if missing:
        where = f"{record} does not name" if recorded else f"{src} has no {TOKENIZERS_RECORD} naming"
        raise ConversionError(
            f"an HF export holds the model's text and image tokenizers, and {where} them all: "
            f"pass {' and '.join(missing)}"
        )
    for kind, path in (("text", text), ("image", image)):
        if not Path(path).exists():
            raise ConversionError(f"the {kind} tokenizer {path} does not exist")
    return Path(text), Path(image)


def load_tokenizers(text_path: Path, image_path: Path) -> tuple[TextTokenizer, VQGAN]:
    """The text tokenizer and the VQGAN of an export, or a ConversionError naming the path that failed."""
    from model.tokenizers.image_tokenizer import ImageTokenizer
    from model.tokenizers.text_tokenizer import TokenizerError, load_text_tokenizer
    from model.tokenizers.vq_checkpoint import VQCheckpointError
    from schemas.config_base import ConfigError

    try:
        text = load_text_tokenizer(text_path)
    except (TokenizerError, OSError) as err:
        raise ConversionError(f"text tokenizer {text_path}: {err}") from None
    try:
        vqgan = ImageTokenizer.load(image_path).vqgan
    except (VQCheckpointError, ConfigError, OSError) as err:
        raise ConversionError(f"image tokenizer {image_path}: {err}") from None
    return text, vqgan

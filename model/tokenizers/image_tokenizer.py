"""The image tokenizer: Chameleon's preprocessing plus the VQGAN, images <-> VQ codes, batched."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from model.tokenizers.image_preprocess import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    ImageSource,
    from_tensor,
    preprocess,
    to_tensor,
)
from model.tokenizers.vq_checkpoint import META_CKPT_NAME, load_hf_vqvae, load_meta_vqgan, save_meta_vqgan
from model.tokenizers.vqgan import VQGAN

ImageInput = ImageSource | np.ndarray  # file bytes or path, or an already preprocessed uint8 HxWx3 array


class ImageTokenizer:
    """Images -> codes [n, grid*grid] and codes -> uint8 images, in batches, with one model copy."""

    def __init__(
        self,
        vqgan: VQGAN,
        batch_size: int = 16,
        fast: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_side: int = DEFAULT_MIN_SIDE,
    ):
        self.vqgan = vqgan.eval().channels_last()
        self.config = vqgan.config
        self.size = vqgan.config.resolution
        self.tokens_per_image = vqgan.config.tokens_per_image
        self.batch_size = batch_size
        self.fast, self.max_pixels, self.min_side = fast, max_pixels, min_side
        self._fingerprint: str | None = None

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> ImageTokenizer:
        """Meta's format (a folder with vqgan.ckpt + vqgan.yaml, or the .ckpt) or a Hugging Face checkpoint folder; on
        a store too (`s3://...`: fetched once into this machine's cache)."""
        from model.files.storage import local_copy

        path = local_copy(path, "tokenizers")
        if path.is_dir() and (path / META_CKPT_NAME).is_file():
            return cls(load_meta_vqgan(path / META_CKPT_NAME), **kwargs)
        if path.suffix == ".ckpt" and path.is_file():
            return cls(load_meta_vqgan(path), **kwargs)
        if path.is_dir() and (path / "config.json").is_file():
            return cls(load_hf_vqvae(path), **kwargs)
        raise FileNotFoundError(f"{path}: no image tokenizer here (expected vqgan.ckpt + vqgan.yaml, or a HF folder)")

    def save(self, directory: str | Path) -> Path:
        """Meta's format: vqgan.ckpt + vqgan.yaml."""
        save_meta_vqgan(self.vqgan, directory)
        return Path(directory)

    @property
    def fingerprint(self) -> str:
        """A hash of the config and every weight: changes whenever a code could change."""
        if self._fingerprint is None:
            digest = hashlib.sha256(self.config.model_dump_json(exclude={"preset"}).encode())
            for name, tensor in sorted(self.vqgan.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def pixels(self, image: ImageInput, mode: Literal["crop", "pad"] = "crop") -> np.ndarray:
        """The model's uint8 input for one image (raises ImageError for a bad one)."""
        if isinstance(image, np.ndarray):
            if image.shape != (self.size, self.size, 3) or image.dtype != np.uint8:
                raise ValueError(f"a preprocessed image must be uint8 {(self.size, self.size, 3)}, got {image.shape}")
            return image
        return preprocess(
            image, size=self.size, mode=mode, fast=self.fast, max_pixels=self.max_pixels, min_side=self.min_side
        ).pixels

    @torch.inference_mode()
    def encode_pixels(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """Codes [n, grid*grid] (int64) of preprocessed uint8 images, in batches."""
        out = [
            self.vqgan.encode(to_tensor(pixels[i : i + self.batch_size])).numpy()
            for i in range(0, len(pixels), self.batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.tokens_per_image), np.int64)

    def encode(self, images: Sequence[ImageInput], mode: Literal["crop", "pad"] = "crop") -> np.ndarray:
        """Codes [n, grid*grid] of images given as file bytes, paths or preprocessed arrays."""
        return self.encode_pixels([self.pixels(image, mode) for image in images])

    @torch.inference_mode()
    def decode(self, codes: np.ndarray) -> list[np.ndarray]:
        """uint8 HxWx3 images from codes [n, grid*grid] (needs the decoder: Meta's format or ours)."""
        codes = np.asarray(codes)
        images: list[np.ndarray] = []
        for i in range(0, len(codes), self.batch_size):
            images += from_tensor(self.vqgan.decode(torch.as_tensor(codes[i : i + self.batch_size])))
        return images

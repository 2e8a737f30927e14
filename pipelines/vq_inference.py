"""The VQ image tokenizer as a Beam RunInference model handler: batched, one model copy per worker process."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from model.image_tokenizer import ImageTokenizer


class VQModelHandler(ModelHandler[np.ndarray, PredictionResult, ImageTokenizer]):
    """Preprocessed uint8 images in, VQ codes [grid*grid] out; the model loads once per process."""

    def __init__(self, tokenizer_path: str, max_batch_size: int = 16):
        self.tokenizer_path = tokenizer_path
        self.max_batch_size = max_batch_size

    def load_model(self) -> ImageTokenizer:
        return ImageTokenizer.load(self.tokenizer_path, batch_size=self.max_batch_size)

    def run_inference(
        self, batch: Sequence[np.ndarray], model: ImageTokenizer, inference_args: dict[str, Any] | None = None
    ) -> Iterable[PredictionResult]:
        codes = model.encode_pixels(list(batch))
        return [PredictionResult(example, inference) for example, inference in zip(batch, codes, strict=True)]

    def batch_elements_kwargs(self) -> dict[str, Any]:
        return {"min_batch_size": 1, "max_batch_size": self.max_batch_size}

    def share_model_across_processes(self) -> bool:
        return False  # one copy per worker process, as the issue asks; a GPU host may prefer True

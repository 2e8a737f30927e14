"""The VQ image tokenizer in Beam: batched, one model copy per worker process.

`VQCodes` uses Beam's RunInference with our model handler. Beam's DaskRunner (2.77) drops what a DoFn emits in
`finish_bundle`, which BatchElements (inside RunInference) relies on, so there it groups images by a batch key
instead (no finish_bundle) and encodes each group in a DoFn that loads the model in `setup`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference

from model.files.storage import local_copy
from model.tokenizers.image_tokenizer import ImageTokenizer


class VQModelHandler(ModelHandler[np.ndarray, PredictionResult, ImageTokenizer]):
    """Preprocessed uint8 images in, VQ codes [grid*grid] out; the model loads once per process."""

    def __init__(self, tokenizer_path: str, max_batch_size: int = 16, threads: int | None = None):
        self.tokenizer_path = tokenizer_path
        self.max_batch_size = max_batch_size
        self.threads = threads  # torch threads per worker process; None keeps torch's default (all cores)

    def load_model(self) -> ImageTokenizer:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)  # N worker processes x all-core torch would oversubscribe
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


# Models loaded in this process, by handler settings and the tokenizer files' sizes and mtimes (a dask worker outlives
# a job: a tokenizer saved again at the same path must be loaded again). Beam's DaskRunner calls `setup` once per
# dask partition, and prepare gives a dask job a partition per read piece.
_LOADED: dict[tuple[Any, ...], ImageTokenizer] = {}


def _files_state(path: str) -> tuple[tuple[str, int, int], ...]:
    """(name, size, mtime) of the tokenizer's files: a folder's, or the one file's (this machine's copy of a folder on
    a store, fetched again if it changed there)."""
    root = local_copy(path, "tokenizers")
    state = []
    for f in sorted(root.rglob("*")) if root.is_dir() else [root]:
        st = f.stat()
        state.append((str(f), st.st_size, st.st_mtime_ns))
    return tuple(state)


def process_model(handler: VQModelHandler) -> ImageTokenizer:
    """The handler's model, loaded once per process (again when its files change)."""
    key = (handler.tokenizer_path, handler.max_batch_size, handler.threads, _files_state(handler.tokenizer_path))
    if key not in _LOADED:
        _LOADED.clear()  # one model at a time: a job uses one VQ tokenizer
        _LOADED[key] = handler.load_model()
    return _LOADED[key]


class _EncodeGroups(beam.DoFn):
    """(batch key, [(key, pixels), ...]) -> (key, codes) for each image; the model loaded once per process."""

    def __init__(self, handler: VQModelHandler):
        self.handler = handler

    def setup(self) -> None:
        self.model = process_model(self.handler)

    def process(self, group: tuple[Any, Iterable[tuple[Any, np.ndarray]]]) -> Iterator[tuple[Any, np.ndarray]]:
        items = list(group[1])
        codes = self.model.encode_pixels([pixels for _, pixels in items])  # batches of max_batch_size inside
        yield from zip((key for key, _ in items), codes, strict=True)


def image_batch_key(key: tuple[str, int], records_per_batch: int = 16) -> str:
    """Images of `records_per_batch` neighbouring records share a batch: key (record key, slot)."""
    prefix, index = key[0].rsplit("_", 1)
    return f"{prefix}_{int(index) // records_per_batch}"


class VQCodes(beam.PTransform):
    """((record key, slot), uint8 image) -> ((record key, slot), VQ codes), batched."""

    def __init__(self, handler: VQModelHandler, use_run_inference: bool = True):
        super().__init__()
        self.handler = handler
        self.use_run_inference = use_run_inference

    def expand(self, images: beam.PCollection) -> beam.PCollection:
        if self.use_run_inference:
            return (
                images
                | "RunInference" >> RunInference(KeyedModelHandler(self.handler))
                | "codes" >> beam.MapTuple(lambda key, result: (key, result.inference))
            )
        return (
            images
            | "batch key" >> beam.Map(lambda kv: (image_batch_key(kv[0]), kv))
            | "group" >> beam.GroupByKey()
            | "encode" >> beam.ParDo(_EncodeGroups(self.handler))
        )

"""Prepared records -> tokenized samples in the worker that prepared them: VQ codes for their images in batches
across records, then the record's tokens (prepare_record.assemble_sample).

The prepare job uses it for sources without deduplication, inside the read stage: no shuffle of records and codes to
join them, and the tokenizing runs spread over the workers with the heavy stage instead of after it.
"""

from __future__ import annotations

from typing import Any

from model.tokenizers.image_tokenizer import ImageTokenizer
from model.tokenizers.mixed_tokenizer import MixedModalTokenizer
from pipelines.prepare_record import PreparedRecord, PrepareSettings, assemble_sample
from pipelines.raw_records import Reject


class RecordTokenizer:
    """Buffers records until their images fill a VQ batch, then encodes them together and assembles each record.

    `add` and `flush` return (ok tag, (shard id, TokenizedSample)) or (reject tag, (shard id, Reject)) pairs, `tags`
    being the caller's (ok, reject); a caller flushes after its last record.
    """

    def __init__(
        self,
        vq: ImageTokenizer,
        tokenizer: MixedModalTokenizer,
        settings: PrepareSettings,
        batch_images: int,
        tags: tuple[str, str],
    ):
        self.vq, self.tokenizer, self.settings = vq, tokenizer, settings
        self.batch_images = batch_images
        self.ok, self.reject = tags
        self.pending: list[PreparedRecord] = []
        self.pending_images = 0

    def add(self, record: PreparedRecord) -> list[tuple[str, Any]]:
        """Buffer `record`; the samples of every buffered record once their images fill a batch."""
        self.pending.append(record)
        self.pending_images += len(record.images)
        return self.flush() if self.pending_images >= self.batch_images else []

    def flush(self) -> list[tuple[str, Any]]:
        """The samples (or rejects) of every buffered record."""
        records, self.pending, self.pending_images = self.pending, [], 0
        codes = iter(self.vq.encode_pixels([image for record in records for image in record.images]))
        out = []
        for record in records:
            by_slot = {slot: next(codes) for slot in range(len(record.images))}
            sample = assemble_sample(record.without_pixels(), by_slot, self.tokenizer, self.settings)
            tag = self.reject if isinstance(sample, Reject) else self.ok
            out.append((tag, (record.task, sample)))
        return out

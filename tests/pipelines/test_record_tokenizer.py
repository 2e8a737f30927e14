"""Records tokenized where they were prepared: images VQ-encoded in batches across records, each record's sample the
same as encoding its images alone and assembling it; rejects tagged; nothing held back after a flush."""

from __future__ import annotations

import numpy as np
import pytest

from model.tokenizers.image_tokenizer import ImageTokenizer
from model.tokenizers.mixed_tokenizer import MixedModalTokenizer
from model.tokenizers.text_tokenizer import load_text_tokenizer
from pipelines.prepare_record import PreparedRecord, PrepareSettings, assemble_sample
from pipelines.raw_records import Reject
from pipelines.record_tokenizer import RecordTokenizer

TAGS = ("ok", "reject")


@pytest.fixture(scope="module")
def tokenizers(tiny_tokenizers):
    vq = ImageTokenizer.load(tiny_tokenizers["image"], batch_size=4)
    return vq, MixedModalTokenizer(load_text_tokenizer(tiny_tokenizers["text"]))


def record(index: int, n_images: int, text: str = "a short caption") -> PreparedRecord:
    rng = np.random.default_rng(index)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(n_images)]
    prompt: list[str | int] = [*range(n_images), text]
    return PreparedRecord("s", "interleaved", 3, index, f"r{index}", prompt, None, images, [(64, 64)] * n_images)


def test_batches_across_records_give_each_record_its_own_sample(tokenizers):
    vq, tokenizer = tokenizers
    settings = PrepareSettings(image_size=64)
    records = [record(i, n) for i, n in enumerate([1, 0, 2, 3, 1, 2])]
    batcher = RecordTokenizer(vq, tokenizer, settings, batch_images=4, tags=TAGS)
    out, sizes = [], []
    for r in records:
        got = batcher.add(r)
        sizes.append(len(got))
        out += got
    assert sizes == [0, 0, 0, 4, 0, 0]  # 1 + 0 + 2 + 3 = 6 >= 4 images: the first four records at once
    last = batcher.flush()
    assert len(last) == 2 and batcher.flush() == [] and batcher.pending == []  # 1 + 2 images, under a batch
    out += last
    assert [tag for tag, _ in out] == ["ok"] * 6
    for r, (_, (task, sample)) in zip(records, out, strict=True):
        alone = assemble_sample(r.without_pixels(), dict(enumerate(vq.encode_pixels(r.images))), tokenizer, settings)
        assert task == 3 and sample.key == alone.key
        np.testing.assert_array_equal(sample.tokens, alone.tokens)


def test_a_record_over_max_tokens_is_a_tagged_reject(tokenizers):
    vq, tokenizer = tokenizers
    batcher = RecordTokenizer(vq, tokenizer, PrepareSettings(image_size=64, max_tokens=20), batch_images=4, tags=TAGS)
    out = batcher.add(record(0, 1)) + batcher.add(record(1, 0, "word " * 3)) + batcher.flush()
    tags = [tag for tag, _ in out]
    assert tags == ["reject", "ok"]  # an image's codes and markers with the caption pass 20 tokens
    (task, reject) = out[0][1]
    assert task == 3 and isinstance(reject, Reject) and reject.reason == "too_long" and reject.record_id == "r0"

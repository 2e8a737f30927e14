"""One record through the per-record work: the image path it takes (Chameleon's exact one on request)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from model.tokenizers.image_preprocess import preprocess
from pipelines.prepare_record import PrepareSettings, prepare_record
from tests.conftest import REPO


def large_jpeg() -> bytes:
    """A 2048x1536 JPEG of a sample photo: large enough for the reduced-scale decode."""
    photo = Image.open(REPO / "sample/images/tabby_cat_chelsea.jpg").convert("RGB").resize((2048, 1536))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_fast_image_decode_off_gives_chameleons_exact_pixels() -> None:
    data = large_jpeg()
    record = {"id": "r0", "image": {"bytes": data, "path": None}, "text": "A cat."}  # a canonical image-text record
    exact = preprocess(data, size=512, fast=False).pixels
    pixels = {}
    for fast in (True, False):
        settings = PrepareSettings(image_size=512, detect_faces=False, fast_image_decode=fast)
        out = prepare_record("photos", "image_text", 0, 0, record, settings)
        pixels[fast] = out.images[0]
    assert np.array_equal(pixels[False], exact)
    assert not np.array_equal(pixels[True], exact)  # the fast path is close, not equal
    assert np.abs(pixels[True].astype(int) - exact).mean() < 1.0

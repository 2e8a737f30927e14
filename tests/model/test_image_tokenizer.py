"""The image tokenizer on the sample photos, and the mixed-modal tokenizer with real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.image_preprocess import ImageError, preprocess, to_tensor
from model.image_tokenizer import ImageTokenizer
from model.mixed_tokenizer import ImageSegment, MixedModalTokenizer
from model.text_tokenizer import iter_texts, train_text_tokenizer
from model.vq_training import init_codebook_from_latents
from model.vqgan import VQGAN
from schemas.vocab import TINY
from schemas.vq_config import VQConfig
from tests.conftest import REPO

PHOTOS = sorted((REPO / "sample" / "images").glob("*.jpg"))


@pytest.fixture(scope="module")
def tokenizer() -> ImageTokenizer:
    torch.manual_seed(0)
    vqgan = VQGAN(VQConfig.from_preset("tiny")).eval()
    # Codes taken from real encoder outputs are well separated, as in a trained tokenizer.
    pixels = to_tensor([preprocess(p, size=64).pixels for p in PHOTOS])
    init_codebook_from_latents(vqgan, pixels, torch.Generator().manual_seed(0))
    return ImageTokenizer(vqgan, batch_size=5)


def test_encode_sample_photos(tokenizer: ImageTokenizer) -> None:
    codes = tokenizer.encode(PHOTOS)
    assert codes.shape == (24, 64) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 256
    assert len(np.unique(codes)) > 64  # the images use many different codes
    # Paths, bytes and preprocessed arrays give the same codes, whatever the batch size.
    assert np.array_equal(tokenizer.encode([p.read_bytes() for p in PHOTOS[:7]]), codes[:7])
    arrays = [preprocess(p, size=64).pixels for p in PHOTOS[:7]]
    assert np.array_equal(tokenizer.encode(arrays), codes[:7])
    one_by_one = np.concatenate([tokenizer.encode([p]) for p in PHOTOS[:7]])
    assert np.array_equal(one_by_one, codes[:7])


def test_pad_mode_sees_the_whole_image(tokenizer: ImageTokenizer) -> None:
    tall = REPO / "sample/images/joe_biden_blue_room_2010.jpg"  # 282x640: crop and pad differ
    assert not np.array_equal(tokenizer.encode([tall], mode="pad"), tokenizer.encode([tall]))


def test_decode_and_round_trip_through_metas_format(tokenizer: ImageTokenizer, tmp_path: Path) -> None:
    codes = tokenizer.encode(PHOTOS[:3])
    images = tokenizer.decode(codes)
    assert [im.shape for im in images] == [(64, 64, 3)] * 3 and images[0].dtype == np.uint8
    tokenizer.save(tmp_path)
    loaded = ImageTokenizer.load(tmp_path)
    assert loaded.fingerprint == tokenizer.fingerprint
    assert np.array_equal(loaded.encode(PHOTOS[:3]), codes)
    assert all(np.array_equal(a, b) for a, b in zip(loaded.decode(codes), images, strict=True))
    with torch.no_grad():
        loaded.vqgan.quantize.embedding.weight[0, 0] += 1.0
    loaded._fingerprint = None
    assert loaded.fingerprint != tokenizer.fingerprint


def test_errors(tokenizer: ImageTokenizer, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no image tokenizer here"):
        ImageTokenizer.load(tmp_path)
    with pytest.raises(ImageError) as info:
        tokenizer.encode([b""])
    assert info.value.reason == "image_empty"
    with pytest.raises(ValueError, match="must be uint8"):
        tokenizer.encode([np.zeros((32, 32, 3), np.uint8)])


def test_mixed_documents_with_real_images(tokenizer: ImageTokenizer) -> None:
    text = train_text_tokenizer(iter_texts([REPO / "sample/text/docs.jsonl"]), TINY)
    mixed = MixedModalTokenizer(text, tokenizer)
    photo = PHOTOS[0]
    ids = mixed.encode(["A photo:", photo.read_bytes(), "The end."])
    assert (ids == mixed.vocab.boi_id).sum() == 1 and len(ids) > TINY.image_block_len
    segments = mixed.decode(ids)
    assert segments[0] == "A photo:" and segments[2] == "The end."
    image = segments[1]
    assert isinstance(image, ImageSegment) and image.pixels.shape == (64, 64, 3)
    assert np.array_equal(image.codes, tokenizer.encode([photo])[0])
    # SFT images are padded, not cropped.
    tall = REPO / "sample/images/joe_biden_blue_room_2010.jpg"
    ids_sft, n_prompt = mixed.encode_sft([tall.read_bytes(), "Who is this?"], ["A man in a suit."])
    assert ids_sft[n_prompt - 1] == mixed.vocab.sep_id
    sft_codes = mixed.vocab.ids_to_codes(ids_sft[2 : 2 + TINY.tokens_per_image])
    assert np.array_equal(sft_codes, tokenizer.encode([tall], mode="pad")[0])

"""The image tokenizer on the sample photos, and the mixed-modal tokenizer with real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.tokenizers.image_preprocess import ImageError, preprocess, to_tensor
from model.tokenizers.image_tokenizer import ImageTokenizer
from model.tokenizers.mixed_tokenizer import ImageSegment, MixedModalTokenizer
from model.tokenizers.text_tokenizer import iter_texts, train_text_tokenizer
from model.tokenizers.vq_training import init_codebook_from_latents
from model.tokenizers.vqgan import VQGAN
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


def _flat_diagram(side: int = 512) -> np.ndarray:
    """A chart-like image: a white page, solid shapes, thin lines and text (large flat regions)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (side, side), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([40, 40, 250, 200], fill=(30, 90, 200))
    draw.ellipse([280, 60, 470, 250], fill=(240, 160, 20))
    draw.line([0, 400, side, 300], fill="black", width=6)
    for y in range(260, 500, 40):
        draw.line([40, y, 240, y], fill=(200, 200, 200), width=1)
    draw.text((60, 320), "flat diagram 42%", fill="black")
    return np.asarray(image)


@pytest.mark.slow
def test_codes_at_512_px_equal_a_float64_reference_on_photos_and_flat_diagrams() -> None:
    """At 512 px, flat and smooth regions give GroupNorm groups whose mean is large against their spread; PyTorch's
    channels_last CPU kernel then moved 12 of 3,072 codes here (Meta's reference tokenizer, NCHW, does not). The
    fast tokenizer's codes equal a float64 NCHW copy of the same model wherever the nearest code is not a near-tie,
    and equal our own contiguous fp32 path."""
    torch.manual_seed(0)
    config = VQConfig.from_preset("chameleon", ch=32, n_embed=1024)  # Meta's shape at 512 px, 1/4 the width
    vqgan = VQGAN(config, with_decoder=False).eval()
    photos = [REPO / "sample/images/chinese_tower_above_lake.jpg", REPO / "sample/images/espresso_cup_on_saucer.jpg"]
    pixels = [preprocess(p, size=512).pixels for p in photos] + [_flat_diagram()]
    with torch.no_grad():
        init_codebook_from_latents(vqgan, to_tensor(pixels), torch.Generator().manual_seed(0))
    reference = VQGAN(config, with_decoder=False).eval()
    reference.load_state_dict(vqgan.state_dict())
    contiguous = VQGAN(config, with_decoder=False).eval()
    contiguous.load_state_dict(vqgan.state_dict())
    reference.double()
    with torch.no_grad():
        latents = reference.latents(to_tensor(pixels).double())
        distances = reference.quantize.distances(latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]))
    best_two = distances.topk(2, largest=False).values
    exact = distances.argmin(1).view(len(pixels), -1).numpy()
    clear = (best_two[:, 1] - best_two[:, 0] > 1e-4).view(len(pixels), -1).numpy()  # the median gap is ~0.15
    assert clear.mean() > 0.98
    fast = ImageTokenizer(vqgan).encode(pixels)
    assert ImageTokenizer(vqgan).vqgan.is_channels_last
    assert np.array_equal(fast[clear], exact[clear])
    assert np.array_equal(fast, contiguous.encode(to_tensor(pixels)).numpy())

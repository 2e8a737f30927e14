"""Image preprocessing: Meta's exact path, the JPEG draft fast path, SFT padding, bad images, tensors."""

from __future__ import annotations

import io
import pickle
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from model.tokenizers.image_preprocess import (
    ImageError,
    _vips_span,
    from_tensor,
    lanczos_window,
    lanczos_window_pillow,
    open_image,
    preprocess,
    psnr,
    resize_center_crop,
    resize_pad,
    to_tensor,
    whiten_transparency,
)
from schemas.records import REJECT_REASONS

SAMPLE_IMAGES = sorted((Path(__file__).resolve().parents[3] / "sample" / "images").glob("*.jpg"))
WHITE = (255, 255, 255)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def sample_rgb(index: int) -> Image.Image:
    with Image.open(SAMPLE_IMAGES[index]) as image:
        return image.convert("RGB")


def large_jpeg(index: int, size: tuple[int, int] = (2048, 1536), **options) -> bytes:
    """A sample photo upscaled to `size` (transposed for portraits) and saved as JPEG q95."""
    photo = sample_rgb(index)
    if photo.height > photo.width:
        size = (size[1], size[0])
    return encode(photo.resize(size, Image.Resampling.BICUBIC), "JPEG", quality=95, **options)


def native_detail_jpeg(seed: int, size: tuple[int, int] = (2048, 1536), tile: int = 200) -> bytes:
    """A mosaic of sample photo crops at native resolution: real detail at every pixel, unlike an upscale."""
    rng = random.Random(seed)
    canvas = Image.new("RGB", size)
    for y in range(0, size[1], tile):
        for x in range(0, size[0], tile):
            photo = sample_rgb(rng.randrange(len(SAMPLE_IMAGES)))
            cx, cy = rng.randrange(photo.width - tile), rng.randrange(photo.height - tile)
            canvas.paste(photo.crop((cx, cy, cx + tile, cy + tile)), (x, y))
    return encode(canvas, "JPEG", quality=95)


def meta_reference(image: Image.Image, size: int) -> torch.Tensor:
    """Meta's ImageTokenizer math written out literally: float64 white blend, resize, crop, (x/255)*2 - 1."""
    if image.mode != "RGB":
        rgba = np.array(image.convert("RGBA"))
        if (rgba[:, :, 3] < 255).any():
            alpha = rgba[:, :, 3:4] / 255.0
            image = Image.fromarray(((1 - alpha) * 255 + alpha * rgba[:, :, :3]).astype("uint8"), "RGB")
        else:
            image = image.convert("RGB")
    scale = size / min(image.size)
    image = image.resize((round(scale * image.size[0]), round(scale * image.size[1])), Image.LANCZOS)
    x0, y0 = (image.width - size) // 2, (image.height - size) // 2
    pixels = np.array(image.crop((x0, y0, x0 + size, y0 + size))) / 255.0 * 2 - 1
    return torch.from_numpy(pixels).permute(2, 0, 1).float().unsqueeze(0)


def test_sample_photos_are_there():
    assert len(SAMPLE_IMAGES) >= 10


@pytest.mark.parametrize("index", [0, 1, 3, 13])  # square, portrait, small square, grayscale
def test_sample_photo_shape_and_size(index: int):
    result = preprocess(SAMPLE_IMAGES[index])
    with Image.open(SAMPLE_IMAGES[index]) as image:
        assert result.original_size == image.size
    assert result.pixels.shape == (512, 512, 3)
    assert result.pixels.dtype == np.uint8
    assert result.draft_scale == 1  # small JPEGs take the exact path


def test_exact_path_is_metas_math_bit_for_bit():
    photo = sample_rgb(1)  # portrait 334x640: upscaled, rounding of the long side matters
    translucent = sample_rgb(5).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, translucent.width).astype(np.uint8), (translucent.height, 1))
    translucent.putalpha(Image.fromarray(alpha))
    for image, fmt in [(photo, "JPEG"), (translucent, "PNG"), (sample_rgb(2).convert("L"), "PNG")]:
        data = encode(image, fmt)
        with Image.open(io.BytesIO(data)) as decoded:
            expected = meta_reference(decoded, 256)
        ours = to_tensor([preprocess(data, 256, fast=False).pixels])
        assert torch.equal(ours, expected), fmt


@pytest.mark.parametrize("axis", [0, 1])
def test_center_crop_keeps_the_floor_offset_region(axis: int):
    # 1025 x 256: the short side is already 256, so no resampling; the crop starts at (1025-256)//2 = 384.
    # Columns 384..639 are green, the neighbours red and blue: a round-up offset would show a blue edge.
    bands = np.zeros((256, 1025, 3), np.uint8)
    bands[:, :384] = (255, 0, 0)
    bands[:, 384:640] = (0, 255, 0)
    bands[:, 640:] = (0, 0, 255)
    if axis == 1:
        bands = bands.transpose(1, 0, 2).copy()
    pixels = preprocess(encode(Image.fromarray(bands), "PNG"), 256).pixels
    assert (pixels == (0, 255, 0)).all()


def test_resize_center_crop_downscales_short_side_to_size():
    image = Image.new("RGB", (900, 300))
    assert resize_center_crop(image, 128).size == (128, 128)
    assert resize_pad(image, 128).size == (128, 128)


def test_pad_mode_keeps_everything_on_white():
    # 1000 x 500: red left edge, green right edge, blue middle -> 256 x 128 pasted at y = 64.
    stripes = np.zeros((500, 1000, 3), np.uint8)
    stripes[:, :100] = (255, 0, 0)
    stripes[:, 100:900] = (0, 0, 255)
    stripes[:, 900:] = (0, 255, 0)
    pixels = preprocess(encode(Image.fromarray(stripes), "PNG"), 256, mode="pad").pixels
    assert pixels.shape == (256, 256, 3)
    assert (pixels[:64] == WHITE).all() and (pixels[192:] == WHITE).all()
    content = pixels[64:192].astype(int)
    assert (content[:, 0] == (255, 0, 0)).all()  # the left edge survived
    assert (content[:, -1] == (0, 255, 0)).all()  # and the right one
    assert (np.abs(content[:, 128] - (0, 0, 255)) <= 1).all()


def test_pad_mode_portrait_borders_left_and_right():
    pixels = preprocess(encode(Image.new("RGB", (300, 600), (10, 20, 30)), "PNG"), 128, mode="pad").pixels
    assert (pixels[:, :32] == WHITE).all() and (pixels[:, 96:] == WHITE).all()
    assert (pixels[:, 32:96] == (10, 20, 30)).all()


def test_rgba_blends_on_white_like_meta():
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[:, :, :3] = (200, 0, 0)
    rgba[:, :32, 3] = 0  # transparent
    rgba[:, 32:48, 3] = 128  # half
    rgba[:, 48:, 3] = 255  # opaque
    pixels = preprocess(encode(Image.fromarray(rgba, "RGBA"), "PNG"), 64).pixels
    assert (pixels[:, :32] == WHITE).all()
    half = int((1 - 128 / 255) * 255 + 128 / 255 * 200), int((1 - 128 / 255) * 255)
    assert (pixels[:, 32:48] == (half[0], half[1], half[1])).all()
    assert (pixels[:, 48:] == (200, 0, 0)).all()


def test_opaque_rgba_is_plain_rgb():
    image = Image.new("RGBA", (40, 40), (1, 2, 3, 255))
    assert whiten_transparency(image).mode == "RGB"
    assert np.asarray(whiten_transparency(image))[0, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_becomes_white(fmt: str):
    palette_image = Image.new("P", (64, 64), 0)
    palette_image.putpalette([0, 0, 0, 30, 60, 90] + [0] * 762)
    palette_image.paste(1, (32, 0, 64, 64))
    data = encode(palette_image, fmt, transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    pixels = preprocess(data, 64).pixels
    assert (pixels[:, :32] == WHITE).all()  # index 0 is transparent black -> white
    assert (pixels[:, 32:] == (30, 60, 90)).all()


def test_gray_with_alpha_becomes_white_where_transparent():
    gray = Image.new("L", (64, 64), 50)
    alpha = Image.new("L", (64, 64), 255)
    alpha.paste(0, (0, 0, 64, 20))
    data = encode(Image.merge("LA", (gray, alpha)), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "LA"
    pixels = preprocess(data, 64).pixels
    assert (pixels[:20] == WHITE).all()
    assert (pixels[20:] == (50, 50, 50)).all()


def test_cmyk_jpeg_converts_to_the_right_colours():
    photo = sample_rgb(18)
    data = encode(photo.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    from_cmyk = preprocess(data, 256).pixels
    from_rgb = preprocess(encode(photo, "PNG"), 256).pixels
    assert psnr(from_cmyk, from_rgb) >= 35  # JPEG loss only; an inverted or misread CMYK gives ~10 dB


def test_sixteen_bit_gray_is_scaled_not_clipped():
    values = np.zeros((64, 64), np.uint16)
    values[:32, :32], values[:32, 32:], values[32:, :32], values[32:, 32:] = 0, 257 * 100, 32896, 65535
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    pixels = preprocess(data, 64).pixels  # 64 px short side: no resampling, values stay exact
    assert (pixels[:32, :32] == 0).all()
    assert (pixels[:32, 32:] == 100).all()
    assert (pixels[32:, :32] == 128).all()  # 32896 / 257 = 128, where clipping would give 255
    assert (pixels[32:, 32:] == 255).all()


@pytest.mark.parametrize(("orientation", "upright_corner"), [(3, "bottom_right"), (6, "top_right"), (8, "bottom_left")])
def test_exif_orientation_is_applied(orientation: int, upright_corner: str):
    # 96 x 64 stored; red block in the stored top-left corner.
    stored = np.full((64, 96, 3), 255, np.uint8)
    stored[:24, :24] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif)
    upright = np.asarray(open_image(data)).astype(int)
    assert upright.shape[:2] == ((64, 96) if orientation == 3 else (96, 64))
    corners = {"top_right": upright[5, -5], "bottom_right": upright[-5, -5], "bottom_left": upright[-5, 5]}
    assert np.abs(corners[upright_corner] - (255, 0, 0)).max() < 30
    assert np.abs(upright[5, 5] - WHITE).max() < 30  # the stored corner is white after turning
    assert preprocess(data, 32).original_size == (upright.shape[1], upright.shape[0])


@pytest.mark.parametrize("index", [0, 1, 6])
def test_fast_path_on_large_jpegs_stays_within_40_db(index: int):
    data = large_jpeg(index)
    fast, exact = preprocess(data), preprocess(data, fast=False)
    assert fast.draft_scale == 2 and exact.draft_scale == 1
    assert fast.original_size == exact.original_size
    assert psnr(fast.pixels, exact.pixels) >= 40


def test_fast_path_on_native_detail_stays_within_40_db():
    data = native_detail_jpeg(0)
    fast, exact = preprocess(data), preprocess(data, fast=False)
    assert fast.draft_scale == 2
    assert psnr(fast.pixels, exact.pixels) >= 40


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_fast_path_follows_exif_orientation(orientation: int, mode: str):
    # 1103 x 800 at size 256: resized width 353, an odd margin, so a mirrored crop offset would be off by one
    # pixel (about 25 dB here).
    exif = Image.Exif()
    exif[0x0112] = orientation
    photo = sample_rgb(2).resize((1103, 800), Image.Resampling.BICUBIC)
    data = encode(photo, "JPEG", quality=95, exif=exif)
    fast, exact = preprocess(data, 256, mode), preprocess(data, 256, mode, fast=False)
    assert fast.draft_scale == (8 / 3 if mode == "pad" else 2)  # pad's target is smaller: 3/8 scale still suffices
    assert fast.original_size == exact.original_size == ((800, 1103) if orientation >= 5 else (1103, 800))
    assert psnr(fast.pixels, exact.pixels) >= 40


@settings(max_examples=200, deadline=None)
@given(
    source=st.integers(64, 8000),
    eighths=st.integers(1, 7),
    target=st.integers(32, 2048),
    lo_frac=st.floats(0.0, 0.5),
    hi_frac=st.floats(0.5, 1.0),
)
def test_vips_span_matches_pillows_pixel_centres(
    source: int, eighths: int, target: int, lo_frac: float, hi_frac: float
):
    # The scales the fast path uses: source side * M/8 decoded pixels onto the resize target's side.
    scale = source * eighths / 8 / target
    assume(scale >= 1.05)
    lo, hi = int(target * lo_frac), max(int(target * lo_frac) + 1, int(target * hi_frac))
    a, n, k, o = _vips_span(scale, lo, hi)
    assert round(n / scale) == o and abs(n / scale - o) < 0.49  # libvips will make exactly o outputs
    assert k <= lo - 4 and k + o >= hi + 4  # the window is clear of libvips' edge copies
    # libvips' centre of its first output against Pillow's centre of output k (half a pixel off costs ~20 dB).
    libvips = a + 0.5 * scale - 0.5 + (n - o * scale) / 2
    pillow = (k + 0.5) * scale - 0.5
    assert abs(libvips - pillow) < 1e-9


@pytest.mark.parametrize("seed", range(6))
def test_lanczos_window_equals_pillows_lanczos(seed: int):
    # Native detail, where a shift of half a decoded pixel already costs about 20 dB; any geometry, borders included.
    pixels = np.asarray(Image.open(io.BytesIO(native_detail_jpeg(seed, (1200, 900)))))
    rng = random.Random(seed)
    height, width = rng.randrange(300, 900), rng.randrange(300, 1200)
    scale = rng.uniform(1.1, 4.0) if seed else 0.9995  # seed 0: an enlargement, which libvips leaves to Pillow
    scales = (scale, scale * rng.uniform(0.99, 1.01))
    out_w, out_h = int(width / scales[0]), int(height / scales[1])
    window = (rng.randrange(out_w // 4), rng.randrange(out_h // 4), rng.randrange(out_w * 3 // 4, out_w + 1), out_h)
    crop = np.ascontiguousarray(pixels[:height, :width])
    ours, reference = lanczos_window(crop, scales, window), lanczos_window_pillow(crop, scales, window)
    assert ours.shape == reference.shape == (window[3] - window[1], window[2] - window[0], 3)
    assert psnr(ours, reference) >= 50


def test_lanczos_window_leaves_extreme_reductions_to_pillow():
    # libvips refuses reduce factors above ~333: a 60,000 x 40 strip padded to 16 px needs ~470.
    strip = encode(sample_rgb(0).resize((60_000, 40)), "JPEG", quality=90)
    out = preprocess(strip, 16, "pad")
    assert out.pixels.shape == (16, 16, 3) and out.draft_scale > 1
    pixels = np.asarray(sample_rgb(0).resize((4000, 40)))
    window = (0, 0, 10, 1)
    assert np.array_equal(
        lanczos_window(pixels, (400.0, 40.0), window), lanczos_window_pillow(pixels, (400.0, 40.0), window)
    )


def _preprocess_in_child(data: bytes) -> tuple[np.ndarray, bool]:
    from model.tokenizers import image_preprocess

    return preprocess(data).pixels, image_preprocess._vips_state["usable"]


def test_a_child_forked_after_libvips_ran_resizes_with_pillow():
    # libvips' thread state does not survive fork(): a forked child that called it would hang. It must fall back.
    import multiprocessing

    data = large_jpeg(1)
    in_parent = preprocess(data).pixels  # libvips has now run in this process
    with multiprocessing.get_context("fork").Pool(1) as pool:
        in_child, usable = pool.apply_async(_preprocess_in_child, (data,)).get(timeout=60)
    assert usable is False
    assert psnr(in_child, in_parent) >= 50  # Pillow's Lanczos in the child, libvips' here


@pytest.mark.parametrize(
    ("size", "draft_scale"),
    [((1536, 1152), 8 / 5), ((2400, 1800), 2), ((2800, 2100), 8 / 3), ((4800, 3600), 4)],
)
def test_fast_path_picks_the_smallest_eighths_scale_that_keeps_40_db(size: tuple[int, int], draft_scale: float):
    data = native_detail_jpeg(1, size)
    fast, exact = preprocess(data), preprocess(data, fast=False)
    assert fast.draft_scale == pytest.approx(draft_scale)
    assert psnr(fast.pixels, exact.pixels) >= 40


def test_cmyk_and_broken_large_jpegs_fall_back_to_pillow():
    photo = sample_rgb(0).resize((2048, 1536), Image.Resampling.BICUBIC)
    cmyk = encode(photo.convert("CMYK"), "JPEG", quality=95)
    assert preprocess(cmyk).draft_scale == 1  # libjpeg-turbo cannot turn CMYK into RGB; Pillow can
    with pytest.raises(ImageError) as caught:
        preprocess(large_jpeg(0)[:200_000])
    assert caught.value.reason == "image_truncated"


def test_jpegs_too_small_to_gain_and_non_jpegs_take_the_exact_path():
    small = SAMPLE_IMAGES[4].read_bytes()
    assert np.array_equal(preprocess(small).pixels, preprocess(small, fast=False).pixels)
    big_png = encode(sample_rgb(4).resize((2048, 1536)), "PNG", compress_level=1)
    assert preprocess(big_png).draft_scale == 1


def test_paths_and_bytes_give_the_same_result(tmp_path: Path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(SAMPLE_IMAGES[7].read_bytes())
    by_path, by_str = preprocess(path, 128), preprocess(str(path), 128)
    by_bytes = preprocess(path.read_bytes(), 128)
    assert np.array_equal(by_path.pixels, by_bytes.pixels) and np.array_equal(by_str.pixels, by_bytes.pixels)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height gray pixels and whose data holds one row at most."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    one_row = zlib.compress(bytes(1 + min(width, 1000)))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", one_row) + png_chunk(b"IEND", b"")


def bad_images(tmp_path: Path) -> dict[str, tuple[object, dict, str]]:
    """name -> (source, preprocess keyword arguments, expected reason)."""
    photo = encode(sample_rgb(8), "JPEG", quality=90)
    png = encode(sample_rgb(8), "PNG")
    empty_file = tmp_path / "empty.jpg"
    empty_file.write_bytes(b"")
    text_file = tmp_path / "notes.jpg"
    text_file.write_text("these are not the pixels you are looking for\n" * 20)
    return {
        "zero bytes": (b"", {}, "image_empty"),
        "empty file": (empty_file, {}, "image_empty"),
        "missing file": (tmp_path / "nope.jpg", {}, "image_missing"),
        "a directory": (tmp_path, {}, "image_missing"),
        "truncated jpeg": (photo[: len(photo) // 2], {}, "image_truncated"),
        "jpeg cut in its header": (photo[:40], {}, "image_truncated"),
        "truncated png": (png[: len(png) // 2], {}, "image_truncated"),
        "random bytes": (np.random.default_rng(0).bytes(4096), {}, "image_not_an_image"),
        "text file": (text_file, {}, "image_not_an_image"),
        "over max_pixels": (photo, {"max_pixels": 100_000}, "image_too_large"),
        # Only a header: rejecting it proves the size is checked before any decoding.
        "header of 20,000 x 20,000": (png_header_claiming(20_000, 20_000), {}, "image_too_large"),
        # Our limit decides on both sides of Pillow's own guard (a warning above ~89 MP, an error above ~179 MP).
        "over a limit above Pillow's error": (
            png_header_claiming(20_000, 20_000),
            {"max_pixels": 399_999_999},
            "image_too_large",
        ),
        "over a limit above Pillow's warning": (
            png_header_claiming(10_000, 10_000),
            {"max_pixels": 99_999_999},
            "image_too_large",
        ),
        "a 400 MP header under a larger limit is read on": (
            png_header_claiming(20_000, 20_000),
            {"max_pixels": 10**12},
            "image_truncated",
        ),
        "thin sliver upscaled": (png_header_claiming(40, 100_000), {"max_pixels": 10**7}, "image_too_large"),
        "under min_side": (encode(Image.new("RGB", (300, 20)), "PNG"), {}, "image_too_small"),
        "under a raised min_side": (photo, {"min_side": 1000}, "image_too_small"),
        "32-bit float": (encode(Image.new("F", (64, 64)), "TIFF"), {}, "image_unsupported_mode"),
    }


def test_bad_images_raise_one_typed_error(tmp_path: Path):
    for name, (source, options, reason) in bad_images(tmp_path).items():
        with pytest.raises(ImageError) as caught:
            preprocess(source, 64, **options)
        assert caught.value.reason == reason, (name, caught.value)
        assert reason in REJECT_REASONS and caught.value.detail, name
        assert isinstance(caught.value, ValueError)
    truncated_png = bad_images(tmp_path)["truncated png"][0]
    with pytest.raises(ImageError, match="image_truncated"):
        open_image(truncated_png)


def test_max_pixels_above_pillows_guard_takes_effect():
    # 95 MP: over Pillow's ~89.5 MP default, which used to refuse it whatever max_pixels said.
    data = encode(Image.new("1", (10_000, 9_500), 1), "PNG")
    pillows_own = Image.MAX_IMAGE_PIXELS
    image = open_image(data, max_pixels=100_000_000)
    assert image.size == (10_000, 9_500) and image.getpixel((9_999, 9_499)) == 255
    with pytest.raises(ImageError, match=r"image_too_large: .*95,?000,?000 pixels"):
        open_image(data, max_pixels=94_999_999)
    assert pillows_own == Image.MAX_IMAGE_PIXELS  # Pillow's own setting is left as it was


def test_image_error_survives_pickling():
    error = pickle.loads(pickle.dumps(ImageError("image_truncated", "JPEG 10x10: cut")))
    assert (error.reason, error.detail) == ("image_truncated", "JPEG 10x10: cut")


def test_unknown_reason_is_a_programming_error():
    with pytest.raises(KeyError):
        ImageError("image_is_sad", "no such code")


@settings(max_examples=25, deadline=None)
@given(
    width=st.integers(32, 200),
    height=st.integers(32, 200),
    image_mode=st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "CMYK", "1"]),
    mode=st.sampled_from(["crop", "pad"]),
)
def test_any_size_and_mode_gives_a_square_rgb(width: int, height: int, image_mode: str, mode: str):
    image = Image.new(image_mode, (width, height))
    fmt = "JPEG" if image_mode == "CMYK" else "PNG"
    pixels = preprocess(encode(image, fmt), 48, mode).pixels
    assert pixels.shape == (48, 48, 3) and pixels.dtype == np.uint8


def test_to_tensor_is_metas_normalisation():
    pixels = np.arange(256 * 3, dtype=np.int64).reshape(16, 16, 3).astype(np.uint8)
    tensor = to_tensor([pixels, pixels[::-1].copy()])
    assert tensor.shape == (2, 3, 16, 16) and tensor.dtype == torch.float32
    expected = torch.from_numpy(pixels / 255.0 * 2 - 1).permute(2, 0, 1).float()
    assert torch.equal(tensor[0], expected)
    assert tensor.min().item() == -1.0 and tensor.max().item() == 1.0


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_from_tensor_inverts_to_tensor(seed: int):
    pixels = np.random.default_rng(seed).integers(0, 256, (2, 8, 12, 3), dtype=np.uint8)
    back = from_tensor(to_tensor(pixels))
    assert len(back) == 2 and all(np.array_equal(b, p) for b, p in zip(back, pixels, strict=True))


def test_from_tensor_clamps_and_rounds():
    tensor = torch.tensor([-3.0, -1.0, 0.0, 0.999, 1.0, 7.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert from_tensor(tensor)[0][0, :, 0].tolist() == [0, 0, 128, 255, 255, 255]


def test_to_tensor_rejects_mixed_sizes():
    with pytest.raises(ValueError, match="expected uint8"):
        to_tensor([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8)])

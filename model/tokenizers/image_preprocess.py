"""Image preprocessing for the VQ tokenizer: Chameleon's exact path, a fast path for large JPEGs, and SFT padding.

The exact path reproduces Meta's `ImageTokenizer` (`_whiten_transparency`, `_vqgan_input_from`): transparency blended
onto white, short side resized to `size` with PIL Lanczos at Meta's rounding, center crop at ((w-size)//2, (h-size)//2),
pixels x/255*2-1. Before it, EXIF orientation is applied and the header is checked against a pixel limit.

The fast path decodes large JPEGs at M/8 scale (libjpeg-turbo's DCT scaling, M = 1..7, through simplejpeg; Pillow's
`Image.draft` only offers 1/2, 1/4 and 1/8), then reduces with libvips' SIMD Lanczos-3 (Pillow's pixel-centre
mapping exactly, its kernel weights nearly: >= 50 dB from Pillow's output on photos) and keeps only the output
window. Every other image, and any JPEG too small to gain, takes the exact path.

Every failure is one `ImageError` whose `reason` is a code of `schemas.records.REJECT_REASONS`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyvips
import simplejpeg
import torch
from PIL import Image

from schemas.records import REJECT_REASONS

DEFAULT_SIZE = 512
# 64 MP: above any camera photo users feed us (a 50 MP frame fits); a decoded RGB image of this size is ~190 MB.
DEFAULT_MAX_PIXELS = 64_000_000
# Rejects favicons, tracking pixels and spacers (1-16 px); 32 px is already a 16x upscale to 512. Web-scale corpora
# often want more (OBELICS keeps images of 150 px and up): pass a larger `min_side`.
DEFAULT_MIN_SIDE = 32

# Smallest (decoded size / resize target) a JPEG decode at M/8 scale may leave before the Lanczos step, by M.
# Measured on mosaics of the sample photos at native resolution (real detail at every pixel, the hard case for DCT
# scaling): these ratios keep the fast path at ~42.4 dB PSNR or more against the exact path (docs/performance.md);
# a 1.0 ratio gives 33-41 dB. Coarse scales alias more, so they need more pixels left.
_DRAFT_MIN_RATIO = {1: 2.0, 2: 1.75, 3: 1.5, 4: 1.5, 5: 1.25, 6: 1.15, 7: 1.1}
_JPEG_FORMATS = ("JPEG", "MPO")

# Process-wide settings, made on import: one image at a time per worker process (the pipelines parallelise across
# processes, so libvips' own threads would only contend for the same cores), and no operation cache (it would keep
# the libvips images of past calls, and so their pixel buffers, alive until evicted).
pyvips.concurrency_set(1)
# pyvips logs every resize at INFO (five lines an image): keep its warnings only.
logging.getLogger("pyvips").setLevel(logging.WARNING)
pyvips.cache_set_max(0)
# libvips' thread state does not survive fork(): a child forked after this process used libvips hangs in its first
# libvips call. Such a child resizes with Pillow instead (same pixels within ~50 dB, slower); spawned processes and
# children forked before any libvips call are unaffected.
_VIPS_MAX_SCALE = 300  # libvips refuses reduce factors above ~333 ("reduce factor too large")
_vips_state = {"used": False, "usable": True}


def _after_fork_in_child() -> None:
    if _vips_state["used"]:
        _vips_state["usable"] = False


os.register_at_fork(after_in_child=_after_fork_in_child)

# EXIF orientation -> the transpose that makes the image upright (the table of PIL.ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112

# File signatures: bytes that start like a known format but fail to open are cut short, not "not an image".
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")

# Meta's blend on white, (1 - a/255)*255 + (a/255)*c truncated to uint8, for every (alpha, channel) pair: the same
# float64 operations in the same order, so indexing this table is bit-exact and avoids float images.
_ALPHA = np.arange(256)[:, None] / 255.0
_BLEND_ON_WHITE = ((1 - _ALPHA) * 255 + _ALPHA * np.arange(256)[None, :]).astype(np.uint8)
# Meta's normalisation, (x/255)*2 - 1 in float64 then cast to float32, for every uint8 value.
_TO_UNIT = (np.arange(256) / 255.0 * 2 - 1).astype(np.float32)


class ImageError(ValueError):
    """An image we cannot use; `reason` is a code of REJECT_REASONS, `detail` says what was found."""

    def __init__(self, reason: str, detail: str):
        if reason not in REJECT_REASONS:
            raise KeyError(f"unknown reject reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # keep both fields when Beam or Dask ship the error to another process
        return type(self), (self.reason, self.detail)


@dataclass(frozen=True)
class PreprocessedImage:
    """The VQ tokenizer's input as uint8 HxWx3 RGB, and the image's (width, height) after EXIF orientation.

    `pixels` is a read-only view of the decoded buffer (no copy); copy it before writing into it.
    """

    pixels: np.ndarray
    original_size: tuple[int, int]
    draft_scale: float = 1.0  # original / decoded size of the fast path's JPEG decode (8/M); 1 means the exact path


ImageSource = bytes | bytearray | memoryview | str | Path


def _read(source: ImageSource) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    elif isinstance(source, str | Path):
        try:
            data = Path(source).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ImageError("image_missing", f"no image file at {source}") from exc
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
            raise ImageError("image_missing", f"cannot read {source!r}: {exc}") from exc
    elif source is None:
        raise ImageError("image_missing", "no image bytes or path given")
    else:
        raise TypeError(f"image source must be bytes or a path, not {type(source).__name__}")
    if not data:
        raise ImageError("image_empty", "zero bytes" if not isinstance(source, str | Path) else f"{source} is empty")
    return data


def _looks_like_image(data: bytes) -> bool:
    head = data[:8]
    return any(head.startswith(m) or m.startswith(head) for m in _MAGIC)


_PILLOW_LIMIT = threading.Lock()


@contextlib.contextmanager
def pillow_pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Pillow's bomb guard (about 89 MP by default) raised to `max_pixels` (None: off) while the block reads a
    header, its warning an error. Never lowered (other threads may be opening images), so a smaller limit is the
    caller's to apply; one block at a time, so that no thread restores another's raised value for good."""
    with _PILLOW_LIMIT, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        default = Image.MAX_IMAGE_PIXELS
        if default is not None:
            Image.MAX_IMAGE_PIXELS = None if max_pixels is None else max(default, max_pixels)
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = default


def _open(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Parse the header only (no pixels decoded); Pillow's own bomb checks become our error, at `max_pixels` or
    above (a smaller limit is `_check_size`'s to apply)."""
    try:
        with pillow_pixel_limit(max_pixels):
            return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("image_too_large", str(exc)) from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... on bad headers
        # Pillow's "cannot identify" message names a BytesIO object; say it plainly.
        why = "no format Pillow knows" if isinstance(exc, Image.UnidentifiedImageError) else str(exc)
        if _looks_like_image(data) or "truncated" in why.lower():
            raise ImageError("image_truncated", f"{len(data)} bytes, header unreadable: {why}") from exc
        raise ImageError("image_not_an_image", f"{len(data)} bytes starting {data[:8]!r}: {why}") from exc


def _load(image: Image.Image, size: tuple[int, int]) -> None:
    """Decode the pixels; a failure after a good header means the data ends early or is corrupt."""
    try:
        image.load()
    except Exception as exc:
        message = f"{image.format} {size[0]}x{size[1]}: {str(exc) or type(exc).__name__}"
        if any(word in str(exc).lower() for word in ("unsupported", "not supported", "unknown")):
            raise ImageError("image_not_an_image", message) from exc
        raise ImageError("image_truncated", message) from exc


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # broken EXIF is no reason to drop the pixels; treat as upright
        return 1
    return value if value in _ORIENTATION_TRANSPOSE else 1


def _upright_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    return (size[1], size[0]) if orientation >= 5 else size


def _check_size(size: tuple[int, int], max_pixels: int, min_side: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageError("image_too_large", f"{width}x{height} = {width * height:,} pixels > limit {max_pixels:,}")
    if min(width, height) < min_side:
        raise ImageError("image_too_small", f"{width}x{height}: shorter side under {min_side} px")


def _header(source: ImageSource, max_pixels: int, min_side: int) -> tuple[Image.Image, int]:
    """Read and open the source, check its size before any decoding; returns the lazy image and its orientation."""
    image = _open(_read(source), max_pixels)
    _check_size(image.size, max_pixels, min_side)
    orientation = _orientation(image)
    return image, orientation


def open_image(
    source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE
) -> Image.Image:
    """Decode an image from bytes or a path, size-checked before decoding and turned upright by its EXIF orientation."""
    image, orientation = _header(source, max_pixels, min_side)
    _load(image, image.size)
    if orientation != 1:
        image = image.transpose(_ORIENTATION_TRANSPOSE[orientation])
    return image


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    # Pillow's own conversion clips 16-bit values at 255; scale 0..65535 onto 0..255 with rounding instead.
    values = np.asarray(image)
    if image.mode == "I" and values.max(initial=0) <= 255:
        gray = np.clip(values, 0, 255).astype(np.uint8)  # 8-bit data stored in 32-bit ints
    else:
        gray = ((np.clip(values, 0, 65535).astype(np.uint32) + 128) // 257).astype(np.uint8)
    key = image.info.get("transparency")
    if isinstance(key, int):  # grayscale colour key (PNG tRNS): those pixels are transparent, so white
        gray[values == key] = 255
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")


def whiten_transparency(image: Image.Image) -> Image.Image:
    """Any image as RGB, transparent pixels blended onto white exactly as Meta's `_whiten_transparency`."""
    if image.mode == "RGB":
        return image
    if image.mode == "I" or image.mode.startswith("I;16"):
        return _sixteen_bit_to_rgb(image)
    if image.mode == "F":
        raise ImageError("image_unsupported_mode", "32-bit float pixels have no agreed range to map to 8 bits")
    try:
        if image.mode in ("1", "L", "CMYK", "YCbCr", "LAB", "HSV") and "transparency" not in image.info:
            return image.convert("RGB")  # no alpha possible: Meta's RGBA detour would find none
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] == 255:
            return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError("image_unsupported_mode", f"cannot convert mode {image.mode} to RGB: {exc}") from exc
    values = np.asarray(rgba)
    return Image.fromarray(_BLEND_ON_WHITE[values[:, :, 3:4], values[:, :, :3]], "RGB")


def _crop_resize_size(size: tuple[int, int], target: int) -> tuple[int, int]:
    # Meta's rounding (Python round, half to even) of scale * side, short side to `target`.
    scale = target / min(size)
    return round(scale * size[0]), round(scale * size[1])


def _pad_resize_size(size: tuple[int, int], target: int) -> tuple[int, int]:
    scale = target / max(size)
    return max(1, round(scale * size[0])), max(1, round(scale * size[1]))


def _center_box(size: tuple[int, int], target: int) -> tuple[int, int, int, int]:
    x0 = (size[0] - target) // 2
    y0 = (size[1] - target) // 2
    return x0, y0, x0 + target, y0 + target


def resize_center_crop(image: Image.Image, size: int = DEFAULT_SIZE) -> Image.Image:
    """Chameleon's resize (short side to `size`, Lanczos, Meta's rounding) and center crop to size x size."""
    resized = image.resize(_crop_resize_size(image.size, size), Image.Resampling.LANCZOS)
    return resized.crop(_center_box(resized.size, size))


def _pad_white(image: Image.Image, size: int) -> Image.Image:
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return canvas


def resize_pad(image: Image.Image, size: int = DEFAULT_SIZE) -> Image.Image:
    """Long side to `size` with Lanczos, centered on a white size x size canvas: nothing is cut off (SFT)."""
    return _pad_white(image.resize(_pad_resize_size(image.size, size), Image.Resampling.LANCZOS), size)


def _draft_eighths(image: Image.Image, resize_to: tuple[int, int]) -> int:
    """The smallest JPEG decode scale M/8 leaving enough pixels for Lanczos to stay near the exact path; 8 if none."""
    # simplejpeg's libjpeg-turbo converts YCbCr and grayscale to RGB; CMYK / YCCK JPEGs take Pillow's exact path.
    if image.format not in _JPEG_FORMATS or image.mode not in ("RGB", "L"):
        return 8
    reduction = min(image.size) / min(resize_to)  # same factor on both axes
    for eighths, min_ratio in _DRAFT_MIN_RATIO.items():
        if reduction * eighths / 8 >= min_ratio:
            return eighths
    return 8


def _box_to_raw(box: tuple[float, float, float, float], upright: tuple[int, int], orientation: int) -> tuple:
    """Map a box in upright coordinates (canvas `upright`) back to the coordinates before the EXIF transpose."""
    width, height = upright
    x0, y0, x1, y1 = box
    corners = {
        1: ((x0, y0), (x1, y1)),
        2: ((width - x1, y0), (width - x0, y1)),
        3: ((width - x1, height - y1), (width - x0, height - y0)),
        4: ((x0, height - y1), (x1, height - y0)),
        5: ((y0, x0), (y1, x1)),
        6: ((y0, width - x1), (y1, width - x0)),
        7: ((height - y1, width - x1), (height - y0, width - x0)),
        8: ((height - y1, x0), (height - y0, x1)),
    }[orientation]
    (a0, b0), (a1, b1) = corners
    return a0, b0, a1, b1


def _decode_scaled(data: bytes, size: tuple[int, int], eighths: int) -> np.ndarray | None:
    """Decode a JPEG at eighths/8 scale with libjpeg-turbo; None if it refuses (Pillow's path then says why)."""
    width, height = size
    try:
        # libjpeg-turbo's output is ceil(side * M / 8); asking for that minimum selects exactly M/8.
        return simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_width=math.ceil(width * eighths / 8), min_height=math.ceil(height * eighths / 8)
        )
    except Exception:  # truncated, corrupt or unusual JPEGs: Pillow decodes or rejects them with a reason
        return None


# Output pixels kept beyond the window on each side of libvips' input region: Lanczos-3 reaches 3 output pixels out,
# so the window never sees the edge copies libvips makes past the region.
_VIPS_MARGIN = 4


def _vips_span(scale: float, lo: int, hi: int) -> tuple[int, int, int, int]:
    """libvips' input span (start a, length n) and output span (start k, count o) for output pixels [lo, hi).

    Pillow maps output pixel j to input centre (j + 0.5) * scale - 0.5. libvips reduces n input pixels to
    o = round(n / scale) outputs centred on the input: output i to a + (i + 0.5) * scale - 0.5 + (n - o * scale) / 2.
    Spans symmetric about 0 (n = -2a, o = -2k) make the two agree exactly. The half before 0 is edge copies that
    libvips never computes: it evaluates only the window.
    """
    k = -(hi + _VIPS_MARGIN)
    # n must round to o: |n / scale - o| = 2 |scale * k - a| / scale < 0.49.
    while abs(scale * k - round(scale * k)) >= 0.24 * scale:
        k -= 1
    a = round(scale * k)
    return a, -2 * a, k, -2 * k


def lanczos_window(pixels: np.ndarray, scale: tuple[float, float], window: tuple[int, int, int, int]) -> np.ndarray:
    """Lanczos-3 reduce of uint8 HxWx3 `pixels` by `scale` (input / output pixels), cut to `window` (x0, y0,
    x1, y1 in output pixels), through libvips: Pillow's `resize(..., LANCZOS, box=window * scale)` with the same
    sampling positions; the kernel weights differ slightly (>= 50 dB apart on photos; up to ~40 grey levels on
    white noise) and so do the image's own borders (libvips copies edge pixels outward, Pillow renormalises)."""
    # Pillow where libvips cannot: enlargements (the fast path never makes them), extreme reductions, and a child
    # forked after this process used libvips.
    if min(scale) < 1 or max(scale) > _VIPS_MAX_SCALE or not _vips_state["usable"]:
        return lanczos_window_pillow(pixels, scale, window)
    _vips_state["used"] = True
    height, width = pixels.shape[:2]
    x0, y0, x1, y1 = window
    ax, nx, kx, ox = _vips_span(scale[0], x0, x1)
    ay, ny, ky, oy = _vips_span(scale[1], y0, y1)
    image = pyvips.Image.new_from_memory(np.ascontiguousarray(pixels).data, width, height, 3, "uchar")
    region = image.embed(-ax, -ay, nx, ny, extend="copy")
    reduced = region.reduce(scale[0], scale[1], kernel="lanczos3")
    if (reduced.width, reduced.height) != (ox, oy):
        raise RuntimeError(f"libvips reduced {nx}x{ny} by {scale} to {reduced.width}x{reduced.height}, not {ox}x{oy}")
    out = reduced.crop(x0 - kx, y0 - ky, x1 - x0, y1 - y0)
    return np.ndarray(buffer=out.write_to_memory(), dtype=np.uint8, shape=(y1 - y0, x1 - x0, 3))


def lanczos_window_pillow(
    pixels: np.ndarray, scale: tuple[float, float], window: tuple[int, int, int, int]
) -> np.ndarray:
    """`lanczos_window` with Pillow's Lanczos: the reference it is tested and benchmarked against."""
    x0, y0, x1, y1 = window
    box = (x0 * scale[0], y0 * scale[1], x1 * scale[0], y1 * scale[1])
    return np.asarray(Image.fromarray(pixels).resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS, box=box))


def _preprocess_draft(
    pixels: np.ndarray,
    eighths: int,
    raw_size: tuple[int, int],
    orientation: int,
    mode: str,
    size: int,
    upright_new: tuple[int, int],
    resample=None,
) -> np.ndarray:
    """One Lanczos reduce of the reduced decode, keeping just the output window; transpose the small result last.

    `resample` defaults to `lanczos_window` (libvips); the benchmark passes `lanczos_window_pillow` to compare.
    """
    window = _center_box(upright_new, size) if mode == "crop" else (0, 0, *upright_new)
    raw_new = _upright_size(upright_new, orientation)  # resize target before the transpose
    raw_window = _box_to_raw(window, upright_new, orientation)
    # Decoded pixel i covers source pixels [i, i + 1) * 8/M: the source spans side * M/8 decoded pixels (the last
    # one may be partial), so the scale maps through that span rather than the decoded array's size.
    scale = (raw_size[0] * eighths / 8 / raw_new[0], raw_size[1] * eighths / 8 / raw_new[1])
    out = Image.fromarray((resample or lanczos_window)(pixels, scale, raw_window))
    if orientation != 1:
        out = out.transpose(_ORIENTATION_TRANSPOSE[orientation])
    return np.asarray(out if mode == "crop" else _pad_white(out, size))


def preprocess(
    source: ImageSource,
    size: int = DEFAULT_SIZE,
    mode: Literal["crop", "pad"] = "crop",
    fast: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
) -> PreprocessedImage:
    """An image file as the VQ tokenizer's size x size RGB uint8 input: Chameleon's crop, or white padding for SFT."""
    if mode not in ("crop", "pad"):
        raise ValueError(f"mode must be 'crop' or 'pad', not {mode!r}")
    data = _read(source)
    image, orientation = _header(data, max_pixels, min_side)
    upright = _upright_size(image.size, orientation)
    new_size = _crop_resize_size(upright, size) if mode == "crop" else _pad_resize_size(upright, size)
    # Upscaling a thin sliver is a bomb of its own: 40 x 64,000 px would become 512 x 819,200.
    if new_size[0] * new_size[1] > max(max_pixels, size * size):
        raise ImageError("image_too_large", f"{upright[0]}x{upright[1]} resized to {new_size} exceeds {max_pixels:,}")
    eighths = _draft_eighths(image, new_size) if fast else 8
    decoded = _decode_scaled(data, image.size, eighths) if eighths < 8 else None
    if decoded is not None:
        pixels = _preprocess_draft(decoded, eighths, image.size, orientation, mode, size, new_size)
        return PreprocessedImage(pixels=pixels, original_size=upright, draft_scale=8 / eighths)
    _load(image, image.size)
    if orientation != 1:
        image = image.transpose(_ORIENTATION_TRANSPOSE[orientation])
    image = whiten_transparency(image)
    pixels = np.asarray(resize_center_crop(image, size) if mode == "crop" else resize_pad(image, size))
    return PreprocessedImage(pixels=pixels, original_size=upright)


def to_tensor(images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 images (all one size) as a float32 [B, 3, H, W] tensor in [-1, 1], Meta's (x/255)*2 - 1."""
    batch = [images] if isinstance(images, np.ndarray) and images.ndim == 3 else list(images)
    if not batch:
        raise ValueError("to_tensor needs at least one image")
    shape = batch[0].shape
    out = np.empty((len(batch), 3, shape[0], shape[1]), dtype=np.float32)
    for i, pixels in enumerate(batch):
        if pixels.dtype != np.uint8 or pixels.shape != shape or pixels.ndim != 3 or shape[2] != 3:
            raise ValueError(f"image {i}: expected uint8 {shape} (H, W, 3), got {pixels.dtype} {pixels.shape}")
        np.take(_TO_UNIT, pixels.transpose(2, 0, 1), out=out[i], mode="clip")  # a lookup, no float temporaries
    return torch.from_numpy(out)


def from_tensor(tensor: torch.Tensor) -> list[np.ndarray]:
    """[B, 3, H, W] (or [3, H, W]) values in [-1, 1] back to uint8 HxWx3 images: clamp, (x+1)*127.5, round.

    Meta truncates instead of rounding; rounding makes from_tensor(to_tensor(x)) == x exactly.
    """
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 4 or tensor.shape[1] != 3:
        raise ValueError(f"expected [B, 3, H, W], got {tuple(tensor.shape)}")
    pixels = tensor.detach().to("cpu", torch.float32).clamp(-1.0, 1.0).add(1.0).mul_(127.5).round_()
    hwc = pixels.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return list(hwc)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB (inf when identical)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)

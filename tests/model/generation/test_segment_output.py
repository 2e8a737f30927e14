"""Prompt thumbnails, shared by `cham generate` and the human-evaluation harness."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from model.generation.segment_output import PROMPT_THUMB, save_thumbnail


def test_a_prompt_image_becomes_an_rgb_png_at_most_the_page_width(tmp_path: Path) -> None:
    wide = tmp_path / "wide.webp"
    Image.new("RGBA", (1000, 500), (10, 200, 30, 128)).save(wide)
    save_thumbnail(wide, tmp_path / "images" / "prompt-0.png")
    with Image.open(tmp_path / "images" / "prompt-0.png") as thumb:
        assert (thumb.format, thumb.mode, thumb.size) == ("PNG", "RGB", (PROMPT_THUMB, PROMPT_THUMB // 2))
    small = tmp_path / "small.png"
    Image.new("L", (40, 30), 7).save(small)
    save_thumbnail(small, tmp_path / "small-copy.png")
    with Image.open(tmp_path / "small-copy.png") as thumb:
        assert (thumb.mode, thumb.size, thumb.getpixel((0, 0))) == ("RGB", (40, 30), (7, 7, 7))  # never enlarged


class PageError(ValueError):
    pass


def test_an_unreadable_image_is_the_callers_error_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(PageError, match=rf"^{re.escape(str(bad))}: cannot read this image"):
        save_thumbnail(bad, tmp_path / "out.png", PageError)
    with pytest.raises(ValueError, match=r"missing\.png: cannot read this image"):
        save_thumbnail(tmp_path / "missing.png", tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()

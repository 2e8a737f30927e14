"""Generated segments on disk: images as PNG files, a JSON record, and HTML with the images inline.

Shared by `cham generate` and the evaluation harness, so a response looks the same wherever it is shown.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from model.tokenizers.mixed_tokenizer import ImageSegment, Segment

PROMPT_THUMB = 256  # prompt images are copied at most this size: the pages show them 256 px wide (PAGE_STYLE)
PAGE_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
.prompt { background: #f4f4f8; border-left: 4px solid #88a; padding: .6rem 1rem; white-space: pre-wrap; }
.response { border-left: 4px solid #8a8; padding: .6rem 1rem; white-space: pre-wrap; }
.response img, .prompt img { display: block; margin: .5rem 0; width: 256px; image-rendering: pixelated; }
.meta { color: #777; font-size: .85rem; }
"""


def save_thumbnail(source: str | Path, target: str | Path, error: type[Exception] = ValueError) -> None:
    """A prompt image copied for a page: RGB, at most PROMPT_THUMB pixels a side, as PNG at `target` (folders made);
    an image that cannot be read raises `error` naming `source`."""
    from PIL import UnidentifiedImageError

    try:
        with Image.open(source) as im:
            image = im.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise error(f"{source}: cannot read this image ({err})") from None
    image.thumbnail((PROMPT_THUMB, PROMPT_THUMB))
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    image.save(target, format="PNG")


def save_segments(segments: Sequence[Segment], folder: str | Path, stem: str) -> list[dict[str, Any]]:
    """JSON-ready records of `segments`; each decoded image is written as `images/{stem}-{k}.png` under `folder`."""
    folder = Path(folder)
    records: list[dict[str, Any]] = []
    for k, seg in enumerate(s for s in segments if isinstance(s, ImageSegment) or s):
        if isinstance(seg, str):
            if records and records[-1]["kind"] == "text":  # a stream yields many pieces: keep one run per text span
                records[-1]["text"] += seg
            else:
                records.append({"kind": "text", "text": seg})
            continue
        record: dict[str, Any] = {"kind": "image", "codes": seg.codes.reshape(-1).tolist()}
        if seg.pixels is not None:
            path = Path("images") / f"{stem}-{k}.png"
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(seg.pixels).save(folder / path)
            record["path"] = path.as_posix()
        records.append(record)
    return records


def _local(path: str) -> bool:
    """A relative path under the page's folder: no URL scheme (http:, javascript:, data:), no leading / or ..."""
    bare = re.sub(r"[\x00-\x20]", "", path)  # what a browser's URL parser drops (" http://x" is http://x)
    return not re.match(r"^([A-Za-z][A-Za-z0-9+.-]*:|[/\\])", bare) and ".." not in Path(path).parts


def segments_html(records: Sequence[dict[str, Any]]) -> str:
    """An HTML fragment of saved segment records: escaped text, images as <img> (paths relative to the page)."""
    parts = []
    for record in records:
        if record["kind"] == "text":
            parts.append(html.escape(record["text"]))
        elif "path" in record and _local(record["path"]):
            parts.append(f'<img src="{html.escape(record["path"])}" alt="generated image">')
        elif "path" in record:  # a URL or an absolute path would be fetched by every viewer of the page
            parts.append(f"<em>[image not shown: {html.escape(record['path'])} is not a file beside the page]</em>")
        else:
            parts.append("<em>[image: no image tokenizer to decode it]</em>")
    return "".join(parts)


def html_page(title: str, body: str) -> str:
    """A whole standalone page around `body`."""
    head = f"<meta charset='utf-8'><title>{html.escape(title)}</title><style>{PAGE_STYLE}</style>"
    heading = f"<h1>{html.escape(title)}</h1>"
    return f"<!doctype html>\n<html><head>{head}</head>\n<body>\n{heading}\n{body}\n</body></html>\n"

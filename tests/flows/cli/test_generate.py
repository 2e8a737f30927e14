"""`cham generate` on a tiny trained run: streamed text, the JSON record, PNG images and the HTML page."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()
PHOTO = Path(__file__).parents[3] / "sample" / "images"


def generate(run: Path, out: Path, *args: str):
    return runner.invoke(app, ["generate", "--checkpoint", str(run), "--out", str(out), *args])


def test_text_mode_streams_what_it_saves_and_is_reproducible(tiny_run: Path, tmp_path: Path) -> None:
    args = ("--prompt", "The function", "--mode", "text", "--max-new-tokens", "24", "--seed", "3")
    first = generate(tiny_run, tmp_path / "a", *args)
    assert first.exit_code == 0, first.output
    record = json.loads((tmp_path / "a" / "generation.json").read_text())
    assert record["mode"] == "text" and record["step"] == 30 and 1 <= record["new_tokens"] <= 24
    assert {s["kind"] for s in record["segments"]} <= {"text"}
    text = "".join(s["text"] for s in record["segments"])
    assert text and text in first.output  # what streamed to the terminal is what was saved
    page = (tmp_path / "a" / "generation.html").read_text()
    assert "The function" in page and "<img" not in page
    assert generate(tiny_run, tmp_path / "b", *args).exit_code == 0
    assert json.loads((tmp_path / "b" / "generation.json").read_text())["segments"] == record["segments"]


def test_image_mode_writes_one_decoded_image(tiny_run: Path, tmp_path: Path) -> None:
    photo = sorted(PHOTO.glob("*.jpg"))[0]
    result = generate(tiny_run, tmp_path, "--image", str(photo), "--prompt", "A photo like this", "--mode", "image")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "generation.json").read_text())
    assert record["new_tokens"] == 64 + 2  # BOI, the 8x8 codes, EOI
    (image,) = record["segments"]
    assert image["kind"] == "image" and len(image["codes"]) == 64 and all(0 <= c < 256 for c in image["codes"])
    pixels = np.asarray(Image.open(tmp_path / image["path"]))
    assert pixels.shape == (64, 64, 3) and pixels.std() > 0
    page = (tmp_path / "generation.html").read_text()
    assert f'<img src="{image["path"]}"' in page and '<img src="images/prompt-0.png"' in page
    assert Image.open(tmp_path / "images" / "prompt-0.png").size[0] <= 256


def test_clear_errors(tiny_run: Path, tmp_path: Path) -> None:
    missing = generate(tmp_path / "nowhere", tmp_path / "o", "--prompt", "hi")
    assert missing.exit_code == 1 and "does not exist" in missing.output
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    unreadable = generate(tiny_run, tmp_path / "o", "--image", str(bad), "--prompt", "hi")
    assert unreadable.exit_code == 1 and "cannot read this image" in unreadable.output
    too_long = generate(tiny_run, tmp_path / "o", "--prompt", "word " * 600)
    assert too_long.exit_code == 1 and "leaves 0 for the response" in too_long.output
    nothing = generate(tiny_run, tmp_path / "o")
    assert nothing.exit_code == 1 and "give a --prompt" in nothing.output
    # Undecodable bytes on a command line reach Python as lone surrogates: an error, not a tokenizer crash.
    invalid = generate(tiny_run, tmp_path / "o", "--prompt", "caf\udcff hi", "--mode", "text")
    assert invalid.exit_code == 1 and "not valid Unicode at character 3" in invalid.output
    assert "Traceback" not in invalid.output
    (tmp_path / "file").write_text("x")
    in_the_way = generate(tiny_run, tmp_path / "file", "--prompt", "hi")
    assert in_the_way.exit_code == 1 and "a file is in the way" in in_the_way.output

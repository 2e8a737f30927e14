"""`cham image-tokenizer train|encode|decode` on the sample photos."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from model.image_tokenizer import ImageTokenizer
from tests.conftest import REPO

runner = CliRunner()
PHOTOS = REPO / "sample" / "images"


def test_train_encode_decode(tmp_path: Path) -> None:
    out = tmp_path / "vq"
    args = ["image-tokenizer", "train", "--images", str(PHOTOS), "--steps", "4", "--batch-size", "4", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "held-out PSNR" in result.output and (out / "vqgan.ckpt").is_file()
    # The progress line carries the step's loss, PSNR and codebook usage.
    assert re.search(r"4/4 .*loss \d+\.\d{4}  PSNR \d+\.\d{2} dB  codebook \d+%", result.output), result.output
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
    # A second run with more steps resumes from step 4.
    result = runner.invoke(app, [*args[:-4], "--steps", "6", "--batch-size", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [h["step"] for h in json.loads((out / "metrics.json").read_text())["history"]][-1] == 6

    photos = [str(PHOTOS / "tabby_cat_chelsea.jpg"), str(PHOTOS / "two_macaws.jpg")]
    result = runner.invoke(app, ["image-tokenizer", "encode", "--tokenizer", str(out), *photos])
    lines = result.output.strip().splitlines()
    assert len(lines) == 2 and len(lines[0].split("\t")[1].split()) == 64
    expected = ImageTokenizer.load(out).encode(photos)
    assert [int(c) for c in lines[1].split("\t")[1].split()] == expected[1].tolist()

    result = runner.invoke(app, ["image-tokenizer", "encode", "--tokenizer", str(out), *photos, "--out",
                                 str(tmp_path / "codes.npy")])  # fmt: skip
    assert np.array_equal(np.load(tmp_path / "codes.npy"), expected)
    result = runner.invoke(app, ["image-tokenizer", "decode", "--tokenizer", str(out), str(tmp_path / "codes.npy"),
                                 "--out", str(tmp_path / "png")])  # fmt: skip
    assert result.exit_code == 0, result.output
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert [p.name for p in pngs] == ["image-0000.png", "image-0001.png"]
    assert Image.open(pngs[0]).size == (64, 64)


def test_train_on_webdataset_shards(tmp_path: Path, sample_data) -> None:
    shards = sample_data[0] / "image_text"  # img2dataset-style tars of jpg + txt
    args = ["image-tokenizer", "train", "--images", str(shards), "--steps", "2", "--batch-size", "2"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "vq")])
    assert result.exit_code == 0, result.output
    counts = re.search(r"(\d+) train / (\d+) held-out images", result.output)
    assert counts, result.output
    n_jpgs = 0
    for path in shards.glob("*.tar"):
        with tarfile.open(path) as tar:
            n_jpgs += sum(name.endswith(".jpg") for name in tar.getnames())
    assert int(counts.group(1)) + int(counts.group(2)) == n_jpgs > 0


def test_errors(tmp_path: Path) -> None:
    result = runner.invoke(app, ["image-tokenizer", "train", "--images", str(tmp_path), "--out", str(tmp_path)])
    assert result.exit_code == 1 and "no images" in result.output
    result = runner.invoke(app, ["image-tokenizer", "train", "-i", str(PHOTOS), "--out", "x", "--preset", "huge"])
    assert result.exit_code == 1 and "unknown preset 'huge'; allowed: chameleon, tiny" in result.output
    result = runner.invoke(app, ["image-tokenizer", "encode", "--tokenizer", str(tmp_path), "x.jpg"])
    assert result.exit_code == 1 and "no image tokenizer here" in result.output

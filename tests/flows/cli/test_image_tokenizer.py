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
from model.tokenizers.image_tokenizer import ImageTokenizer
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

    result = runner.invoke(
        app, ["image-tokenizer", "encode", "--tokenizer", str(out), *photos, "--out", str(tmp_path / "codes.npy")]
    )
    assert np.array_equal(np.load(tmp_path / "codes.npy"), expected)
    result = runner.invoke(
        app,
        [
            "image-tokenizer",
            "decode",
            "--tokenizer",
            str(out),
            str(tmp_path / "codes.npy"),
            "--out",
            str(tmp_path / "png"),
        ],
    )
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


def test_bad_images_codes_and_paths_are_one_line(tmp_path: Path, tiny_tokenizers) -> None:
    vq = str(tiny_tokenizers["image"])

    def one_line(args: list[str], message: str, code: int = 1) -> None:
        result = runner.invoke(app, ["image-tokenizer", *args])
        assert result.exit_code == code and "Traceback" not in result.output, result.output
        assert message in " ".join(result.output.split()), result.output

    photo = PHOTOS / "two_macaws.jpg"
    (tmp_path / "cut.jpg").write_bytes(photo.read_bytes()[:2000])
    one_line(["encode", "--tokenizer", vq, str(photo), str(tmp_path / "cut.jpg")], f"{tmp_path / 'cut.jpg'}: image_")
    one_line(["encode", "--tokenizer", vq, "--mode", "weird", str(photo)], "Invalid value for '--mode'", 2)
    result = runner.invoke(
        app, ["image-tokenizer", "encode", "--tokenizer", vq, str(photo), "--out", str(tmp_path / "codes")]
    )
    assert result.exit_code == 0 and f"-> {tmp_path / 'codes.npy'}" in " ".join(result.output.split())
    np.save(tmp_path / "empty.npy", np.zeros((0, 64), np.int64))
    np.save(tmp_path / "flat.npy", np.zeros(64, np.int64))
    for codes, message in [
        ("empty.npy", "codes of shape (0, 64); expected [n >= 1, 64]"),
        ("flat.npy", "codes of shape (64,); expected [n >= 1, 64]"),
        ("cut.jpg", "not a .npy array"),
        ("none.npy", "cannot read its codes"),
    ]:
        one_line(["decode", "--tokenizer", vq, str(tmp_path / codes), "--out", str(tmp_path / "png")], message)
    (tmp_path / "file").write_text("x")
    one_line(
        ["decode", "--tokenizer", vq, str(tmp_path / "codes.npy"), "--out", str(tmp_path / "file")],
        "a file is in the way",
    )
    one_line(["train", "-i", str(PHOTOS), "--out", str(tmp_path / "file")], "a file is in the way")
    one_line(
        ["train", "-i", str(PHOTOS), "--out", str(tmp_path / "vq"), "--steps", "0"], "Invalid value for '--steps'", 2
    )
    # Only one usable image: nothing to hold out. The skip reasons are in the error.
    for n, name in enumerate(["a.jpg", "b.jpg"]):
        (tmp_path / "few" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "few" / name).write_bytes(photo.read_bytes() if n == 0 else b"not an image")
    one_line(
        ["train", "-i", str(tmp_path / "few"), "--out", str(tmp_path / "vq")],
        "not enough usable images to train on: 1 of 2 (one to train on and one to hold out are needed); skipped",
    )

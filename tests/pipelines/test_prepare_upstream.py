"""Upstream interleaved formats through the whole prepare job and back through the tokenizer's decode: MMC4 as it
ships (`docs_shard_N_v2.jsonl.zip`), OBELICS parquet; each source's manifest survives another source's failure."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.tokenizers.mixed_tokenizer import ImageSegment, MixedModalTokenizer
from model.tokenizers.text_tokenizer import load_text_tokenizer
from pipelines.prepare_job import MANIFEST, PrepareError, run_prepare
from pipelines.shard_writer import read_shard
from schemas import PrepareConfig, validate_config

PHOTOS = sorted((Path(__file__).resolve().parents[2] / "sample" / "images").glob("*.jpg"))

MMC4_SENTENCES = ["One sentence.", "Another one.", "", "A third, after the picture.", "The last one."]
OBELICS_TEXTS = ["First paragraph.", "Second paragraph.", None, "After the image.", None]


def write_mmc4_shard(folder: Path) -> Path:
    """An MMC4 shard as published: a zip holding one jsonl; images named by image_name beside it."""
    folder.mkdir(parents=True)
    shutil.copy(PHOTOS[0], folder / "img0.jpg")
    doc = {
        "text_list": MMC4_SENTENCES,
        "image_info": [
            {
                "image_name": "img0.jpg",
                "raw_url": "https://example.com/0.jpg",
                "matched_text_index": 3,
                "matched_sim": 0.31,
                "face_detections": None,
            }
        ],
        "similarity_matrix": [[0.1, 0.2, 0.0, 0.31, 0.05]],
        "url": "https://example.com/page",
        "could_have_url_duplicate": 0,
    }
    path = folder / "docs_shard_3_v2.jsonl.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("docs_shard_3_v2.jsonl", json.dumps(doc) + "\n")
    return path


def write_obelics(folder: Path) -> Path:
    folder.mkdir(parents=True)
    images = [
        None,
        None,
        {"bytes": PHOTOS[1].read_bytes(), "path": None},
        None,
        {"bytes": PHOTOS[2].read_bytes(), "path": None},
    ]
    path = folder / "obelics.parquet"
    pq.write_table(pa.Table.from_pylist([{"texts": OBELICS_TEXTS, "images": images, "metadata": "[]"}]), path)
    return path


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, tiny_tokenizers) -> tuple[PrepareConfig, dict]:
    raw = tmp_path_factory.mktemp("upstream")
    mmc4, obelics = write_mmc4_shard(raw / "mmc4"), write_obelics(raw / "obelics")
    config = validate_config(
        PrepareConfig,
        {
            "output_dir": str(raw / "out"),
            "image_size": 64,
            "detect_faces": False,
            "tokenizers": {k: str(v) for k, v in tiny_tokenizers.items()},
            "sources": [
                {"name": "mmc4", "kind": "interleaved", "format": "jsonl", "paths": [str(raw / "mmc4")]},
                {"name": "obelics", "kind": "interleaved", "format": "parquet", "paths": [str(obelics)]},
                {
                    "name": "mmc4_lines",
                    "kind": "interleaved",
                    "format": "jsonl",
                    "paths": [str(mmc4)],
                    "options": {"text_separator": "\n"},
                },
            ],
        },
    )
    return config, run_prepare(config)


def decoded(config: PrepareConfig, source: str, tokenizer_dir: Path) -> list[list]:
    """Every sample of a prepared source, decoded: texts as strings, images as 'IMAGE'."""
    tokenizer = MixedModalTokenizer(load_text_tokenizer(tokenizer_dir))
    out = []
    for tar in sorted((Path(config.output_dir) / source).glob("shard-*.tar")):
        for sample in read_shard(tar):
            segments = tokenizer.decode(sample["tokens"], decode_images=False)
            out.append(["IMAGE" if isinstance(s, ImageSegment) else s for s in segments])
    return out


def test_interleaved_texts_decode_as_a_reader_expects(upstream, tiny_tokenizers) -> None:
    config, result = upstream
    assert {n: (m["totals"]["samples"], m["totals"]["rejects"]) for n, m in result["manifests"].items()} == {
        "mmc4": (1, 0),
        "obelics": (1, 0),
        "mmc4_lines": (1, 0),
    }
    # MMC4: sentences of one document, a space between them (the empty one adds nothing); the image goes before
    # its matched sentence and parts the texts itself.
    assert decoded(config, "mmc4", tiny_tokenizers["text"]) == [
        ["One sentence. Another one.", "IMAGE", "A third, after the picture. The last one."]
    ]
    # OBELICS: blocks of a web page, a blank line between consecutive ones.
    assert decoded(config, "obelics", tiny_tokenizers["text"]) == [
        ["First paragraph.\n\nSecond paragraph.", "IMAGE", "After the image.", "IMAGE"]
    ]
    assert decoded(config, "mmc4_lines", tiny_tokenizers["text"]) == [
        ["One sentence.\nAnother one.", "IMAGE", "A third, after the picture.\nThe last one."]
    ]
    assert result["manifests"]["mmc4"]["shards"][0]["records_in"] == 1


def test_one_source_failing_its_manifest_keeps_the_others(upstream) -> None:
    config, _ = upstream
    out = Path(config.output_dir)
    (out / "obelics" / MANIFEST).unlink()
    (out / "mmc4_lines" / MANIFEST).unlink()
    blocker = out / "mmc4" / MANIFEST
    blocker.unlink()
    blocker.mkdir()  # the first source's manifest cannot be written (renamed onto a folder)
    try:
        with pytest.raises(PrepareError, match=r"mmc4: manifest not written: .*Is a directory"):
            run_prepare(config)
    finally:
        blocker.rmdir()
    assert not list((out / "mmc4").glob(".*.tmp"))  # the failed write left no temporary
    for name in ("obelics", "mmc4_lines"):  # the sources after it still get theirs
        assert json.loads((out / name / MANIFEST).read_text())["totals"]["samples"] == 1
    assert run_prepare(config)["shards_skipped"] == {"mmc4": 1, "obelics": 1, "mmc4_lines": 1}


def test_inputs_that_changed_since_the_config_was_loaded_are_one_error(tmp_path, tiny_tokenizers) -> None:
    (tmp_path / "notes.txt").write_text("{}")
    config = validate_config(
        PrepareConfig,
        {
            "output_dir": str(tmp_path / "out"),
            "image_size": 64,
            "tokenizers": {k: str(v) for k, v in tiny_tokenizers.items()},
            "sources": [{"name": "t", "kind": "text", "format": "jsonl", "paths": [str(tmp_path / "notes.txt")]}],
        },
        check_paths=False,
    )
    with pytest.raises(PrepareError, match=r"source t: .*notes.txt is not a jsonl file"):
        run_prepare(config)

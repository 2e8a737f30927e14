"""The bundled sample corpus (sample/) and `cham sample-data`: writing it in the formats users bring.

Text goes out as jsonl and parquet, image-text pairs as an img2dataset-style WebDataset, interleaved
documents as OBELICS-style parquet, SFT pairs as jsonl with images beside it. The prepare job's readers
read exactly these.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from model.files.atomic import atomic_path
from schemas import records

# Fixed tar mtime so the same corpus gives byte-identical shards.
TAR_MTIME = 0
IMAGES_PER_SHARD = 12
TEXT_JSONL_PARTS = 2
PARQUET_ROW_GROUP = 16


def stand_in_aesthetic(data: bytes) -> float:
    """A stand-in for LAION-Aesthetics' score (1 to 10) on the image-text records, so curation filters and the
    image-generation example (docs/configs/image_generation_sft.yaml) run offline: the image's colourfulness
    (Hasler and Suesstrunk, 2003) on a 64 x 64 thumbnail, scaled to 3 (grey) .. 9.5. Not a learned predictor."""
    import numpy as np

    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image.convert("RGB").resize((64, 64)), dtype=np.float64)
    rg = pixels[..., 0] - pixels[..., 1]
    yb = 0.5 * (pixels[..., 0] + pixels[..., 1]) - pixels[..., 2]
    colourfulness = np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())
    return round(min(9.5, 3.0 + float(colourfulness) / 20.0), 2)


class SampleCorpusError(RuntimeError):
    """The bundled corpus is missing or inconsistent (e.g. a document names an image that is not there)."""


def sample_root() -> Path:
    """The folder holding the bundled corpus: $CHAM_SAMPLE_DIR, else `sample/` of this checkout."""
    root = Path(os.environ.get("CHAM_SAMPLE_DIR") or Path(__file__).resolve().parents[1] / "sample")
    if not (root / "images" / "images.jsonl").is_file():
        raise SampleCorpusError(f"no sample corpus at {root}: set CHAM_SAMPLE_DIR to the repository's sample/ folder")
    return root


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All records of a small, trusted jsonl file (the bundled corpus), with the line of any bad one."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise SampleCorpusError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    return rows


@dataclass
class SampleCorpus:
    """The corpus as loaded from sample/: photos with captions, text documents, interleaved docs, SFT pairs."""

    root: Path
    images: list[dict[str, Any]]
    texts: list[dict[str, Any]]
    interleaved: list[dict[str, Any]]
    sft: list[dict[str, Any]]
    image_bytes: dict[str, bytes] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, root: Path | None = None) -> SampleCorpus:
        """Read sample/ and check that every image a document names exists."""
        root = root or sample_root()
        corpus = cls(
            root=root,
            images=read_jsonl(root / "images" / "images.jsonl"),
            texts=read_jsonl(root / "text" / "docs.jsonl"),
            interleaved=read_jsonl(root / "interleaved" / "docs.jsonl"),
            sft=read_jsonl(root / "sft" / "pairs.jsonl"),
        )
        corpus.image_bytes = {im["file"]: (root / "images" / im["file"]).read_bytes() for im in corpus.images}
        for doc in corpus.interleaved:
            corpus._check_segments(doc["id"], doc["segments"])
        for pair in corpus.sft:
            corpus._check_segments(pair["id"], pair["prompt"] + pair["answer"])
            if pair["category"] not in records.SFT_CATEGORIES:
                raise SampleCorpusError(f"SFT pair {pair['id']}: unknown category {pair['category']!r}")
        return corpus

    def _check_segments(self, doc_id: str, segments: list[dict[str, str]]) -> None:
        for seg in segments:
            if len(seg) != 1 or next(iter(seg)) not in ("text", "image"):
                raise SampleCorpusError(f"{doc_id}: a segment must be {{'text': ...}} or {{'image': ...}}: {seg}")
            if "image" in seg and seg["image"] not in self.image_bytes:
                raise SampleCorpusError(f"{doc_id}: names image {seg['image']!r}, which is not in sample/images")


def _write_parquet(rows: list[dict[str, Any]], schema: pa.Schema, path: Path) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path, row_group_size=PARQUET_ROW_GROUP)


def _image_ref(data: bytes) -> dict[str, Any]:
    return {"bytes": data, "path": None, "url": None}


def write_text(corpus: SampleCorpus, out: Path) -> dict[str, Any]:
    """Prose as jsonl parts, code as parquet: both text-record formats the prepare job reads."""
    out.mkdir(parents=True, exist_ok=True)
    prose = [d for d in corpus.texts if d["kind"] == "prose"]
    code = [d for d in corpus.texts if d["kind"] == "code"]
    files = []
    for part in range(TEXT_JSONL_PARTS):
        path = out / f"prose-{part:05d}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for doc in prose[part::TEXT_JSONL_PARTS]:
                f.write(json.dumps({"id": doc["id"], "text": doc["text"], "source": doc["source"]}) + "\n")
        files.append(path.name)
    rows = [{"id": d["id"], "text": d["text"], "source": d["source"]} for d in code]
    _write_parquet(rows, records.TEXT, out / "code-00000.parquet")
    files.append("code-00000.parquet")
    return {"records": len(prose) + len(code), "jsonl": len(prose), "parquet": len(code), "files": files}


def write_image_text(corpus: SampleCorpus, out: Path) -> dict[str, Any]:
    """img2dataset's webdataset output: NNNNN.tar (jpg/txt/json), NNNNN.parquet and NNNNN_stats.json per shard."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for shard_id, start in enumerate(range(0, len(corpus.images), IMAGES_PER_SHARD)):
        batch = corpus.images[start : start + IMAGES_PER_SHARD]
        meta_rows = []
        tar_path = out / f"{shard_id:05d}.tar"
        with wds.TarWriter(str(tar_path), mtime=TAR_MTIME) as sink:
            for idx, image in enumerate(batch):
                data = corpus.image_bytes[image["file"]]
                key = f"{shard_id * 10_000 + idx:09d}"  # img2dataset's key: shard id then index, digits only
                meta = {
                    "url": f"sample://images/{image['file']}",
                    "caption": image["caption"],
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": image["width"],
                    "height": image["height"],
                    "original_width": image["width"],
                    "original_height": image["height"],
                    "exif": None,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "aesthetic": stand_in_aesthetic(data),  # as img2dataset keeps LAION's extra columns
                }
                sink.write({"__key__": key, "jpg": data, "txt": image["caption"], "json": meta})
                meta_rows.append(meta)
        pq.write_table(pa.Table.from_pylist(meta_rows), out / f"{shard_id:05d}.parquet")
        stats = {"count": len(batch), "successes": len(batch), "failed_to_download": 0, "failed_to_resize": 0}
        (out / f"{shard_id:05d}_stats.json").write_text(json.dumps(stats, indent=2))
        files += [tar_path.name, f"{shard_id:05d}.parquet", f"{shard_id:05d}_stats.json"]
    return {"records": len(corpus.images), "shards": len(files) // 3, "files": files}


def write_interleaved(corpus: SampleCorpus, out: Path) -> dict[str, Any]:
    """OBELICS layout: parallel `texts` / `images` lists, exactly one set per position; images as bytes."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for doc in corpus.interleaved:
        texts, images, meta = [], [], []
        for seg in doc["segments"]:
            is_image = "image" in seg
            texts.append(None if is_image else seg["text"])
            images.append(_image_ref(corpus.image_bytes[seg["image"]]) if is_image else None)
            meta.append({"file": seg["image"]} if is_image else None)
        rows.append({"id": doc["id"], "texts": texts, "images": images, "metadata": json.dumps(meta)})
    _write_parquet(rows, records.INTERLEAVED, out / "obelics-00000.parquet")
    n_images = sum(1 for r in rows for im in r["images"] if im is not None)
    return {"records": len(rows), "images": n_images, "files": ["obelics-00000.parquet"]}


def write_sft(corpus: SampleCorpus, out: Path) -> dict[str, Any]:
    """SFT jsonl; image segments hold paths relative to the jsonl file, images copied to images/."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    with (out / "pairs.jsonl").open("w", encoding="utf-8") as f:
        for pair in corpus.sft:
            row = {"id": pair["id"], "category": pair["category"]}
            for side in ("prompt", "answer"):
                row[side] = [
                    {"image": f"images/{seg['image']}"} if "image" in seg else {"text": seg["text"]}
                    for seg in pair[side]
                ]
                used |= {seg["image"] for seg in pair[side] if "image" in seg}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    for name in sorted(used):
        shutil.copyfile(corpus.root / "images" / name, out / "images" / name)
    by_category: dict[str, int] = {}
    for pair in corpus.sft:
        by_category[pair["category"]] = by_category.get(pair["category"], 0) + 1
    return {
        "records": len(corpus.sft),
        "images": len(used),
        "by_category": by_category,
        "files": ["pairs.jsonl", *(f"images/{n}" for n in sorted(used))],
    }


def write_sample_data(out: Path, corpus: SampleCorpus | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write the corpus under `out` (text/, image_text/, interleaved/, sft/, manifest.json); return the manifest."""
    out = Path(out)
    if (out / "manifest.json").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds sample data; pass overwrite=True (--force) to rewrite it")
    corpus = corpus or SampleCorpus.load()
    # Whole folder written under a temporary name, then swapped in: no half-written sample data.
    with atomic_path(out, replace_folder=True) as tmp:
        manifest = {
            "text": write_text(corpus, tmp / "text"),
            "image_text": write_image_text(corpus, tmp / "image_text"),
            "interleaved": write_interleaved(corpus, tmp / "interleaved"),
            "sft": write_sft(corpus, tmp / "sft"),
        }
        manifest["faces"] = sum(1 for im in corpus.images if im["has_face"])
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def read_back(out: Path) -> dict[str, int]:
    """Read every file `write_sample_data` wrote, decode every image, and count records by kind."""
    out = Path(out)
    counts = {"text": 0, "image_text": 0, "interleaved": 0, "sft": 0, "images_decoded": 0}
    for path in sorted((out / "text").glob("*.jsonl")):
        counts["text"] += len(read_jsonl(path))
    for path in sorted((out / "text").glob("*.parquet")):
        counts["text"] += pq.read_table(path).num_rows
    for path in sorted((out / "image_text").glob("*.tar")):
        for sample in wds.WebDataset(str(path), shardshuffle=False).decode("pil"):
            sample["jpg"].load()
            counts["image_text"] += 1
            counts["images_decoded"] += 1
    for path in sorted((out / "interleaved").glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            counts["interleaved"] += 1
            for image in row["images"]:
                if image is not None:
                    Image.open(io.BytesIO(image["bytes"])).load()
                    counts["images_decoded"] += 1
    for pair in read_jsonl(out / "sft" / "pairs.jsonl"):
        counts["sft"] += 1
        for seg in pair["prompt"] + pair["answer"]:
            if "image" in seg:
                with Image.open(out / "sft" / seg["image"]) as image:
                    image.load()
                counts["images_decoded"] += 1
    return counts

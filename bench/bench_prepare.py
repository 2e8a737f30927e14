"""End-to-end prepare of image-text pairs: pairs/s with 1 and 2 workers, and where the time goes.

Pairs are built from the sample photos at realistic sizes (upscaled to 1024-2048 px on the long side, JPEG q90,
img2dataset-style tars). The job runs on the `local` runner (Beam DirectRunner, worker processes) with the tiny
tokenizers; the stage shares are measured in process, per image, for the tiny and the Chameleon VQ presets.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from model.tokenizers.image_preprocess import preprocess
from model.tokenizers.image_tokenizer import ImageTokenizer
from model.tokenizers.mixed_tokenizer import ImageSegment, MixedModalTokenizer
from model.tokenizers.text_tokenizer import iter_texts, train_text_tokenizer
from model.tokenizers.vq_checkpoint import save_meta_vqgan
from model.tokenizers.vqgan import VQGAN
from pipelines.face_detection import HaarFaceDetector
from pipelines.prepare_job import run_prepare
from pipelines.shard_writer import TokenizedSample, write_shard
from schemas import PrepareConfig, validate_config
from schemas.vocab import TINY
from schemas.vq_config import VQConfig

REPO = Path(__file__).resolve().parents[1]
LONG_SIDES = (1024, 1536, 2048)


def realistic_jpegs(copies: int) -> list[tuple[str, bytes]]:
    """(caption, JPEG q90 bytes) of the sample photos upscaled to long sides of 1024, 1536 and 2048 px."""
    photos = [json.loads(line) for line in (REPO / "sample/images/images.jsonl").open()]
    out = []
    for copy in range(copies):
        for photo in photos:
            image = Image.open(REPO / "sample/images" / photo["file"]).convert("RGB")
            side = LONG_SIDES[(copy + len(out)) % len(LONG_SIDES)]
            scale = side / max(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            out.append((photo["caption"], buffer.getvalue()))
    return out


def make_pairs(out: Path, copies: int) -> list[bytes]:
    """img2dataset-style tars of the sample photos at realistic sizes; returns the JPEG bytes."""
    pairs = realistic_jpegs(copies)
    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / "%05d.tar"), maxcount=32, verbose=0) as sink:
        for n, (caption, jpeg) in enumerate(pairs):
            sink.write({"__key__": f"{n:09d}", "jpg": jpeg, "txt": caption})
    return [jpeg for _, jpeg in pairs]


def tokenizers(base: Path) -> dict[str, Path]:
    train_text_tokenizer(iter_texts([REPO / "sample/text/docs.jsonl"]), TINY).save(base / "text")
    torch.manual_seed(0)
    save_meta_vqgan(VQGAN(VQConfig.from_preset("tiny")), base / "vq")
    return {"text": base / "text", "image": base / "vq"}


def time_pipeline(pairs: Path, toks: dict[str, Path], out: Path, runner: dict[str, Any]) -> float:
    """Seconds for run_prepare of the pairs on `runner` (a RunnerConfig as a dict), job start included."""
    config = validate_config(
        PrepareConfig,
        {
            "output_dir": str(out),
            "image_size": 64,
            "samples_per_shard": 16,
            "runner": runner,
            "tokenizers": {k: str(v) for k, v in toks.items()},
            "sources": [{"name": "pairs", "kind": "image_text", "format": "webdataset", "paths": [str(pairs)]}],
        },
    )
    start = time.perf_counter()
    result = run_prepare(config)
    assert result["manifests"]["pairs"]["totals"]["rejects"] == 0
    return time.perf_counter() - start


def stage_shares(jpegs: list[bytes], toks: dict[str, Path], preset: str, n: int) -> dict[str, float]:
    """Seconds per image in each stage, measured in this process on one thread."""
    torch.set_num_threads(1)
    size = VQConfig.from_preset(preset).resolution
    tokenizer = ImageTokenizer(VQGAN(VQConfig.from_preset(preset)).eval(), batch_size=4)
    detector = HaarFaceDetector()
    text = MixedModalTokenizer(train_text_tokenizer(iter_texts([REPO / "sample/text/docs.jsonl"]), TINY))
    sample = jpegs[:n]
    t0 = time.perf_counter()
    pixels = [preprocess(j, size=size).pixels for j in sample]
    t1 = time.perf_counter()
    faces = [
        detector.count_faces(p if size >= 256 else preprocess(j, size=256).pixels)
        for p, j in zip(pixels, sample, strict=True)
    ]
    t2 = time.perf_counter()
    codes = np.concatenate([tokenizer.encode_pixels(pixels[i : i + 4]) for i in range(0, len(pixels), 4)])
    t3 = time.perf_counter()
    grid = TINY.tokens_per_image
    samples = [
        TokenizedSample(
            f"k{i:06d}",
            text.encode(["a caption of a photo", ImageSegment(c[:grid] % TINY.image_codes)]),
            {"has_face": f > 0, "n_images": 1},
        )
        for i, (c, f) in enumerate(zip(codes, faces, strict=True))
    ]
    with tempfile.TemporaryDirectory() as tmp:
        write_shard(Path(tmp), 0, samples, [], vocab_size=TINY.vocab_size, fingerprint="bench")
    t4 = time.perf_counter()
    return {
        "decode + resize": (t1 - t0) / n,
        "face detection": (t2 - t1) / n,
        "VQ encode": (t3 - t2) / n,
        "tokenize + write": (t4 - t3) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer pairs; skip the Chameleon-preset stage timing")
    args = parser.parse_args()
    copies = 2 if args.quick else 20
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        jpegs = make_pairs(base / "pairs", copies)
        toks = tokenizers(base / "tok")
        n = len(jpegs)
        embedded = time_pipeline(base / "pairs", toks, base / "out0", {"kind": "embedded"})
        one = time_pipeline(base / "pairs", toks, base / "out1", {"kind": "local", "workers": 1})
        two = time_pipeline(base / "pairs", toks, base / "out2", {"kind": "local", "workers": 2})
        print(f"{n} image-text pairs (long side {', '.join(map(str, LONG_SIDES))} px, JPEG q90), tiny tokenizers")
        print(f"embedded runner        : {n / embedded:6.2f} pairs/s ({embedded:.1f} s, job start included)")
        print(f"local runner, 1 worker : {n / one:6.2f} pairs/s ({one:.1f} s)")
        print(f"local runner, 2 workers: {n / two:6.2f} pairs/s ({two:.1f} s)")
        print(f"scaling, local 2 workers / 1: {one / two:.2f}x")
        presets = ["tiny"] if args.quick else ["tiny", "chameleon"]
        for preset in presets:
            shares = stage_shares(jpegs, toks, preset, n=8 if preset == "chameleon" else min(n, 48))
            total = sum(shares.values())
            parts = ", ".join(f"{k} {v * 1000:.1f} ms ({v / total:.0%})" for k, v in shares.items())
            print(f"stage times per image, VQ preset {preset} (one thread): {parts}")


if __name__ == "__main__":
    main()

"""Our image stage against img2dataset's resizer (the anchor), on the same realistic JPEGs, one core each.

img2dataset pins webdataset < 0.3, which conflicts with ours, so it runs from its own venv in .bench-venv/
(created on first use: `pip install img2dataset==1.47.0`; a bench-only dependency). Both sides produce a 512x512
center crop re-encoded as JPEG q95, img2dataset's default output; ours is also timed without the re-encode, which
is what the prepare job does unless `write_images` is on.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
from bench_prepare import realistic_jpegs  # bench/ is on sys.path when this file is run
from PIL import Image

from model.tokenizers.image_preprocess import preprocess

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".bench-venv" / "img2dataset"
IMG2DATASET = "img2dataset==1.47.0"

I2D_SCRIPT = """
import json, sys, time, io, glob
from img2dataset.resizer import Resizer
files = sorted(glob.glob(sys.argv[1] + "/*.jpg"))
data = [open(f, "rb").read() for f in files]
resizer = Resizer(image_size=512, resize_mode="center_crop", resize_only_if_bigger=False, encode_quality=95)
best = float("inf")
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    for d in data:
        out = resizer(io.BytesIO(d))
        assert out[-1] is None, out[-1]
    best = min(best, time.perf_counter() - start)
print(json.dumps({"images": len(data), "seconds": best}))
"""


def img2dataset_python() -> Path:
    """The bench venv's python, with img2dataset installed (created on first use)."""
    python = VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {VENV} with {IMG2DATASET} (first run only)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", IMG2DATASET], check=True)
    return python


def ours(jpegs: list[bytes], repeats: int, encode: bool) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for data in jpegs:
            pixels = preprocess(data, size=512, mode="crop").pixels
            if encode:
                Image.fromarray(pixels).save(io.BytesIO(), format="JPEG", quality=95)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    repeats = 2 if args.quick else 3
    jpegs = [jpeg for _, jpeg in realistic_jpegs(1 if args.quick else 2)]
    with tempfile.TemporaryDirectory() as tmp:
        for n, data in enumerate(jpegs):
            Path(tmp, f"{n:05d}.jpg").write_bytes(data)
        env = os.environ | {"OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
        run = subprocess.run(
            [str(img2dataset_python()), "-c", I2D_SCRIPT, tmp, str(repeats)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        i2d = json.loads(run.stdout.strip().splitlines()[-1])["seconds"]
    with_encode = ours(jpegs, repeats, encode=True)
    without = ours(jpegs, repeats, encode=False)
    n = len(jpegs)
    print(f"{n} JPEGs (long side 1024-2048 px) -> 512x512 center crop, one core, best of {repeats}")
    print(f"img2dataset resizer (cv2 decode, INTER_AREA, crop, JPEG q95): {n / i2d:6.1f} img/s")
    print(f"ours (Chameleon's Lanczos path, fast decode, JPEG q95)      : {n / with_encode:6.1f} img/s")
    print(f"ours without the re-encode (what prepare does)              : {n / without:6.1f} img/s")
    print(f"ratio ours / img2dataset: {i2d / with_encode:.2f}x (same output), {i2d / without:.2f}x (prepare's work)")


if __name__ == "__main__":
    main()

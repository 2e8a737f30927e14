"""The mix job's tokens/s on prepared shards scaled up from the sample, and the stage loader's tokens/s against
reading the same tar files raw with `tarfile` (the limit on this machine).

Prepared sources are made by copying the sample's prepared text shards many times (same tokens, new keys), so the
mix reads realistic shard files without waiting for a long prepare run.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from model.tokenizers.text_tokenizer import iter_texts, load_text_tokenizer, train_text_tokenizer
from model.training.stage_loader import StageLoader
from pipelines.mix_job import run_mix
from pipelines.raw_records import Reject
from pipelines.shard_writer import TokenizedSample, write_shard
from schemas import MixtureSpec, validate_config
from schemas.vocab import TINY

REPO = Path(__file__).resolve().parents[1]


def make_prepared_source(folder: Path, texts: list[str], copies: int, samples_per_shard: int, tok_dir: Path) -> int:
    """A prepared text source (shards + manifest) with `copies` x the sample documents; returns its token count."""
    tokenizer = load_text_tokenizer(tok_dir)
    ids = [np.concatenate([[0], t, [2]]) for t in tokenizer.encode_batch(texts)]
    samples = [(n, ids[n % len(ids)]) for n in range(copies * len(ids))]
    shards, total = [], 0
    for shard_id, start in enumerate(range(0, len(samples), samples_per_shard)):
        batch = [
            TokenizedSample(
                f"{folder.name}_{shard_id:05d}_{i:06d}",
                tokens,
                {"n_tokens": len(tokens), "has_face": False, "n_images": 0, "n_prompt_tokens": 0},
            )
            for i, (_, tokens) in enumerate(samples[start : start + samples_per_shard])
        ]
        stats = write_shard(folder, shard_id, batch, list[Reject](), vocab_size=TINY.vocab_size, fingerprint="bench")
        shards.append({k: stats[k] for k in ("shard", "samples", "tokens", "images", "faces", "rejects")})
        total += stats["tokens"]
    manifest = {
        "fingerprint": "bench",
        "shards": shards,
        "tokenizers": {"text": str(tok_dir), "text_fingerprint": tokenizer.fingerprint, "image_fingerprint": "none"},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return total


def raw_tar_rate(stage: Path) -> tuple[float, int]:
    """Seconds to read every member of every stage shard with tarfile and np.load, and the tokens read."""
    start, tokens = time.perf_counter(), 0
    for path in sorted(stage.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if member.name.endswith("tokens.npy"):
                    tokens += np.load(io.BytesIO(data)).size
    return time.perf_counter() - start, tokens


def loader_rate(stage: Path, batch_size: int, workers: int) -> tuple[float, int]:
    start, tokens = time.perf_counter(), 0
    for batch in StageLoader(stage, batch_size=batch_size, num_workers=workers):
        tokens += batch["tokens"].numel()
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    copies = 20 if args.quick else 100
    torch.set_num_threads(1)
    texts = list(iter_texts([REPO / "sample/text/docs.jsonl"]))
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        train_text_tokenizer(texts, TINY).save(base / "tok")
        a = make_prepared_source(base / "prose", texts[:130], copies, 1000, base / "tok")
        b = make_prepared_source(base / "code", texts[130:], copies, 1000, base / "tok")
        stage_tokens = int(0.9 * (a + b))
        spec = validate_config(
            MixtureSpec,
            {
                "seq_len": 2048,
                "tokens_per_image": 64,
                "seed": 0,
                "stages": {
                    "stage1": {
                        "tokens": stage_tokens,
                        "sources": [
                            {"name": "prose", "path": str(base / "prose"), "weight": 3.0},
                            {"name": "code", "path": str(base / "code"), "weight": 1.0},
                        ],
                    }
                },
            },
        )
        started = time.perf_counter()
        result = run_mix(spec, base / "mixed")
        mix_seconds = time.perf_counter() - started
        mixed = result["manifests"]["stage1"]["tokens"]
        print(
            f"mix job (embedded runner): {mixed:,} tokens into {result['manifests']['stage1']['sequences']:,} "
            f"sequences of 2048 in {mix_seconds:.1f} s = {mixed / mix_seconds / 1e6:.2f} M tokens/s"
        )
        stage = base / "mixed" / "stage1"
        raw_s, raw_tokens = raw_tar_rate(stage)
        print(f"raw tarfile read of the stage shards: {raw_tokens / raw_s / 1e6:.2f} M tokens/s")
        for workers in (0, 2):
            s, tokens = loader_rate(stage, batch_size=8, workers=workers)
            print(
                f"stage loader, batch 8, {workers} workers: {tokens / s / 1e6:.2f} M tokens/s "
                f"= {raw_s / raw_tokens * tokens / s:.2f}x raw"
            )


if __name__ == "__main__":
    main()

"""`cham demo`: the end-to-end flow on the bundled sample corpus, and the configs it is run with.

sample corpus -> text + VQ image tokenizers trained -> prepare (Beam) -> mix stage 1, stage 2 and SFT (Beam)
-> pretrain on stage 1 then stage 2 (one run, one schedule) -> SFT -> generate -> evaluate -> an HTML report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from schemas import MixtureSpec, PrepareConfig, SFTConfig, TrainConfig, validate_config
from schemas.vocab import TINY

# The sample corpus in its raw formats, as sources of the prepare job (name, kind, format, path under raw/).
SAMPLE_SOURCES = [
    ("prose", "text", "jsonl", "text/*.jsonl"),
    ("code", "text", "parquet", "text/*.parquet"),
    ("photos", "image_text", "webdataset", "image_text/*.tar"),
    ("howto", "interleaved", "parquet", "interleaved"),
    ("instructions", "sft", "jsonl", "sft/pairs.jsonl"),
]
SEQ_LEN = 512


def demo_prepare_config(out: Path) -> PrepareConfig:
    """Every sample source, 64 px images, tokenized with the tokenizers trained under out/tokenizers."""
    return validate_config(
        PrepareConfig,
        {
            "output_dir": str(out / "prepared"),
            "image_size": 64,
            "samples_per_shard": 64,
            "write_images": True,
            "tokenizers": {"text": str(out / "tokenizers" / "text"), "image": str(out / "tokenizers" / "vq")},
            "sources": [
                {"name": n, "kind": k, "format": f, "paths": [str(out / "raw" / p)]} for n, k, f, p in SAMPLE_SOURCES
            ],
        },
    )


def demo_mixture(prepared: Path) -> MixtureSpec:
    """Chameleon's two stages (text : image-text : interleaved = 2.9 : 1.5 : 0.4, then half of that plus
    high-quality data) and an SFT stage, sized for the sample corpus."""

    def src(name: str, weight: float) -> dict[str, Any]:
        return {"name": name, "path": str(prepared / name), "weight": weight}

    return validate_config(
        MixtureSpec,
        {
            "seq_len": SEQ_LEN,
            "tokens_per_image": TINY.tokens_per_image,
            "total_tokens": 60_000,
            "max_repetitions": 16,
            "face_weight": 2.0,
            "seed": 0,
            "stages": {
                "stage1": {"fraction": 0.8, "sources": [src("prose", 2.9), src("photos", 1.5), src("howto", 0.4)]},
                "stage2": {
                    "fraction": 0.2,
                    "inherit": {"stage": "stage1", "factor": 0.5},
                    "sources": [src("code", 1.2)],
                },
                "sft": {"tokens": 4_000, "sft": True, "sources": [src("instructions", 1.0)]},
            },
        },
    )


def demo_train_config(mixed: Path, out: Path, stage1_steps: int) -> TrainConfig:
    """A tiny model pretrained in one run on stage 1, then stage 2 for half as many steps (one lr schedule)."""
    stage2_steps = max(2, stage1_steps // 2)
    total = stage1_steps + stage2_steps
    return validate_config(
        TrainConfig,
        {
            "model": {"preset": "tiny"},
            "stages": [
                {"data": str(mixed / "stage1"), "share": stage1_steps / total},
                {"data": str(mixed / "stage2"), "share": stage2_steps / total},
            ],
            "out_dir": str(out),
            "seq_len": SEQ_LEN,
            "steps": total,
            "global_batch_size": 8,
            "micro_batch_size": 4,
            "optimizer": {"lr": 3e-3},
            "schedule": {"warmup_steps": max(1, total // 10)},
            "checkpoint": {"every_steps": total, "keep_last": 1},
            "logging": {"every_steps": max(1, total // 10), "tensorboard": False},
        },
    )


def demo_sft_config(data: Path, out: Path, steps: int, init_from: Path) -> SFTConfig:
    """SFT of the pretrained tiny model on the sample instructions (prompts masked from the loss)."""
    return validate_config(
        SFTConfig,
        {
            "model": {"preset": "tiny"},
            "data": str(data),
            "out_dir": str(out),
            "seq_len": SEQ_LEN,
            "steps": steps,
            "global_batch_size": 8,
            "micro_batch_size": 4,
            "optimizer": {"lr": 1e-3},
            "init_from": str(init_from),
            "checkpoint": {"every_steps": steps, "keep_last": 1},
            "logging": {"every_steps": max(1, steps // 5), "tensorboard": False},
        },
    )

"""`cham demo`: the longest part of the main job that works today, run on the bundled sample corpus.

sample corpus -> every raw format -> text tokenizer + VQ image tokenizer trained -> the prepare job (Beam) writes
tokenized shards of every source -> the mix job (Beam) packs stage 1, stage 2 and SFT sequences.
It grows into the end-to-end flow (prepare -> mix -> train -> generate -> eval) as those capabilities land.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model.text_tokenizer import expand_inputs, iter_texts, train_text_tokenizer
from model.vq_training import VQTrainer, VQTrainSettings, find_images
from pipelines.mix_job import run_mix
from pipelines.mix_report import plot_shares
from pipelines.prepare_job import run_prepare
from pipelines.sample_corpus import read_back, write_sample_data
from schemas import MixtureSpec, PrepareConfig, dump_config, validate_config
from schemas.vocab import TINY
from schemas.vq_config import VQConfig

# The sample corpus in its raw formats, as sources of the prepare job (name, kind, format, path under raw/).
SAMPLE_SOURCES = [
    ("prose", "text", "jsonl", "text/*.jsonl"),
    ("code", "text", "parquet", "text/*.parquet"),
    ("photos", "image_text", "webdataset", "image_text/*.tar"),
    ("howto", "interleaved", "parquet", "interleaved"),
    ("instructions", "sft", "jsonl", "sft/pairs.jsonl"),
]


def demo_mixture(prepared: Path) -> MixtureSpec:
    """Chameleon's two stages (text : image-text : interleaved = 2.9 : 1.5 : 0.4, then half of that plus
    high-quality data) and an SFT stage, sized for the sample corpus."""

    def src(name: str, weight: float) -> dict[str, Any]:
        return {"name": name, "path": str(prepared / name), "weight": weight}

    return validate_config(MixtureSpec, {
        "seq_len": 512, "tokens_per_image": TINY.tokens_per_image, "total_tokens": 60_000, "max_repetitions": 16,
        "face_weight": 2.0, "seed": 0,
        "stages": {
            "stage1": {"fraction": 0.8, "sources": [src("prose", 2.9), src("photos", 1.5), src("howto", 0.4)]},
            "stage2": {"fraction": 0.2, "inherit": {"stage": "stage1", "factor": 0.5}, "sources": [src("code", 1.2)]},
            "sft": {"tokens": 4_000, "sft": True, "sources": [src("instructions", 1.0)]},
        },
    })  # fmt: skip


def run_demo(out: Path, vq_steps: int = 200, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every working stage on the sample corpus under `out`; return (and write) the report."""
    out = Path(out)
    started = time.perf_counter()
    report: dict[str, Any] = {"out": str(out)}

    log("1/5 writing the sample corpus in every raw format")
    manifest = write_sample_data(out / "raw", overwrite=True)
    counts = read_back(out / "raw")
    report["raw"] = {kind: manifest[kind]["records"] for kind in ("text", "image_text", "interleaved", "sft")}
    report["images_decoded"] = counts["images_decoded"]

    log("2/5 training the text tokenizer (SentencePiece BPE, tiny vocabulary layout)")
    text = train_text_tokenizer(iter_texts(expand_inputs([out / "raw" / "text"])), TINY)
    text.save(out / "tokenizers" / "text")
    report["text_tokenizer"] = {"vocab_size": TINY.vocab_size, "text_pieces": TINY.n_text,
                                "fingerprint": text.fingerprint}  # fmt: skip

    log(f"3/5 training the VQ image tokenizer (tiny preset, {vq_steps} steps)")
    settings = VQTrainSettings(steps=vq_steps, batch_size=8, log_every=max(1, vq_steps // 4))
    images = find_images([out / "raw" / "image_text"])
    trainer = VQTrainer(VQConfig.from_preset("tiny"), images, out / "tokenizers" / "vq", settings)
    result = trainer.run(resume=False, progress=lambda m: log(f"    step {m['step']:.0f}: PSNR {m['psnr']:.1f} dB"))
    report["vq_tokenizer"] = {"steps": result.steps, "heldout_psnr_before": round(result.initial_psnr, 2),
                              "heldout_psnr_after": round(result.final_psnr, 2),
                              "codebook_usage": round(result.codebook_usage, 3)}  # fmt: skip

    log("4/5 the prepare job (Apache Beam, embedded runner): every sample source into tokenized shards")
    config = validate_config(PrepareConfig, {
        "output_dir": str(out / "prepared"), "image_size": 64, "samples_per_shard": 64, "write_images": True,
        "tokenizers": {"text": str(out / "tokenizers" / "text"), "image": str(out / "tokenizers" / "vq")},
        "sources": [{"name": n, "kind": k, "format": f, "paths": [str(out / "raw" / p)]}
                    for n, k, f, p in SAMPLE_SOURCES],
    })  # fmt: skip
    dump_config(config, out / "prepare.yaml")
    prepared = run_prepare(config)
    report["prepared"] = {name: m["totals"] for name, m in prepared["manifests"].items()}

    log("5/5 the mix job (Apache Beam): Chameleon's recipe in miniature, stage 1, stage 2 and SFT")
    spec = demo_mixture(out / "prepared")
    dump_config(spec, out / "mixture.yaml")
    mixed = run_mix(spec, out / "mixed")
    plot_shares(mixed["manifests"], out / "mixed" / "report.png")
    report["mixed"] = mixed["manifests"]
    report["seconds"] = round(time.perf_counter() - started, 1)
    (out / "demo-report.json").write_text(json.dumps(report, indent=2))
    return report

"""`cham demo`: the longest part of the main job that works today, run on the bundled sample corpus.

sample corpus -> every raw format -> text tokenizer + VQ image tokenizer trained -> the prepare job (Beam) writes
tokenized shards of every source.
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
from pipelines.prepare_job import run_prepare
from pipelines.sample_corpus import read_back, write_sample_data
from schemas import PrepareConfig, dump_config, validate_config
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


def run_demo(out: Path, vq_steps: int = 200, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every working stage on the sample corpus under `out`; return (and write) the report."""
    out = Path(out)
    started = time.perf_counter()
    report: dict[str, Any] = {"out": str(out)}

    log("1/4 writing the sample corpus in every raw format")
    manifest = write_sample_data(out / "raw", overwrite=True)
    counts = read_back(out / "raw")
    report["raw"] = {kind: manifest[kind]["records"] for kind in ("text", "image_text", "interleaved", "sft")}
    report["images_decoded"] = counts["images_decoded"]

    log("2/4 training the text tokenizer (SentencePiece BPE, tiny vocabulary layout)")
    text = train_text_tokenizer(iter_texts(expand_inputs([out / "raw" / "text"])), TINY)
    text.save(out / "tokenizers" / "text")
    report["text_tokenizer"] = {"vocab_size": TINY.vocab_size, "text_pieces": TINY.n_text,
                                "fingerprint": text.fingerprint}  # fmt: skip

    log(f"3/4 training the VQ image tokenizer (tiny preset, {vq_steps} steps)")
    settings = VQTrainSettings(steps=vq_steps, batch_size=8, log_every=max(1, vq_steps // 4))
    images = find_images([out / "raw" / "image_text"])
    trainer = VQTrainer(VQConfig.from_preset("tiny"), images, out / "tokenizers" / "vq", settings)
    result = trainer.run(resume=False, progress=lambda m: log(f"    step {m['step']:.0f}: PSNR {m['psnr']:.1f} dB"))
    report["vq_tokenizer"] = {"steps": result.steps, "heldout_psnr_before": round(result.initial_psnr, 2),
                              "heldout_psnr_after": round(result.final_psnr, 2),
                              "codebook_usage": round(result.codebook_usage, 3)}  # fmt: skip

    log("4/4 the prepare job (Apache Beam, embedded runner): every sample source into tokenized shards")
    config = validate_config(PrepareConfig, {
        "output_dir": str(out / "prepared"), "image_size": 64, "samples_per_shard": 64, "write_images": True,
        "tokenizers": {"text": str(out / "tokenizers" / "text"), "image": str(out / "tokenizers" / "vq")},
        "sources": [{"name": n, "kind": k, "format": f, "paths": [str(out / "raw" / p)]}
                    for n, k, f, p in SAMPLE_SOURCES],
    })  # fmt: skip
    dump_config(config, out / "prepare.yaml")
    prepared = run_prepare(config)
    report["prepared"] = {name: m["totals"] for name, m in prepared["manifests"].items()}
    report["seconds"] = round(time.perf_counter() - started, 1)
    (out / "demo-report.json").write_text(json.dumps(report, indent=2))
    return report

"""`cham demo`: the longest part of the main job that works today, run on the bundled sample corpus.

sample corpus -> every raw format -> text tokenizer + VQ image tokenizer trained -> every record tokenized.
It grows into the end-to-end flow (prepare -> mix -> train -> generate -> eval) as those capabilities land.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from model.image_preprocess import ImageError
from model.image_tokenizer import ImageTokenizer
from model.mixed_tokenizer import MixedModalTokenizer
from model.text_tokenizer import expand_inputs, iter_texts, train_text_tokenizer
from model.vq_training import VQTrainer, VQTrainSettings, find_images
from pipelines.documents import document_segments, sft_segments
from pipelines.raw_records import Reject
from pipelines.sample_corpus import read_back, write_sample_data
from pipelines.source_reader import plan_read_tasks, read_task
from schemas.prepare_config import SourceConfig
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


def tokenize_source(source: SourceConfig, tokenizer: MixedModalTokenizer) -> dict[str, Any]:
    """Read one source and tokenize every record in process; counts of records, samples, tokens and rejects."""
    stats = {"records": 0, "samples": 0, "tokens": 0, "images": 0, "rejects": 0}
    for task in plan_read_tasks(source):
        for item in read_task(task):
            stats["records"] += 1
            if isinstance(item, Reject):
                stats["rejects"] += 1
                continue
            try:
                if source.kind == "sft":
                    ids, _ = tokenizer.encode_sft(*sft_segments(item))
                else:
                    ids = tokenizer.encode(document_segments(source.kind, item))
            except ImageError:
                stats["rejects"] += 1
                continue
            stats["samples"] += 1
            stats["tokens"] += len(ids)
            stats["images"] += int(np.sum(ids == tokenizer.vocab.boi_id))
    return stats


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

    log("4/4 tokenizing every sample record with the mixed-modal tokenizer")
    tokenizer = MixedModalTokenizer(text, ImageTokenizer.load(out / "tokenizers" / "vq"))
    report["tokenized"] = {
        name: tokenize_source(
            SourceConfig(name=name, kind=kind, format=fmt, paths=[str(out / "raw" / path)]), tokenizer
        )
        for name, kind, fmt, path in SAMPLE_SOURCES
    }
    report["seconds"] = round(time.perf_counter() - started, 1)
    (out / "demo-report.json").write_text(json.dumps(report, indent=2))
    return report

"""Text MinHash stage: ours (pipelines/dedup.py, the per-record work of the prepare job's dedup stage) vs datatrove's
MinhashDedupSignature on the same documents, in one run, with the same settings (word 5-grams, 14 bands x 8 rows).

Ours per record: normalise, shingle, 112 min-hashes, 14 band keys, the exact hash (dedup.record_entry). Datatrove's:
simplify, tokenize, shingle, 112 min-hashes, written to 14 sorted bucket files (its stage 1). Both split words on
whitespace: datatrove takes a custom word tokenizer, and its English default (spaCy) is not installed here, nor
needed by ours. datatrove is not a dependency of this project: install it elsewhere and put it on PYTHONPATH
(`pip install --target /tmp/dt datatrove xxhash`; `PYTHONPATH=/tmp/dt`); without it, ours runs alone.

The corpus: random documents over a Zipf vocabulary, with planted paraphrases (3 words changed) and exact copies;
the report says which planted pairs our verified LSH finds and how many other pairs it flags. `--prepare` also runs
the whole prepare job (embedded runner, tiny tokenizers) on the same documents as one text source with dedup off,
exact and on: what the dedup stage adds to a text build.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.dedup import MinHasher, Node, Thresholds, bucket_edges, bucket_keys, record_entry, resolve

REPO = Path(__file__).resolve().parents[1]


def corpus(n_docs: int, n_words: int, seed: int = 0) -> tuple[list[str], set[tuple[int, int]]]:
    """Documents, then the planted (original, copy) pairs: a tenth paraphrased copies, a twentieth exact ones."""
    rng = np.random.default_rng(seed)
    vocabulary = np.array([f"word{n}" for n in range(30_000)])
    weights = 1.0 / np.arange(1, len(vocabulary) + 1)
    weights /= weights.sum()
    n_originals = n_docs - n_docs // 10 - n_docs // 20
    docs = [" ".join(rng.choice(vocabulary, n_words, p=weights)) for _ in range(n_originals)]
    planted = set()
    for _ in range(n_docs // 10):
        original = int(rng.integers(n_originals))
        words = docs[original].split()
        for at in rng.choice(len(words), 3, replace=False):
            words[at] = "changed"
        planted.add((original, len(docs)))
        docs.append(" ".join(words))
    for _ in range(n_docs // 20):
        original = int(rng.integers(n_originals))
        planted.add((original, len(docs)))
        docs.append(docs[original])
    return docs, planted


def ours(docs: list[str], hasher: MinHasher) -> list[Any]:
    """The prepare job's per-record dedup work for text records with dedup on."""
    entries = []
    for n, text in enumerate(docs):
        node = Node(1, 0, "bench", f"bench_{n:08d}", str(n))
        entries.append(record_entry(node, 0, "text", [text], [], True, hasher))
    return entries


def found_pairs(entries: list[Any], hasher: MinHasher) -> set[tuple[int, int]]:
    """Duplicate pairs (kept index, duplicate index) after grouping, verification and resolution."""
    buckets: dict[Any, list[Any]] = defaultdict(list)
    for entry in entries:
        for key in bucket_keys(entry, hasher, Thresholds()):
            buckets[key].append(entry)
    edges = [e for (how, _), group in buckets.items() if len(group) > 1 for e in bucket_edges(how, group, Thresholds())]
    return {(int(kept.record_id), int(dup.record_id)) for dup, (kept, _) in resolve(edges).items()}


def datatrove_stage() -> Callable[[list[str], str], None] | None:
    """datatrove's signature stage as a function of (documents, output folder); None when it is not importable."""
    try:
        from datatrove.data import Document
        from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
        from datatrove.utils.word_tokenizers import WordTokenizer
        from loguru import logger
    except ImportError:
        return None
    logger.remove()  # its per-step INFO lines would bury the table

    class Whitespace(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    def run(docs: list[str], folder: str) -> None:
        config = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
        step = MinhashDedupSignature(output_folder=folder, config=config, language=Whitespace())
        step.run((Document(text=t, id=str(n)) for n, t in enumerate(docs)), rank=0, world_size=1)

    return run


def prepare_modes(docs: list[str], base: Path, repeats: int) -> dict[str, dict[str, Any]]:
    """The prepare job on the documents as one text source, per dedup mode: median seconds (after an untimed
    warm-up run) and duplicate rejects."""
    import torch

    from model.tokenizers.text_tokenizer import iter_texts, train_text_tokenizer
    from model.tokenizers.vq_checkpoint import save_meta_vqgan
    from model.tokenizers.vqgan import VQGAN
    from pipelines.prepare_job import run_prepare
    from schemas import PrepareConfig, validate_config
    from schemas.vocab import TINY
    from schemas.vq_config import VQConfig

    train_text_tokenizer(iter_texts([REPO / "sample/text/docs.jsonl"]), TINY).save(base / "text")
    torch.manual_seed(0)
    save_meta_vqgan(VQGAN(VQConfig.from_preset("tiny")), base / "vq")
    (base / "raw").mkdir()
    (base / "raw" / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))

    def run(mode: str, out: Path) -> dict[str, Any]:
        source = {"name": "web", "kind": "text", "format": "jsonl", "paths": [str(base / "raw")], "dedup": mode}
        data = {
            "output_dir": str(out),
            "image_size": 64,
            "samples_per_shard": 500,
            "tokenizers": {"text": str(base / "text"), "image": str(base / "vq")},
            "sources": [source],
        }
        return run_prepare(validate_config(PrepareConfig, data))["manifests"]["web"]["totals"]

    run("off", base / "warm-up")
    rows = {}
    for mode in ("off", "exact", "on"):
        outs = iter(base / f"out-{mode}-{n}" for n in range(repeats))
        seconds, totals = timed(lambda mode=mode, outs=outs: run(mode, next(outs)), repeats)
        duplicates = totals["rejects_by_reason"].get("duplicate", 0)
        rows[mode] = {"seconds": round(seconds, 2), "samples": totals["samples"], "duplicates": duplicates}
    return rows


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median seconds of `repeats` runs, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=4000)
    parser.add_argument("--words", type=int, default=400, help="words per document")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="200 documents, one repeat")
    parser.add_argument("--prepare", action="store_true", help="also time the prepare job with dedup off/exact/on")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args()
    n_docs, repeats = (200, 1) if args.quick else (args.docs, args.repeats)
    docs, planted = corpus(n_docs, args.words)
    hasher = MinHasher()
    words = sum(len(d.split()) for d in docs)
    seconds, entries = timed(lambda: ours(docs, hasher), repeats)
    found = found_pairs(entries, hasher)
    report: dict[str, Any] = {
        "docs": len(docs),
        "words": words,
        "permutations": hasher.bands * hasher.rows,
        "ours_s": round(seconds, 3),
        "ours_docs_per_s": round(len(docs) / seconds, 1),
        # per shingle and permutation: an xor, two multiplies and three xor-shifts (mix64), and a min
        "ours_gop_per_s": round(words * hasher.bands * hasher.rows * 7 / seconds / 1e9, 2),
        "planted_pairs": len(planted),
        "planted_found": len(planted & found),
        "other_pairs_flagged": len(found - planted),
    }
    dt = datatrove_stage()
    if dt is None:
        report["datatrove"] = "not importable: ours alone (see the module docstring to add it)"
    else:

        def run_dt() -> None:
            with tempfile.TemporaryDirectory() as folder:
                dt(docs, folder)

        dt_seconds, _ = timed(run_dt, repeats)
        report["datatrove_s"] = round(dt_seconds, 3)
        report["datatrove_docs_per_s"] = round(len(docs) / dt_seconds, 1)
        report["ours_vs_datatrove"] = round(dt_seconds / seconds, 2)
    print(f"{len(docs):,} documents, {words:,} words, {report['permutations']} permutations, median of {repeats}")
    print(f"{'stage':<40} {'seconds':>8} {'docs/s':>9}")
    print(f"{'ours (signature + bands + exact hash)':<40} {report['ours_s']:>8} {report['ours_docs_per_s']:>9}")
    if "datatrove_s" in report:
        print(f"{'datatrove MinhashDedupSignature':<40} {report['datatrove_s']:>8} {report['datatrove_docs_per_s']:>9}")
        print(f"ours vs datatrove: {report['ours_vs_datatrove']}x (datatrove's time / ours)")
    else:
        print(f"datatrove: {report['datatrove']}")
    print(
        f"planted duplicate pairs found: {report['planted_found']} of {report['planted_pairs']}; "
        f"other pairs flagged: {report['other_pairs_flagged']}"
    )
    if args.prepare:
        with tempfile.TemporaryDirectory() as base:
            report["prepare"] = prepare_modes(docs, Path(base), repeats)
        off = report["prepare"]["off"]["seconds"]
        print(f"{'prepare, one text source':<28} {'seconds':>8} {'vs off':>7} {'samples':>8} {'duplicates':>11}")
        for mode, row in report["prepare"].items():
            ratio = f"{row['seconds'] / off:.2f}x"
            print(f"{'dedup ' + mode:<28} {row['seconds']:>8} {ratio:>7} {row['samples']:>8} {row['duplicates']:>11}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

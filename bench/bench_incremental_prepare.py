"""Incremental prepare: a build after adding 1% new input files (named to sort first, the worst case before) against
a full build of the same corpus, in one run. Goal: <= 3% of the full build's time.

The corpus is text (jsonl web documents of a few hundred words, drawn from the sample prose and shuffled), so the
time is the job's own: reading, cleaning, tokenizing, writing shards. The new build's fixed costs (starting Beam,
loading the tokenizers, listing the inputs and checking every earlier shard's stats) are part of its time.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

from bench_prepare import tokenizers  # bench/ is on sys.path when this file is run

from pipelines.prepare_job import run_prepare
from schemas import PrepareConfig, validate_config

REPO = Path(__file__).resolve().parents[1]


def write_corpus(folder: Path, files: int, docs_per_file: int, seed: int, prefix: str = "web") -> None:
    """`files` jsonl files of `docs_per_file` documents of 200-600 words shuffled from the sample prose."""
    words = " ".join(json.loads(line)["text"] for line in (REPO / "sample/text/docs.jsonl").open()).split()
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        with open(folder / f"{prefix}-{f:05d}.jsonl", "w") as out:
            for d in range(docs_per_file):
                text = " ".join(rng.choices(words, k=rng.randint(200, 600)))
                out.write(json.dumps({"id": f"{prefix}-{f}-{d}", "text": text}) + "\n")


def config(inputs: Path, out: Path, toks: dict[str, Path]) -> PrepareConfig:
    return validate_config(
        PrepareConfig,
        {
            "output_dir": str(out),
            "samples_per_shard": 200,
            "image_size": 64,  # the tiny VQ's (the corpus has no images)
            "tokenizers": {k: str(v) for k, v in toks.items()},
            "sources": [{"name": "web", "kind": "text", "format": "jsonl", "paths": [str(inputs)]}],
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200, help="input files of the full build")
    parser.add_argument("--docs", type=int, default=200, help="documents per file")
    parser.add_argument("--new-share", type=float, default=0.01, help="new inputs of the next build, a share")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        toks = tokenizers(base / "tokenizers")
        write_corpus(base / "inputs", args.files, args.docs, seed=0)
        t0 = time.perf_counter()
        full = run_prepare(config(base / "inputs", base / "out", toks))
        full_s = time.perf_counter() - t0
        new_files = max(1, round(args.files * args.new_share))
        # Named to sort before every earlier file: before incremental builds this re-tokenized the whole source.
        write_corpus(base / "inputs", new_files, args.docs, seed=1, prefix="aaa-new")
        t0 = time.perf_counter()
        incremental = run_prepare(config(base / "inputs", base / "out", toks))
        incremental_s = time.perf_counter() - t0
        build = incremental["manifests"]["web"]["builds"][-1]
        shutil.rmtree(base / "out")
    report = {
        "full_build_s": round(full_s, 2),
        "full_shards": full["shards_written"]["web"],
        "full_records": full["manifests"]["web"]["totals"]["records_in"],
        "incremental_build_s": round(incremental_s, 2),
        "new_files": new_files,
        "new_shards": len(build["new_shards"]),
        "reused_shards": build["reused_shards"],
        "ratio": round(incremental_s / full_s, 4),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report))
    print(f"incremental / full build time: {report['ratio']:.1%} (goal <= 3%)")


if __name__ == "__main__":
    main()

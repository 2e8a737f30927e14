"""Text encode throughput: our batch encode vs SentencePiece's own encode of the same text, 1 and 2 threads.

Our encode adds the id offset into Chameleon's vocabulary and the U+2581 escape on top of SentencePiece;
the goal is >= 0.9x of SentencePiece on one core and near-linear scaling on two.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from model.tokenizers.text_tokenizer import iter_texts, layout_for, train_text_tokenizer

REPO = Path(__file__).resolve().parents[1]


def best_of(fn, repeats: int) -> float:
    """Fastest of `repeats` runs, in seconds (the least disturbed by other work on the machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller corpus, fewer repeats")
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()
    docs = list(iter_texts([REPO / "sample" / "text" / "docs.jsonl"]))
    tokenizer = train_text_tokenizer(docs, layout_for(args.vocab_size, "tiny"))
    texts = docs * (10 if args.quick else 50)
    repeats = 3 if args.quick else 5
    mb = sum(len(t.encode()) for t in texts) / 1e6
    sp = tokenizer._sp  # the bare SentencePiece processor we wrap
    same, checked = ids_agree(tokenizer, sp, texts[:200])
    rows = []
    for threads in (1, 2):
        t_sp = best_of(lambda n=threads: sp.encode(texts, num_threads=n), repeats)
        t_ours = best_of(lambda n=threads: tokenizer.encode_batch(texts, num_threads=n), repeats)
        rows.append((threads, mb / t_sp, mb / t_ours))
    print(f"{len(texts)} documents, {mb:.1f} MB, vocabulary {args.vocab_size}, {os.cpu_count()} cores")
    print(f"{'threads':>7} {'sentencepiece MB/s':>19} {'ours MB/s':>10} {'ours / sp':>10}")
    for threads, sp_rate, our_rate in rows:
        print(f"{threads:>7} {sp_rate:>19.2f} {our_rate:>10.2f} {our_rate / sp_rate:>9.2f}x")
    print(f"ours, 2 threads vs 1: {rows[1][2] / rows[0][2]:.2f}x")
    print(f"check: ours = SentencePiece's ids + offset, round trip exact, in {same}/{checked} documents")


def ids_agree(tokenizer, sp, texts: list[str]) -> tuple[int, int]:
    """Documents (of those without a literal U+2581, which ours escapes) whose batch-encoded ids are SentencePiece's
    shifted into Chameleon's id space and decode back to the text: both sides of the benchmark do the same work."""
    plain = [t for t in texts if "\u2581" not in t]
    offset = tokenizer.vocab.first_text_id - 1  # SentencePiece id 0 is <unk>, never produced (byte fallback)
    ours = tokenizer.encode_batch(plain, num_threads=2)
    same = sum(
        ids.tolist() == [offset + i for i in sp.encode(text)] and tokenizer.decode(ids.tolist()) == text
        for ids, text in zip(ours, plain, strict=True)
    )
    return same, len(plain)


if __name__ == "__main__":
    main()

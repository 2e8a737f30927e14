"""Packing documents into training sequences of `seq_len`, without Beam.

Pretraining concatenates documents in mixture order and may split text across sequences, but never an image
block (BOI ... EOI): a block that would cross the end moves whole to the next sequence and the gap is padding.
SFT packs whole samples best-fit (in windows, to keep the mixture order roughly intact), prompt tokens masked.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

SFT_WINDOW = 1024  # samples packed together; bins are shuffled within a window


@dataclass
class PackedSequence:
    """One training sequence: tokens, which positions count in the loss, and where documents start."""

    tokens: np.ndarray  # [seq_len] int32, padded with the pad id
    loss_mask: np.ndarray  # [seq_len] bool: True where the token is a training target
    doc_starts: np.ndarray  # int32 offsets where a document (or the rest of one) starts; the first is 0
    doc_sources: np.ndarray  # int32 source index of each document piece
    n_real: int  # tokens before the padding

    def doc_lengths(self) -> np.ndarray:
        return np.diff(np.append(self.doc_starts, self.n_real))


class _Builder:
    def __init__(self, seq_len: int, pad_id: int):
        self.seq_len, self.pad_id = seq_len, pad_id
        self.reset()

    def reset(self) -> None:
        self.tokens: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.starts: list[int] = []
        self.sources: list[int] = []
        self.used = 0

    @property
    def free(self) -> int:
        return self.seq_len - self.used

    def add(self, tokens: np.ndarray, mask: np.ndarray, source: int) -> None:
        self.starts.append(self.used)
        self.sources.append(source)
        self.tokens.append(tokens)
        self.masks.append(mask)
        self.used += len(tokens)

    def finish(self) -> PackedSequence:
        pad = self.free
        tokens = np.concatenate([*self.tokens, np.full(pad, self.pad_id)]).astype(np.int32)
        mask = np.concatenate([*self.masks, np.zeros(pad, bool)])
        seq = PackedSequence(tokens, mask, np.array(self.starts, np.int32), np.array(self.sources, np.int32), self.used)
        self.reset()
        return seq


def image_spans(tokens: np.ndarray, boi_id: int, eoi_id: int) -> list[tuple[int, int]]:
    """(start, end) of every image block, end exclusive (BOI at start, EOI at end - 1)."""
    starts = np.flatnonzero(tokens == boi_id)
    ends = np.flatnonzero(tokens == eoi_id)
    if len(starts) != len(ends) or (len(starts) and (ends < starts).any()):
        raise ValueError("unbalanced image blocks (BOI / EOI)")
    return [(int(s), int(e) + 1) for s, e in zip(starts, ends, strict=True)]


def _cut(tokens: np.ndarray, limit: int, spans: list[tuple[int, int]]) -> int:
    """The largest cut <= limit that does not fall inside an image block."""
    for start, end in spans:
        if start < limit < end:
            return start
    return limit


def pack_pretraining(
    docs: Iterable[tuple[int, np.ndarray]], seq_len: int, boi_id: int, eoi_id: int, pad_id: int
) -> Iterator[PackedSequence]:
    """(source index, tokens) documents in order -> full sequences; the last one padded."""
    builder = _Builder(seq_len, pad_id)
    for source, tokens in docs:
        tokens = np.asarray(tokens)
        spans = image_spans(tokens, boi_id, eoi_id)
        for start, end in spans:
            if end - start > seq_len:
                raise ValueError(f"an image block of {end - start} positions cannot fit seq_len {seq_len}")
        pos = 0
        while pos < len(tokens):
            end = pos + builder.free
            take = (_cut(tokens, end, spans) if end < len(tokens) else len(tokens)) - pos
            if take > 0:
                builder.add(tokens[pos : pos + take], np.ones(take, bool), source)
                pos += take
            if builder.free == 0 or (take <= 0 and builder.used):
                yield builder.finish()  # full, or the next image block needs a fresh sequence
    if builder.used:
        yield builder.finish()


def pack_sft(
    samples: Iterable[tuple[int, np.ndarray, int]], seq_len: int, pad_id: int, seed: int = 0, window: int = SFT_WINDOW
) -> tuple[list[PackedSequence], list[int]]:
    """(source index, tokens, n_prompt_tokens) -> sequences packed best-fit, whole samples only, prompts masked.

    Returns the sequences and the positions (in input order) of samples longer than seq_len, which cannot be packed.
    """
    rng = np.random.default_rng(seed)
    sequences: list[PackedSequence] = []
    too_long: list[int] = []
    batch: list[tuple[int, int, np.ndarray, int]] = []

    def flush() -> None:
        bins: list[_Builder] = []
        for _, source, tokens, n_prompt in sorted(batch, key=lambda s: (-len(s[2]), s[0])):  # best-fit decreasing
            mask = np.ones(len(tokens), bool)
            mask[:n_prompt] = False
            fits = [b for b in bins if b.free >= len(tokens)]
            target = min(fits, key=lambda b: b.free) if fits else None
            if target is None:
                target = _Builder(seq_len, pad_id)
                bins.append(target)
            target.add(tokens, mask, source)
        for i in rng.permutation(len(bins)):
            sequences.append(bins[i].finish())
        batch.clear()

    for position, (source, tokens, n_prompt) in enumerate(samples):
        tokens = np.asarray(tokens)
        if len(tokens) > seq_len:
            too_long.append(position)
            continue
        batch.append((position, source, tokens, n_prompt))
        if len(batch) == window:
            flush()
    if batch:
        flush()
    return sequences, too_long

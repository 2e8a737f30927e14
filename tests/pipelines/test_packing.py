"""Packing: nothing lost, image blocks never split, document boundaries and loss masks exact."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.packing import image_spans, pack_pretraining, pack_sft
from schemas.vocab import TINY

BOI, EOI, PAD = TINY.boi_id, TINY.eoi_id, 1
BLOCK = TINY.image_block_len  # 66


def document(rng: np.random.Generator, n_text: list[int]) -> np.ndarray:
    """Text runs with an image block between consecutive runs."""
    parts = [np.array([0])]
    for i, n in enumerate(n_text):
        if i:
            parts.append(np.concatenate([[BOI], rng.integers(4, 4 + 256, 64), [EOI]]))
        parts.append(rng.integers(TINY.first_text_id, TINY.vocab_size, n))
    parts.append(np.array([2]))
    return np.concatenate(parts).astype(np.int32)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 150), min_size=1, max_size=4), min_size=1, max_size=12),
    st.integers(BLOCK, 300),
    st.integers(0, 2**16),
)
def test_pretraining_packing(doc_shapes: list[list[int]], seq_len: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    docs = [(i % 3, document(rng, shape)) for i, shape in enumerate(doc_shapes)]
    sequences = list(pack_pretraining(docs, seq_len, BOI, EOI, PAD))
    assert all(len(s.tokens) == seq_len for s in sequences)
    # Nothing lost or reordered: the real tokens, in order, are the documents, in order.
    real = np.concatenate([s.tokens[: s.n_real] for s in sequences])
    assert np.array_equal(real, np.concatenate([d for _, d in docs]))
    for s in sequences:
        assert (
            (s.tokens[s.n_real :] == PAD).all() and not s.loss_mask[s.n_real :].any() and s.loss_mask[: s.n_real].all()
        )
        image_spans(s.tokens[: s.n_real], BOI, EOI)  # balanced: no block split across sequences
        codes = (s.tokens >= 4) & (s.tokens < EOI)
        inside = np.zeros(seq_len, bool)
        for start, end in image_spans(s.tokens[: s.n_real], BOI, EOI):
            inside[start:end] = True
        assert not (codes & ~inside).any()  # no image code outside a whole block in this sequence
        assert s.doc_starts[0] == 0 and s.doc_lengths().sum() == s.n_real
    # Every token's document piece carries its document's source.
    expected = np.concatenate([np.full(len(d), src) for src, d in docs])
    actual = np.concatenate([np.repeat(s.doc_sources, s.doc_lengths()) for s in sequences])
    assert np.array_equal(actual, expected)


def test_an_image_that_would_cross_the_end_moves_whole() -> None:
    rng = np.random.default_rng(0)
    doc = document(rng, [100, 10])  # <s>, 100 text, 66 image, 10 text, </s> = 178
    first, second = pack_pretraining([(0, doc)], 150, BOI, EOI, PAD)
    assert first.n_real == 101 and (first.tokens[101:] == PAD).all()  # padded instead of cutting the image
    assert second.tokens[0] == BOI and second.n_real == 77


def test_sft_packing_keeps_samples_whole_and_masks_prompts() -> None:
    rng = np.random.default_rng(1)
    samples = []
    for i in range(40):
        n = int(rng.integers(10, 120))
        samples.append((i % 2, rng.integers(300, 2000, n).astype(np.int32), int(rng.integers(1, n))))
    samples.append((0, np.arange(400, 700, dtype=np.int32), 5))  # longer than seq_len
    sequences, too_long = pack_sft(samples, 256, PAD, seed=3)
    assert too_long == [40]
    found = []
    for s in sequences:
        for start, length in zip(s.doc_starts, s.doc_lengths(), strict=True):
            piece = s.tokens[start : start + length]
            match = [i for i, (_, t, _) in enumerate(samples) if len(t) == length and np.array_equal(t, piece)]
            assert match, "every piece is one whole sample"
            i = match[0]
            found.append(i)
            n_prompt = samples[i][2]
            assert not s.loss_mask[start : start + n_prompt].any()  # prompt masked exactly
            assert s.loss_mask[start + n_prompt : start + length].all()
        assert not s.loss_mask[s.n_real :].any()
    assert sorted(found) == list(range(40))
    # Best fit leaves little room: fewer sequences than one per sample, about as few as the total allows.
    total = sum(len(t) for _, t, _ in samples[:40])
    assert len(sequences) <= total // 256 + 3
    again, _ = pack_sft(samples, 256, PAD, seed=3)
    assert all(np.array_equal(a.tokens, b.tokens) for a, b in zip(sequences, again, strict=True))

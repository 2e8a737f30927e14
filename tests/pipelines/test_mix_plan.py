"""Mixture planning: exact token shares, faces drawn 2x, bounded repetitions, prefix-exact interleaving."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipelines.mix_plan import (
    MixPlanError,
    SampleRef,
    _rng,
    apportion,
    draw_source,
    interleave,
    plan_stage,
    weighted_pool,
)


def source(n: int, tokens: int | list[int], face_share: float = 0.0, name: str = "s") -> list[SampleRef]:
    rng = np.random.default_rng(len(name) + n)
    sizes = tokens if isinstance(tokens, list) else [tokens] * n
    return [SampleRef(0, f"{name}_{i:06d}", int(sizes[i]), bool(rng.random() < face_share)) for i in range(n)]


@given(st.integers(0, 10**12), st.dictionaries(st.text(min_size=1, max_size=3), st.floats(0.01, 100), min_size=1))
def test_apportion_is_exact_and_proportional(total: int, weights: dict[str, float]) -> None:
    shares = apportion(total, weights)
    assert sum(shares.values()) == total
    weight_sum = sum(weights.values())
    for name, w in weights.items():
        assert abs(shares[name] - total * w / weight_sum) < 1 + 1e-6 * total


def test_apportion_rejects_bad_weights() -> None:
    with pytest.raises(MixPlanError, match="positive sum"):
        apportion(10, {"a": 0.0, "b": 0.0})
    with pytest.raises(MixPlanError):
        apportion(10, {"a": -1.0, "b": 2.0})


@given(st.dictionaries(st.sampled_from("abcdefg"), st.integers(0, 300), min_size=1))
def test_every_prefix_of_the_interleave_keeps_the_shares(counts: dict[str, int]) -> None:
    order = interleave(counts)
    assert Counter(order) == Counter({k: v for k, v in counts.items() if v})
    total = sum(counts.values())
    k = sum(1 for c in counts.values() if c)
    bound = 1 - 1 / (2 * k - 2) if k > 1 else 0.0  # Tijdeman: strictly within one sample
    taken: Counter[str] = Counter()
    for step, name in enumerate(order, 1):
        taken[name] += 1
        for s, c in counts.items():
            assert abs(taken[s] - c / total * step) <= bound + 1e-9


def test_faces_are_drawn_twice_as_often() -> None:
    samples = source(2000, 10, face_share=0.3)
    plan = draw_source("photos", samples, target_tokens=3 * 20_000, face_weight=2.0, max_repetitions=4, seed=1)
    draws = Counter(s.key for s in plan.samples)
    faces = [draws[s.key] for s in samples if s.has_face]
    others = [draws[s.key] for s in samples if not s.has_face]
    assert 1.9 < np.mean(faces) / np.mean(others) < 2.1
    assert plan.realized_tokens == plan.target_tokens == 60_000


def test_realized_within_one_sample_and_repetition_limit() -> None:
    samples = source(50, list(range(10, 60)))
    plan = draw_source("text", samples, target_tokens=3_001, face_weight=2.0, max_repetitions=2, seed=0)
    assert 0 <= plan.realized_tokens - 3_001 < max(s.n_tokens for s in samples)
    with pytest.raises(
        MixPlanError,
        match=r"source 'text' needs 5,000 tokens but 2 repetitions of its 1,725 tokens "
        r"give 3,450: 1,550 tokens missing",
    ):
        draw_source("text", samples, target_tokens=5_000, face_weight=2.0, max_repetitions=2, seed=0)


def test_stage_plan_for_three_sources_of_very_different_sizes() -> None:
    sources = {
        "text": source(5000, 300, name="text"),
        "pairs": source(400, 1100, 0.4, "pairs"),
        "docs": source(12, 2500, 0.2, "docs"),
    }
    weights = {"text": 2.9, "pairs": 1.5, "docs": 0.4}
    reps = dict.fromkeys(weights, 8.0)
    plans, sequence = plan_stage(sources, weights, 600_000, 2.0, reps, seed=7)
    targets = apportion(600_000, weights)
    for name, plan in plans.items():
        assert plan.target_tokens == targets[name]
        assert 0 <= plan.realized_tokens - targets[name] < max(s.n_tokens for s in sources[name])
    # The sequence interleaves the plans in order, keeping every prefix within one sample of the shares.
    counts = {name: len(p.samples) for name, p in plans.items()}
    taken: Counter[str] = Counter()
    for step, (name, _) in enumerate(sequence, 1):
        taken[name] += 1
        assert all(abs(taken[s] - c / len(sequence) * step) <= 1 for s, c in counts.items())
    again = plan_stage(sources, weights, 600_000, 2.0, reps, seed=7)[1]
    assert again == sequence  # deterministic from the seed and the inputs
    assert plan_stage(sources, weights, 600_000, 2.0, reps, seed=8)[1] != sequence


def test_stage_two_inherits_stage_one_at_half_weight(tmp_path) -> None:
    from schemas import MixtureSpec, validate_config

    for name in ("a", "b", "hq"):
        (tmp_path / name).mkdir()
    spec = validate_config(
        MixtureSpec,
        {
            "total_tokens": 1_000_000,
            "seq_len": 2048,
            "stages": {
                "stage1": {
                    "fraction": 0.8,
                    "sources": [{"name": "a", "path": "a", "weight": 2.0}, {"name": "b", "path": "b", "weight": 1.0}],
                },
                "stage2": {
                    "fraction": 0.2,
                    "inherit": {"stage": "stage1", "factor": 0.5},
                    "sources": [{"name": "hq", "path": "hq", "weight": 1.5}],
                },
            },
        },
        base_dir=tmp_path,
    )
    weights = {s.name: s.weight for s in spec.sources_of("stage2")}
    assert weights == {"a": 1.0, "b": 0.5, "hq": 1.5}
    assert apportion(spec.stage_tokens("stage2"), weights) == {"a": 66_667, "b": 33_333, "hq": 100_000}


def test_a_later_stage_goes_on_where_the_earlier_one_stopped() -> None:
    samples = [SampleRef(0, f"k{i}", 10, False) for i in range(50)]
    first = draw_source("prose", samples, target_tokens=200, face_weight=2.0, max_repetitions=4, seed=1)
    second = draw_source("prose", samples, 150, 2.0, 4, seed=1, start=first.next_draw)
    assert first.next_draw == 20 and second.next_draw == 35
    # Together they are the one endless draw order: stage 2 sees samples stage 1 left out before any repeat.
    whole = draw_source("prose", samples, 350, 2.0, 4, seed=1)
    assert first.samples + second.samples == whole.samples
    assert not {s.key for s in first.samples} & {s.key for s in second.samples}


def test_face_weight_below_one_that_leaves_nothing_is_an_error_not_a_hang() -> None:
    samples = [SampleRef(0, f"f{i}", 10, True) for i in range(3)]  # every sample has a face
    # A seed whose coin flips keep none of the three (each kept with probability 0.3).
    seed = next(s for s in range(500) if not weighted_pool(samples, 0.3, _rng(s, "faces", "pool")))
    with pytest.raises(MixPlanError, match=r"face_weight 0\.3 left no samples to draw from"):
        draw_source("faces", samples, 20, face_weight=0.3, max_repetitions=4, seed=seed)

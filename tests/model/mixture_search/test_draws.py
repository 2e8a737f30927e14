"""The swarm's mixtures: Dirichlet draws around the base, reproducible, always shares."""

from __future__ import annotations

import numpy as np
import pytest

from model.mixture_search.draws import draw_mixtures, normalise


def test_normalise_gives_shares_in_source_order() -> None:
    assert normalise({"b": 1, "a": 3}, ["a", "b", "c"]) == {"a": 0.75, "b": 0.25, "c": 0.0}
    thirds = normalise({"a": 1, "b": 1, "c": 1}, ["a", "b", "c"])
    assert sum(thirds.values()) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="unknown sources"):
        normalise({"z": 1}, ["a"])
    with pytest.raises(ValueError, match="at least one weight"):
        normalise({"a": 0}, ["a"])


def test_draws_are_reproducible_and_a_larger_swarm_keeps_the_smaller_ones() -> None:
    base = {"a": 0.5, "b": 0.3, "c": 0.2}
    first = draw_mixtures(base, 8, 1.0, seed=3)
    assert draw_mixtures(base, 8, 1.0, seed=3) == first
    assert draw_mixtures(base, 12, 1.0, seed=3)[:8] == first
    assert draw_mixtures(base, 8, 1.0, seed=4) != first
    for m in first:
        assert list(m) == ["a", "b", "c"] and sum(m.values()) == pytest.approx(1.0, abs=1e-12)
        assert all(v >= 0 for v in m.values())


def test_concentration_sets_how_near_the_base_the_draws_stay() -> None:
    base = {"a": 0.6, "b": 0.3, "c": 0.1}
    target = np.array(list(base.values()))

    def spread(concentration: float) -> float:
        draws = np.array([list(m.values()) for m in draw_mixtures(base, 400, concentration, seed=0)])
        assert draws.mean(axis=0) == pytest.approx(target, abs=0.03)  # centred on the base
        return float(np.abs(draws - target).mean())

    assert spread(100.0) < spread(1.0) / 4


def test_a_source_at_zero_stays_at_zero() -> None:
    draws = draw_mixtures({"a": 1.0, "b": 0.0, "c": 1.0}, 20, 1.0, seed=0)
    assert all(m["b"] == 0.0 for m in draws) and len({m["a"] for m in draws}) == 20

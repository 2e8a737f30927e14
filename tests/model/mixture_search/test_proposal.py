"""The proposal: share caps from token counts, constraints checked for feasibility, projection onto them, and a
search that finds the law's optimum, stays inside every constraint (also when the optimum is outside), and repeats
itself for a seed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model.mixture_search.fits import FIT_KINDS, fit
from model.mixture_search.proposal import Constraints, draw_candidates, is_feasible, project, propose, share_caps

SOURCES = ["web", "captions", "interleaved"]
BASE = {"web": 0.5, "captions": 0.3, "interleaved": 0.2}


def runs(slopes: list[float], n: int = 40, seed: int = 0, noise: float = 0.005) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.dirichlet(np.ones(3), n)
    return X, np.exp(0.5 + X @ np.array(slopes)) * (1 + noise * rng.standard_normal(n))


@pytest.fixture(scope="module")
def text_model():
    """Text loss falls as web's share grows: the unconstrained optimum is all web."""
    return fit("loglinear", *runs([-0.8, 0.3, 0.0]))


@pytest.fixture(scope="module")
def image_model():
    """Image loss falls as captions' share grows."""
    return fit("loglinear", *runs([0.2, -0.9, 0.0], seed=1))


def check_respected(weights: dict[str, float], constraints: Constraints) -> None:
    shares = np.array([weights[s] for s in SOURCES])
    assert shares.sum() == pytest.approx(1.0, abs=1e-9)
    low, high = constraints.bounds(SOURCES)
    assert (shares >= low - 1e-12).all() and (shares <= high + 1e-12).all()


def test_share_caps():
    caps = share_caps(
        {"web": 1_000_000, "captions": 1_000, "interleaved": 100},
        {"web": 1.0, "captions": 1.0, "interleaved": 4.0},
        budget_tokens=10_000,
    )
    assert caps == {"web": 1.0, "captions": 0.1, "interleaved": 0.04}
    assert share_caps({"a": 0}, {"a": 2.0}, 10) == {"a": 0.0}
    with pytest.raises(ValueError, match=r"missing \['b'\], unknown \['c'\]"):
        share_caps({"a": 1, "b": 1}, {"a": 1.0, "c": 1.0}, 10)
    with pytest.raises(ValueError, match="budget must be > 0"):
        share_caps({"a": 1}, {"a": 1.0}, 0)
    with pytest.raises(ValueError, match="source 'a'"):
        share_caps({"a": 1}, {"a": 0.0}, 10)


def test_infeasible_constraints_are_a_clear_error():
    with pytest.raises(ValueError, match=r"minimum shares sum to 1\.2 \(> 1\)"):
        Constraints(min_share={"web": 0.7, "captions": 0.5}).bounds(SOURCES)
    with pytest.raises(ValueError, match=r"maximum shares sum to 0\.9 \(< 1\)"):
        Constraints(max_share={"web": 0.5, "captions": 0.3, "interleaved": 0.1}).bounds(SOURCES)
    with pytest.raises(ValueError, match=r"min_share 0\.6 > max_share 0\.4"):
        Constraints(min_share={"web": 0.6}, max_share={"web": 0.4})
    with pytest.raises(ValueError, match=r"max_share\['web'\] = 1.5"):
        Constraints(max_share={"web": 1.5})
    with pytest.raises(ValueError, match="not in the mixture: audio"):
        Constraints(min_share={"audio": 0.1}).bounds(SOURCES)
    # Sources the constraints leave out may take up to 1: these are feasible.
    Constraints(max_share={"web": 0.1, "captions": 0.1}).bounds(SOURCES)


def test_projection_lands_inside_and_leaves_feasible_mixtures_alone():
    low, high = np.array([0.1, 0.0, 0.05]), np.array([0.3, 0.6, 1.0])
    X = np.random.default_rng(0).dirichlet(np.ones(3), 2000)
    projected = project(X, low, high)
    assert is_feasible(projected, low, high).all()
    feasible = is_feasible(X, low, high)
    assert 0 < feasible.sum() < len(X)
    np.testing.assert_allclose(projected[feasible], X[feasible], atol=1e-12)
    np.testing.assert_allclose(project(projected, low, high), projected, atol=1e-12)
    # Nearest: no random feasible point is closer to an infeasible one than its projection.
    others = project(np.random.default_rng(1).dirichlet(np.ones(3), 500), low, high)
    for x, p in zip(X[~feasible][:50], projected[~feasible][:50], strict=True):
        assert np.linalg.norm(x - p) <= np.linalg.norm(others - x, axis=1).min() + 1e-12


def test_candidates_search_far_and_near_the_base():
    base = np.array([0.5, 0.3, 0.2])
    X = draw_candidates(base, 10_000, np.random.default_rng(0))
    assert X.shape == (10_000, 3) and np.allclose(X.sum(axis=1), 1.0) and (X >= 0).all()
    distance = np.linalg.norm(X - base, axis=1)
    assert np.median(distance[5_000:]) < 0.1 < np.median(distance[:5_000])


def test_unconstrained_proposal_finds_the_optimum_and_beats_the_base(text_model):
    proposal = propose({"text": text_model}, {"text": 1.0}, SOURCES, Constraints(), BASE, n_candidates=20_000)
    assert proposal.weights["web"] > 0.9
    assert proposal.n_feasible == proposal.n_candidates == 20_000 and proposal.base_feasible
    assert proposal.weighted["mean"] < proposal.base_weighted["mean"]
    assert proposal.top_k_weighted["best"] <= proposal.top_k_weighted["worst"]


@pytest.mark.parametrize("kind", FIT_KINDS)
def test_every_constraint_holds_when_the_optimum_is_outside(kind):
    model = fit(kind, *runs([-0.8, 0.3, 0.0], n=32))
    constraints = Constraints(min_share={"interleaved": 0.15}, max_share={"web": 0.3, "captions": 0.6})
    proposal = propose({"text": model}, {"text": 1.0}, SOURCES, constraints, BASE, n_candidates=5_000, top_k=50)
    check_respected(proposal.weights, constraints)
    assert proposal.n_feasible < proposal.n_candidates
    assert not proposal.base_feasible  # web 0.5 > 0.3
    if kind == "loglinear":  # smooth enough to push web to its cap and captions to its floor
        assert proposal.weights["web"] > 0.28 and proposal.weights["captions"] < 0.57


def test_weighted_objectives_trade_off_and_the_prediction_adds_up(text_model, image_model):
    models = {"text": text_model, "image": image_model}
    constraints = Constraints(max_share={"web": 0.7, "captions": 0.7})
    text_only = propose(models, {"text": 1.0, "image": 0.0}, SOURCES, constraints, BASE, n_candidates=20_000)
    both = propose(models, {"text": 1.0, "image": 1.0}, SOURCES, constraints, BASE, n_candidates=20_000)
    check_respected(both.weights, constraints)
    assert text_only.weights["web"] > 0.65 and both.weights["captions"] > text_only.weights["captions"] + 0.2
    assert both.weighted["mean"] == pytest.approx(both.predicted["text"]["mean"] + both.predicted["image"]["mean"])
    assert both.weighted["std"] == pytest.approx(
        np.hypot(both.predicted["text"]["std"], both.predicted["image"]["std"])
    )
    assert set(text_only.predicted) == {"text", "image"}  # an objective weighted 0 is still reported
    mean, std = text_model.predict([[BASE[s] for s in SOURCES]])
    assert both.base_predicted["text"] == {"mean": float(mean[0]), "std": float(std[0])}


def test_same_seed_same_proposal(text_model, image_model):
    models = {"text": text_model, "image": image_model}
    constraints = Constraints(min_share={"interleaved": 0.1})
    args = (models, {"text": 1.0, "image": 0.5}, SOURCES, constraints, BASE)
    first = propose(*args, n_candidates=5_000, seed=3).as_dict()
    assert first == propose(*args, n_candidates=5_000, seed=3).as_dict()
    assert first != propose(*args, n_candidates=5_000, seed=4).as_dict()
    assert json.loads(json.dumps(first, allow_nan=False)) == first


def test_bad_requests_are_clear_errors(text_model):
    args = (SOURCES, Constraints(), BASE)
    with pytest.raises(ValueError, match="weighted without a fit: image"):
        propose({"text": text_model}, {"text": 1.0, "image": 1.0}, *args)
    with pytest.raises(ValueError, match="over 3 sources, not the 2 given"):
        propose({"text": text_model}, {"text": 1.0}, ["web", "captions"], Constraints(), {"web": 1, "captions": 1})
    with pytest.raises(ValueError, match="base must weigh exactly"):
        propose({"text": text_model}, {"text": 1.0}, SOURCES, Constraints(), {"web": 1.0})
    with pytest.raises(ValueError, match="at least one objective weight must be > 0"):
        propose({"text": text_model}, {"text": 0.0}, *args)
    with pytest.raises(ValueError, match="top_k"):
        propose({"text": text_model}, {"text": 1.0}, *args, n_candidates=10, top_k=50)
    with pytest.raises(ValueError, match="minimum shares sum to"):
        propose(
            {"text": text_model}, {"text": 1.0}, SOURCES, Constraints(min_share={"web": 0.6, "captions": 0.6}), BASE
        )
    # Unnormalised base weights are read as proportions.
    proposal = propose(
        {"text": text_model}, {"text": 1.0}, SOURCES, Constraints(), {"web": 5, "captions": 3, "interleaved": 2}, 1000
    )
    assert proposal.base_weights == pytest.approx(BASE)

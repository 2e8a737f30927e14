"""The proposed mixture: the one the fits predict best for a weighted sum of objectives, under the real run's
constraints (each source's repetition cap for its token budget, minimum and maximum shares).

RegMix's search: many candidate mixtures are drawn over the simplex, scored by the fits, and the proposal is the
average of the best `top_k` (steadier than the single best, whose score is the most flattered by the fits' errors).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from model.mixture_search.fits import FittedModel, check_shares

NEAR_BASE_CONCENTRATIONS = (10.0, 300.0)  # Dirichlet concentrations around the base, drawn log-uniformly in between
_PROJECTION_STEPS = 100  # bisection halvings: enough to pin the shift to float precision


def share_caps(
    source_tokens: dict[str, int], max_repetitions: dict[str, float], budget_tokens: int
) -> dict[str, float]:
    """The largest share each source may take in a run of `budget_tokens` tokens without repeating its tokens more
    than `max_repetitions[source]` times: min(1, tokens * repetitions / budget)."""
    if budget_tokens <= 0:
        raise ValueError(f"the token budget must be > 0, got {budget_tokens}")
    if set(max_repetitions) != set(source_tokens):
        missing = sorted(set(source_tokens) - set(max_repetitions))
        unknown = sorted(set(max_repetitions) - set(source_tokens))
        raise ValueError(f"max_repetitions must name every source once: missing {missing}, unknown {unknown}")
    caps = {}
    for source, tokens in source_tokens.items():
        repetitions = max_repetitions[source]
        if tokens < 0 or not repetitions > 0:
            raise ValueError(f"source {source!r}: tokens must be >= 0 and repetitions > 0, got {tokens}, {repetitions}")
        caps[source] = min(1.0, tokens * repetitions / budget_tokens)
    return caps


@dataclass(frozen=True)
class Constraints:
    """Bounds on each source's share: min_share (default 0) and max_share (default 1) per source name, e.g.
    max_share=share_caps(...). A mixture is feasible when every share is within its bounds (and they sum to 1)."""

    min_share: dict[str, float] = field(default_factory=dict)
    max_share: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, bounds in (("min_share", self.min_share), ("max_share", self.max_share)):
            for source, share in bounds.items():
                if not 0.0 <= share <= 1.0:
                    raise ValueError(f"{name}[{source!r}] = {share}, a share must be in [0, 1]")
        for source, low in self.min_share.items():
            if low > self.max_share.get(source, 1.0):
                raise ValueError(f"source {source!r}: min_share {low} > max_share {self.max_share[source]}")

    def bounds(self, sources: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(lowest, highest) share per source, in `sources`' order; ValueError when the constraints name a source
        not in `sources`, or cannot be met (the minimums sum to more than 1, or the maximums to less than 1)."""
        unknown = sorted((set(self.min_share) | set(self.max_share)) - set(sources))
        if unknown:
            raise ValueError(f"constraints name sources that are not in the mixture: {', '.join(unknown)}")
        low = np.array([self.min_share.get(s, 0.0) for s in sources])
        high = np.array([self.max_share.get(s, 1.0) for s in sources])
        if low.sum() > 1.0 + 1e-12:
            raise ValueError(f"infeasible constraints: the minimum shares sum to {low.sum():.6g} (> 1)")
        if high.sum() < 1.0 - 1e-12:
            raise ValueError(f"infeasible constraints: the maximum shares sum to {high.sum():.6g} (< 1)")
        return low, high


def is_feasible(X: np.ndarray, low: np.ndarray, high: np.ndarray, tolerance: float = 1e-9) -> np.ndarray:
    """Per row of X: within the bounds and summing to 1 (up to `tolerance`)."""
    within = ((low - tolerance <= X) & (high + tolerance >= X)).all(axis=1)
    return within & (np.abs(X.sum(axis=1) - 1.0) <= tolerance)


def project(X: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """The nearest (Euclidean) feasible mixture to each row of X: clip(x - t, low, high) with the shift t that makes
    it sum to 1, found by bisection (the sum falls as t grows); feasible rows come back unchanged up to rounding."""
    X = np.asarray(X, dtype=np.float64)
    shift_low = (X - high).min(axis=1)  # every share at its maximum: sums to >= 1
    shift_high = (X - low).max(axis=1)  # every share at its minimum: sums to <= 1
    for _ in range(_PROJECTION_STEPS):
        middle = (shift_low + shift_high) / 2
        too_much = np.clip(X - middle[:, None], low, high).sum(axis=1) > 1.0
        shift_low = np.where(too_much, middle, shift_low)
        shift_high = np.where(too_much, shift_high, middle)
    return np.clip(X - ((shift_low + shift_high) / 2)[:, None], low, high)


def draw_candidates(base: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n mixtures: half uniform over the simplex (far from the base), half Dirichlet around the base with
    concentrations log-uniform in NEAR_BASE_CONCENTRATIONS (near it; a source the base leaves out still gets a
    little)."""
    k = len(base)
    n_uniform = n // 2
    low, high = np.log(NEAR_BASE_CONCENTRATIONS)
    concentration = np.exp(rng.uniform(low, high, n - n_uniform))
    alpha = np.vstack([np.ones((n_uniform, k)), concentration[:, None] * (base + 0.01)[None, :]])
    gammas = rng.gamma(alpha)
    return gammas / gammas.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Proposal:
    """The proposed mixture and what the fits predict for it, next to the base mixture.

    predicted / base_predicted: per objective {"mean", "std"} (std: a new run's spread, see fits.FittedModel.predict);
    weighted / base_weighted: the weighted objective, its std assuming the objectives' errors independent.
    n_feasible: the candidates that met the constraints as drawn (the others were projected onto them).
    top_k_weighted: the best and the worst predicted weighted objective among the top_k averaged.
    """

    sources: list[str]
    weights: dict[str, float]
    predicted: dict[str, dict[str, float]]
    weighted: dict[str, float]
    base_weights: dict[str, float]
    base_predicted: dict[str, dict[str, float]]
    base_weighted: dict[str, float]
    base_feasible: bool
    objective_weights: dict[str, float]
    n_candidates: int
    n_feasible: int
    top_k: int
    top_k_weighted: dict[str, float]
    seed: int

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain JSON values."""
        return asdict(self)


def _predictions(models: dict[str, FittedModel], x: np.ndarray, objective_weights: dict[str, float]):
    predicted = {}
    for objective, model in models.items():
        mean, std = model.predict(x[None, :])
        predicted[objective] = {"mean": float(mean[0]), "std": float(std[0])}
    weighted = {
        "mean": sum(w * predicted[o]["mean"] for o, w in objective_weights.items()),
        "std": math.sqrt(sum((w * predicted[o]["std"]) ** 2 for o, w in objective_weights.items())),
    }
    return predicted, weighted


def propose(
    models: dict[str, FittedModel],
    objective_weights: dict[str, float],
    sources: list[str],
    constraints: Constraints,
    base: dict[str, float],
    n_candidates: int = 100_000,
    top_k: int = 100,
    seed: int = 0,
) -> Proposal:
    """The mixture of `sources` that the fits (`models`, one per objective, over `sources`' columns) predict lowest
    for sum(objective_weights[o] * objective o) under `constraints`: the average of the top_k of n_candidates
    drawn mixtures (draw_candidates around `base`, plus the base), each projected onto the constraints. The
    constraints are convex, so the average of feasible mixtures is feasible. `base` may be unnormalised weights.
    Deterministic for a seed."""
    if not sources or len(set(sources)) != len(sources):
        raise ValueError(f"sources must be distinct names, got {sources}")
    if not objective_weights or any(not (w >= 0 and math.isfinite(w)) for w in objective_weights.values()):
        raise ValueError(f"objective weights must be finite and >= 0, got {objective_weights}")
    if sum(objective_weights.values()) <= 0:
        raise ValueError("at least one objective weight must be > 0")
    unfitted = sorted(set(objective_weights) - set(models))
    if unfitted:
        raise ValueError(f"objectives weighted without a fit: {', '.join(unfitted)}")
    for objective, model in models.items():
        if model.n_sources != len(sources):
            raise ValueError(f"the {objective} fit is over {model.n_sources} sources, not the {len(sources)} given")
    if set(base) != set(sources):
        raise ValueError(f"base must weigh exactly the sources {sources}, got {sorted(base)}")
    base_vector = np.array([base[s] for s in sources], dtype=np.float64)
    if not np.isfinite(base_vector).all() or (base_vector < 0).any() or base_vector.sum() <= 0:
        raise ValueError(f"base weights must be finite and >= 0 with a positive sum, got {base}")
    base_vector = check_shares((base_vector / base_vector.sum())[None, :], "base")[0]
    if n_candidates < 1 or not 1 <= top_k <= n_candidates + 1:
        raise ValueError(f"need n_candidates >= 1 and 1 <= top_k <= n_candidates + 1, got {n_candidates}, {top_k}")
    low, high = constraints.bounds(sources)

    rng = np.random.default_rng(seed)
    drawn = np.vstack([base_vector[None, :], draw_candidates(base_vector, n_candidates, rng)])
    n_feasible = int(is_feasible(drawn[1:], low, high).sum())
    candidates = project(drawn, low, high)
    scores = np.zeros(len(candidates))
    for objective, weight in objective_weights.items():
        if weight > 0:
            scores += weight * models[objective].predict(candidates)[0]
    best = np.argsort(scores, kind="stable")[:top_k]
    # The average is feasible in exact arithmetic; the projection only removes rounding.
    proposal = project(candidates[best].mean(axis=0)[None, :], low, high)[0]
    if not is_feasible(proposal[None, :], low, high)[0]:  # cannot happen; a proposal must never break a constraint
        raise RuntimeError(f"the proposal {proposal.tolist()} breaks the constraints {low.tolist()}..{high.tolist()}")

    predicted, weighted = _predictions(models, proposal, objective_weights)
    base_predicted, base_weighted = _predictions(models, base_vector, objective_weights)
    return Proposal(
        sources=list(sources),
        weights={s: float(v) for s, v in zip(sources, proposal, strict=True)},
        predicted=predicted,
        weighted=weighted,
        base_weights={s: float(v) for s, v in zip(sources, base_vector, strict=True)},
        base_predicted=base_predicted,
        base_weighted=base_weighted,
        base_feasible=bool(is_feasible(base_vector[None, :], low, high)[0]),
        objective_weights=dict(objective_weights),
        n_candidates=n_candidates,
        n_feasible=n_feasible,
        top_k=top_k,
        top_k_weighted={"best": float(scores[best[0]]), "worst": float(scores[best[-1]])},
        seed=seed,
    )

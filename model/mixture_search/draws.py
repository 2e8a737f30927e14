"""The mixtures a search tries: shares over a stage's sources, drawn from a Dirichlet around the base weights."""

from __future__ import annotations

import numpy as np

SHARE_DECIMALS = 6  # shares are rounded so that a mixture has one spelling (its run's cache key) on every machine


def normalise(weights: dict[str, float], sources: list[str]) -> dict[str, float]:
    """Token shares (summing to 1, rounded) over `sources` in their order; a source left out has share 0."""
    unknown = set(weights) - set(sources)
    if unknown:
        raise ValueError(f"unknown sources {sorted(unknown)}; the stage's sources: {sources}")
    if any(weights.get(s, 0.0) < 0 for s in sources):
        raise ValueError(f"weights must be >= 0, got {weights}")
    total = sum(weights.get(s, 0.0) for s in sources)
    if total <= 0:
        raise ValueError(f"at least one weight must be > 0, got {weights}")
    shares = [round(weights.get(s, 0.0) / total, SHARE_DECIMALS) for s in sources]
    # Rounding may leave the sum 1e-6 off: the largest share takes the difference, so shares always sum to 1.
    largest = int(np.argmax(shares))
    shares[largest] = round(shares[largest] + 1.0 - sum(shares), SHARE_DECIMALS)
    return dict(zip(sources, shares, strict=True))


def draw_mixtures(base: dict[str, float], n: int, concentration: float, seed: int) -> list[dict[str, float]]:
    """`n` mixtures from Dirichlet(alpha), alpha_i = concentration x K x base_i over the sources with a base share
    (a source at 0 stays at 0). With equal base shares and concentration 1 the draws are uniform over all mixtures;
    a larger concentration keeps them nearer the base. The same seed gives the same mixtures."""
    if concentration <= 0:
        raise ValueError(f"concentration must be > 0, got {concentration}")
    sources = list(base)
    active = [s for s in sources if base[s] > 0]
    total = sum(base[s] for s in active)
    alpha = np.array([concentration * len(active) * base[s] / total for s in active])
    rng = np.random.default_rng(seed)
    out = []
    for row in rng.dirichlet(alpha, size=n):
        # A tiny alpha can draw exact zeros for every source in floating point: such a row is drawn again.
        while row.sum() <= 0 or not np.isfinite(row).all():
            row = rng.dirichlet(alpha)
        out.append(normalise(dict(zip(active, row.tolist(), strict=True)), sources))
    return out

"""Fits of proxy runs' losses as functions of their mixtures, and how well they predict runs they did not see.

A run is a mixture x (shares over K sources, each >= 0, summing to 1, columns in a fixed source order) and one
measured objective y > 0 (a held-out loss). X is (n, K), y is (n,). Four kinds of fit:

- "loglinear": log y = a + sum_i b_i x_i, lightly ridge-regularised (Data Mixing Laws' exponential law without
  offset); it extrapolates smoothly and its coefficients read as each source's effect.
- "powerlaw": y = a + B (x_s + eps)^-c + sum_{j != s} d_j x_j, a power law in one source's own share (as Data Mixing
  Laws and BiMix fit a domain's loss) plus linear transfer from the others, s being the source whose law fits best;
  it follows a loss that climbs steeply as its own source's share nears 0.
- "gp": a Gaussian process (Matern 5/2 x constant + white noise), smooth and local, with its own predictive std.
- "gbt": gradient-boosted trees (as RegMix uses LightGBM): no shape assumed, needs more runs, cannot extrapolate.

Every fit's `predict` gives a mean and a std, the std being the spread of a new run's measured loss at that mixture
(run-to-run noise included), so fits can be compared and the std checked against held-out runs.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, get_args

import numpy as np

from schemas.search_config import FitKind

FIT_KINDS = get_args(FitKind)

SHARE_TOLERANCE = 1e-6  # how far a row's sum may be from 1, or a share below 0, for rounding
RIDGE_ALPHA_PER_RUN = 1e-3  # log-linear's ridge penalty, per run: light, but keeps K near n solvable
GBT_BAGS = 10  # bootstrap refits that give the trees' spread
BETTER_THAN_MEAN_P = 0.05  # one-sided Spearman p-value a fit must reach to count as better than the mean
_FEWEST_RUNS = {"loglinear": 3, "powerlaw": 6, "gp": 5, "gbt": 8}
POWER_LAW_EPS = 1e-3  # keeps a source's term finite at share 0 (a source left out of a mixture)
POWER_LAW_EXPONENTS = (0.1, 0.3, 0.6)  # starting exponents: the least-squares fit has local minima
POWER_LAW_MAX_EXPONENT = 3.0


def min_runs(kind: str, n_sources: int) -> int:
    """The fewest runs a fit of `kind` over `n_sources` sources accepts: one more than the log-linear law's free
    parameters (K shares summing to 1 leave K - 1 slopes, plus the intercept), one more than the power law's (its
    K + 2), and a floor per kind."""
    _check_kind(kind)
    parameters = n_sources + 2 if kind == "powerlaw" else n_sources
    return max(parameters + 1, _FEWEST_RUNS[kind])


def check_shares(X: Any, what: str = "X") -> np.ndarray:
    """`X` as a float (n, K) array of mixtures; a row that is not shares (a negative, NaN or inf entry, or a sum
    other than 1) raises ValueError naming it."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] < 2:
        raise ValueError(f"{what}: expected an (n runs, K >= 2 sources) array of shares, got shape {X.shape}")
    not_finite = ~np.isfinite(X).all(axis=1)
    if not_finite.any():
        row = int(np.argmax(not_finite))
        raise ValueError(f"{what}: row {row} is not finite ({X[row].tolist()})")
    not_shares = (X.min(axis=1) < -SHARE_TOLERANCE) | (np.abs(X.sum(axis=1) - 1.0) > SHARE_TOLERANCE)
    if not_shares.any():
        row = int(np.argmax(not_shares))
        raise ValueError(f"{what}: row {row} is not shares (each >= 0, summing to 1): {X[row].tolist()}")
    return np.clip(X, 0.0, None)


def check_losses(y: Any, n: int, what: str = "y") -> np.ndarray:
    """`y` as a float (n,) array of losses; NaN, inf or a loss <= 0 raises ValueError naming the row."""
    y = np.asarray(y, dtype=np.float64)
    if y.shape != (n,):
        raise ValueError(f"{what}: expected {n} losses (one per row of X), got shape {y.shape}")
    bad = ~(np.isfinite(y) & (y > 0))
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(f"{what}: row {row} is {y[row]}, a loss must be finite and > 0")
    return y


class FittedModel(ABC):
    """A fit of one objective over mixtures of `n_sources` sources, made from `n_runs` runs."""

    kind: str

    def __init__(self, n_sources: int, n_runs: int, train_mean: float) -> None:
        self.n_sources = n_sources
        self.n_runs = n_runs
        self.train_mean = train_mean  # the constant predictor's value, for `evaluate`'s comparison

    def predict(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) of the objective at each mixture (row) of X: the predicted loss, and the spread of one new
        run's measured loss there (how each kind estimates it is in its class's docstring)."""
        X = check_shares(X)
        if X.shape[1] != self.n_sources:
            raise ValueError(f"X: this {self.kind} fit is over {self.n_sources} sources, X has {X.shape[1]} columns")
        return self._predict(X)

    @abstractmethod
    def _predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class LogLinearFit(FittedModel):
    """log y = intercept + coefficients . x, by ridge regression in log space; predicts exp(.).

    Shares sum to 1, so adding c to every coefficient and taking c from the intercept changes nothing: the ridge
    solution is the one whose coefficients sum to 0, and a source's effect is read against the others (b_i - b_j is
    the log-loss change of moving the whole mixture from source j to source i). std: the residual std in log space
    (over n - K degrees of freedom: K - 1 free slopes and the intercept), widened by the point's leverage, taken as a
    log-normal's std around the prediction.
    """

    kind = "loglinear"

    def __init__(self, X: np.ndarray, y: np.ndarray) -> None:
        super().__init__(X.shape[1], X.shape[0], float(y.mean()))
        log_y = np.log(y)
        self._x_mean = X.mean(axis=0)
        centered = X - self._x_mean
        gram = centered.T @ centered + RIDGE_ALPHA_PER_RUN * len(y) * np.eye(X.shape[1])
        self._gram_inv = np.linalg.inv(gram)
        self.coefficients = self._gram_inv @ centered.T @ (log_y - log_y.mean())
        self.intercept = float(log_y.mean() - self._x_mean @ self.coefficients)
        residuals = log_y - (self.intercept + X @ self.coefficients)
        dof = len(y) - np.linalg.matrix_rank(centered) - 1
        self.residual_std = float(np.sqrt(residuals @ residuals / dof))

    def _predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        log_mean = self.intercept + X @ self.coefficients
        centered = X - self._x_mean
        leverage = 1.0 / self.n_runs + np.einsum("ij,jk,ik->i", centered, self._gram_inv, centered)
        log_var = self.residual_std**2 * (1.0 + leverage)
        mean = np.exp(log_mean)
        return mean, mean * np.sqrt(np.expm1(log_var))


class PowerLawFit(FittedModel):
    """y = a + B (x_s + eps)^-c + sum_{j != s} d_j x_j, B = e^b > 0 and 0 <= c <= POWER_LAW_MAX_EXPONENT, by least
    squares (scipy), from a few starting exponents; s (`source`, a column of X) is the source whose law leaves the
    smallest residual, which for a source's own held-out loss is nearly always that source. The linear terms leave
    s out, as shares sum to 1.

    std: the residual std (over n - K - 2 degrees of freedom) widened by the point's leverage under the fit's
    linearisation (g (J'J)^-1 g', J the residuals' Jacobian at the solution, g the model's gradient at the point).
    """

    kind = "powerlaw"

    def __init__(self, X: np.ndarray, y: np.ndarray) -> None:
        from scipy.optimize import least_squares

        super().__init__(X.shape[1], X.shape[0], float(y.mean()))
        lower = np.r_[-np.inf, -np.inf, 0.0, np.full(X.shape[1] - 1, -np.inf)]
        upper = np.r_[np.inf, np.inf, POWER_LAW_MAX_EXPONENT, np.full(X.shape[1] - 1, np.inf)]
        best = None
        for source in range(X.shape[1]):
            for exponent in POWER_LAW_EXPONENTS:
                start = np.r_[y.min(), math.log(max(np.ptp(y), 1e-6) / 10), exponent, np.zeros(X.shape[1] - 1)]
                result = least_squares(
                    lambda p, s=source: self._law(p, X, s) - y,
                    start,
                    jac=lambda p, s=source: self._gradient(p, X, s),
                    bounds=(lower, upper),
                )
                if best is None or result.cost < best[0].cost:
                    best = (result, source)
        result, self.source = best
        self.parameters = result.x
        jacobian = self._gradient(self.parameters, X, self.source)
        self._cov = np.linalg.pinv(jacobian.T @ jacobian)
        dof = max(len(y) - len(self.parameters), 1)
        self.residual_std = float(np.sqrt(2 * result.cost / dof))

    @staticmethod
    def _law(p: np.ndarray, X: np.ndarray, source: int) -> np.ndarray:
        return p[0] + np.exp(p[1]) * (X[:, source] + POWER_LAW_EPS) ** -p[2] + np.delete(X, source, axis=1) @ p[3:]

    @staticmethod
    def _gradient(p: np.ndarray, X: np.ndarray, source: int) -> np.ndarray:
        own = X[:, source] + POWER_LAW_EPS
        term = np.exp(p[1]) * own ** -p[2]
        return np.column_stack([np.ones(len(X)), term, -term * np.log(own), np.delete(X, source, axis=1)])

    def _predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        gradient = self._gradient(self.parameters, X, self.source)
        leverage = np.einsum("ij,jk,ik->i", gradient, self._cov, gradient)
        return self._law(self.parameters, X, self.source), self.residual_std * np.sqrt(1.0 + leverage)


class GaussianProcessFit(FittedModel):
    """scikit-learn's GaussianProcessRegressor, Matern(nu=2.5, one length scale per source) x constant + white
    noise, on normalised y; std is its predictive std, which includes the fitted white noise (run-to-run noise).

    Hyperparameters that end on a bound (a source whose length scale is as long as allowed: it hardly matters; noise
    at its ceiling: y looks like noise) are legitimate answers here, so sklearn's ConvergenceWarning about them is not
    shown. Its matrices are a few hundred rows at most, which one BLAS thread handles faster than several (7x on two
    busy cores), so the fit and the predictions use one (threadpoolctl comes with scikit-learn).
    """

    kind = "gp"

    def __init__(self, X: np.ndarray, y: np.ndarray, seed: int) -> None:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel
        from threadpoolctl import threadpool_limits

        super().__init__(X.shape[1], X.shape[0], float(y.mean()))
        kernel = Matern(length_scale=np.full(X.shape[1], 0.5), length_scale_bounds=(1e-2, 1e2), nu=2.5) * (
            ConstantKernel(1.0, constant_value_bounds=(1e-3, 1e2))
        ) + WhiteKernel(noise_level=0.1, noise_level_bounds=(1e-6, 1e1))
        self.regressor = GaussianProcessRegressor(
            kernel=kernel, normalize_y=True, n_restarts_optimizer=2, random_state=seed
        )
        with warnings.catch_warnings(), threadpool_limits(1, user_api="blas"):
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.regressor.fit(X, y)

    def _predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, user_api="blas"):
            mean, std = self.regressor.predict(X, return_std=True)
        return mean, std


class BoostedTreesFit(FittedModel):
    """scikit-learn's GradientBoostingRegressor with small-data settings (shallow trees, small leaves, subsampling).

    The mean is the fit on all runs. std: GBT_BAGS refits on bootstrap resamples of the runs give the spread of the
    fit at each point; the run-to-run noise (and the bias) is what the bags' out-of-bag squared errors leave after
    that spread; std = sqrt(spread^2 + noise).
    """

    kind = "gbt"

    def __init__(self, X: np.ndarray, y: np.ndarray, seed: int) -> None:
        super().__init__(X.shape[1], X.shape[0], float(y.mean()))
        n = len(y)
        self.regressor = self._trees(seed).fit(X, y)
        rng = np.random.default_rng(seed)
        self.bags = []
        out_of_bag = np.zeros((GBT_BAGS, n))
        out_of_bag_mask = np.zeros((GBT_BAGS, n), dtype=bool)
        for bag in range(GBT_BAGS):
            rows = rng.integers(0, n, n)
            model = self._trees(seed + 1 + bag).fit(X[rows], y[rows])
            self.bags.append(model)
            out = np.ones(n, dtype=bool)
            out[rows] = False
            out_of_bag[bag, out] = model.predict(X[out]) if out.any() else []
            out_of_bag_mask[bag] = out
        seen = out_of_bag_mask.any(axis=0)
        oob_pred = out_of_bag.sum(axis=0)[seen] / out_of_bag_mask.sum(axis=0)[seen]
        oob_mse = float(np.mean((y[seen] - oob_pred) ** 2))
        spread_at_runs = float(np.mean(self._bag_predictions(X).var(axis=0)))
        self.noise_var = max(oob_mse - spread_at_runs, 0.0)

    @staticmethod
    def _trees(seed: int):
        from sklearn.ensemble import GradientBoostingRegressor

        return GradientBoostingRegressor(
            n_estimators=100, learning_rate=0.1, max_depth=2, min_samples_leaf=2, subsample=0.8, random_state=seed
        )

    def _bag_predictions(self, X: np.ndarray) -> np.ndarray:
        return np.stack([bag.predict(X) for bag in self.bags])

    def _predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        spread = self._bag_predictions(X).var(axis=0)
        return self.regressor.predict(X), np.sqrt(spread + self.noise_var)


def fit(kind: str, X: Any, y: Any, seed: int = 0) -> FittedModel:
    """A fit of kind `kind` (one of FIT_KINDS) of losses y (n,) over mixtures X (n, K); the same seed and data give
    the same predictions, bit for bit. Too few runs, rows that are not shares, or losses that are not finite and > 0
    raise ValueError saying which."""
    _check_kind(kind)
    X = check_shares(X)
    y = check_losses(y, len(X))
    needed = min_runs(kind, X.shape[1])
    if len(y) < needed:
        raise ValueError(f"a {kind} fit over {X.shape[1]} sources needs at least {needed} runs, got {len(y)}")
    if kind == "loglinear":
        return LogLinearFit(X, y)
    if kind == "powerlaw":
        return PowerLawFit(X, y)
    if kind == "gp":
        return GaussianProcessFit(X, y, seed)
    return BoostedTreesFit(X, y, seed)


@dataclass(frozen=True)
class PredictionQuality:
    """How a fit's predictions of runs it did not see compare with their measured losses, and with predicting the
    training runs' mean loss for every one (the constant predictor).

    spearman: rank correlation of predicted and actual (None when either is constant or there are < 3 runs), with
    its one-sided p-value (spearman_p, for a correlation > 0). skill: 1 - MSE / the constant predictor's MSE (> 0:
    better than the mean). within_2std: the share of runs whose loss is within 2 predicted stds (about 0.95 when the
    std is honest). better_than_mean: lower RMSE than the constant predictor and a rank correlation significantly
    above 0 (spearman_p < BETTER_THAN_MEAN_P); when False, the fit says no more than the mean does.
    """

    kind: str
    n_runs: int
    actual: list[float]
    predicted: list[float]
    predicted_std: list[float]
    spearman: float | None
    spearman_p: float | None
    mae: float
    rmse: float
    mean_mae: float
    mean_rmse: float
    skill: float | None
    within_2std: float
    better_than_mean: bool

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain JSON values."""
        return asdict(self)


@dataclass(frozen=True)
class CrossValidation(PredictionQuality):
    """PredictionQuality of k-fold out-of-fold predictions: every run predicted by the fit on the other folds, and
    the constant predictor being the other folds' mean."""

    folds: int = 5
    seed: int = 0


def _quality(kind: str, actual: np.ndarray, mean: np.ndarray, std: np.ndarray, constant: np.ndarray) -> dict:
    from scipy.stats import spearmanr

    errors = mean - actual
    constant_errors = constant - actual
    spearman = spearman_p = None
    if len(actual) >= 3 and np.ptp(actual) > 0 and np.ptp(mean) > 0:
        result = spearmanr(actual, mean, alternative="greater")
        spearman, spearman_p = float(result.statistic), float(result.pvalue)
    mse, constant_mse = float(np.mean(errors**2)), float(np.mean(constant_errors**2))
    rmse, constant_rmse = math.sqrt(mse), math.sqrt(constant_mse)
    return {
        "kind": kind,
        "n_runs": len(actual),
        "actual": actual.tolist(),
        "predicted": mean.tolist(),
        "predicted_std": std.tolist(),
        "spearman": spearman,
        "spearman_p": spearman_p,
        "mae": float(np.mean(np.abs(errors))),
        "rmse": rmse,
        "mean_mae": float(np.mean(np.abs(constant_errors))),
        "mean_rmse": constant_rmse,
        "skill": 1.0 - mse / constant_mse if constant_mse > 0 else None,
        "within_2std": float(np.mean(np.abs(errors) <= 2 * std)),
        "better_than_mean": bool(rmse < constant_rmse and spearman_p is not None and spearman_p < BETTER_THAN_MEAN_P),
    }


def attainable_spearman(noise_std: float | None, actual: Any) -> float | None:
    """The rank correlation a perfect predictor would be expected to reach against `actual`, measured losses each
    carrying run-to-run noise of std `noise_std`: the true losses' correlation with the measured ones is
    rho = sqrt(1 - noise^2 / var(actual)), and Spearman's of a bivariate normal is (6 / pi) asin(rho / 2). A fit's
    test Spearman is read against this ceiling, not against 1. None without a noise figure, for fewer than 3 runs or
    no spread."""
    actual = np.asarray(actual, dtype=np.float64)
    if noise_std is None or len(actual) < 3 or not np.ptp(actual) > 0:
        return None
    rho = math.sqrt(max(0.0, 1.0 - noise_std**2 / float(np.var(actual, ddof=1))))
    return 6.0 / math.pi * math.asin(rho / 2.0)


def pooled_noise(groups: Any) -> float | None:
    """Run-to-run noise pooled over several mixtures: `groups` holds, per mixture, its measured losses with distinct
    training seeds. Each group of n >= 2 runs gives its sample variance with n - 1 degrees of freedom; the pooled
    variance is their sum weighted by those degrees of freedom, sum (n_i - 1) s_i^2 / sum (n_i - 1), and the noise
    its square root (one group: that group's sample std). Groups of fewer than 2 runs are skipped; None when none is
    left. Noise measured at one mixture (the base) can understate it elsewhere on the simplex; pooling the spread of
    seed pairs spread over it does not."""
    squares, dof = 0.0, 0
    for group in groups:
        values = np.asarray(group, dtype=np.float64)
        if len(values) < 2:
            continue
        squares += float(np.sum((values - values.mean()) ** 2))  # (n - 1) x the sample variance
        dof += len(values) - 1
    return math.sqrt(squares / dof) if dof else None


def evaluate(model: FittedModel, X_test: Any, y_test: Any) -> PredictionQuality:
    """How `model` predicts runs it was not fitted on (X_test, y_test), against predicting its training mean."""
    X_test = check_shares(X_test, "X_test")
    y_test = check_losses(y_test, len(X_test), "y_test")
    mean, std = model.predict(X_test)
    constant = np.full(len(y_test), model.train_mean)
    return PredictionQuality(**_quality(model.kind, y_test, mean, std, constant))


def cross_validate(kind: str, X: Any, y: Any, folds: int = 5, seed: int = 0) -> CrossValidation:
    """k-fold cross-validation of a `kind` fit: runs shuffled (by `seed`) into `folds` folds, each predicted by a
    fit (with `seed`) on the others. Needs enough runs that every training part has `min_runs`; says how many."""
    from sklearn.model_selection import KFold

    _check_kind(kind)
    X = check_shares(X)
    y = check_losses(y, len(X))
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
    needed = max(folds, min_runs(kind, X.shape[1]))
    while needed - math.ceil(needed / folds) < min_runs(kind, X.shape[1]):
        needed += 1
    if len(y) < needed:
        raise ValueError(
            f"{folds}-fold cross-validation of a {kind} fit over {X.shape[1]} sources needs at least {needed} runs, "
            f"got {len(y)}"
        )
    mean, std, constant = np.empty(len(y)), np.empty(len(y)), np.empty(len(y))
    for train, test in KFold(n_splits=folds, shuffle=True, random_state=seed).split(X):
        model = fit(kind, X[train], y[train], seed)
        mean[test], std[test] = model.predict(X[test])
        constant[test] = y[train].mean()
    return CrossValidation(**_quality(kind, y, mean, std, constant), folds=folds, seed=seed)


def _check_kind(kind: str) -> None:
    if kind not in FIT_KINDS:
        raise ValueError(f"unknown fit kind {kind!r}; expected one of {', '.join(FIT_KINDS)}")

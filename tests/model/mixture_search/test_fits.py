"""Fits of losses over mixtures: each kind ranks held-out runs of a known law, the log-linear fit recovers the law,
cross-validation is out-of-fold and says when a fit is no better than the mean, seeds reproduce bit for bit, and bad
input is a one-line error that names the row."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.model_selection import KFold

from model.mixture_search.fits import (
    FIT_KINDS,
    CrossValidation,
    LogLinearFit,
    PowerLawFit,
    attainable_spearman,
    cross_validate,
    evaluate,
    fit,
    min_runs,
    pooled_noise,
)

INTERCEPT, SLOPES = 0.5, np.array([-0.8, 0.3, 0.0])  # y = exp(0.5 - 0.8 x_0 + 0.3 x_1) + noise


def law(n: int, seed: int, noise: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.dirichlet(np.ones(3), n)
    return X, np.exp(INTERCEPT + X @ SLOPES) + noise * rng.standard_normal(n)


def pure_noise(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Losses that do not depend on the mixture (drawn from a generator of their own, not the mixtures')."""
    X = np.random.default_rng(1000 + seed).dirichlet(np.ones(3), 48)
    return X, 2.0 * np.exp(0.02 * np.random.default_rng(5000 + seed).standard_normal(48))


@pytest.fixture(scope="module")
def train() -> tuple[np.ndarray, np.ndarray]:
    return law(48, seed=0)


@pytest.fixture(scope="module")
def held_out() -> tuple[np.ndarray, np.ndarray]:
    return law(16, seed=1)


@pytest.mark.parametrize("kind", FIT_KINDS)
def test_each_kind_ranks_held_out_runs_of_the_law(kind, train, held_out):
    model = fit(kind, *train)
    quality = evaluate(model, *held_out)
    assert quality.n_runs == 16
    assert quality.spearman >= 0.9
    assert quality.rmse < 0.3 * quality.mean_rmse
    assert quality.better_than_mean
    # The constant predictor of a held-out evaluation is the training runs' mean.
    assert quality.mean_rmse == pytest.approx(np.sqrt(np.mean((held_out[1] - train[1].mean()) ** 2)))
    mean, std = model.predict(held_out[0])
    assert mean.shape == std.shape == (16,) and (std > 0).all()


def test_loglinear_recovers_the_law(train):
    model = fit("loglinear", *train)
    assert isinstance(model, LogLinearFit)
    # Shares sum to 1, so only differences of slopes are identifiable; the fit's slopes sum to 0.
    b = model.coefficients
    assert b.sum() == pytest.approx(0.0, abs=1e-9)
    assert b[0] - b[2] == pytest.approx(SLOPES[0] - SLOPES[2], abs=0.05)
    assert b[1] - b[2] == pytest.approx(SLOPES[1] - SLOPES[2], abs=0.05)
    assert model.intercept == pytest.approx(INTERCEPT + SLOPES.mean(), abs=0.02)
    # Noise of 0.01 on losses of about 1.3-1.8 is about 0.007 in log space.
    assert 0.003 < model.residual_std < 0.015


def test_powerlaw_finds_the_source_and_recovers_its_law():
    """A loss that climbs steeply as source 2's share nears 0 (as the photos loss of a real swarm does), with transfer
    from source 0: the fit names source 2, recovers the exponent and beats the exponential law on held-out runs."""
    rng = np.random.default_rng(3)

    def steep(n):
        X = rng.dirichlet(np.ones(3), n)
        return X, 4.0 + 0.2 * (X[:, 2] + 1e-3) ** -0.5 - 0.3 * X[:, 0] + 0.01 * rng.standard_normal(n)

    (X, y), (X_test, y_test) = steep(48), steep(16)
    model = fit("powerlaw", X, y)
    assert isinstance(model, PowerLawFit) and model.source == 2
    a, log_b, c, d0, d1 = model.parameters
    assert c == pytest.approx(0.5, abs=0.05) and np.exp(log_b) == pytest.approx(0.2, rel=0.15)
    assert a == pytest.approx(4.0, abs=0.05)
    assert d0 == pytest.approx(-0.3, abs=0.05) and d1 == pytest.approx(0.0, abs=0.05)
    assert 0.005 < model.residual_std < 0.02
    quality = evaluate(model, X_test, y_test)
    assert quality.spearman >= 0.95 and quality.within_2std >= 0.8
    assert quality.rmse < evaluate(fit("loglinear", X, y), X_test, y_test).rmse / 2


@pytest.mark.parametrize("kind", FIT_KINDS)
def test_cross_validation_of_the_law_is_better_than_the_mean_and_its_std_is_honest(kind, train):
    cv = cross_validate(kind, *train, folds=4, seed=0)
    assert isinstance(cv, CrossValidation) and cv.folds == 4 and cv.n_runs == 48
    assert len(cv.predicted) == len(cv.predicted_std) == 48 and cv.actual == train[1].tolist()
    assert cv.spearman >= 0.9 and cv.skill > 0.9 and cv.better_than_mean
    assert cv.within_2std >= 0.8  # about 0.95 for an honest std
    json.dumps(cv.as_dict(), allow_nan=False)


@pytest.mark.parametrize("kind", FIT_KINDS)
def test_cross_validation_on_pure_noise_is_not_better_than_the_mean(kind):
    cv = cross_validate(kind, *pure_noise(seed=0), folds=5, seed=0)
    assert not cv.better_than_mean
    assert cv.skill < 0.1


def test_cross_validation_predicts_each_run_from_the_other_folds_only(train):
    X, y = train
    cv = cross_validate("loglinear", X, y, folds=4, seed=3)
    expected, constant = np.empty(48), np.empty(48)
    for rest, fold in KFold(n_splits=4, shuffle=True, random_state=3).split(X):
        expected[fold] = fit("loglinear", X[rest], y[rest]).predict(X[fold])[0]
        constant[fold] = y[rest].mean()
    assert cv.predicted == expected.tolist()
    assert cv.mean_mae == pytest.approx(np.mean(np.abs(constant - y)))


@pytest.mark.parametrize("kind", FIT_KINDS)
def test_same_seed_same_predictions_bit_for_bit(kind, train, held_out):
    first = fit(kind, *train, seed=7).predict(held_out[0])
    second = fit(kind, *train, seed=7).predict(held_out[0])
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    X, y = train[0][:24], train[1][:24]
    assert (
        cross_validate(kind, X, y, folds=3, seed=7).as_dict() == cross_validate(kind, X, y, folds=3, seed=7).as_dict()
    )


def test_another_seed_changes_the_trees(train, held_out):
    first = fit("gbt", *train, seed=0).predict(held_out[0])[0]
    assert not np.array_equal(first, fit("gbt", *train, seed=1).predict(held_out[0])[0])


def test_too_few_runs_says_how_many(train):
    X, y = train
    assert min_runs("loglinear", 3) == 4 and min_runs("gbt", 3) == 8 and min_runs("gp", 10) == 11
    assert min_runs("powerlaw", 3) == 6 and min_runs("powerlaw", 10) == 13  # K + 2 parameters
    with pytest.raises(ValueError, match="a gbt fit over 3 sources needs at least 8 runs, got 7"):
        fit("gbt", X[:7], y[:7])
    # 5 folds of 9 runs leave 7 to train on: one short of a gbt fit's 8.
    with pytest.raises(ValueError, match="5-fold cross-validation of a gbt fit over 3 sources needs at least 10 runs"):
        cross_validate("gbt", X[:9], y[:9])
    cross_validate("gbt", X[:10], y[:10])
    with pytest.raises(ValueError, match="at least 2 folds"):
        cross_validate("loglinear", X, y, folds=1)


@pytest.mark.parametrize(
    ("bad", "message"),
    [(float("nan"), "row 5 is nan"), (float("inf"), "row 5 is inf"), (0.0, "row 5 is 0.0"), (-1.0, "row 5 is -1.0")],
)
def test_losses_that_are_not_finite_and_positive_name_the_row(train, bad, message):
    X, y = train
    y = y.copy()
    y[5] = bad
    with pytest.raises(ValueError, match=message):
        fit("loglinear", X, y)


def test_rows_that_are_not_shares_name_the_row(train):
    X, y = train
    for row, value, message in [(3, [0.5, 0.6, 0.1], "row 3 is not shares"), (4, [1.2, -0.2, 0.0], "row 4 is not")]:
        bad = X.copy()
        bad[row] = value
        with pytest.raises(ValueError, match=message):
            fit("gp", bad, y)
    bad = X.copy()
    bad[2, 0] = np.nan
    with pytest.raises(ValueError, match="row 2 is not finite"):
        fit("loglinear", bad, y)
    with pytest.raises(ValueError, match="expected an"):
        fit("loglinear", X[:, 0], y)
    with pytest.raises(ValueError, match="expected 48 losses"):
        fit("loglinear", X, y[:40])
    with pytest.raises(ValueError, match="unknown fit kind 'lgbm'"):
        fit("lgbm", X, y)
    with pytest.raises(ValueError, match="over 3 sources, X has 2 columns"):
        fit("loglinear", X, y).predict([[0.5, 0.5]])
    with pytest.raises(ValueError, match="X_test: row 0 is not shares"):
        evaluate(fit("loglinear", X, y), [[0.5, 0.5, 0.5]], [1.0])


def test_evaluate_on_few_runs_leaves_the_rank_correlation_undefined(train, held_out):
    quality = evaluate(fit("loglinear", *train), held_out[0][:2], held_out[1][:2])
    assert quality.spearman is None and quality.spearman_p is None and not quality.better_than_mean
    json.dumps(quality.as_dict(), allow_nan=False)


def test_attainable_spearman_is_what_a_perfect_predictor_reaches_through_the_noise():
    rng = np.random.default_rng(0)
    true = rng.normal(0.0, 1.0, (4000, 16))
    measured = true + rng.normal(0.0, 0.5, true.shape)  # noise half the true spread
    from scipy.stats import spearmanr

    simulated = np.mean([spearmanr(t, m).statistic for t, m in zip(true, measured, strict=True)])
    expected = np.mean([attainable_spearman(0.5, m) for m in measured])
    assert expected == pytest.approx(simulated, abs=0.02)  # about 0.88: 16 runs at this noise cannot reach 0.9
    assert attainable_spearman(0.0, [1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert attainable_spearman(10.0, [1.0, 2.0, 3.0]) == 0.0  # all noise
    assert attainable_spearman(None, [1.0, 2.0, 3.0]) is None and attainable_spearman(0.1, [1.0, 1.0, 1.0]) is None


def test_pooled_noise_weights_each_mixtures_variance_by_its_degrees_of_freedom():
    # [1, 3]: squares 2 over 1 dof; [2, 2, 5]: squares 1 + 1 + 4 = 6 over 2 dof; pooled variance 8 / 3
    assert pooled_noise([[1.0, 3.0], [2.0, 2.0, 5.0]]) == pytest.approx((8 / 3) ** 0.5, rel=1e-12)
    one = [4.1, 4.3, 3.9, 4.6]
    assert pooled_noise([one]) == pytest.approx(float(np.std(one, ddof=1)), rel=1e-12)  # one group: its sample std
    assert pooled_noise([one, [7.0], []]) == pooled_noise([one])  # a mixture with one run says nothing of the noise
    assert pooled_noise([[5.0], []]) is None and pooled_noise([]) is None
    assert pooled_noise(np.array([[1.0, 2.0], [3.0, 5.0]])) == pytest.approx(((0.5 + 2.0) / 2) ** 0.5)

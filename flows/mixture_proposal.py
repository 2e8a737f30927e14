"""A mixture search without Prefect: the swarm's runs, fits of every objective, the proposal, its confirmation run,
and the approved spec. The `mixture-search` flow and `cham mixture search` are thin shells around `search`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from flows.mixture_swarm import ProxyRun, SearchSpace, plan_runs, run_key, run_swarm, search_space
from model.files.atomic import write_atomic
from model.mixture_search import fits, proposal
from model.mixture_search.draws import normalise
from schemas import MixtureSpec, validate_config
from schemas.search_config import MixtureSearchConfig

WEIGHTED = "weighted"  # the minimised sum of the objectives, by the config's weights
SEARCH_FILE, APPROVED_SPEC = "search.json", "approved-mixture.yaml"


def weighted_objective(objectives: dict[str, float], weights: dict[str, float]) -> float | None:
    """The config's weighted sum of a run's objectives; None when the run lacks one of them."""
    if any(name not in objectives for name in weights):
        return None
    return sum(w * objectives[name] for name, w in weights.items())


def swarm_rows(runs: list[ProxyRun], results: dict[str, dict[str, Any]], config: MixtureSearchConfig) -> list[dict]:
    """One row per run: role, shares, each objective and the weighted one."""
    rows = []
    for run in runs:
        found = results[run.key]["objectives"]
        rows.append(
            {
                "run": run.name,
                "role": run.role,
                "seed": run.seed,
                **{f"share {s}": v for s, v in run.shares.items()},
                **{name: found.get(name) for name in config.objective},
                WEIGHTED: weighted_objective(found, config.objective),
                **({"error": results[run.key]["error"]} if "error" in results[run.key] else {}),
            }
        )
    return rows


def source_tokens(space: SearchSpace) -> dict[str, int]:
    """Tokens of each prepared source of the stage (its manifest's shards)."""
    tokens = {}
    for s in space.spec.sources_of(space.stage):
        manifest = json.loads((Path(s.path) / "manifest.json").read_text())
        tokens[s.name] = int(sum(shard.get("tokens", 0) for shard in manifest["shards"]))
    return tokens


def approved_spec(space: SearchSpace, shares: dict[str, float]) -> MixtureSpec:
    """The spec with the searched stage's weights set to `shares` (its sources listed in full, inheritance resolved);
    every other stage as it was."""
    shares = normalise(shares, space.sources)
    data = space.spec.model_dump(mode="json")
    stage = data["stages"][space.stage]
    stage.pop("inherit", None)
    stage["sources"] = [
        {
            "name": s.name,
            "path": s.path,
            "weight": shares[s.name],
            "max_repetitions": s.max_repetitions,
            **({"filters": list(s.filters)} if s.filters else {}),
        }
        for s in space.spec.sources_of(space.stage)
    ]
    return validate_config(MixtureSpec, data, "approved mixture")


def noise_of(values: list[float]) -> float | None:
    """Run-to-run noise: the sample standard deviation of one mixture's runs with other seeds."""
    return float(np.std(values, ddof=1)) if len(values) >= 2 else None


def fit_objectives(
    config: MixtureSearchConfig, space: SearchSpace, fit_runs: list[ProxyRun], results: dict[str, dict[str, Any]]
) -> tuple[dict[str, fits.FittedModel], list[dict[str, Any]]]:
    """For every objective, each fit kind's k-fold predicted-vs-actual; the kind with the best rank correlation
    (then the lowest RMSE) is fitted on every run and used for the proposal."""
    X = np.array([[r.shares[s] for s in space.sources] for r in fit_runs])
    chosen, report = {}, []
    for name in config.objective:
        y = np.array([results[r.key]["objectives"][name] for r in fit_runs])
        tried = []
        for kind in config.fits.kinds:
            try:
                cv = fits.cross_validate(kind, X, y, folds=min(config.fits.folds, len(y)), seed=config.swarm.seed)
            except ValueError as err:  # too few runs for this kind: reported, not fatal
                report.append({"objective": name, "kind": kind, "error": str(err)})
                continue
            tried.append(cv)
            report.append({"objective": name, **cv.as_dict()})
        if not tried:
            raise ValueError(f"objective {name!r}: no fit could be cross-validated ({len(y)} runs); raise swarm.size")
        best = max(tried, key=lambda cv: (cv.spearman if cv.spearman is not None else -2.0, -cv.rmse))
        chosen[name] = fits.fit(best.kind, X, y, seed=config.swarm.seed)
        for row in report:
            if row["objective"] == name and row.get("kind") == best.kind and "error" not in row:
                row["chosen"] = True
    return chosen, report


def test_fits(
    models: dict[str, fits.FittedModel],
    space: SearchSpace,
    test_runs: list[ProxyRun],
    results: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    """Each chosen fit against the test runs, which no fit saw."""
    if len(test_runs) < 3:
        return []
    X = np.array([[r.shares[s] for s in space.sources] for r in test_runs])
    return [
        {
            "objective": name,
            **fits.evaluate(model, X, [results[r.key]["objectives"][name] for r in test_runs]).as_dict(),
        }
        for name, model in models.items()
    ]


def effects(space: SearchSpace, runs: list[ProxyRun], results: dict[str, dict[str, Any]], objectives: list[str]):
    """The per-source effect on each objective: the rank correlation of a source's share with the objective over the
    swarm's runs (negative: more of the source lowers that loss)."""
    from scipy.stats import spearmanr

    rows = []
    for source in space.sources:
        shares = [r.shares[source] for r in runs]
        row: dict[str, Any] = {"source": source}
        for name in objectives:
            values = [results[r.key]["objectives"].get(name, np.nan) for r in runs]
            ok = np.isfinite(values)
            if ok.sum() >= 3 and np.ptp(np.array(shares)[ok]) > 0 and np.ptp(np.array(values)[ok]) > 0:
                row[name] = round(float(spearmanr(np.array(shares)[ok], np.array(values)[ok]).statistic), 3)
            else:
                row[name] = None
        rows.append(row)
    return rows


def search(
    config: MixtureSearchConfig,
    progress: Callable[[int, int, ProxyRun, bool], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or reuse) the swarm, fit, propose, confirm; write out_dir/search.json and return what it holds."""
    space = search_space(config)
    runs = plan_runs(config, space)
    log(
        f"mixture search of {space.stage!r} over {len(space.sources)} sources: {len(runs)} proxy runs of "
        f"{space.steps} steps ({config.proxy.tokens:,} tokens each)"
    )
    results = run_swarm(config, space, runs, progress)
    failed = [r for r in runs if weighted_objective(results[r.key]["objectives"], config.objective) is None]
    for r in failed:
        reason = results[r.key].get("error", "an objective is missing")
        log(f"proxy run {r.name} ({r.role}, {r.shares}) has no losses: {reason}")
    measured = [r for r in runs if r not in failed]
    fit_runs = [r for r in measured if r.role in ("given", "fit", "base")]
    test_runs = [r for r in measured if r.role == "test"]
    noise_runs = [r for r in measured if r.role in ("base", "noise")]
    objectives = list(config.objective)
    noise = {name: noise_of([results[r.key]["objectives"][name] for r in noise_runs]) for name in objectives}
    # noise_runs are measured runs: every objective, so the weighted one, is there
    noise[WEIGHTED] = noise_of([weighted_objective(results[r.key]["objectives"], config.objective) for r in noise_runs])
    models, cv_report = fit_objectives(config, space, fit_runs, results)
    tested = test_fits(models, space, test_runs, results)

    budget = config.proposal.budget_tokens or space.spec.stage_tokens(space.stage)
    caps = proposal.share_caps(
        source_tokens(space), {s.name: s.max_repetitions for s in space.spec.sources_of(space.stage)}, budget
    )
    max_share = {s: min(caps[s], config.proposal.max_share.get(s, 1.0)) for s in space.sources}
    constraints = proposal.Constraints(
        min_share={s: config.proposal.min_share.get(s, 0.0) for s in space.sources}, max_share=max_share
    )
    proposed = proposal.propose(
        models,
        config.objective,
        space.sources,
        constraints,
        space.base,
        n_candidates=config.proposal.candidates,
        top_k=config.proposal.top_k,
        seed=config.swarm.seed,
    )
    shares = normalise(proposed.weights, space.sources)
    confirmation = None
    if config.proposal.confirm:
        run = ProxyRun("proposal", shares, config.proxy.seed, run_key(config, space, shares, config.proxy.seed))
        found = run_swarm(config, space, [run], progress)[run.key]
        confirmed = weighted_objective(found["objectives"], config.objective)
        scored = [
            (weighted_objective(results[r.key]["objectives"], config.objective), r)
            for r in measured
            if r.role != "noise"
        ]
        best_value, best_run = min(scored, key=lambda pair: pair[0])
        confirmation = {
            "run": run.name,
            "objectives": {n: found["objectives"].get(n) for n in objectives},
            WEIGHTED: confirmed,
            **({"error": found["error"]} if "error" in found else {}),
            "predicted": proposed.predicted,
            "predicted_weighted": proposed.weighted,
            "best_swarm_run": best_run.name,
            "best_swarm_role": best_run.role,
            "best_swarm_weighted": best_value,
            "best_swarm_shares": best_run.shares,
            "base_weighted": weighted_objective(
                results[next(r for r in runs if r.role == "base").key]["objectives"], config.objective
            ),
        }
    outcome = {
        "stage": space.stage,
        "sources": space.sources,
        "base": space.base,
        "steps": space.steps,
        "runs": swarm_rows(runs, results, config),
        "failed": len(failed),
        "noise": noise,
        "cross_validation": cv_report,
        "test": tested,
        "effects": effects(space, [r for r in measured if r.role != "noise"], results, objectives),
        "constraints": {"budget_tokens": budget, "min_share": constraints.min_share, "max_share": max_share},
        "proposal": {**proposed.as_dict(), "shares": shares},
        "confirmation": confirmation,
    }
    write_atomic(Path(config.out_dir) / SEARCH_FILE, json.dumps(outcome, indent=1, default=str))
    return outcome


def write_approved(config: MixtureSearchConfig, shares: dict[str, float]) -> Path:
    """The approved mixture as a MixtureSpec file beside the search (out_dir/approved-mixture.yaml)."""
    spec = approved_spec(search_space(config), shares)
    path = Path(config.out_dir) / APPROVED_SPEC
    write_atomic(path, yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    return path

"""A mixture search without Prefect: the swarm's runs, fits of every objective, the proposal, its confirmation run,
and the approved spec. The `mixture-search` flow and `cham mixture search` are thin shells around `search`."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from flows.mixture_swarm import ProxyRun, SearchSpace, distinct, plan_runs, run_swarm, search_space, seeded_runs
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


@dataclass(frozen=True)
class Mixture:
    """One mixture as measured: its runs (one per seed) and each objective's mean over them."""

    role: str
    shares: dict[str, float]
    runs: tuple[ProxyRun, ...]
    objectives: dict[str, float]

    def weighted(self, weights: dict[str, float]) -> float:
        value = weighted_objective(self.objectives, weights)
        assert value is not None  # a Mixture is made only when every run has every objective
        return value

    def as_row(self, weights: dict[str, float]) -> dict[str, Any]:
        return {
            "role": self.role,
            "runs": [r.name for r in self.runs],
            **{f"share {s}": v for s, v in self.shares.items()},
            **self.objectives,
            WEIGHTED: self.weighted(weights),
        }


def mixtures_of(runs: list[ProxyRun], results: dict[str, dict[str, Any]], objectives: list[str]) -> list[Mixture]:
    """The measured runs grouped by role and mixture, in order, each objective averaged over the group's seeds.
    Noise and replicate runs are left out (they measure the noise, not a mixture: a replicate is a test mixture's
    second seed, and averaging it in would score that test mixture on other terms than the rest); a group with a run
    that lacks an objective (an unmixable mixture) is left out too."""
    groups: dict[tuple, list[ProxyRun]] = {}
    for run in runs:
        if run.role not in ("noise", "replicate"):
            groups.setdefault((run.role, tuple(sorted(run.shares.items()))), []).append(run)
    mixtures = []
    for (role, _), group in groups.items():
        found = [results[r.key]["objectives"] for r in group]
        if all(name in f for f in found for name in objectives):
            means = {name: float(np.mean([f[name] for f in found])) for name in objectives}
            mixtures.append(Mixture(role, group[0].shares, tuple(group), means))
    return mixtures


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
    config: MixtureSearchConfig, space: SearchSpace, fit_mixtures: list[Mixture]
) -> tuple[dict[str, fits.FittedModel], list[dict[str, Any]]]:
    """For every objective, each fit kind's k-fold predicted-vs-actual; the kind with the best rank correlation
    (then the lowest RMSE) is fitted on every mixture and used for the proposal."""
    X = np.array([[m.shares[s] for s in space.sources] for m in fit_mixtures])
    chosen, report = {}, []
    for name in config.objective:
        y = np.array([m.objectives[name] for m in fit_mixtures])
        tried = []
        for kind in config.fits.kinds:
            try:
                cv = fits.cross_validate(kind, X, y, folds=min(config.fits.folds, len(y)), seed=config.swarm.seed)
            except ValueError as err:  # too few mixtures for this kind: reported, not fatal
                report.append({"objective": name, "kind": kind, "error": str(err)})
                continue
            tried.append(cv)
            report.append({"objective": name, **cv.as_dict()})
        if not tried:
            raise ValueError(
                f"objective {name!r}: no fit could be cross-validated ({len(y)} mixtures); raise swarm.size"
            )
        best = max(tried, key=lambda cv: (cv.spearman if cv.spearman is not None else -2.0, -cv.rmse))
        chosen[name] = fits.fit(best.kind, X, y, seed=config.swarm.seed)
        for row in report:
            if row["objective"] == name and row.get("kind") == best.kind and "error" not in row:
                row["chosen"] = True
    return chosen, report


def test_fits(
    models: dict[str, fits.FittedModel], space: SearchSpace, test_mixtures: list[Mixture]
) -> list[dict[str, Any]]:
    """Each chosen fit against the test mixtures, which no fit saw."""
    if len(test_mixtures) < 3:
        return []
    X = np.array([[m.shares[s] for s in space.sources] for m in test_mixtures])
    return [
        {"objective": name, **fits.evaluate(model, X, [m.objectives[name] for m in test_mixtures]).as_dict()}
        for name, model in models.items()
    ]


def effects(space: SearchSpace, mixtures: list[Mixture], objectives: list[str]) -> list[dict[str, Any]]:
    """The per-source effect on each objective: the rank correlation of a source's share with the objective over the
    swarm's mixtures (negative: more of the source lowers that loss)."""
    from scipy.stats import spearmanr

    rows = []
    for source in space.sources:
        shares = np.array([m.shares[source] for m in mixtures])
        row: dict[str, Any] = {"source": source}
        for name in objectives:
            values = np.array([m.objectives[name] for m in mixtures])
            if len(mixtures) >= 3 and np.ptp(shares) > 0 and np.ptp(values) > 0:
                row[name] = round(float(spearmanr(shares, values).statistic), 3)
            else:
                row[name] = None
        rows.append(row)
    return rows


def measured_noise(
    runs: list[ProxyRun], results: dict[str, dict[str, Any]], config: MixtureSearchConfig
) -> dict[str, float | None]:
    """The noise of one run, per objective and weighted: the spread of the base mixture's runs over distinct seeds."""
    by_seed = {r.seed: results[r.key]["objectives"] for r in runs if r.role in ("base", "noise")}
    found = [f for f in by_seed.values() if weighted_objective(f, config.objective) is not None]
    noise = {name: noise_of([f[name] for f in found]) for name in config.objective}
    noise[WEIGHTED] = noise_of([weighted_objective(f, config.objective) for f in found])
    return noise


def search(
    config: MixtureSearchConfig,
    progress: Callable[[int, int, ProxyRun, bool], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or reuse) the swarm, fit, propose, confirm; write out_dir/search.json and return what it holds."""
    space = search_space(config)
    runs = distinct(plan_runs(config, space))  # a base seed that is also a noise seed is run and listed once
    log(
        f"mixture search of {space.stage!r} over {len(space.sources)} sources: {len(runs)} proxy runs of "
        f"{space.steps} steps ({config.proxy.tokens:,} tokens each)"
    )
    results = run_swarm(config, space, runs, progress)
    failed = [r for r in runs if weighted_objective(results[r.key]["objectives"], config.objective) is None]
    for r in failed:
        reason = results[r.key].get("error", "an objective is missing")
        log(f"proxy run {r.name} ({r.role}, {r.shares}) has no losses: {reason}")
    objectives = list(config.objective)
    mixtures = mixtures_of(runs, results, objectives)
    fit_mixtures = [m for m in mixtures if m.role in ("given", "fit", "base")]
    test_mixtures = [m for m in mixtures if m.role == "test"]
    noise = measured_noise(runs, results, config)
    models, cv_report = fit_objectives(config, space, fit_mixtures)
    tested = test_fits(models, space, test_mixtures)

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
        confirm_runs = seeded_runs(config, space, "proposal", shares)
        found = run_swarm(config, space, confirm_runs, progress)
        confirmed = mixtures_of(confirm_runs, found, objectives)
        best = min(mixtures, key=lambda m: m.weighted(config.objective))
        base = next((m for m in mixtures if m.role == "base"), None)
        errors = sorted({found[r.key]["error"] for r in confirm_runs if "error" in found[r.key]})
        confirmation = {
            "runs": [r.name for r in confirm_runs],
            "objectives": confirmed[0].objectives if confirmed else {n: None for n in objectives},
            WEIGHTED: confirmed[0].weighted(config.objective) if confirmed else None,
            **({"error": "; ".join(errors)} if errors else {}),
            "predicted": proposed.predicted,
            "predicted_weighted": proposed.weighted,
            "best_swarm_runs": [r.name for r in best.runs],
            "best_swarm_role": best.role,
            "best_swarm_weighted": best.weighted(config.objective),
            "best_swarm_shares": best.shares,
            "base_weighted": base.weighted(config.objective) if base else None,
        }
    outcome = {
        "stage": space.stage,
        "sources": space.sources,
        "base": space.base,
        "steps": space.steps,
        "runs": swarm_rows(runs, results, config),
        "mixtures": [m.as_row(config.objective) for m in mixtures],
        "failed": len(failed),
        "seeds": config.swarm.seeds,
        "noise": noise,
        "cross_validation": cv_report,
        "test": tested,
        "effects": effects(space, mixtures, objectives),
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

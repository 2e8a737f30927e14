"""The mixture-search benchmark: its grid is a lattice of equal compute, and its quick mode runs end to end (a tiny
corpus, model and swarm; no figure asserted): every fit kind scored on every objective and on the weighted sum, the
grid's runs beside the search's, the proposal compared with the grid, the best swarm member and the base."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from bench_mixture_search import SOURCES, grid_steps, lattice  # noqa: E402


def test_the_lattice_covers_the_simplex_once_per_point() -> None:
    points = lattice(SOURCES, 4)
    assert len(points) == math.comb(4 + 3, 3) == 35
    assert all(math.isclose(sum(p.values()), 1.0) for p in points)
    assert all(v * 4 == round(v * 4) and v >= 0 for p in points for v in p.values())
    assert len({tuple(p.values()) for p in points}) == 35
    assert {"prose": 0.25, "docs": 0.25, "code": 0.25, "photos": 0.25} in points  # the base: a run both share
    assert lattice(("a", "b"), 2) == [{"a": 0.0, "b": 1.0}, {"a": 0.5, "b": 0.5}, {"a": 1.0, "b": 0.0}]


def test_the_grid_is_the_finest_lattice_within_the_swarm_size() -> None:
    assert grid_steps(4, 48) == 4  # 35 points; 5 steps would be 56
    assert grid_steps(4, 56) == 5
    assert grid_steps(3, 48) == 8  # 45 points
    assert grid_steps(4, 8) == 1  # the corners only
    for k, most in [(2, 10), (3, 20), (4, 48), (5, 48)]:
        assert len(lattice([f"s{i}" for i in range(k)], grid_steps(k, most))) <= most


@pytest.mark.slow
def test_mixture_search_benchmark_quick_mode(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [
            sys.executable,
            "bench/bench_mixture_search.py",
            "--quick",
            "--work",
            str(tmp_path / "work"),
            "--json",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    objectives = [f"val.source.{s}" for s in SOURCES]
    # four sources with train and held-out parts, every part prepared
    assert all(report["documents"][part][s] > 0 for part in ("train", "heldout") for s in SOURCES)
    assert all(report["tokens"][s] > 0 and report["tokens"][f"{s}-heldout"] > 0 for s in SOURCES)
    sizes = report["sizes"]
    assert sizes["replicate_tests"] > 0
    search_runs = sizes["size"] + sizes["test_size"] + 1 + sizes["noise_seeds"] + sizes["replicate_tests"] + 1
    assert report["runs"]["search"] == search_runs
    assert report["runs"]["grid_points"] == len(lattice(SOURCES, report["runs"]["lattice_steps"])) <= sizes["size"]
    assert all(report["noise"][name] > 0 for name in [*objectives, "weighted"])
    # the noise pooled over the base's seeds and each replicated test mixture's pair
    assert all(report["noise_pooled"][name] > 0 for name in [*objectives, "weighted"])
    assert report["noise_pooled_over"] == {
        "mixtures": 1 + sizes["replicate_tests"],
        "dof": sizes["noise_seeds"] + sizes["replicate_tests"],
    }
    scored = {(r["kind"], r["objective"]) for r in report["test_by_kind"]}
    assert scored == {(k, o) for k in ("loglinear", "powerlaw", "gp", "gbt") for o in [*objectives, "weighted"]}
    # the ceiling a perfect fit would reach through the noise, at the base and pooled: one figure per objective each,
    # the same for every kind
    for column in ("attainable base", "attainable pooled"):
        attainable = {(r["objective"], r[column]) for r in report["test_by_kind"]}
        assert len(attainable) == len(objectives) + 1 and all(0 <= a <= 1 for _, a in attainable if a is not None)
    assert sorted(report["chosen"]) == sorted(objectives)
    # the bench's refit of the kind the search chose scores the test runs exactly as the search's own test does
    by_kind = {(r["kind"], r["objective"]): r for r in report["test_by_kind"]}
    for tested in report["search_test"]:
        assert tested["kind"] == report["chosen"][tested["objective"]]
        figures = by_kind[(tested["kind"], tested["objective"])]
        assert {k: v for k, v in figures.items() if not k.startswith(("attainable", "spearman replicate"))} == {
            "kind": tested["kind"],
            "objective": tested["objective"],
            **{k: v for k, v in tested.items() if k not in ("kind", "objective")},
        }
    proposal = report["proposal"]
    assert sum(proposal["shares"].values()) == pytest.approx(1.0)
    assert proposal["measured_weighted"] == pytest.approx(sum(proposal["measured"].values()))
    assert set(report["compare"]) == {"grid_best", "swarm_best", "base"}
    grid_best = report["compare"]["grid_best"]
    assert grid_best["proposal_minus"] == pytest.approx(proposal["measured_weighted"] - grid_best["weighted"])
    assert "Spearman of predicted vs actual" in done.stdout and "proposal - grid_best" in done.stdout
    assert "noise pooled" in done.stdout and "attainable pooled" in done.stdout
    # every kind's predictions also scored against the replicated test mixtures' second seed
    replicated = {(r["kind"], r["objective"]): r["spearman replicate"] for r in report["test_by_kind"]}
    assert set(replicated) == scored and all(-1 <= v <= 1 for v in replicated.values() if v == v)  # NaN: constant
    assert "against the second seed of 3 test mixtures" in done.stdout

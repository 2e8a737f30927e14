"""`cham mixture search CONFIG`: a mixture search without a server (the `mixture-search` flow's work, with no
approval step, or `--approve` to write the proposal as a MixtureSpec); `cham mixture proxy RUN_DIR`: one proxy run
(the swarm starts these)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flows.cli.output import console, fail

app = typer.Typer(no_args_is_help=True, help="Search data mixtures with proxy runs, fits and a proposal.")


def _table(title: str, rows: list[dict], columns: list[str] | None = None) -> Table:
    columns = columns or (list(rows[0]) if rows else [])
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(
            *(
                "" if row.get(c) is None else f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c])
                for c in columns
            )
        )
    return table


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@app.command()
def search(
    config_file: Annotated[Path, typer.Argument(metavar="CONFIG", help="a MixtureSearchConfig YAML file")],
    approve: Annotated[
        bool, typer.Option(help="write the proposal as a MixtureSpec (out_dir/approved-mixture.yaml)")
    ] = False,
) -> None:
    """Proxy runs on mixtures around the spec's weights (reused when they exist), fits, and the proposal."""
    from flows.mixture_proposal import WEIGHTED, write_approved
    from flows.mixture_proposal import search as run_search
    from flows.subprocess_task import CommandError
    from schemas import ConfigError, MixtureSearchConfig, load_config

    try:
        config = load_config(MixtureSearchConfig, config_file)
        with console.status("proxy runs") as status:

            def progress(done: int, total: int, run, reused: bool) -> None:
                status.update(f"proxy runs: {done}/{total} ({run.role} {run.name} {'reused' if reused else 'done'})")

            outcome = run_search(config, progress, log=console.print)
    except (ConfigError, ValueError, OSError, CommandError) as err:
        raise fail(str(err)) from None
    console.print(_table("proxy runs", outcome["runs"]))
    if outcome["seeds"] > 1:
        console.print(_table(f"mixtures: losses averaged over {outcome['seeds']} seeds", outcome["mixtures"]))
    cv = [
        {
            k: r.get(k)
            for k in ("objective", "kind", "spearman", "rmse", "mean_rmse", "better_than_mean", "chosen", "error")
        }
        for r in outcome["cross_validation"]
    ]
    console.print(_table(f"fits: {config.fits.folds}-fold predicted vs actual", cv))
    if outcome["test"]:
        console.print(
            _table(
                "fits on the test runs (not fitted)",
                [
                    {k: r[k] for k in ("objective", "kind", "spearman", "rmse", "mean_rmse", "better_than_mean")}
                    for r in outcome["test"]
                ],
            )
        )
    console.print(_table("effect of each source's share (rank correlation with each loss)", outcome["effects"]))
    noise = ", ".join(f"{k} {v:.4f}" for k, v in outcome["noise"].items() if v is not None)
    console.print(
        f"run-to-run noise (std over seeds of the base mixture, one run; a mixture's mean of {outcome['seeds']} "
        f"seeds has 1/sqrt({outcome['seeds']}) of it): {noise or 'not measured'}"
    )
    from flows.mixture_swarm import pooled_run_noise

    pooled = pooled_run_noise(outcome["runs"], outcome["sources"], list(outcome["noise"]))
    if pooled["groups"] > 1:  # replicated test mixtures (swarm.replicate_tests): the noise away from the base too
        figures = ", ".join(f"{k} {v:.4f}" for k, v in pooled["noise"].items() if v is not None)
        console.print(
            f"run-to-run noise pooled over {pooled['groups']} mixtures with two or more seeds "
            f"({pooled['dof']} degrees of freedom), one run: {figures}"
        )
    shares = outcome["proposal"]["shares"]
    console.print("proposal: " + ", ".join(f"{s} {v:.3f}" for s, v in shares.items()))
    if outcome["confirmation"]:
        c = outcome["confirmation"]
        console.print(
            f"confirmation {', '.join(c['runs'])}: {WEIGHTED} {_number(c[WEIGHTED])} measured, predicted "
            f"{c['predicted_weighted']['mean']:.4f} +- {c['predicted_weighted']['std']:.4f}; "
            f"best swarm mixture {', '.join(c['best_swarm_runs'])} ({c['best_swarm_role']}) "
            f"{c['best_swarm_weighted']:.4f}; base {_number(c['base_weighted'])}"
        )
    console.print(f"search: {Path(config.out_dir) / 'search.json'}")
    if approve:
        console.print(f"approved mixture: {write_approved(config, shares)} (mix it with `cham mix`)")


@app.command()
def proxy(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="a proxy run's folder (written by the search)")],
) -> None:
    """One proxy run: mix its stage, train on it, evaluate on the held-out stages, write result.json."""
    from flows.mixture_swarm import LOG, run_proxy

    if not (run_dir / "request.json").is_file():
        raise fail(f"{run_dir} is not a proxy run folder (no request.json)")
    with (run_dir / LOG).open("w") as log:
        result = run_proxy(run_dir, log=lambda line: print(line, file=log, flush=True))
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result["objectives"].items() if k.count(".") == 1)
    console.print(f"{run_dir.name}: {shown}")

"""The `mixture-search` flow: the swarm of proxy runs, the fits and the proposal (flows/mixture_proposal.py), shown as
artifacts; then a pause for approval in the UI, with a form that holds the proposed weights and lets the user edit
them; once approved, the approved MixtureSpec is written and mixed, and the real run's training deployment started."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from prefect import flow, task
from prefect.artifacts import update_progress_artifact
from prefect.deployments import run_deployment
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from flows.artifacts import markdown_artifact, markdown_table, png_markdown, table_artifact, task_progress_artifact
from flows.build_dataset import mix_task
from flows.markup import Markdown, code, md
from flows.mixture_proposal import WEIGHTED, search, write_approved
from flows.mixture_swarm import pooled_run_noise
from flows.subprocess_task import cham, run_command, run_logger
from schemas import MixtureSearchConfig, TrainConfig, load_config, validate_config

APPROVED_MIX = "approved-mix"  # out_dir/approved-mix/<stage>/: the approved spec's stages


class MixtureApproval(RunInput):
    """The form the paused flow waits for: the weights to train with (the proposal's, editable) and the decision."""

    approve: bool = Field(True, description="write the mixture and start the training deployment with it")
    weights: dict[str, float] = Field(description="source -> weight of the searched stage (normalised on use)")


@task(name="mixture-swarm")
def search_task(config: MixtureSearchConfig) -> dict[str, Any]:
    """The swarm (existing runs reused), fits, proposal and confirmation; a progress bar of the proxy runs."""
    progress = task_progress_artifact("proxy runs done (reused ones included)")
    logger = run_logger()

    def advance(done: int, total: int, run: Any, reused: bool) -> None:
        update_progress_artifact(progress, 100.0 * done / max(total, 1))
        logger.info("proxy run %s/%s: %s %s (%s)", done, total, run.role, run.name, "reused" if reused else "done")

    return search(config, advance, log=logger.info)


def predicted_vs_actual_png(outcome: dict[str, Any], path: Path) -> Path:
    """One panel per objective: each chosen fit's out-of-fold prediction of every swarm run (and of the test runs,
    which no fit saw) against the measured loss, with the diagonal."""
    chosen = [r for r in outcome["cross_validation"] if r.get("chosen")]
    tests = {r["objective"]: r for r in outcome["test"]}
    fig, axes = plt.subplots(1, len(chosen), figsize=(4.2 * len(chosen), 4.0), squeeze=False)
    for ax, row in zip(axes[0], chosen, strict=True):
        ax.scatter(row["actual"], row["predicted"], s=14, label=f"{row['folds']}-fold ({row['kind']})")
        values = row["actual"] + row["predicted"]
        if row["objective"] in tests:
            test = tests[row["objective"]]
            ax.scatter(test["actual"], test["predicted"], s=18, marker="x", label="test runs")
            values += test["actual"] + test["predicted"]
        low, high = min(values), max(values)
        ax.plot([low, high], [low, high], color="grey", linewidth=1)
        ax.set_title(row["objective"])
        ax.set_xlabel("measured loss")
        ax.set_ylabel("predicted loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _fmt(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def fit_rows(outcome: dict[str, Any]) -> list[dict[str, Any]]:
    """The fits' quality, k-fold and on the test runs, against predicting the mean."""
    rows = []
    for where, found in (("k-fold", outcome["cross_validation"]), ("test runs", outcome["test"])):
        for r in found:
            rows.append(
                {
                    "objective": r["objective"],
                    "fit": r["kind"],
                    "on": where,
                    "chosen": "yes" if r.get("chosen") else "",
                    "rank correlation": _fmt(r.get("spearman")),
                    "RMSE": _fmt(r.get("rmse")),
                    "RMSE of the mean": _fmt(r.get("mean_rmse")),
                    "better than the mean": r.get("better_than_mean"),
                    "error": r.get("error", ""),
                }
            )
    return rows


def report_search(config: MixtureSearchConfig, outcome: dict[str, Any]) -> Markdown:
    """Artifacts: the swarm table, the fits, predicted vs actual, the per-source effects, the proposal."""
    table_artifact(
        [{k: _fmt(v) for k, v in row.items()} for row in outcome["runs"]],
        key="mixture-search-swarm",
        description="every proxy run: role, shares, held-out losses",
    )
    if outcome["seeds"] > 1:
        table_artifact(
            [{k: _fmt(v) if k != "runs" else ", ".join(v) for k, v in row.items()} for row in outcome["mixtures"]],
            key="mixture-search-mixtures",
            description=f"every mixture: its losses averaged over its {outcome['seeds']} seeds (what the fits see)",
        )
    table_artifact(fit_rows(outcome), key="mixture-search-fits", description="the fits: predicted vs actual")
    table_artifact(
        outcome["effects"],
        key="mixture-search-effects",
        description="each source's effect on each objective (rank correlation of its share with the loss)",
    )
    png = predicted_vs_actual_png(outcome, Path(config.out_dir) / "predicted-vs-actual.png")
    markdown_artifact(png_markdown(png, "predicted vs actual"), key="mixture-search-fit-plot", description="fits")
    proposal = outcome["proposal"]
    rows = [
        {
            "source": s,
            "base share": outcome["base"][s],
            "proposed share": round(proposal["shares"][s], 4),
            "least": outcome["constraints"]["min_share"][s],
            "most": round(outcome["constraints"]["max_share"][s], 4),
        }
        for s in outcome["sources"]
    ]
    noise = outcome["noise"].get(WEIGHTED)
    lines = [
        md("# Mixture search of {}", code(outcome["stage"])),
        md(
            "Predicted {} (the weighted objective): proposal {} +- {}, base {}; run-to-run noise (std over seeds): {}"
            " a run, {} a mixture's mean of {} seeds.",
            WEIGHTED,
            round(proposal["weighted"]["mean"], 4),
            round(proposal["weighted"]["std"], 4),
            round(proposal["base_weighted"]["mean"], 4),
            "not measured" if noise is None else round(noise, 4),
            "not measured" if noise is None else round(noise / outcome["seeds"] ** 0.5, 4),
            outcome["seeds"],
        ),
        markdown_table(rows),
    ]
    pooled = pooled_run_noise(outcome["runs"], outcome["sources"], [WEIGHTED])
    if pooled["groups"] > 1:  # replicated test mixtures: the noise away from the base too
        lines.insert(
            -1,
            md(
                "Run-to-run noise of {} pooled over {} mixtures with two or more seeds ({} degrees of freedom): {} a "
                "run (at the base alone: {}).",
                WEIGHTED,
                pooled["groups"],
                pooled["dof"],
                _fmt(pooled["noise"][WEIGHTED]),
                "not measured" if noise is None else round(noise, 4),
            ),
        )
    confirmation = outcome["confirmation"]
    if confirmation:
        lines.append(
            md(
                "Confirmation {}: measured {}, predicted {}; best swarm mixture {} ({}) {}; base {}.",
                code(", ".join(confirmation["runs"])),
                _fmt(confirmation[WEIGHTED]),
                round(confirmation["predicted_weighted"]["mean"], 4),
                code(", ".join(confirmation["best_swarm_runs"])),
                confirmation["best_swarm_role"],
                round(confirmation["best_swarm_weighted"], 4),
                _fmt(confirmation["base_weighted"]),
            )
        )
    if not any(r.get("better_than_mean") for r in outcome["cross_validation"] if r.get("chosen")):
        lines.append(
            md("**No chosen fit predicts better than the mean**: the proposal is no better founded than the base.")
        )
    summary = Markdown("\n\n".join(lines))
    markdown_artifact(summary, key="mixture-search-proposal", description="the proposed mixture")
    return summary


def launch_config(config: MixtureSearchConfig, stage_dirs: dict[str, Path], stage: str) -> TrainConfig:
    """The real run's TrainConfig with the approved stages as its data (`stages:` matched by stage folder name)."""
    assert config.launch.train_config is not None
    train = load_config(TrainConfig, config.launch.train_config).model_dump(mode="json")
    if train.get("stages"):
        for entry in train["stages"]:
            name = Path(entry["data"]).name
            if name not in stage_dirs:
                raise ValueError(
                    f"{config.launch.train_config}: stage folder {entry['data']} names no stage of the spec"
                )
            entry["data"] = str(stage_dirs[name])
    else:
        train["data"] = str(stage_dirs[stage])
    return validate_config(TrainConfig, train, str(config.launch.train_config))


@flow(name="mixture-proxy")
def mixture_proxy(run_dir: str = Field(description="a proxy run's folder, written by a mixture search")) -> None:
    """One proxy run of a mixture search (`cham mixture proxy RUN_DIR`): mix, train, evaluate, write result.json.
    A search with `swarm.deployment` starts these, so that a work pool's workers run the swarm."""
    run_command(cham("mixture", "proxy", run_dir), tail_lines=20)


@flow(name="mixture-search")
def mixture_search(
    config: MixtureSearchConfig,
    wait_for_approval: bool = Field(True, description="pause for approval of the proposal in the UI"),
    approval_timeout_s: int = Field(7 * 24 * 3600, gt=0, description="how long the pause waits for the form"),
) -> dict[str, Any]:
    """Proxy runs, fits and a proposal; then (after approval, with the weights the form holds) the approved
    MixtureSpec, its mix, and the training deployment started on it."""
    outcome = search_task(config)
    summary = report_search(config, outcome)
    if not wait_for_approval:
        return outcome
    form = MixtureApproval.with_initial_data(
        description=str(summary) + "\n\nEdit the weights if you like, then approve to mix and train with them.",
        weights=outcome["proposal"]["shares"],
        approve=True,
    )
    approval = pause_flow_run(wait_for_input=form, timeout=approval_timeout_s, key="approve-mixture")
    outcome["approval"] = {"approved": approval.approve, "weights": approval.weights}
    if not approval.approve:
        markdown_artifact(md("The proposal was **not approved**."), key="mixture-search-approval", description="")
        return outcome
    spec_file = write_approved(config, approval.weights)
    manifests = mix_task(spec_file, Path(config.out_dir) / APPROVED_MIX)
    stage_dirs = {name: Path(config.out_dir) / APPROVED_MIX / name for name in manifests}
    lines = [md("Approved mixture: {}, mixed into {}.", code(spec_file), code(Path(config.out_dir) / APPROVED_MIX))]
    if config.launch.train_config is not None:
        train = launch_config(config, stage_dirs, outcome["stage"])
        run = run_deployment(
            config.launch.deployment, parameters={"config": train.model_dump(mode="json")}, timeout=0, as_subflow=False
        )
        outcome["launched"] = {"deployment": config.launch.deployment, "flow_run": str(run.id), "name": run.name}
        lines.append(
            md("Started {} as flow run {} ({}).", code(config.launch.deployment), code(run.name), code(run.id))
        )
    markdown_artifact(Markdown("\n\n".join(lines)), key="mixture-search-approval", description="what was started")
    return outcome

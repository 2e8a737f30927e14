"""The deployments `cham serve` serves: a nightly dataset build, experiments and training from the UI, and
training triggered when a dataset build completes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger
from prefect.schedules import Cron

from flows.build_dataset import build_dataset
from flows.end_to_end import end_to_end
from flows.evaluation_flows import evaluate, generate
from flows.mixture_experiment import mixture_experiment
from flows.mixture_search import mixture_proxy, mixture_search
from flows.serve_settings import ServeSettings
from flows.training_flows import sft, train
from schemas import PrepareConfig, SFTConfig, TrainConfig, load_config

ON_DEMAND = "on-demand"  # deployments started from the UI (or the API) with a form
NIGHTLY = "nightly"
AFTER_BUILD = "after-build"


def _defaults(kind: type, path: Path | None) -> dict[str, Any]:
    """A config file as the deployment's default `config` parameter (validated now, so errors show at start)."""
    return {"config": load_config(kind, path).model_dump(mode="json")} if path else {}


def build_deployments(settings: ServeSettings) -> list[RunnerDeployment]:
    """Every deployment, ready for `prefect.serve`; schedules and triggers as the settings ask."""
    tags = list(settings.tags)
    prepare = _defaults(PrepareConfig, settings.prepare_config)
    train_defaults = _defaults(TrainConfig, settings.train_config)
    schedules = (
        [Cron(settings.build_cron, timezone=settings.timezone, slug="nightly-build")]
        if (prepare and settings.build_cron)
        else []
    )
    deployments = [
        build_dataset.to_deployment(
            NIGHTLY,
            parameters=prepare,
            schedules=schedules,
            tags=tags,
            description="Prepare the configured sources (complete shards are skipped).",
        ),
        mixture_experiment.to_deployment(ON_DEMAND, tags=tags, description="Mix, train and compare mixtures."),
        mixture_search.to_deployment(
            ON_DEMAND,
            tags=tags,
            description="Proxy runs, fits and a proposed mixture; approve it to mix and start training.",
        ),
        mixture_proxy.to_deployment(
            ON_DEMAND, tags=tags, description="One proxy run of a mixture search (started by the search)."
        ),
        train.to_deployment(ON_DEMAND, parameters=train_defaults, tags=tags, description="Pretrain with a form."),
        sft.to_deployment(
            ON_DEMAND,
            parameters=_defaults(SFTConfig, settings.sft_config),
            tags=tags,
            description="Fine-tune a pretrained checkpoint.",
        ),
        evaluate.to_deployment(ON_DEMAND, tags=tags, description="Held-out loss and prompt-set answers."),
        generate.to_deployment(ON_DEMAND, tags=tags, description="Prompt a checkpoint."),
        end_to_end.to_deployment(ON_DEMAND, tags=tags, description="The whole pipeline on the sample corpus."),
    ]
    if settings.train_after_build:
        if not train_defaults:
            raise ValueError("training after a dataset build needs a train config (--train-config)")
        # The build's flow-run name names the training folder, so each build trains into a fresh out_dir and a
        # retry of that training resumes in the same one.
        trigger = DeploymentEventTrigger(
            name="train when build-dataset completes",
            expect={"prefect.flow-run.Completed"},
            # Runs of the served build deployment only: not build-dataset as a subflow (end-to-end, `cham demo`)
            # nor a build started by hand outside it.
            match_related=[
                {"prefect.resource.role": "flow", "prefect.resource.name": build_dataset.name},
                {"prefect.resource.role": "deployment", "prefect.resource.name": NIGHTLY},
            ],
            parameters={**train_defaults, "run_name": "{{ event.resource.name }}"},
        )
        deployments.append(
            train.to_deployment(
                AFTER_BUILD,
                parameters=train_defaults,
                triggers=[trigger],
                tags=tags,
                description="Pretrain when a dataset build completes.",
            )
        )
    return deployments

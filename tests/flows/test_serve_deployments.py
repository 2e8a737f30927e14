"""A real `prefect server` on 127.0.0.1, `cham serve` in a subprocess, and a training started through the API the
way the UI starts one; plus what the served deployments carry (schedule, forms, the after-build trigger)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.artifacts import read_metrics
from tests.flows.prefect_server import REPO, stop, wait_for

pytestmark = pytest.mark.slow


def test_train_deployment_runs_when_started_through_the_api(
    server: dict, tmp_path: Path, make_stage, sample_data, tiny_tokenizers
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from schemas import TrainConfig, validate_config

    config = validate_config(
        TrainConfig,
        {
            "model": {"preset": "tiny"},
            "data": str(make_stage(4_000)),
            "out_dir": str(tmp_path / "runs"),
            "seq_len": 128,
            "steps": 2,
            "global_batch_size": 4,
            "micro_batch_size": 2,
            "schedule": {"warmup_steps": 1},
        },
    )
    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    prepare_yaml = tmp_path / "prepare.yaml"
    prepare_yaml.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path / "prepared"),
                "image_size": 64,
                "tokenizers": {k: str(v) for k, v in tiny_tokenizers.items()},
                "sources": [
                    {"name": "prose", "kind": "text", "format": "jsonl", "paths": [str(sample_data[0] / "text")]}
                ],
            }
        )
    )
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows",
            "serve",
            "--train-config",
            str(train_yaml),
            "--prepare-config",
            str(prepare_yaml),
            "--build-cron",
            "30 2 * * *",
            "--train-after-build",
        ],
        cwd=REPO,
        env=server | {"PREFECT_RUNNER_POLL_FREQUENCY": "2"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"]}), get_client(sync_client=True) as client:

            def deployment(name: str):
                try:
                    return client.read_deployment_by_name(name)
                except Exception:  # not registered yet
                    return None

            # The after-build deployment is registered last.
            after_build = wait_for(lambda: deployment("train/after-build"), "the deployments", 120, [serve])
            on_demand = client.read_deployment_by_name("train/on-demand")
            names = {d.name for d in client.read_deployments()}
            assert {"on-demand", "nightly", "after-build"} <= names
            nightly = client.read_deployment_by_name("build-dataset/nightly")
            assert [s.schedule.cron for s in nightly.schedules] == ["30 2 * * *"]
            assert nightly.parameters["config"]["sources"][0]["name"] == "prose"
            # The form: the schema the UI draws, with the served config as its default.
            assert "TrainConfig" in on_demand.parameter_openapi_schema["definitions"]
            assert on_demand.parameters["config"]["steps"] == 2
            # serve() creates a deployment's trigger automation just after the deployment itself: wait for it.
            automations = wait_for(
                lambda: client.read_automations_by_name("train when build-dataset completes"),
                "the automation of the after-build trigger",
                60,
                [serve],
            )
            assert "prefect.flow-run.Completed" in automations[0].trigger.model_dump_json()
            assert str(after_build.id) in automations[0].model_dump_json()  # its action runs train/after-build

            # As the UI's "Run" button does: a flow run of the deployment, with the form's values.
            parameters = {"config": config.model_dump(mode="json"), "run_name": "from-the-ui"}
            run = client.create_flow_run_from_deployment(on_demand.id, parameters=parameters)

            def finished():
                state = client.read_flow_run(run.id).state
                return state if state and state.is_final() else None

            state = wait_for(finished, "the training flow run", 240, [serve])
            serve_log = (tmp_path / "serve.log").read_text()
            assert state.is_completed(), f"{state.type}: {state.message}; serve log:\n{serve_log[-3000:]}"
            metrics = read_metrics(tmp_path / "runs" / "from-the-ui")
            assert [m["step"] for m in metrics] == [1, 2]
            artifacts = client.read_artifacts()
            final = [a for a in artifacts if a.key == "train-final-metrics" and a.flow_run_id == run.id]
            assert len(final) == 1 and '"step"' in str(final[0].data)

            # A run of the nightly build: its completion starts train/after-build, named after the build's run.
            build = client.create_flow_run_from_deployment(nightly.id)
            run = build
            state = wait_for(finished, "the build-dataset flow run", 240, [serve])
            assert state.is_completed(), state.message

            def triggered():
                runs = client.read_flow_runs()
                return [r for r in runs if r.deployment_id == after_build.id] or None

            (training,) = wait_for(triggered, "the after-build training run", 60, [serve])
            assert training.parameters["run_name"] == client.read_flow_run(build.id).name
    finally:
        stop(serve)
        log.close()


def test_cancelling_a_training_run_through_the_api_ends_every_rank(server: dict, tmp_path: Path, make_stage) -> None:
    """Cancel `train/on-demand` as the UI's Cancel button does: the runner kills the flow run's process group, which
    torchrun's ranks are not in (each has a session of its own); they must end too, and count 0 after."""
    import psutil
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelling

    from schemas import TrainConfig, validate_config

    config = validate_config(
        TrainConfig,
        {
            "model": {"preset": "tiny"},
            "data": str(make_stage(4_000)),
            "out_dir": str(tmp_path / "runs"),
            "seq_len": 128,
            "steps": 100_000,
            "global_batch_size": 4,
            "micro_batch_size": 2,
            "schedule": {"warmup_steps": 1},
            "logging": {"every_steps": 1, "tensorboard": False},
        },
    )
    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    out = tmp_path / "runs" / "cancel-me"

    def processes() -> list[psutil.Process]:  # every process of the run: its config file is in their command line
        alive = [p for p in psutil.process_iter(["cmdline", "status"]) if p.info["status"] != psutil.STATUS_ZOMBIE]
        return [p for p in alive if str(out) in " ".join(p.info["cmdline"] or [])]

    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows", "serve", "--train-config", str(train_yaml), "--build-cron", ""],
        cwd=REPO,
        env=server | {"PREFECT_RUNNER_POLL_FREQUENCY": "2"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"]}), get_client(sync_client=True) as client:

            def deployment():
                try:
                    return client.read_deployment_by_name("train/on-demand")
                except Exception:  # not registered yet
                    return None

            on_demand = wait_for(deployment, "the deployments", 120, [serve])
            parameters = {
                "config": config.model_dump(mode="json"),
                "run_name": "cancel-me",
                "nproc_per_node": 2,
                "retries": 0,
            }
            run = client.create_flow_run_from_deployment(on_demand.id, parameters=parameters)
            metrics = out / "metrics.jsonl"
            wait_for(
                lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2,
                "the ranks to train",
                240,
                [serve],
            )
            ranks = [p for p in processes() if "flows.train_worker" in p.info["cmdline"]]
            assert len(ranks) >= 2

            client.set_flow_run_state(run.id, Cancelling())  # what the UI and `prefect flow-run cancel` do

            def final():
                state = client.read_flow_run(run.id).state
                return state if state and state.is_final() else None

            state = wait_for(final, "the cancelled flow run", 120, [serve])
            assert state.is_cancelled(), f"{state.type}: {state.message}"
            # DataLoader workers notice their rank is gone within a few seconds (PyTorch's own watchdog).
            wait_for(lambda: not processes(), "every process of the run to end", 60, [serve])
            lines = len(metrics.read_text().splitlines())
            time.sleep(2)
            assert len(metrics.read_text().splitlines()) == lines  # nothing trains on
    finally:
        for proc in processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        stop(serve)
        log.close()

"""A task's progress artifact survives its retries as one bar."""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import update_progress_artifact

from flows.artifacts import task_progress_artifact


@task(retries=2, retry_delay_seconds=0)
def flaky(attempts: list[int]) -> None:
    progress = task_progress_artifact("work done")
    update_progress_artifact(progress, 50.0)
    attempts.append(1)
    if len(attempts) < 3:
        raise RuntimeError("a transient failure")
    update_progress_artifact(progress, 100.0)


@flow
def retried() -> None:
    flaky([])


def test_a_retried_task_keeps_one_progress_artifact(prefect_api) -> None:
    state = retried(return_state=True)
    assert state.is_completed(), state.message
    progress = [a for a in prefect_api.artifacts(state.state_details.flow_run_id) if a["type"] == "progress"]
    assert [(a["data"], a["description"]) for a in progress] == [(100.0, "work done")]

"""Prefect for the flow tests: one test harness (temporary database and API server) for the whole session."""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

import pytest

from tests.flows.prefect_server import server  # noqa: F401  (a fixture: a real `prefect server` on 127.0.0.1)


@pytest.fixture(scope="session")
def prefect_api() -> Any:
    """A temporary Prefect API (SQLite in a temp dir) that every flow run of the session reports to (~25 s);
    yields a reader of what the runs recorded."""
    from prefect.settings import PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with (
        temporary_settings({PREFECT_SERVER_ANALYTICS_ENABLED: False}),
        prefect_test_harness(server_startup_timeout=120),
    ):
        yield RunRecords()


class RunRecords:
    """Reads back, through the API client, the artifacts and subflow runs of flow runs."""

    @staticmethod
    def artifacts(flow_run_id: UUID, subflows: bool = False) -> list[dict[str, Any]]:
        """The artifacts of a flow run (and of its subflow runs), `data` decoded (tables as lists of rows)."""
        return read_artifacts(child_flow_runs(flow_run_id) if subflows else [flow_run_id])

    by_key = staticmethod(lambda artifacts, key: by_key(artifacts, key))


def read_artifacts(flow_run_ids: list[UUID]) -> list[dict[str, Any]]:
    """Every artifact the given flow runs created, as dicts with `data` decoded (tables as lists of rows)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(flow_run_ids))))
    out = []
    for artifact in found:
        data = artifact.data
        if artifact.type == "table" and isinstance(data, str):
            data = json.loads(data)
        out.append(
            {
                "key": artifact.key,
                "type": artifact.type,
                "data": data,
                "description": artifact.description,
                "flow_run_id": artifact.flow_run_id,
                "created": artifact.created,  # a key published again (a live table) has one artifact per version
            }
        )
    return out


def child_flow_runs(flow_run_id: UUID) -> list[UUID]:
    """The flow run and all its subflow runs, recursively."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    ids, todo = [flow_run_id], [flow_run_id]
    with get_client(sync_client=True) as client:
        while todo:
            parent = todo.pop()
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent]))
            )
            ids += [r.id for r in runs]
            todo += [r.id for r in runs]
    return ids


def by_key(artifacts: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The one artifact with this key (fails, listing the keys there are, when it is missing)."""
    matches = [a for a in artifacts if a["key"] == key]
    assert len(matches) == 1, f"{len(matches)} artifacts with key {key!r}; keys: {[a['key'] for a in artifacts]}"
    return matches[0]

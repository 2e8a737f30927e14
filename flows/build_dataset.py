"""The `build-dataset` flow: the prepare job (and optionally the mix job) as subprocesses, with progress and counts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import update_progress_artifact
from pydantic import Field

from flows.artifacts import table_artifact, task_progress_artifact
from flows.subprocess_task import cham, run_command, run_logger
from model.files import storage
from pipelines.shard_writer import SHARD_IDS, STATS_SUFFIX, shard_name
from pipelines.source_reader import plan_read_tasks
from schemas import MixtureSpec, PrepareConfig, dump_config, load_config

MANIFEST = "manifest.json"


def planned_stats_files(config: PrepareConfig) -> dict[str | Path, set[str]]:
    """Per source folder (a URL on a store), the names of the stats files of every shard the job will have written
    when done: the shard ids it assigned (its shard_ids.json, written when it starts; earlier builds' shards keep
    theirs), else one per read task."""
    files = {}
    for source in config.sources:
        folder = storage.join(config.output_dir, source.name)
        try:
            ids = [int(e["id"]) for e in json.loads(storage.read_text(storage.join(folder, SHARD_IDS)))["shards"]]
        except (OSError, ValueError, KeyError, TypeError):
            ids = list(range(len(plan_read_tasks(source, records_per_task=config.samples_per_shard))))
        files[folder] = {f"{shard_name(i)}{STATS_SUFFIX}" for i in ids}
    return files


def shards_done(planned: dict[str | Path, set[str]]) -> int:
    """How many of the planned stats files exist (one listing a source folder)."""
    return sum(len(names & set(storage.list_names(folder))) for folder, names in planned.items())


def reject_rows(manifests: dict[str, dict[str, Any]], written: dict[str, int]) -> list[dict[str, Any]]:
    """One row per source: records in, samples out, rejects in all and by reason, tokens, and this build's shards and
    records: new, reused from earlier builds, removed (the manifest's last build; `written` for older manifests)."""
    rows = []
    for name, manifest in manifests.items():
        t = manifest["totals"]
        shards = len(manifest["shards"])
        build = (manifest.get("builds") or [None])[-1]
        new = len(build["new_shards"]) if build else written.get(name, 0)
        rows.append(
            {
                "source": name,
                "kind": manifest["kind"],
                "records in": t["records_in"],
                "samples out": t["samples"],
                "rejects": t["rejects"],
                "rejects by reason": "; ".join(f"{r}: {n}" for r, n in t["rejects_by_reason"].items()) or "none",
                "tokens": t["tokens"],
                "images": t["images"],
                "faces": t["faces"],
                "shards new": new,
                "shards skipped": shards - new,
                "shards removed": len(build["removed_shards"]) if build else 0,
                "records new": build["new_records"] if build else None,
                "records reused": build["reused_records"] if build else None,
            }
        )
    return rows


@task(name="prepare", retries=2, retry_delay_seconds=5)
def prepare_task(config: PrepareConfig) -> dict[str, Any]:
    """`cham prepare` on the config; progress from the shards' stats files; returns per-source manifests."""
    out = config.output_dir
    # The config the job runs with, beside its output (in this machine's mirror of an output on a store).
    config_file = dump_config(config, storage.local_mirror(out, "prepare-logs") / "prepare-config.yaml")
    total = sum(len(names) for names in planned_stats_files(config).values())
    progress_id = task_progress_artifact(f"prepare: shards written of {total}")

    def report() -> None:
        # Complete shards skipped by the job already have their stats file; shards it redoes get a new one. The
        # plan is read again: the job writes its shard ids when it starts.
        planned = planned_stats_files(config)
        total = sum(len(names) for names in planned.values())
        update_progress_artifact(progress_id, 100.0 * shards_done(planned) / max(1, total))

    run_command(cham("prepare", str(config_file)), poll=report)
    update_progress_artifact(progress_id, 100.0)
    manifests = {s.name: json.loads(storage.read_text(storage.join(out, s.name, MANIFEST))) for s in config.sources}
    # This run's shards: its build in each manifest (a retry's manifest lists what its own attempt wrote).
    written = {name: len(m["builds"][-1]["new_shards"]) for name, m in manifests.items() if m.get("builds")}
    return {"manifests": manifests, "written": written}


@task(name="mix", retries=1, retry_delay_seconds=5)
def mix_task(spec_file: Path, out: str | Path) -> dict[str, Any]:
    """`cham mix` on a MixtureSpec file; returns the stage manifests (small: counts and shares)."""
    run_command(cham("mix", str(spec_file), "--out", str(out)))
    spec = load_config(MixtureSpec, spec_file)
    return {stage: json.loads(storage.read_text(storage.join(out, stage, MANIFEST))) for stage in spec.stages}


def stage_rows(manifests: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (stage, source): weight, target and realized token share, samples, repetitions."""
    rows = []
    for stage, m in manifests.items():
        for name, s in m["sources"].items():
            rows.append(
                {
                    "stage": stage,
                    "source": name,
                    "weight": s["weight"],
                    "target share": round(s["target_share"], 4),
                    "realized share": round(s["realized_share"], 4),
                    "realized tokens": s["realized_tokens"],
                    "samples": s["samples"],
                    "repetitions": round(s["repetitions"], 3),
                }
            )
    return rows


@flow(name="build-dataset")
def build_dataset(
    config: PrepareConfig,
    mixture_file: str | None = Field(None, description="a MixtureSpec YAML to mix once the sources are prepared"),
    mixed_dir: str | None = Field(None, description="where the mix writes its stages (default: OUTPUT_DIR/mixed)"),
) -> dict[str, Any]:
    """Tokenize raw sources into shards (complete shards are skipped), report counts and rejects, optionally mix."""
    logger = run_logger()
    prepared = prepare_task(config)
    rows = reject_rows(prepared["manifests"], prepared["written"])
    table_artifact(
        rows, key="build-dataset-sources", description="records in, samples out and rejects by reason, per source"
    )
    summary: dict[str, Any] = {"output_dir": str(config.output_dir), "sources": rows}
    # A log line is plain text (not markdown): the rows as they are, one per line.
    logger.info(
        "prepared %d sources:\n%s", len(rows), "\n".join(", ".join(f"{k}: {v}" for k, v in r.items()) for r in rows)
    )
    if mixture_file:
        out = mixed_dir or storage.join(config.output_dir, "mixed")
        stages = mix_task(Path(mixture_file), out)
        table_artifact(
            stage_rows(stages),
            key="build-dataset-stages",
            description=f"stages mixed into {out}: target vs realized token shares",
        )
        summary["mixed_dir"] = str(out)
        summary["stages"] = {s: {"sequences": m["sequences"], "tokens": m["tokens"]} for s, m in stages.items()}
    return summary

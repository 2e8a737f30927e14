"""What flows show in the Prefect UI: tables, mermaid charts and PNGs as data URIs inside markdown artifacts.

The V2 UI (the default since Prefect 3.8) sanitizes markdown: raw <svg> and scripts are dropped, but ```mermaid```
blocks are drawn as diagrams and `data:image/...` URLs are kept in <img src> (docs/orchestration.md, "Plots").
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any
from uuid import UUID

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

METRICS_FILE = "metrics.jsonl"  # written by model/trainer.py into the run's out_dir


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    """The trainer's per-step metrics, one per step: a step redone after a resume keeps its last record."""
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def _thin(points: list[tuple[float, float]], most: int) -> list[tuple[float, float]]:
    """At most `most` points, evenly spaced, the last one always kept (mermaid gets crowded)."""
    if len(points) <= most:
        return points
    stride = math.ceil(len(points) / most)
    kept = points[::stride]
    return kept if kept[-1] == points[-1] else [*kept, points[-1]]


def mermaid_lines(title: str, series: dict[str, list[tuple[float, float]]], y_label: str = "loss",
                  most: int = 40) -> str:  # fmt: skip
    """A mermaid `xychart-beta` line chart of (step, value) series sharing one step axis.

    xychart-beta has no legend, so the series' order is written under the chart.
    """
    series = {name: _thin(points, most) for name, points in series.items() if points}
    steps = sorted({int(x) for points in series.values() for x, _ in points})
    values = [y for points in series.values() for _, y in points]
    if not steps:
        return f"*{title}: no points yet*"
    low, high = min(values), max(values)
    pad = (high - low) * 0.05 or 0.1
    axis = ", ".join(map(str, steps))
    lines = ["```mermaid", "xychart-beta", f'    title "{title}"', f'    x-axis "step" [{axis}]',
             f'    y-axis "{y_label}" {low - pad:.3f} --> {high + pad:.3f}']  # fmt: skip
    for points in series.values():
        by_step = dict((int(x), y) for x, y in points)
        filled, last = [], points[0][1]
        for step in steps:  # a series without this step repeats its last value, so lines stay aligned
            last = by_step.get(step, last)
            filled.append(f"{last:.4f}")
        lines.append(f"    line [{', '.join(filled)}]")
    lines.append("```")
    if len(series) > 1:
        lines.append("Lines, in the theme's colour order: " + ", ".join(f"`{n}`" for n in series) + ".")
    return "\n".join(lines)


def mermaid_bars(title: str, values: dict[str, float], y_label: str) -> str:
    """A mermaid `xychart-beta` bar chart, one bar per name."""
    if not values:
        return f"*{title}: nothing to show*"
    low, high = min(values.values()), max(values.values())
    bottom = max(0.0, low - (high - low) * 0.5 - 0.05 * abs(low))
    names = ", ".join(f'"{n}"' for n in values)
    return "\n".join(["```mermaid", "xychart-beta", f'    title "{title}"', f"    x-axis [{names}]",
                      f'    y-axis "{y_label}" {bottom:.3f} --> {high * 1.02 + 1e-3:.3f}',
                      f"    bar [{', '.join(f'{v:.4f}' for v in values.values())}]", "```"])  # fmt: skip


def png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def png_markdown(path: Path, alt: str) -> str:
    """Markdown showing a PNG inline (a data URI, which the V2 UI keeps)."""
    return f"![{alt}]({png_data_uri(path)})"


def plot_loss_curves(series: dict[str, list[tuple[float, float]]], path: Path, title: str = "training loss") -> Path:
    """Loss against step, one line per run, as a PNG with a legend."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, points in series.items():
        if points:
            ax.plot([x for x, _ in points], [y for _, y in points], label=name, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def loss_points(metrics: list[dict[str, Any]], field: str = "loss") -> list[tuple[float, float]]:
    """(step, value) pairs of one metric, skipping steps where it is missing or not finite."""
    return [(m["step"], m[field]) for m in metrics if isinstance(m.get(field), int | float) and math.isfinite(m[field])]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A GitHub-style markdown table of dict rows (the keys of the first row are the columns)."""
    if not rows:
        return "*(no rows)*"
    columns = list(rows[0])
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(str(row.get(c, "")).replace("|", "\\|") for c in columns) + " |" for row in rows]
    return "\n".join(out)


def task_progress_artifact(description: str) -> UUID:
    """A progress artifact (at 0%) for the running task; a retry of the task gets its first attempt's back, so a
    task shows one progress bar however many attempts it takes."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterTaskRunId, ArtifactFilterType
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    if context is not None and context.task_run.run_count > 1:
        artifact_filter = ArtifactFilter(task_run_id=ArtifactFilterTaskRunId(any_=[context.task_run.id]),
                                         type=ArtifactFilterType(any_=["progress"]))  # fmt: skip
        with get_client(sync_client=True) as client:
            found = client.read_artifacts(artifact_filter=artifact_filter)
        if found:
            update_progress_artifact(found[0].id, 0.0)
            return found[0].id
    return create_progress_artifact(0.0, description=description)

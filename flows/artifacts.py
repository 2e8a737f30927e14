"""What flows show in the Prefect UI: tables, mermaid charts and PNGs as data URIs inside markdown artifacts.

The V2 UI (the default since Prefect 3.8) sanitizes markdown: raw <svg> and scripts are dropped, but ```mermaid```
blocks are drawn as diagrams and `data:image/...` URLs are kept in <img src> (docs/orchestration.md, "Plots").
Every artifact is made through `markdown_artifact` / `table_artifact` here, so text that is not ours (prompts, model
output, paths, names) is escaped on the way (flows/markup.py).
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

from flows.markup import Markdown, escape_cell, escape_markdown, escape_table_cell, md
from model.training.metrics import METRICS_FILE  # the trainer's JSONL sink, in the run's out_dir

Points = list[tuple[float, float | None]]  # (step, value); None where the step has no value (a gap)


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


def markdown_artifact(markdown: Markdown, key: str, description: str) -> UUID:
    """A markdown artifact. `markdown` must be Markdown built with flows.markup (md, escape_markdown, the charts
    here), so no text reaches the UI unescaped; the description (markdown in the UI) is escaped whole."""
    from prefect.artifacts import create_markdown_artifact

    if not isinstance(markdown, Markdown):
        raise TypeError("artifact markdown must be built with flows.markup.md or escape_markdown, not a plain str")
    return create_markdown_artifact(markdown, key=key, description=escape_markdown(description))


def table_artifact(rows: list[dict[str, Any]], key: str, description: str) -> UUID:
    """A table artifact of dict rows; string cells and column names escaped for the UIs that render them as
    markdown (flows.markup.escape_table_cell), numbers and None kept as they are."""
    from prefect.artifacts import create_table_artifact

    table = [{escape_table_cell(k): escape_table_cell(v) for k, v in row.items()} for row in rows]
    return create_table_artifact(table, key=key, description=escape_markdown(description))


def _thin(points: Points, most: int) -> Points:
    """At most `most` points, evenly spaced, the last one always kept (mermaid gets crowded)."""
    if len(points) <= most:
        return points
    stride = math.ceil(len(points) / most)
    kept = points[::stride]
    return kept if kept[-1] == points[-1] else [*kept, points[-1]]


def _has_values(points: Points) -> bool:
    return any(y is not None for _, y in points)


def _mermaid_string(text: str) -> str:
    """Text inside a mermaid "..." string: one line, no quote or backtick to end the string or the code fence."""
    return " ".join(str(text).replace('"', "'").replace("`", "'").split())


def mermaid_lines(title: str, series: dict[str, Points], y_label: str = "loss", most: int = 40) -> Markdown:
    """A mermaid `xychart-beta` line chart of (step, value) series sharing one step axis.

    xychart-beta has no legend, so the series' order is written under the chart. It cannot draw a gap either: a series
    with steps that have no value (None: e.g. image CE at steps without image targets) is left out of the chart and
    named under it (the PNG draws it, with its gaps); a series with no value at all is not drawn anywhere.
    """
    drawn = {name: points for name, points in series.items() if _has_values(points)}
    gapped = [name for name, points in drawn.items() if any(y is None for _, y in points)]
    series = {name: _thin(points, most) for name, points in drawn.items() if name not in gapped}
    steps = sorted({int(x) for points in series.values() for x, _ in points})
    values = [y for points in series.values() for _, y in points]
    note = (
        md(
            "*Not in this chart (steps without a value, which it cannot show as gaps; see the PNG): {}.*",
            ", ".join(gapped),
        )
        if gapped
        else Markdown("")
    )
    if not steps:
        return Markdown("\n\n".join(p for p in (md("*{}: no points yet*", title), note) if p))
    low, high = min(values), max(values)
    pad = (high - low) * 0.05 or 0.1
    axis = ", ".join(map(str, steps))
    lines = [
        "```mermaid",
        "xychart-beta",
        f'    title "{_mermaid_string(title)}"',
        f'    x-axis "step" [{axis}]',
        f'    y-axis "{_mermaid_string(y_label)}" {low - pad:.3f} --> {high + pad:.3f}',
    ]
    for points in series.values():
        by_step = dict((int(x), y) for x, y in points)
        filled, last = [], points[0][1]
        for step in steps:  # a shorter run repeats its last value, so the lines stay aligned on one step axis
            last = by_step.get(step, last)
            filled.append(f"{last:.4f}")
        lines.append(f"    line [{', '.join(filled)}]")
    lines.append("```")
    if len(series) > 1:
        lines.append(md("Lines, in the theme's colour order: {}.", ", ".join(series)))
    if note:
        lines.append(note)
    return Markdown("\n".join(lines))


def mermaid_bars(title: str, values: dict[str, float], y_label: str) -> Markdown:
    """A mermaid `xychart-beta` bar chart, one bar per name."""
    if not values:
        return md("*{}: nothing to show*", title)
    low, high = min(values.values()), max(values.values())
    bottom = max(0.0, low - (high - low) * 0.5 - 0.05 * abs(low))
    names = ", ".join(f'"{_mermaid_string(n)}"' for n in values)
    return Markdown(
        "\n".join(
            [
                "```mermaid",
                "xychart-beta",
                f'    title "{_mermaid_string(title)}"',
                f"    x-axis [{names}]",
                f'    y-axis "{_mermaid_string(y_label)}" {bottom:.3f} --> {high * 1.02 + 1e-3:.3f}',
                f"    bar [{', '.join(f'{v:.4f}' for v in values.values())}]",
                "```",
            ]
        )
    )


def png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def png_markdown(path: Path, alt: str) -> Markdown:
    """Markdown showing a PNG inline (a data URI, which the V2 UI keeps); the alt text is escaped."""
    return Markdown(f"![{escape_markdown(alt)}]({png_data_uri(path)})")


def loss_figure(series: dict[str, Points], title: str = "training loss") -> Any:
    """Loss against step, one line per series with a legend (a matplotlib Figure). A step without a value (None) is
    a gap in its line, marked points show values between gaps; a series with no value at all is not drawn."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    drawn = {name: points for name, points in series.items() if _has_values(points)}
    for name, points in drawn.items():
        ys = [math.nan if y is None else y for _, y in points]
        gaps = any(y is None for _, y in points)  # an isolated value between two gaps is a point, not a line
        ax.plot([x for x, _ in points], ys, label=name, linewidth=1.5, marker="o" if gaps else None, markersize=2.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(drawn) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_loss_curves(series: dict[str, Points], path: Path, title: str = "training loss") -> Path:
    """`loss_figure` of the series, saved as a PNG."""
    fig = loss_figure(series, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def loss_points(metrics: list[dict[str, Any]], field: str = "loss") -> Points:
    """(step, value) of one metric at every logged step; None where the step has no value (the trainer writes null,
    e.g. ce_image at a step without image targets) or it is missing or not finite: a gap, never a zero."""

    def value(m: dict[str, Any]) -> float | None:
        v = m.get(field)
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None

    return [(m["step"], value(m)) for m in metrics]


def markdown_table(rows: list[dict[str, Any]]) -> Markdown:
    """A GitHub-style markdown table of dict rows (the keys of the first row are the columns), cells escaped."""
    if not rows:
        return Markdown("*(no rows)*")
    columns = list(rows[0])
    out = ["| " + " | ".join(escape_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    out += [
        "| " + " | ".join(escape_cell("" if row.get(c) is None else row[c]) for c in columns) + " |" for row in rows
    ]
    return Markdown("\n".join(out))


def task_progress_artifact(description: str) -> UUID:
    """A progress artifact (at 0%) for the running task; a retry of the task gets its first attempt's back, so a
    task shows one progress bar however many attempts it takes."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterTaskRunId, ArtifactFilterType
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    if context is not None and context.task_run.run_count > 1:
        artifact_filter = ArtifactFilter(
            task_run_id=ArtifactFilterTaskRunId(any_=[context.task_run.id]), type=ArtifactFilterType(any_=["progress"])
        )
        with get_client(sync_client=True) as client:
            found = client.read_artifacts(artifact_filter=artifact_filter)
        if found:
            update_progress_artifact(found[0].id, 0.0)
            return found[0].id
    return create_progress_artifact(0.0, description=escape_markdown(description))

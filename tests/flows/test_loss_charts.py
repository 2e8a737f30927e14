"""Charts and tables of metrics.jsonl where a step has no value (null: no image or no text targets at that step):
the point is left out and the line shows a gap, never a zero or a line drawn across; an all-null series is not drawn."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from prefect import flow

from flows.artifacts import loss_figure, loss_points, mermaid_lines, plot_loss_curves, read_metrics

# Steps 1-6: image CE is null at steps 2, 3 and 5 (an isolated value at step 4), text CE at every step.
IMAGE_CE = {1: 5.5, 2: None, 3: None, 4: 5.0, 5: None, 6: 4.5}


def write_metrics(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"step": step, "loss": 4.0 - 0.1 * step, "ce_text": None, "ce_image": ce, "lr": 1e-3})
        for step, ce in IMAGE_CE.items()
    ]
    (out_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return out_dir


def series_of(out_dir: Path) -> dict[str, list]:
    metrics = read_metrics(out_dir)
    return {
        "loss": loss_points(metrics),
        "text CE": loss_points(metrics, "ce_text"),
        "image CE": loss_points(metrics, "ce_image"),
    }


def test_null_steps_are_gaps_not_zeros(tmp_path: Path) -> None:
    series = series_of(write_metrics(tmp_path))
    assert series["image CE"] == list(IMAGE_CE.items())
    assert series["text CE"] == [(s, None) for s in IMAGE_CE]
    assert loss_points([{"step": 1, "loss": float("nan")}, {"step": 2}, {"step": 3, "loss": True}]) == [
        (1, None),
        (2, None),
        (3, None),
    ]


def test_png_lines_have_nan_gaps_and_no_all_null_series(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = loss_figure(series_of(write_metrics(tmp_path)))
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"loss", "image CE"}  # text CE has no value at any step
    image = lines["image CE"]
    assert list(image.get_xdata()) == list(IMAGE_CE)
    assert [None if math.isnan(y) else y for y in image.get_ydata()] == list(IMAGE_CE.values())
    assert image.get_marker() == "o"  # the value at step 4, between two gaps, is drawn as a point
    assert ax.get_ylim()[0] > 2.0  # no zero stretches the axis down
    plt.close(fig)
    png = plot_loss_curves(series_of(tmp_path), tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mermaid_chart_leaves_out_what_it_cannot_draw_as_gaps(tmp_path: Path) -> None:
    chart = mermaid_lines("train loss", series_of(write_metrics(tmp_path)))
    (line,) = re.findall(r"^    line \[(.*)\]$", chart, flags=re.M)  # loss only
    assert [float(v) for v in line.split(", ")] == pytest.approx([4.0 - 0.1 * s for s in IMAGE_CE])
    low = float(re.search(r'y-axis "loss" ([\d.-]+) -->', chart).group(1))
    assert low > 3.0  # the axis is the loss's, not stretched to a zero
    assert "image CE" in chart.split("```")[-1] and "text CE" not in chart
    only_null = mermaid_lines("t", {"text CE": [(1, None), (2, None)]})
    assert "```" not in only_null and "no points yet" in only_null


@flow
def reports_a_run(out_dir: str) -> None:
    from flows.training_flows import report_training

    metrics = read_metrics(Path(out_dir))
    report_training("train", {"out_dir": out_dir, "final": metrics[-1], "checkpoint": None})


def test_training_flow_artifacts_of_a_run_with_null_steps(prefect_api, tmp_path: Path) -> None:
    out = write_metrics(tmp_path / "run")
    state = reports_a_run(str(out), return_state=True)
    assert state.is_completed(), state.message
    artifacts = prefect_api.artifacts(state.state_details.flow_run_id)
    curve = prefect_api.by_key(artifacts, "train-loss-curve")["data"]
    assert len(re.findall(r"^    line \[", curve, flags=re.M)) == 1 and "0.0000" not in curve
    assert "image CE" in curve and "text CE" not in curve
    final = {r["metric"]: r["value"] for r in prefect_api.by_key(artifacts, "train-final-metrics")["data"]}
    assert final["ce_image"] == 4.5 and "ce_text" not in final  # null is no row, not 0
    assert (out / "loss.png").is_file()


def test_end_to_end_tables_show_null_as_an_empty_cell() -> None:
    from flows.end_to_end import training_row
    from flows.html_report import dict_table

    result = {"steps": 6, "checkpoint": "c", "final": {"step": 6, "loss": 3.4, "ce_text": None, "ce_image": 4.5}}
    row = training_row("sft", result)
    assert row == {"run": "sft", "steps": 6, "final loss": 3.4, "text CE": None, "image CE": 4.5, "checkpoint": "c"}
    assert "<td>sft</td><td>6</td><td>3.4</td><td></td><td>4.5</td>" in dict_table([row])

"""`cham eval benchmark` on the tiny run: a table and a JSON of lm-eval's metrics for a bundled multiple-choice task
and for GSM8K, the lm-eval task written beside, and one-line errors for what cannot be read."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from flows.cli.eval import app

runner = CliRunner()


def test_benchmark_scores_a_bundled_task_k_shot_and_writes_the_lm_eval_task(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "arc.json"
    args = ["benchmark", "--checkpoint", str(tiny_run), "--task", "arc", "--shots", "2", "--out", str(out)]
    result = runner.invoke(app, [*args, "--lm-eval-task", str(tmp_path / "lm_eval")])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert (data["task"], data["shots"], data["seed"], data["questions"], data["step"]) == ("arc", 2, 1234, 8, 30)
    assert set(data["metrics"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "acc_bytes", "acc_bytes_stderr"}
    assert data["metrics"]["acc"] == sum(s["acc"] for s in data["samples"]) / 8
    first = data["samples"][0]
    assert len(first["requests"]) == len(first["loglikelihoods"]) == 4
    assert first["requests"][0][0].count("Question:") == 3  # two solved examples, then the question
    for name in ("acc_norm", f"{data['metrics']['acc']:.4f}"):
        assert name in result.output
    config = json.loads((tmp_path / "lm_eval" / "arc.yaml").read_text())
    assert config["task"] == "cham_arc" and (tmp_path / "lm_eval" / "arc.jsonl").is_file()
    # The same seed gives the same prompts; --limit scores the first questions only.
    again = tmp_path / "again.json"
    assert runner.invoke(app, [*args[:-1], str(again), "--limit", "3"]).exit_code == 0
    assert json.loads(again.read_text())["samples"] == data["samples"][:3]


def test_benchmark_generates_gsm8k_answers_and_scores_exact_match(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "gsm8k.json"
    args = ["benchmark", "--checkpoint", str(tiny_run), "--task", "gsm8k", "--limit", "2", "--max-new-tokens", "6"]
    result = runner.invoke(app, [*args, "--shots", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["questions"] == 2 and "exact_match,strict-match" in data["metrics"]
    assert all(s["prompt"].count("#### ") == 1 for s in data["samples"])  # the one solved example's answer


def test_benchmark_refuses_unknown_tasks_and_bad_files_in_one_line(tiny_run: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "x.json")
    result = runner.invoke(app, ["benchmark", "--checkpoint", str(tiny_run), "--task", "squad", "--out", out])
    assert result.exit_code == 1 and "not a bundled task" in result.output
    bad = tmp_path / "hellaswag.jsonl"
    bad.write_text('{"ctx_a": "x"}\n')
    result = runner.invoke(app, ["benchmark", "--checkpoint", str(tiny_run), "--task", str(bad), "--out", out])
    assert result.exit_code == 1 and "record 1: no 'endings'" in result.output
    result = runner.invoke(
        app, ["benchmark", "--checkpoint", str(tiny_run), "--task", "boolq", "--shots", "9", "--out", out]
    )
    assert result.exit_code == 1 and "9 shots asked" in result.output
    assert not Path(out).exists()

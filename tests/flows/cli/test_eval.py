"""`cham eval loss | prompts | compare | score` end to end on the tiny run, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli.eval import app
from model.evaluation.annotation_page import annotation_line

runner = CliRunner()
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def stage(make_stage) -> Path:
    return make_stage(2_000)


def test_loss_writes_the_results_and_prints_a_table(tiny_run: Path, stage: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval" / "loss.json"
    args = [
        "loss",
        "--checkpoint",
        str(tiny_run),
        "--stage",
        str(stage),
        "--max-batches",
        "2",
        "--batch-size",
        "3",
        "--out",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert (data["batches"], data["sequences"], data["step"]) == (2, 6, 30)
    assert set(data["by_source"]) == {"prose", "photos"} and set(data["by_modality"]) == {"text", "image"}
    assert data["tokens"] == sum(v["tokens"] for v in data["by_source"].values()) > 0
    for name in ("source prose", "source photos", "modality image", f"{data['loss']:.4f}"):
        assert name in result.output


def test_prompts_compare_and_score(tiny_run: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "\n".join(
            json.dumps(p)
            for p in [
                {"id": "p1", "prompt": "How do I brew coffee?", "category": "how-to"},
                {
                    "id": "p2",
                    "prompt": "What is in this photo?",
                    "images": [str(REPO / "sample/images/two_macaws.jpg")],
                    "category": "explanation",
                },
            ]
        )
    )
    for name, seed in (("a", "1"), ("b", "2")):
        args = [
            "prompts",
            "--checkpoint",
            str(tiny_run),
            "--prompts",
            str(prompts),
            "--out",
            str(tmp_path / name),
            "--max-new-tokens",
            "12",
            "--seed",
            seed,
        ]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "p1:" in result.output and "annotate.html" in result.output
    responses = [json.loads(line) for line in (tmp_path / "a" / "responses.jsonl").read_text().splitlines()]
    assert [(r["id"], r["mode"]) for r in responses] == [("p1", "mixed"), ("p2", "mixed")]
    assert all(0 < r["new_tokens"] <= 12 for r in responses)
    assert (tmp_path / "a" / "annotate.html").is_file()

    result = runner.invoke(
        app,
        [
            "compare",
            str(tmp_path / "a/responses.jsonl"),
            str(tmp_path / "b/responses.jsonl"),
            "--out",
            str(tmp_path / "cmp"),
            "--seed",
            "5",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cmp" / "compare.html").is_file()
    blinding = json.loads((tmp_path / "cmp" / "blinding.json").read_text())
    assert blinding["seed"] == 5 and set(blinding["items"]) == {"p1", "p2"}

    # Every annotator prefers response 1 on p1 and calls p2 a tie: A's result on p1 depends on the blinding.
    lines = [annotation_line("relative", "p1", "how-to", f"ann{k}", "first_wins") for k in (1, 2, 3)]
    lines += [annotation_line("relative", "p2", "explanation", f"ann{k}", "tie") for k in (1, 2, 3)]
    (tmp_path / "votes.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "scores.json"
    result = runner.invoke(
        app,
        [
            "score",
            str(tmp_path / "votes.jsonl"),
            "--blinding",
            str(tmp_path / "cmp" / "blinding.json"),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text())
    a_first = blinding["items"]["p1"]["first"] == "A"
    assert scores["rates"] == {"win": 0.5 if a_first else 0.0, "tie": 0.5, "loss": 0.0 if a_first else 0.5}
    assert scores["agreement"]["all_agree"] == 1.0
    assert "3/3" in result.output and "overall" in result.output and "A wins" in result.output

    out = tmp_path / "absolute.json"
    result = runner.invoke(app, ["score", str(REPO / "sample/eval/annotations-example.jsonl"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["rates"]["fulfills"] == 0.5 and "50.0%" in result.output


def test_bad_input_is_one_error_line_and_exit_code_1(tiny_run: Path, stage: Path, tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "p1", "prompt": "hi", "category": "x"}) + "\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": "p1", "prompt": "hi"}) + "\n")
    (tmp_path / "two.jsonl").write_text(annotation_line("absolute", "q", "x", "a1", "fulfills") + "\n")
    out = str(tmp_path / "out")
    cases = {
        "no such checkpoint folder": [
            "loss",
            "--checkpoint",
            str(tmp_path / "nope"),
            "--stage",
            str(stage),
            "--out",
            out,
        ],
        "not a stage folder": ["loss", "--checkpoint", str(tiny_run), "--stage", str(tmp_path), "--out", out],
        "nope.jsonl: file not found": [
            "prompts",
            "--checkpoint",
            str(tiny_run),
            "--prompts",
            str(tmp_path / "nope.jsonl"),
            "--out",
            out,
        ],
        "bad.jsonl:1: category: Field required": [
            "prompts",
            "--checkpoint",
            str(tiny_run),
            "--prompts",
            str(tmp_path / "bad.jsonl"),
            "--out",
            out,
        ],
        "no such checkpoint": [
            "prompts",
            "--checkpoint",
            str(tmp_path / "nope"),
            "--prompts",
            str(tmp_path / "p.jsonl"),
            "--out",
            out,
        ],
        "has 1 annotator(s)": ["score", str(tmp_path / "two.jsonl"), "--out", out],
        "missing.json: file not found": [
            "score",
            str(tmp_path / "two.jsonl"),
            "--blinding",
            str(tmp_path / "missing.json"),
            "--out",
            out,
        ],
        "a.jsonl: file not found": ["compare", str(tmp_path / "a.jsonl"), str(tmp_path / "p.jsonl"), "--out", out],
        # Checked before the evaluation runs, not after it.
        "a folder is in the way": [
            "loss",
            "--checkpoint",
            str(tiny_run),
            "--stage",
            str(stage),
            "--out",
            str(tmp_path),
        ],
        "a file is in the way": [
            "prompts",
            "--checkpoint",
            str(tiny_run),
            "--prompts",
            str(tmp_path / "p.jsonl"),
            "--out",
            str(tmp_path / "p.jsonl"),
        ],
    }
    for message, args in cases.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (message, result.output)
        assert "Traceback" not in result.output
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output


def test_loss_needs_no_tokenizers_and_prompts_need_a_token_budget(tiny_run: Path, stage: Path, tmp_path: Path) -> None:
    from model.lm.convert import load_ours, save_ours

    save_ours(*reversed(load_ours(tiny_run / "checkpoints" / "step-00000030")), tmp_path / "converted")
    out = tmp_path / "loss.json"
    args = [
        "loss",
        "--checkpoint",
        str(tmp_path / "converted"),
        "--stage",
        str(stage),
        "--max-batches",
        "1",
        "--out",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["step"] is None  # a converted folder has no training step
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "p1", "prompt": "hi", "category": "x"}) + "\n")
    for budget in ("0", "-2"):
        result = runner.invoke(
            app,
            [
                "prompts",
                "--checkpoint",
                str(tiny_run),
                "--prompts",
                str(tmp_path / "p.jsonl"),
                "--out",
                str(tmp_path / "r"),
                "--max-new-tokens",
                budget,
            ],
        )
        assert result.exit_code == 2 and "Traceback" not in result.output and "--max-new-tokens" in result.output

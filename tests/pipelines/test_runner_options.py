"""The `kind: beam` examples of docs/prepare.md ("Runners") reach Beam's PipelineOptions unchanged: every option
they name is one of Beam's own (a misspelt name would be dropped), with the value the example gives it."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from pipelines.runners import pipeline_options
from schemas.prepare_config import RunnerConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "prepare.md"


def runner_examples() -> list[dict]:
    """The `runner:` mappings of the yaml blocks in the Runners section that use kind beam."""
    section = DOC.read_text().split("\n## Runners\n", 1)[1].split("\n## ", 1)[0]
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", section, flags=re.S)]
    return [b["runner"] for b in blocks if isinstance(b, dict) and b.get("runner", {}).get("kind") == "beam"]


def test_the_documented_runner_options_pass_through_to_beam_unchanged() -> None:
    examples = runner_examples()
    assert {e["options"]["runner"] for e in examples} == {"FlinkRunner", "SparkRunner", "DataflowRunner"}
    for example in examples:
        options = pipeline_options(RunnerConfig.model_validate(example)).get_all_options()  # Beam's names only
        for name, value in example["options"].items():
            assert options.get(name) == value, (example["options"]["runner"], name, options.get(name))


def test_an_option_beam_does_not_know_is_not_passed_as_one_of_its_own() -> None:
    runner = RunnerConfig(kind="beam", options={"runner": "FlinkRunner", "flink_mastr": "host:8081"})
    assert "flink_mastr" not in pipeline_options(runner).get_all_options()

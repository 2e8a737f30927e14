"""Shared fixtures: the repository, the sample data written once per session, the example configs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipelines.sample_corpus import write_sample_data

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "docs" / "configs"


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """`cham sample-data` output (folder, manifest), written once for the whole session."""
    out = tmp_path_factory.mktemp("sample") / "data"
    return out, write_sample_data(out)


@pytest.fixture()
def example_base(tmp_path: Path, sample_data: tuple[Path, dict]) -> Path:
    """A working directory where every path the example configs name exists."""
    shutil.copytree(sample_data[0], tmp_path / "data" / "sample")
    for folder in [
        "tokenizers/text",
        "tokenizers/vq",
        "mixed/stage1",
        "mixed/sft",
        "runs/pretrain/checkpoints/latest",
        "runs/sft/checkpoints/latest",
    ]:
        (tmp_path / "data" / folder).mkdir(parents=True)
    for source in ["prose", "photos", "howto", "code", "instructions"]:
        (tmp_path / "data" / "prepared" / source).mkdir(parents=True)
    return tmp_path

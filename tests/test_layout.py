"""The layering of docs/DESIGN's layout, read from the imports: each package and each room of model/ imports only
what it may, so the rule can be seen in the tree and cannot quietly erode."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

# model's rooms, lowest first: a room imports only itself and the rooms before it.
MODEL_ROOMS = ["files", "tokenizers", "lm", "training", "generation", "evaluation", "mixture_search"]
HEAVY = ("torch", "apache_beam", "prefect", "transformers")


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(module imported, at top level?) for every import in a file; relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, id(node) in top))
    return found


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def room_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "model" and len(parts) > 1 and parts[1] in MODEL_ROOMS else None


def test_model_is_in_rooms_only() -> None:
    loose = [p.name for p in (REPO / "model").glob("*.py") if p.name != "__init__.py"]
    assert loose == [], "every model module belongs to a room (model/<room>/)"
    assert sorted(p.name for p in (REPO / "model").iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(
        MODEL_ROOMS
    )


@pytest.mark.parametrize("room", MODEL_ROOMS)
def test_model_rooms_import_downward_only(room: str) -> None:
    allowed = set(MODEL_ROOMS[: MODEL_ROOMS.index(room) + 1])
    bad = []
    for path in modules(f"model/{room}"):
        for module, _ in imports_of(path):
            target = module.split(".")[0]
            if target in ("pipelines", "flows") or (target == "model" and room_of(module) not in allowed):
                bad.append(f"{path.relative_to(REPO)} imports {module}")
    assert bad == []


def test_pipelines_import_only_the_tokenizers_and_files_of_model() -> None:
    bad = [
        f"{path.relative_to(REPO)} imports {module}"
        for path in modules("pipelines")
        for module, _ in imports_of(path)
        if module.split(".")[0] == "flows"
        or (module.startswith("model") and room_of(module) not in ("tokenizers", "files"))
    ]
    assert bad == []


def test_schemas_import_no_other_package_and_nothing_heavy() -> None:
    bad = [
        f"{path.relative_to(REPO)} imports {module}"
        for path in modules("schemas")
        for module, _ in imports_of(path)
        if module.split(".")[0] in ("model", "pipelines", "flows", *HEAVY)
    ]
    assert bad == []


def test_the_command_line_imports_heavy_libraries_only_inside_commands() -> None:
    """`cham --help` and a config error must not pay for torch, Beam or Prefect: flows/cli/ imports them (and the
    modules that do) inside the commands that need them."""
    bad = [
        f"{path.relative_to(REPO)} imports {module}"
        for path in modules("flows/cli")
        for module, top in imports_of(path)
        if top and module.split(".")[0] in (*HEAVY, "model", "pipelines")
    ]
    assert bad == []

"""Atomic writes: all or nothing, never a shared temporary, nothing left behind by a failed write."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.files.atomic import atomic_path, temporary_path, write_atomic


def test_write_atomic_text_and_bytes(tmp_path: Path) -> None:
    write_atomic(tmp_path / "a.json", '{"x": "é"}')
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "a.json").read_text(encoding="utf-8") == '{"x": "é"}'
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    write_atomic(tmp_path / "a.json", "second")
    assert (tmp_path / "a.json").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin"]  # no temporaries left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_folder_replaces_a_folder_whole(tmp_path: Path) -> None:
    target = tmp_path / "step-00000002"
    target.mkdir()
    (target / "stale.pt").write_text("stale")
    with atomic_path(target, replace_folder=True) as tmp:
        tmp.mkdir()
        (tmp / "model.pt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["model.pt"]
    with pytest.raises(ValueError), atomic_path(tmp_path / "other", replace_folder=True) as tmp:
        tmp.mkdir()
        (tmp / "x").write_text("x")
        raise ValueError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002"]


def test_two_writers_never_share_a_temporary(tmp_path: Path) -> None:
    names = {temporary_path(tmp_path / "manifest.json").name for _ in range(100)}
    assert len(names) == 100 and all(n.startswith(".manifest.json.") and n.endswith(".tmp") for n in names)

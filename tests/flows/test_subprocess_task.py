"""run_command: a failing job's error is in the exception, even when a launcher prints a long summary after it."""

from __future__ import annotations

import sys

import pytest

from flows.subprocess_task import CommandError, run_command


def test_the_cause_survives_a_long_launcher_summary() -> None:
    script = (
        "import sys\n"
        "print('[rank1]: error: /data/stage1 is not a stage folder (no manifest.json)')\n"
        "print('[rank0]: error: /data/stage1 is not a stage folder (no manifest.json)')\n"
        "for i in range(30): print(f'launcher summary line {i}')\n"
        "sys.exit(1)\n"
    )
    with pytest.raises(CommandError) as caught:
        run_command([sys.executable, "-c", script])
    message = str(caught.value)
    assert (
        "exited with status 1; error:\n  error: /data/stage1 is not a stage folder (no manifest.json); last" in message
    )
    assert message.endswith("launcher summary line 29") and "launcher summary line 17" not in message


def test_a_clean_run_returns_its_last_lines() -> None:
    out = run_command([sys.executable, "-c", "print('ValueError: only printed'); print('done')"])
    assert out == ["ValueError: only printed", "done"]

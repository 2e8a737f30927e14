"""What every `cham` command prints with: the consoles, and one-line errors that end the command."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `error: message` on stderr and return the Exit to raise (no traceback for the user)."""
    err_console.print("[red]error:[/red]", escape(message), highlight=False)
    return typer.Exit(code)


def output_folder(path: Path, option: str = "--out") -> Path:
    """Create the folder a command writes into (parents too), or end the command saying why it cannot be; `option`
    names where the path came from."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise fail(f"{option} {path}: a file is in the way (give a folder)") from None
    except OSError as err:
        raise fail(f"{option} {path}: cannot create this folder ({err.strerror or err})") from None
    return path


def output_file(path: Path) -> Path:
    """Check, before any work, that `path` can be written as a file (its folder is created); else end the command."""
    if path.is_dir():
        raise fail(f"--out {path}: a folder is in the way (give a file name)")
    output_folder(path.parent)
    return path

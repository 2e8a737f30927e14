"""What every `cham` command prints with: the consoles, and one-line errors that end the command."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `error: message` on stderr and return the Exit to raise (no traceback for the user)."""
    err_console.print("[red]error:[/red]", escape(message), highlight=False)
    return typer.Exit(code)

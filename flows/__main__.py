"""`python -m flows ARGS` is `cham ARGS`: how flows launch jobs in a subprocess with this very interpreter."""

from flows.cli import app

app(prog_name="cham")

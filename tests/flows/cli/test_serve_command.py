"""`cham serve` checks that a Prefect server answers before it builds the deployments (a real server:
tests/flows/test_serve_deployments.py)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from typer.testing import CliRunner

from flows.cli import app
from flows.cli.serve import server_unreachable

runner = CliRunner()


class _NotFound(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_any_http_answer_counts_as_a_server_and_a_refused_connection_does_not() -> None:
    server = HTTPServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        assert server_unreachable(f"http://127.0.0.1:{port}/api") is None  # a 404 (or a 401 of Prefect Cloud)
    finally:
        server.shutdown()
        server.server_close()
    assert "refused" in server_unreachable(f"http://127.0.0.1:{port}/api").lower()
    assert server_unreachable("not-a-url") is not None


def test_serve_without_a_server_is_one_line_after_the_settings_are_checked() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        result = runner.invoke(app, ["serve", "--timezone", "Europe/Paris"])
    assert result.exit_code == 1
    assert "error: no Prefect server answers at http://127.0.0.1:9/api (" in result.output
    assert "prefect server start --host 127.0.0.1" in result.output
    assert "serving" not in result.output

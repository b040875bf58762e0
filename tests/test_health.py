import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from kit.serve import health


def _serve(status):
    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *a):
            pass
    srv = HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.mark.parametrize("status, code", [(200, 0), (500, 1)])
def test_health_follows_the_server(monkeypatch, status, code):
    srv = _serve(status)
    try:
        monkeypatch.setenv("KIT_HEALTH_PORT", str(srv.server_address[1]))
        assert health.main() == code
    finally:
        srv.shutdown()


def test_healthy_when_nothing_serves(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("KIT_HEALTH_PORT", str(port))
    assert health.main() == 0

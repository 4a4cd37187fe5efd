"""The HTTP client's retry rule against a stand-in server that answers each status on cue: a request timeout
(408) and back-pressure (429, with Retry-After) are retried as 5xx are; a request the server refuses (422) is
raised at once, naming its field. (A real replica killed under load: test_client_faults.py.)"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from sparserm.serve.client import HTTPRewardClient
from sparserm.serve.errors import ServeRequestError


def _server(first_status: int, first_body: dict):
    """A server whose first POST gets ``first_status``, every later one a score of 1.0; and its call log."""
    calls: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            calls.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            status, body = (first_status, first_body) if len(calls) == 1 else (200, {"scores": [1.0], "model": "m",
                                                                                     "truncated": []})
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            if status == 429:
                self.send_header("Retry-After", "0.3")
            self.end_headers()
            self.wfile.write(data)

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, calls


@pytest.mark.parametrize("status", [503, 429, 408])
def test_an_overloaded_service_is_retried(status):
    server, calls = _server(status, {"detail": "busy"})
    try:
        client = HTTPRewardClient(f"http://127.0.0.1:{server.server_port}", backoff_s=0.01)
        t0 = time.monotonic()
        assert client.score(["p"], ["r"]) == [1.0]
        waited = time.monotonic() - t0
    finally:
        server.shutdown()
    assert len(calls) == 2 and calls[0] == calls[1] == {"items": [{"prompt": "p", "response": "r"}]}
    if status == 429:
        assert waited >= 0.3  # its Retry-After, not the 0.01 s backoff


def test_a_service_busy_past_the_retries_raises_its_own_answer():
    server, calls = _server(429, {"detail": "queue full"})
    try:
        client = HTTPRewardClient(f"http://127.0.0.1:{server.server_port}", backoff_s=0.01, retries=0)
        with pytest.raises(ServeRequestError) as info:
            client.score(["p"], ["r"])
    finally:
        server.shutdown()
    assert len(calls) == 1 and info.value.status == 429 and info.value.message == "queue full"


def test_a_refused_request_is_raised_at_once_with_its_field():
    server, calls = _server(422, {"detail": "cannot encode item 0", "field": "items.0"})
    try:
        client = HTTPRewardClient(f"http://127.0.0.1:{server.server_port}", backoff_s=0.01)
        with pytest.raises(ServeRequestError) as info:
            client.score(["p"], ["r"])
    finally:
        server.shutdown()
    assert len(calls) == 1 and info.value.status == 422 and info.value.field == "items.0"

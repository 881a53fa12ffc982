"""Remote JWKS: served by a test server behind an Envoy cluster, fetched by the filter with
dispatch_http_call, refreshed on a timer, refetched on an unknown kid, kept when the server is down."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from tokens import AUDIENCE, ISSUER, Key, jwks

pytestmark = pytest.mark.usefixtures("require_envoy")


class JwksServer:
    """A JWKS endpoint whose document the test can change, and which can go down."""

    def __init__(self):
        self.document = {"keys": []}
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests += 1
                body = json.dumps(outer.document).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jwks_server():
    srv = JwksServer()
    yield srv
    try:
        srv.stop()
    except Exception:
        pass


def wait_until(pred, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_rotation_and_outage(demo, envoy_factory, jwks_server):
    k1 = Key.generate("EdDSA", kid="k1")
    k2 = Key.generate("ES256", kid="k2")
    jwks_server.document = jwks(k1)
    cfg = {
        "providers": [
            {
                "name": "remote",
                "issuer": ISSUER,
                "audiences": [AUDIENCE],
                "jwks": {
                    "remote": {"cluster": "jwks", "path": "/jwks.json", "refresh_seconds": 2, "min_refetch_seconds": 0}
                },
            }
        ],
        "clock_skew_seconds": 0,
    }
    gw = envoy_factory(demo, jwt_auth=cfg, extra_clusters={"jwks": jwks_server.port})
    stat = lambda name: gw.stats().get(f"wasmcustom.gatehouse.jwt_auth.{name}", 0)  # noqa: E731
    assert wait_until(lambda: stat("jwks.fetch_ok") >= 1), "the JWKS is fetched at start"

    def status(token):
        return requests.get(gw.url + "/api/echo", headers={"authorization": f"Bearer {token}"}, timeout=10).status_code

    assert status(k1.mint()) == 200

    # Rotation: the new key is published; a token with the new kid is accepted at once
    # (an unknown kid triggers a refetch while the request waits).
    jwks_server.document = jwks(k1, k2)
    assert status(k2.mint()) == 200

    # A kid nobody publishes is refused.
    assert status(Key.generate("EdDSA", kid="k3").mint()) == 401

    # Every worker keeps its own keys: let one refresh round (main thread + 2 workers) pass so
    # every worker has seen k2 before the server goes down.
    fetched = stat("jwks.fetch_ok")
    assert wait_until(lambda: stat("jwks.fetch_ok") >= fetched + 3, timeout=15), "periodic refresh"

    # Outage: the server goes down; refreshes fail, cached keys keep working.
    failed_before = stat("jwks.fetch_failed")
    jwks_server.stop()
    assert wait_until(lambda: stat("jwks.fetch_failed") > failed_before, timeout=15), "refresh failures are counted"
    assert status(k1.mint()) == 200
    assert status(k2.mint()) == 200
    assert "keeping the last good keys" in gw.log_text()

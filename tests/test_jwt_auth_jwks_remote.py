"""Remote JWKS: served by a test server behind an Envoy cluster, fetched by the filter with
dispatch_http_call, refreshed on a timer, refetched on an unknown kid, kept when the server is down."""

from __future__ import annotations

import pytest
import requests

from conftest import wait_until
from pages import JsonDocument
from tokens import AUDIENCE, ISSUER, Key, jwks

pytestmark = pytest.mark.usefixtures("require_envoy")


@pytest.fixture
def jwks_server():
    """The identity provider's JWKS endpoint: a document the test changes, and can take down."""
    srv = JsonDocument({"keys": []})
    yield srv
    srv.stop()


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

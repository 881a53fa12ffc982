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


def test_a_token_waits_for_a_jwks_that_has_not_loaded_with_503_never_401(demo, envoy_factory, jwks_server):
    """Until the provider's remote JWKS has loaded once (the first fetch under way, or every fetch
    so far failed), an unknown key says nothing against the token: 503 / close 1013 (retry), not
    401 / 4401 (which tells a browser to log in again). Found by the soak: the first requests after
    Envoy starts raced the first fetch."""
    import websockets

    from conftest import run_async

    key = Key.generate("EdDSA", kid="k1")
    jwks_server.document = {"not": "a jwks"}   # every fetch fails until the IdP is fixed
    cfg = {
        "providers": [{
            "name": "remote", "issuer": ISSUER, "audiences": [AUDIENCE],
            "jwks": {"remote": {"cluster": "jwks", "path": "/jwks.json", "refresh_seconds": 1,
                                "min_refetch_seconds": 60}},
        }],
    }
    gw = envoy_factory(demo, jwt_auth=cfg, extra_clusters={"jwks": jwks_server.port})
    stat = lambda name: gw.stats().get(f"wasmcustom.gatehouse.jwt_auth.{name}", 0)  # noqa: E731
    assert wait_until(lambda: stat("jwks.fetch_failed") >= 1), "the first fetch fails"
    token = key.mint()

    r = requests.get(gw.url + "/api/echo", headers={"authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 503, r.text
    assert token not in r.text

    async def upgrade():
        async with websockets.connect(gw.ws_url + "/ws/echo", subprotocols=["sip", "bearer." + token],
                                      open_timeout=10) as ws:
            try:
                await ws.recv()
            except websockets.ConnectionClosed as e:
                return e.rcvd.code if e.rcvd else None
        return None

    assert run_async(upgrade()) == 1013
    assert stat("denied.jwks_unavailable") >= 2
    assert stat("denied.unknown_key") == 0

    # The IdP recovers: the next refresh loads the keys, and the same token is good.
    jwks_server.document = jwks(key)
    assert wait_until(lambda: requests.get(gw.url + "/api/echo", headers={"authorization": f"Bearer {token}"},
                                           timeout=10).status_code == 200, timeout=15)

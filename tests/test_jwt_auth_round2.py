"""jwt-auth, security round 2 (issue 13), in real Envoy in front of the real demo: the verified
token forwarded upstream, every credential location stripped, the verifying key's id published,
the origin check of cookie-sourced tokens, dot-segment paths refused."""

from __future__ import annotations

import asyncio
import http.client
import time

import jwt
import pytest
import requests
import websockets

from conftest import run_async as run, start_shipped, wait_until
from tokens import AUDIENCE, ISSUER, Key, claims_of, jwt_auth_config, unsigned

pytestmark = pytest.mark.usefixtures("require_envoy")

WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def counter(gw, name):
    return gw.stats().get(f"wasmcustom.gatehouse.jwt_auth.{name}", 0)


def raw(gw, method: str, path: str, headers: list[tuple[str, str]]) -> tuple[int, bytes]:
    """A request sent byte for byte (no client-side path normalisation, repeated headers kept)."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    conn.putheader("host", "gw.test")
    for k, v in headers:
        conn.putheader(k, v)
    conn.endheaders()
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, body


async def _ws_outcome(url: str, **kw):
    """("open", echo) or ("closed", code, reason)."""
    async with websockets.connect(url, open_timeout=10, **kw) as ws:
        try:
            await ws.send("hello")
            return ("open", await asyncio.wait_for(ws.recv(), 10))
        except websockets.ConnectionClosed:
            return ("closed", ws.close_code, ws.close_reason)


def ws_outcome(url, **kw):
    return run(_ws_outcome(url, **kw))


# -------------------------------------------------------------- 1. forward the verified token


def test_shipped_api_gets_the_verified_token_after_a_cookie_only_request(demo, envoy_factory):
    gw = start_shipped(envoy_factory, demo)
    r = requests.post(gw.url + "/dev/login?user=forward-check", timeout=10)
    assert r.ok, r.text
    token = r.json()["access_token"]
    jar = "; ".join(c.split(";", 1)[0] for c in r.raw.headers.getlist("set-cookie"))
    csrf = r.json()["csrf_token"]
    seen = requests.get(gw.url + "/api/echo", headers={"cookie": jar}, timeout=10).json()["headers"]
    assert seen["authorization"].startswith("Bearer "), seen
    forwarded = seen["authorization"].removeprefix("Bearer ")
    assert claims_of(forwarded)["sub"] == claims_of(token)["sub"] == "forward-check"
    assert "gh-at" not in seen.get("cookie", ""), "the cookie token itself never reaches the API"
    # A forged bearer token never rides along: it is verified (and refused) or replaced.
    forged = unsigned({"iss": "https://demo.gatehouse.local", "sub": "mallory", "exp": 2_000_000_000})
    r = requests.get(gw.url + "/api/echo", headers={"authorization": f"Bearer {forged}"}, timeout=10)
    assert r.status_code == 401
    # State-changing with the cookie (token-proxy's CSRF check passes): still the verified one.
    r = requests.post(gw.url + "/api/echo", headers={"cookie": jar, "x-gh-csrf": csrf, "origin": gw.url}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["headers"]["authorization"] == seen["authorization"]


# ---------------------------------------------------- 4. every credential location stripped


@pytest.fixture(scope="module")
def strip_gw(key, demo, envoy_factory):
    cfg = jwt_auth_config(key, rules=[{"match": {"prefix": "/api/open"}, "allow_missing": True}])
    return envoy_factory(demo, jwt_auth=cfg)


def test_subprotocol_token_with_a_forged_authorization_is_refused(strip_gw, key):
    forged = unsigned({"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "exp": 2_000_000_000})
    before = counter(strip_gw, "denied.multiple_tokens")
    got = ws_outcome(strip_gw.ws_url + "/ws/echo", subprotocols=["sip", "bearer." + key.mint()],
                     additional_headers={"authorization": f"Bearer {forged}"})
    assert got[:2] == ("closed", 4400), got
    assert counter(strip_gw, "denied.multiple_tokens") == before + 1
    # The same token in both places is one credential: allowed, and neither copy goes upstream.
    token = key.mint()
    got = ws_outcome(strip_gw.ws_url + "/ws/echo", subprotocols=["sip", "bearer." + token],
                     additional_headers={"authorization": f"Bearer {token}"})
    assert got[0] == "open", got


def test_allow_missing_route_strips_tab_bearer_and_repeated_authorization(strip_gw, key):
    token = key.mint()
    for headers in (
        [("authorization", f"Bearer\t{token}")],
        [("authorization", "Basic YTpi"), ("authorization", f"Bearer {token}")],
        [("authorization", "Basic YTpi")],
    ):
        status, body = raw(strip_gw, "GET", "/api/open/echo", headers)
        assert status == 200, (headers, body)
        assert b'"authorization"' not in body, (headers, body)
    # Two different bearer tokens in two headers: 400, not "the first one wins".
    other = key.mint(sub="bob")
    status, _ = raw(strip_gw, "GET", "/api/open/echo",
                    [("authorization", f"Bearer {token}"), ("authorization", f"Bearer {other}")])
    assert status == 400
    # A forged token on an allow_missing route is verified, not waved through.
    forged = unsigned({"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "exp": 2_000_000_000})
    status, _ = raw(strip_gw, "GET", "/api/open/echo", [("authorization", f"Bearer\t{forged}")])
    assert status == 401


# ------------------------------------------------------------ 6. dot-segments walk out of rules


@pytest.mark.parametrize("path,reason", [
    ("/api/open/../echo", "path_dot_segment"),
    ("/api/open/%2e%2e/echo", "path_dot_segment"),
    ("/api/open/.%2E/echo", "path_dot_segment"),
    ("/api/open/..%2fecho", "path_separator"),
    ("/api/open/%5c../echo", "path_separator"),
])
def test_dot_segment_paths_no_longer_match_an_allow_missing_rule(strip_gw, path, reason):
    assert raw(strip_gw, "GET", "/api/open/echo", [])[0] == 200, "the rule itself lets through"
    before = counter(strip_gw, f"denied.{reason}")
    status, body = raw(strip_gw, "GET", path, [])
    assert status == 400, body
    assert counter(strip_gw, f"denied.{reason}") == before + 1


def test_dot_segment_upgrade_closes_4400(strip_gw, key):
    got = ws_outcome(strip_gw.ws_url + "/ws/%2e%2e/echo", subprotocols=["sip", "bearer." + key.mint()])
    assert got[:2] == ("closed", 4400), got


# --------------------------------------------------- 5. origin check for cookie-sourced tokens


@pytest.fixture(scope="module")
def cookie_gw(key, demo, envoy_factory):
    cfg = jwt_auth_config(
        key,
        trusted_web_origins=["https://app.test"],
        rules=[
            {"match": {"prefix": "/api/"}, "sources": [{"cookie": {"name": "at"}}]},
            {"match": {"prefix": "/ws/cookie/"}, "sources": [{"cookie": {"name": "at"}}]},
            {"match": {"prefix": "/ws/"}, "sources": [{"websocket_protocol": {"prefix": "bearer."}}]},
        ],
    )
    return envoy_factory(demo, jwt_auth=cfg)


def test_cookie_token_on_a_state_changing_request_needs_a_trusted_origin(cookie_gw, key):
    cookie = f"at={key.mint()}; theme=dark"
    url = cookie_gw.url + "/api/echo"
    assert requests.get(url, headers={"cookie": cookie, "origin": "https://evil.test"}, timeout=10).status_code == 200
    before = counter(cookie_gw, "denied.origin")
    for headers in ({"origin": "https://evil.test"}, {}, {"sec-fetch-site": "same-site"}):
        r = requests.post(url, headers={"cookie": cookie, **headers}, timeout=10)
        assert r.status_code == 403, headers
    assert counter(cookie_gw, "denied.origin") == before + 3
    r = requests.post(url, headers={"cookie": cookie, "origin": "https://app.test"}, timeout=10)
    assert r.status_code == 200
    assert r.json()["headers"].get("cookie") == "theme=dark", "the token cookie is stripped"
    r = requests.delete(url, headers={"cookie": cookie, "sec-fetch-site": "same-origin"}, timeout=10)
    assert r.status_code == 200


def test_cookie_token_on_an_upgrade_needs_a_trusted_origin(cookie_gw, key):
    cookie = f"at={key.mint()}"
    url = cookie_gw.ws_url + "/ws/cookie/echo"
    assert ws_outcome(url, subprotocols=["sip"], additional_headers={"cookie": cookie})[:2] == ("closed", 4403), "no Origin"
    assert ws_outcome(url, subprotocols=["sip"], additional_headers={"cookie": cookie},
                      origin="https://evil.test")[:2] == ("closed", 4403)
    assert ws_outcome(url, subprotocols=["sip"], additional_headers={"cookie": cookie},
                      origin="https://app.test")[0] == "open"
    # The subprotocol route takes no cookie, and a subprotocol token needs no Origin.
    assert ws_outcome(cookie_gw.ws_url + "/ws/echo", subprotocols=["sip"],
                      additional_headers={"cookie": cookie})[:2] == ("closed", 4401)
    assert ws_outcome(cookie_gw.ws_url + "/ws/echo", subprotocols=["sip", "bearer." + key.mint()],
                      origin="https://evil.test")[0] == "open"


def test_cookie_source_without_trusted_origins_does_not_load(key, demo, envoy_factory):
    cfg = jwt_auth_config(key, sources=[{"cookie": {"name": "at"}}])
    with pytest.raises(Exception) as err:
        envoy_factory(demo, jwt_auth=cfg)
    assert "config error at trusted_web_origins" in str(err.value)


# ------------------------------------------------ 3. the kid of the key that verified, published


def test_kidless_token_by_a_revoked_key_is_refused(demo, envoy_factory):
    from test_session_binding import FeedServer, feed_config, make_gateway, unique

    feed = FeedServer()
    try:
        k1, k2 = Key.generate("EdDSA", kid=unique("k1")), Key.generate("EdDSA", kid=unique("k2"))
        gw = make_gateway("jwt_auth", k1, demo, envoy_factory, keys=[k1, k2],
                          sb_extra={"revocation": feed_config(max_stale=30)}, clusters={"revocation": feed.port})
        assert wait_until(lambda: gw.stat("revocation.fetch_ok") >= 2, 10)
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "bob", "iat": now, "exp": now + 300, "scope": "phone:call"}
        kidless = jwt.encode(body, k2.private, algorithm="EdDSA")
        assert "kid" not in jwt.get_unverified_header(kidless)
        url = gw.url("/ws/echo")
        assert ws_outcome(url, subprotocols=["sip", "bearer." + kidless])[0] == "open", "not revoked yet"
        feed.set({"kid": k2.kid})
        assert ws_outcome(url, subprotocols=["sip", "bearer." + kidless])[:2] == ("closed", 4401)
        r = requests.get(gw.envoy.url + "/api/echo", headers={"authorization": f"Bearer {kidless}"}, timeout=5)
        assert r.status_code == 401
        assert ws_outcome(url, subprotocols=["sip", "bearer." + jwt.encode(body, k1.private, algorithm="EdDSA")])[0] == "open"
    finally:
        feed.stop()

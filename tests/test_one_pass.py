"""The one-pass filter (`root_id: gatehouse`, issue 14) in real Envoy: the /api/ chain (cookie →
bearer → verify → binding) and the /ws/ chain as ONE filter, each stage refusing with the status /
close code and the stat of its separate filter, one live socket closed 4401 at expiry and on
revocation with one close frame, re-auth on the socket, page-guard on a page, turn-credentials'
answer, and a bad one-pass config refused at load naming the field."""

from __future__ import annotations

import asyncio
import json
import secrets
import time

import pytest
import requests
import websockets

from conftest import COOKIE_KEYS_VAR, closes_without, one_pass_filter, run_async as run, wait_until
from cookies import seal
from pages import JsonDocument
from tokens import claims_of, jwt_auth_config

pytestmark = pytest.mark.usefixtures("require_envoy")

TURN_SECRET = secrets.token_hex(32)


class Feed(JsonDocument):
    def __init__(self):
        super().__init__({"revoked": []})


@pytest.fixture(scope="module")
def feed():
    srv = Feed()
    yield srv
    srv.stop()


def stages(key, origin: str) -> dict:
    return {
        "token_proxy": {
            "cookie_prefix": "gh",
            "encryption_keys_env": COOKIE_KEYS_VAR,
            "trusted_web_origins": [origin],
            "allow_tokens": True,
        },
        "jwt_auth": jwt_auth_config(
            key,
            sources=[{"websocket_protocol": {"prefix": "bearer."}}, {"authorization": {}}],
            session_claims=["sid"],
            reauth_type="gatehouse.reauth",
            rules=[{"match": {"prefix": "/api/scoped"}, "require": [{"claim": "scope", "contains": "admin"}]}],
        ),
        "session_binding": {
            "rules": [
                {"match": {"prefix": "/ws/once/"}, "single_use": True},
                {"match": {"prefix": "/ws/"}},
                {"match": {"prefix": "/api/"}},
                {"match": {"prefix": "/"}, "disabled": True},
            ],
            "revocation": {"cluster": "revocation", "path": "/revoked.json", "authority": "feed",
                           "refresh_seconds": 1, "timeout_ms": 500, "max_stale_seconds": 300, "when_stale": "open"},
        },
        "turn_credentials": {
            "urls": ["turn:127.0.0.1:3478?transport=udp"],
            "allowed_origins": [origin],
            "secret": {"env": "GATEHOUSE_TURN_SECRET"},
            "ttl_seconds": 600,
        },
        "page_guard": {
            "csp": {"default-src": ["'self'"], "script-src": []},
            "rules": [{"match": {"prefix": "/api/"}, "disabled": True}, {"match": {"prefix": "/ws/"}, "disabled": True}],
        },
    }


@pytest.fixture(scope="module")
def gw(key, demo, envoy_factory, feed):
    from conftest import free_port
    port = free_port()
    env = {COOKIE_KEYS_VAR: demo.cookie_keys, "GATEHOUSE_TURN_SECRET": TURN_SECRET}
    envoy = envoy_factory(
        demo, port=port, env=env, extra_clusters={"revocation": feed.port},
        http_filters=[one_pass_filter(stages(key, f"http://127.0.0.1:{port}"), list(env))],
    )
    assert wait_until(lambda: stat(envoy, "session_binding", "revocation.fetch_ok") >= 1, 10)
    return envoy


def stat(envoy, stage: str, name: str) -> int:
    return envoy.stats().get(f"wasmcustom.gatehouse.{stage}.{name}", 0)


def test_the_api_chain_in_one_filter_cookie_to_bearer_to_verified(gw, key, demo):
    token = key.mint(ttl=60, sid="s1")
    csrf = "c" * 16
    cookie = f"gh-at={seal(demo.cookie_keys.split(',')[0], token)}; gh-csrf={seal(demo.cookie_keys.split(',')[0], csrf)}"
    before = stat(gw, "jwt_auth", "allowed")
    r = requests.get(gw.url + "/api/echo", headers={"cookie": cookie}, timeout=5)
    assert r.status_code == 200, r.text
    assert stat(gw, "token_proxy", "forwarded") >= 1
    assert stat(gw, "jwt_auth", "allowed") == before + 1
    assert stat(gw, "session_binding", "allowed") >= 1
    # The claims still go out as filter state (nothing of the token reaches the upstream as a cookie).
    assert "gh-at" not in r.json()["headers"].get("cookie", "")


def test_each_stage_refuses_with_its_own_status_and_stat(gw, key, demo):
    # jwt-auth: no token (401, RFC 6750).
    before = stat(gw, "jwt_auth", "denied.missing")
    r = requests.get(gw.url + "/api/echo", timeout=5)
    assert r.status_code == 401 and "Bearer" in r.headers.get("www-authenticate", "")
    assert stat(gw, "jwt_auth", "denied.missing") == before + 1
    # jwt-auth: a valid token without the scope (403).
    r = requests.get(gw.url + "/api/scoped", headers={"authorization": f"Bearer {key.mint(ttl=60)}"}, timeout=5)
    assert r.status_code == 403
    assert stat(gw, "jwt_auth", "denied.forbidden") >= 1
    # token-proxy: a cookie-carrying write from an untrusted origin (401), before jwt-auth runs.
    allowed = stat(gw, "jwt_auth", "allowed") + stat(gw, "jwt_auth", "denied.missing")
    k = demo.cookie_keys.split(",")[0]
    cookie = f"gh-at={seal(k, key.mint(ttl=60))}; gh-csrf={seal(k, 'c' * 16)}"
    r = requests.post(gw.url + "/api/echo", headers={"cookie": cookie, "origin": "https://evil.example",
                                                     "x-csrf-token": "c" * 16}, timeout=5)
    assert r.status_code == 401, r.text
    assert stat(gw, "token_proxy", "denied.origin") >= 1
    assert stat(gw, "jwt_auth", "allowed") + stat(gw, "jwt_auth", "denied.missing") == allowed, \
        "a refusal ends the pass: jwt-auth never saw the request"


def test_single_use_refusal_on_the_socket_is_session_bindings(gw, key):
    token = key.mint(ttl=60)

    async def go():
        async with websockets.connect(gw.ws_url + "/ws/once/echo", subprotocols=["sip", "bearer." + token],
                                      open_timeout=10) as ws:
            await ws.send("hi")
            assert await ws.recv() == "hi"
        async with websockets.connect(gw.ws_url + "/ws/once/echo", subprotocols=["sip", "bearer." + token],
                                      open_timeout=10) as ws:
            try:
                await asyncio.wait_for(ws.recv(), 5)
            except websockets.ConnectionClosed:
                pass
            return ws.close_code

    assert run(go()) == 4401
    assert stat(gw, "session_binding", "denied.replay") >= 1


def test_a_live_socket_closes_4401_at_expiry_with_one_close_frame(gw, key):
    token = key.mint(ttl=2)
    before = stat(gw, "jwt_auth", "ws.expired_close")

    async def go():
        async with websockets.connect(gw.ws_url + "/ws/echo", subprotocols=["sip", "bearer." + token],
                                      open_timeout=10) as ws:
            await ws.send("before")
            assert await ws.recv() == "before"
            await asyncio.sleep(2.5)
            return await closes_without(ws, "after", "a frame after expiry must not reach the upstream")

    code, _ = run(go())
    assert code == 4401
    assert stat(gw, "jwt_auth", "ws.expired_close") == before + 1
    # One socket, one close: session-binding closed nothing of its own.
    assert not any(k.startswith("wasmcustom.gatehouse.session_binding.ws.closed.") and v for k, v in gw.stats().items())


def test_a_live_socket_closes_4401_on_revocation_and_reauth_extends_it(gw, key, feed):
    token = key.mint(ttl=3, sid="s-live")
    fresh = key.mint(ttl=60, sid="s-live")

    async def go():
        async with websockets.connect(gw.ws_url + "/ws/echo", subprotocols=["sip", "bearer." + token],
                                      open_timeout=10) as ws:
            await ws.send(json.dumps({"type": "gatehouse.reauth", "token": fresh}))
            await ws.send("a")
            assert await ws.recv() == "a"
            await asyncio.sleep(3.5)
            # Past the connect token's expiry: the re-auth keeps the socket open.
            await ws.send("b")
            assert await ws.recv() == "b"
            seen = feed.fetches
            feed.document = {"revoked": [{"jti": claims_of(fresh)["jti"]}]}
            await asyncio.to_thread(wait_until, lambda: feed.fetches >= seen + 6, 10)
            await asyncio.sleep(0.3)
            return await closes_without(ws, "after", "a frame after revocation must not reach the upstream")

    try:
        assert run(go()) == (4401, "token revoked")
    finally:
        feed.document = {"revoked": []}
    assert stat(gw, "jwt_auth", "ws.reauth") >= 1
    assert stat(gw, "session_binding", "ws.closed.revoked_jti") == 1


def test_turn_credentials_and_page_guard_stages(gw, key):
    r = requests.post(gw.url + "/turn-credentials", timeout=5,
                      headers={"authorization": f"Bearer {key.mint(ttl=60, sub='alice')}", "origin": gw.url})
    assert r.status_code == 200, r.text
    server = r.json()["iceServers"][0]
    assert server["urls"] and server["username"].endswith(":alice")
    assert stat(gw, "turn_credentials", "minted") >= 1
    # page-guard on a page (jwt-auth lets the page through only with a token: it is one pass).
    r = requests.get(gw.url + "/", headers={"authorization": f"Bearer {key.mint(ttl=60)}"}, timeout=5)
    assert r.status_code == 200
    assert "default-src 'self'" in r.headers.get("content-security-policy", "")


@pytest.mark.parametrize("config, field", [
    ({"jwt_auth": {"providers": [{"nmae": "x"}]}}, "jwt_auth.providers"),
    ({"jwt_auth": {}, "jwt_authn": {}}, "jwt_authn"),
    ({"session_binding": {"rules": [{"match": {"prefix": "/"}, "single_us": True}]}}, "session_binding.rules"),
])
def test_a_bad_one_pass_config_is_refused_at_load_naming_the_field(tmp_path, demo, config, field):
    import subprocess
    from conftest import ENVOY_BIN, ROOT
    cfg = {
        "static_resources": {
            "listeners": [{"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                           "typed_config": {
                                                               "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                                               "stat_prefix": "x",
                                                               "route_config": {"virtual_hosts": []},
                                                               "http_filters": [one_pass_filter(config), {
                                                                   "name": "envoy.filters.http.router",
                                                                   "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                                                           }}]}]}],
        },
    }
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    r = subprocess.run([str(ENVOY_BIN), "--mode", "init_only", "-c", str(path), "--use-dynamic-base-id",
                        "--log-level", "info"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-2000:]
    assert field in out, out[-3000:]

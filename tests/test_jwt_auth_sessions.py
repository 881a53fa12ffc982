"""Live sockets follow their session, not the token they connected with: a fresh token of the same
session on any guarded request (on any Envoy worker), or in an in-band re-auth frame, keeps the
socket open; without one it closes
with 4401 "session expired"; an absolute lifetime ends it whatever the refreshes; a `wss_only`
route refuses plain ws://."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import requests
import websockets

from conftest import Demo, run_async
from tokens import claims_of, jwt_auth_config

pytestmark = pytest.mark.usefixtures("require_envoy")


@pytest.fixture(scope="module")
def gw(key, demo, envoy_factory):
    cfg = jwt_auth_config(
        key,
        session_claims=["sid", "sub"],
        reauth_type="gatehouse.reauth",
        rules=[
            {"match": {"prefix": "/ws/secure"}, "wss_only": True},
            {"match": {"prefix": "/ws/short"}, "max_socket_seconds": 3},
        ],
    )
    return envoy_factory(demo, jwt_auth=cfg)


def refresh(gw, token):
    """A guarded API call with a fresh token: what a token-handler SPA does on every request."""
    r = requests.get(gw.url + "/api/echo", headers={"authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 200, r.text


async def chat(url, token, seconds, on_tick=None, headers=None):
    """Send a frame every 0.5 s for `seconds`; returns (frames echoed, close code, close reason)."""
    echoed = 0
    async with websockets.connect(url, subprotocols=["sip", "bearer." + token], additional_headers=headers) as ws:
        start = time.monotonic()
        try:
            while time.monotonic() - start < seconds:
                if on_tick:
                    on_tick(time.monotonic() - start)
                await ws.send("ping")
                assert await asyncio.wait_for(ws.recv(), 5) == "ping"
                echoed += 1
                await asyncio.sleep(0.5)
        except websockets.ConnectionClosed:
            pass
        return echoed, ws.close_code, ws.close_reason


def test_refreshes_keep_the_socket_open_for_20_seconds(gw, key):
    last = [0.0]

    def every_3s(elapsed):
        if elapsed - last[0] >= 3:
            last[0] = elapsed
            refresh(gw, key.mint(ttl=5, sid="call-1"))

    echoed, code, _ = run_async(chat(gw.ws_url + "/ws/echo", key.mint(ttl=5, sid="call-1"), 20, every_3s), 60)
    assert code is None, "the socket must still be open after 20 s of refreshes"
    assert echoed >= 35


def test_without_a_fresh_token_the_session_expires(gw, key):
    t0 = time.time()
    echoed, code, reason = run_async(chat(gw.ws_url + "/ws/echo", key.mint(ttl=3, sid="call-2"), 15), 60)
    assert (code, reason) == (4401, "session expired")
    # The socket closes on its first frame after the deadline: frames go every 0.5 s.
    assert time.time() - t0 < 3 + 2


def test_a_fresh_token_of_another_session_does_not_extend(gw, key):
    refreshed = []

    def other_session(elapsed):
        if not refreshed:
            refreshed.append(elapsed)
            refresh(gw, key.mint(ttl=60, sid="someone-else"))

    _, code, reason = run_async(chat(gw.ws_url + "/ws/echo", key.mint(ttl=3, sid="call-3"), 15, other_session), 60)
    assert (code, reason) == (4401, "session expired")


def test_the_maximum_socket_lifetime_wins_over_refreshes(gw, key):
    def keep_refreshing(elapsed):
        refresh(gw, key.mint(ttl=60, sid="call-4"))

    t0 = time.time()
    _, code, reason = run_async(chat(gw.ws_url + "/ws/short", key.mint(ttl=60, sid="call-4"), 15, keep_refreshing), 60)
    assert (code, reason) == (4401, "socket lifetime exceeded")
    assert time.time() - t0 < 3 + 2


async def close_of(url, token, headers=None):
    async with websockets.connect(url, subprotocols=["sip", "bearer." + token], additional_headers=headers) as ws:
        try:
            await asyncio.wait_for(ws.recv(), 10)
        except websockets.ConnectionClosed:
            pass
        return ws.close_code, ws.close_reason


def test_plain_ws_is_refused_on_a_wss_only_route(gw, key, demo, envoy_factory):
    # A client-sent x-forwarded-proto is not believed unless the hop before Envoy is trusted.
    code, _ = run_async(close_of(gw.ws_url + "/ws/secure", key.mint(), {"x-forwarded-proto": "https"}))
    assert code == 4400
    assert gw.stats().get("wasmcustom.gatehouse.jwt_auth.denied.insecure_transport", 0) >= 1
    assert "denied (insecure_transport)" in gw.log_text()
    trusting = envoy_factory(
        demo,
        jwt_auth=jwt_auth_config(key, trust_forwarded_proto=True,
                                 rules=[{"match": {"prefix": "/ws/secure"}, "wss_only": True}]),
    )
    # TLS terminated by a trusted hop counts as wss.
    echoed, code, _ = run_async(
        chat(trusting.ws_url + "/ws/secure", key.mint(), 1, headers={"x-forwarded-proto": "https"}))
    assert echoed >= 1 and code is None
    code, _ = run_async(close_of(trusting.ws_url + "/ws/secure", key.mint()))
    assert code == 4400, "without x-forwarded-proto: https the upgrade is refused"


def reauth_frame(token):
    return json.dumps({"type": "gatehouse.reauth", "token": token})


def test_in_band_reauth_extends_the_socket_and_never_reaches_the_upstream(gw, key):
    async def go():
        async with websockets.connect(gw.ws_url + "/ws/echo",
                                      subprotocols=["sip", "bearer." + key.mint(ttl=3, sid="call-5")]) as ws:
            await ws.send("__headers__")
            seen = json.loads(await ws.recv())
            start = time.monotonic()
            refreshed = 0
            while time.monotonic() - start < 8:
                if time.monotonic() - start > 1 + 2 * refreshed:
                    await ws.send(reauth_frame(key.mint(ttl=3, sid="call-5")))
                    refreshed += 1
                await ws.send("ping")
                # The demo echoes every text frame: a re-auth frame that reached it would come back.
                assert await asyncio.wait_for(ws.recv(), 5) == "ping"
                await asyncio.sleep(0.4)
            return seen, ws.close_code

    seen, code = run_async(go(), 60)
    assert code is None, "re-auth frames every 2 s keep a 3 s token's socket open for 8 s"
    assert "sec-websocket-extensions" not in seen, "no permessage-deflate: re-auth frames stay readable"
    assert gw.stats().get("wasmcustom.gatehouse.jwt_auth.ws.reauth", 0) >= 3


def test_a_reauth_token_of_another_session_closes_4401(gw, key):
    async def go():
        async with websockets.connect(gw.ws_url + "/ws/echo",
                                      subprotocols=["sip", "bearer." + key.mint(ttl=60, sid="call-6")]) as ws:
            await ws.send(reauth_frame(key.mint(ttl=60, sid="intruder")))
            try:
                while True:
                    assert await asyncio.wait_for(ws.recv(), 5) != reauth_frame, "never forwarded"
            except websockets.ConnectionClosed:
                pass
            return ws.close_code, ws.close_reason

    assert run_async(go(), 30) == (4401, "other session")


def test_a_socket_nobody_speaks_on_closes_within_the_keepalive_bound(key, envoy_factory, tmp_path):
    """Proxy-wasm has no per-stream timer: the close rides on the next frame. With the upstream's
    keepalive ping every second, a silent client's socket closes within deadline + 1 s."""
    pinging = Demo(tmp_path, GATEHOUSE_DEMO_PING_SECONDS="1")
    try:
        gw = envoy_factory(pinging, jwt_auth=jwt_auth_config(key))

        async def go():
            token = key.mint(ttl=2)
            deadline = claims_of(token)["exp"]
            async with websockets.connect(gw.ws_url + "/ws/echo", subprotocols=["sip", "bearer." + token]) as ws:
                try:
                    await asyncio.wait_for(ws.recv(), 15)  # the client never sends anything
                except websockets.ConnectionClosed:
                    pass
                return ws.close_code, ws.close_reason, time.time() - deadline

        code, reason, late = run_async(go(), 30)
        assert (code, reason) == (4401, "token expired")
        assert late < 1 + 1.5, f"closed {late:.1f} s after the deadline; the bound is the ping interval"
    finally:
        pinging.stop()

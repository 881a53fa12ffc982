"""jwt-auth on WebSocket upgrades, with a real client library (websockets), real Envoy and the
real demo upstream. The client must read the close code the filter chose."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import websockets

from conftest import closes_without, run_async as run
from tokens import jwt_auth_config

pytestmark = pytest.mark.usefixtures("require_envoy")


@pytest.fixture(scope="module")
def gw(key, demo, envoy_factory):
    cfg = jwt_auth_config(
        key,
        rules=[{"match": {"prefix": "/ws/"}, "require": [{"claim": "scope", "contains": "phone:call"}]}],
    )
    return envoy_factory(demo, jwt_auth=cfg)


async def close_code_of(url, protocols):
    """Connect and return (code, reason) of the close the server sends."""
    async with websockets.connect(url, subprotocols=protocols, open_timeout=10) as ws:
        try:
            await asyncio.wait_for(ws.recv(), 10)
        except websockets.ConnectionClosed:
            pass
        return ws.close_code, ws.close_reason


def test_valid_token_echoes_and_upstream_never_sees_it(gw, key):
    token = key.mint()

    async def go():
        async with websockets.connect(gw.ws_url + "/ws/echo", subprotocols=["sip", "bearer." + token]) as ws:
            assert ws.subprotocol == "sip"
            await ws.send("hello")
            assert await ws.recv() == "hello"
            await ws.send("__headers__")
            return json.loads(await ws.recv())

    headers = run(go())
    assert headers.get("sec-websocket-protocol") == "sip"
    assert token not in json.dumps(headers), "the token subprotocol must be removed before upstream"


@pytest.mark.parametrize(
    "case,code",
    [("garbage", 4401), ("expired", 4401), ("wrong_scope", 4403), ("missing", 4401), ("only_token", 4400)],
)
def test_refused_upgrades_close_with_the_right_code(gw, key, case, code):
    protocols = {
        "garbage": ["sip", "bearer.not-a-token"],
        "expired": ["sip", "bearer." + key.mint(ttl=-5)],
        "wrong_scope": ["sip", "bearer." + key.mint(scope="read")],
        "missing": ["sip"],
        "only_token": ["bearer." + key.mint()],
    }[case]
    got, reason = run(close_code_of(gw.ws_url + "/ws/echo", protocols))
    assert got == code, reason


def test_token_in_query_is_4400(gw, key):
    got, _ = run(close_code_of(gw.ws_url + "/ws/echo?access_token=" + key.mint(), ["sip"]))
    assert got == 4400


def test_token_expiring_mid_connection_closes_4401_when_the_client_sends(gw, key):
    token = key.mint(ttl=2)

    async def go():
        async with websockets.connect(gw.ws_url + "/ws/echo", subprotocols=["sip", "bearer." + token]) as ws:
            await ws.send("before")
            assert await ws.recv() == "before"
            await asyncio.sleep(max(0.0, json_exp(token) - time.time()) + 1.2)
            return await closes_without(ws, "after expiry", "a frame after expiry must not reach the upstream")

    code, reason = run(go())
    assert (code, reason) == (4401, "token expired")


def test_token_expiring_mid_connection_closes_4401_when_the_upstream_sends(gw, key):
    token = key.mint(ttl=2)

    async def go():
        async with websockets.connect(gw.ws_url + "/ws/echo", subprotocols=["sip", "bearer." + token]) as ws:
            # Ask the demo to push a frame after the token has expired; the client stays silent.
            delay_ms = int((json_exp(token) - time.time() + 1.5) * 1000)
            await ws.send(f"__later__:{delay_ms}:late")
            code, _ = await closes_without(ws, "late", "a frame after expiry must not reach the client",
                                           timeout=15, send=False)
            return code

    assert run(go()) == 4401


def json_exp(token):
    from tokens import claims_of

    return claims_of(token)["exp"]

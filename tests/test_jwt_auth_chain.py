"""jwt-auth extends a session only once the whole filter chain allowed the request (issue 13,
item 9), in real Envoy: a later filter's local reply is not `via_upstream` and extends nothing;
an in-band re-auth extends its own socket only, and its verified token is published as filter
state that each accepted re-auth overwrites mid-stream, seen by a later filter on the same chunk."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
import requests
import websockets

import conftest
from conftest import run_async, wasm_filter
from tokens import claims_of, jwt_auth_config

pytestmark = pytest.mark.usefixtures("require_envoy")

ROUTES = [
    # Answered by the router (a filter after jwt-auth) with a local reply: never the upstream.
    {"name": "denied", "match": {"prefix": "/api/denied"}, "direct_response": {"status": 403, "body": {"inline_string": "no"}}},
    {"name": "default", "match": {"prefix": "/"}, "route": {"cluster": "demo", "timeout": "0s"}},
]


def session_cfg(key):
    return jwt_auth_config(key, session_claims=["sid"], reauth_type="gatehouse.reauth")


@pytest.fixture(scope="module")
def gw(key, demo, envoy_factory):
    return envoy_factory(demo, jwt_auth=session_cfg(key), routes=ROUTES)


def reauth_frame(token):
    return json.dumps({"type": "gatehouse.reauth", "token": token})


async def chat(url, token, seconds, on_tick=None, frames=None):
    """Send a frame every 0.4 s for `seconds` (`frames(elapsed)` may give extra frames to send
    first); returns (close code, close reason), (None, None) while still open."""
    async with websockets.connect(url, subprotocols=["sip", "bearer." + token], open_timeout=10) as ws:
        start = time.monotonic()
        try:
            while time.monotonic() - start < seconds:
                elapsed = time.monotonic() - start
                if on_tick:
                    await asyncio.to_thread(on_tick, elapsed)
                for extra in (frames(elapsed) if frames else []):
                    await ws.send(extra)
                await ws.send("ping")
                assert await asyncio.wait_for(ws.recv(), 5) == "ping"
                await asyncio.sleep(0.4)
        except websockets.ConnectionClosed:
            pass
        return ws.close_code, ws.close_reason


def once_after(t, fn):
    done = [False]

    def tick(elapsed):
        if elapsed >= t and not done[0]:
            done[0] = True
            fn()

    return tick


def test_a_request_a_later_filter_refuses_does_not_extend_the_session(gw, key):
    sid = uuid.uuid4().hex

    def refused_refresh():
        r = requests.get(gw.url + "/api/denied", headers={"authorization": f"Bearer {key.mint(ttl=60, sid=sid)}"}, timeout=5)
        assert r.status_code == 403 and r.text == "no"

    got = run_async(chat(gw.ws_url + "/ws/echo", key.mint(ttl=3, sid=sid), 7, once_after(1, refused_refresh)), 60)
    assert got == (4401, "session expired"), "a refused request must not extend the session"


def test_a_request_the_upstream_answers_extends_the_session(gw, key):
    sid = uuid.uuid4().hex

    def refresh():
        r = requests.get(gw.url + "/api/echo", headers={"authorization": f"Bearer {key.mint(ttl=60, sid=sid)}"}, timeout=5)
        assert r.status_code == 200

    got = run_async(chat(gw.ws_url + "/ws/echo", key.mint(ttl=3, sid=sid), 6, once_after(1, refresh)), 60)
    assert got == (None, None), "an upstream response (via_upstream) extends the session"


def test_an_in_band_reauth_extends_its_own_socket_only(gw, key):
    sid = uuid.uuid4().hex
    sent = [0]

    def reauth_every_second(elapsed):
        if elapsed > 1 + sent[0]:
            sent[0] += 1
            return [reauth_frame(key.mint(ttl=3, sid=sid))]
        return []

    async def both():
        refreshed = chat(gw.ws_url + "/ws/echo", key.mint(ttl=3, sid=sid), 7, frames=reauth_every_second)
        other = chat(gw.ws_url + "/ws/echo", key.mint(ttl=3, sid=sid), 7)
        return await asyncio.gather(refreshed, other)

    refreshed, other = run_async(both(), 60)
    assert refreshed == (None, None), "re-auth frames keep their own socket open"
    assert other == (4401, "session expired"), "a re-auth is not a session refresh for other sockets"


def test_reauth_filter_state_is_overwritten_on_each_accepted_reauth(key, demo, envoy_factory, monkeypatch):
    monkeypatch.setattr(
        conftest, "ACCESS_LOG_FORMAT",
        "%REQ(:PATH)% %FILTER_STATE(wasm.gatehouse.jwt_auth.reauth_kid:PLAIN)% "
        "%FILTER_STATE(wasm.gatehouse.jwt_auth.reauth_claims:PLAIN)%\n",
    )
    gw = envoy_factory(demo, jwt_auth=session_cfg(key), access_log=True)
    sid = uuid.uuid4().hex
    first, second = key.mint(ttl=60, sid=sid), key.mint(ttl=60, sid=sid)

    async def go():
        async with websockets.connect(gw.ws_url + f"/ws/echo?fs={sid}", subprotocols=["sip", "bearer." + key.mint(sid=sid)]) as ws:
            for t in (first, second):
                await ws.send(reauth_frame(t))
                await ws.send("ping")
                assert await asyncio.wait_for(ws.recv(), 5) == "ping"

    run_async(go(), 30)
    line = gw.wait_for_access_log(f"fs={sid}")
    _, kid, claims = line.split(" ", 2)
    assert kid == key.kid
    assert json.loads(claims)["jti"] == claims_of(second)["jti"], "the last accepted re-auth wins"


LUA = """
function envoy_on_request(h)
  if h:headers():get("upgrade") == nil then return end
  for chunk in h:bodyChunks() do
    local seen = h:streamInfo():filterState():get("wasm.gatehouse.jwt_auth.reauth_claims")
    h:logWarn("lua-chunk bytes=" .. chunk:length() .. " reauth_claims=" .. tostring(seen))
  end
end
"""


def lua_after_jwt_auth(jwt_cfg) -> list:
    """jwt-auth, then a Lua filter that logs, on every request chunk of an upgrade, the re-auth
    filter state it sees."""
    return [
        wasm_filter("jwt_auth", jwt_cfg),
        {"name": "envoy.filters.http.lua", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": LUA}}},
    ]


def test_a_later_filter_sees_the_reauth_state_on_the_same_chunk(key, demo, envoy_factory):
    gw = envoy_factory(demo, http_filters=lua_after_jwt_auth(session_cfg(key)))
    sid = uuid.uuid4().hex
    first, second = key.mint(ttl=60, sid=sid, marker="first"), key.mint(ttl=60, sid=sid, marker="second")

    async def go():
        async with websockets.connect(gw.ws_url + "/ws/echo", subprotocols=["sip", "bearer." + key.mint(sid=sid)]) as ws:
            await ws.send("ping")
            assert await asyncio.wait_for(ws.recv(), 5) == "ping"
            for t in (first, second):
                # The re-auth frame alone in its chunk: jwt-auth drops it, so the later filter's
                # chunk is empty, and the state it sees must already be this token's.
                await ws.send(reauth_frame(t))
                await asyncio.sleep(0.5)
            await ws.send("ping")
            assert await asyncio.wait_for(ws.recv(), 5) == "ping"

    run_async(go(), 30)
    time.sleep(0.5)
    lines = [l for l in gw.log_text().splitlines() if "lua-chunk" in l]
    seen = [l.split("reauth_claims=", 1)[1] for l in lines]
    markers = [json.loads(v)["marker"] if v != "nil" else None for v in seen]
    # Before any re-auth: nothing. The chunk that carried each re-auth frame (jwt-auth took the
    # frame out, so the later filter's chunk is empty) already shows that token, in order: the
    # state was overwritten mid-stream and is visible on the same chunk.
    first_seen = markers.index("first")
    assert all(m is None for m in markers[:first_seen]), lines
    assert markers[first_seen:] == ["first"] + ["second"] * (len(markers) - first_seen - 1), lines
    assert len(markers) - first_seen >= 3, lines

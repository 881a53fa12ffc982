"""The one-pass filter's root tick: every stage runs on its root context's one tick, which must
be the shortest period any stage asks for. jwt-auth with a fleet store asks for 250 ms (its
session-deadline calls go out on the tick); session-binding without a store asks for 1 s and
configures after it. A stand-in store that always fails makes jwt-auth ask again on every tick
for a socket held at its deadline, so its calls count the ticks."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import websockets

from conftest import cluster, one_pass_filter, run_async as run
from pages import LocalServer
from tokens import jwt_auth_config

pytestmark = pytest.mark.usefixtures("require_envoy")


class FailingStore(LocalServer):
    """Not etcd: every call answered 503 and counted."""

    def __init__(self):
        self.calls = 0

        def answer(method, path, host, body):
            self.calls += 1
            return 503, json.dumps({"error": "unavailable", "code": 14}).encode()

        super().__init__(answer)


def test_a_one_pass_filter_ticks_at_the_shortest_period_its_stages_ask_for(key, demo, envoy_factory):
    store = FailingStore()
    try:
        jwt = jwt_auth_config(key, sources=[{"websocket_protocol": {"prefix": "bearer."}}],
                              session_claims=["sid", "sub"],
                              store={"etcd": {"cluster": "etcd", "prefix": "gh-tick/", "timeout_ms": 250},
                                     "when_unavailable": "closed"})
        sb = {"rules": [{"match": {"prefix": "/ws/once/"}, "single_use": True}]}
        envoy = envoy_factory(demo, http_filters=[one_pass_filter({"jwt_auth": jwt, "session_binding": sb})],
                              extra_clusters={"etcd": cluster("etcd", store.port)})

        async def go():
            token = key.mint(ttl=2, sid="tick-1")
            async with websockets.connect(envoy.ws_url + "/ws/echo", subprotocols=["sip", "bearer." + token],
                                          open_timeout=10) as ws:
                async def ping_for(seconds: float):
                    end = time.monotonic() + seconds
                    while time.monotonic() < end:
                        await ws.send("ping")
                        assert await asyncio.wait_for(ws.recv(), 5) == "ping"
                        await asyncio.sleep(0.25)

                # Past the token's expiry: the socket is held while the store cannot answer,
                # and jwt-auth asks it for the session's deadline on every tick.
                await ping_for(3.5)
                before = store.calls
                await ping_for(4)
                return store.calls - before

        calls = run(go(), timeout=60)
        # 4 s of a 250 ms tick: 16 ticks, each retrying the deadline write and the read (about 32
        # calls); a 1 s tick: about 8.
        assert calls >= 18, f"{calls} store calls in 4 s: the pass does not tick every 250 ms"
    finally:
        store.stop()

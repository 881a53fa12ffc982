"""A fleet, not a process (issue 15): several real Envoy replicas sharing single-use connect tokens
and socket caps through a real etcd (Debian `etcd-server`, one or three members on free loopback
ports), reached through an Envoy cluster and etcd's JSON gateway. etcd paused (SIGSTOP) and back,
a replica killed with its sockets open, one member of three stopped, and bad store answers from
a stand-in server (the only place etcd is not real)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
import requests
import websockets

from conftest import run_async as run, wait_until
from pages import LocalServer
from tokens import jwt_auth_config

pytestmark = pytest.mark.usefixtures("require_envoy")

SB = "gatehouse.session_binding"
CAP = 8
LEASE_TTL = 6  # sockets.slot_ttl_seconds: the socket lease's TTL
TIMEOUT_MS = 250


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def sb_config(prefix: str, when_unavailable: str = "closed", cluster: str = "etcd", timeout_ms: int = TIMEOUT_MS) -> dict:
    return {
        "rules": [
            {"match": {"prefix": "/ws/once/"}, "single_use": True},
            {"match": {"prefix": "/ws/capped/"}, "max_sockets": {"limit": CAP, "per_claim": "sub"}},
        ],
        "sockets": {"slot_ttl_seconds": LEASE_TTL},
        "store": {"etcd": {"cluster": cluster, "prefix": prefix, "timeout_ms": timeout_ms},
                  "when_unavailable": when_unavailable},
    }


class Replica:
    def __init__(self, envoy):
        self.envoy = envoy

    def kwargs(self, token: str) -> dict:
        return {"subprotocols": ["sip", "bearer." + token], "open_timeout": 10}

    def url(self, path: str) -> str:
        return self.envoy.ws_url + path

    def stat(self, name: str) -> int:
        return self.envoy.stats().get(f"wasmcustom.{SB}.{name}", 0)


def replicas(n, key, demo, envoy_factory, store_cluster: dict, sb: dict) -> list[Replica]:
    jwt_cfg = jwt_auth_config(key, sources=[{"websocket_protocol": {"prefix": "bearer."}}, {"authorization": {}}])
    return [Replica(envoy_factory(demo, jwt_auth=jwt_cfg, session_binding=sb,
                                  extra_clusters={"etcd": store_cluster}))
            for _ in range(n)]


async def _outcome(r: Replica, path: str, token: str):
    """Connect, say hello: ("open", echo) or ("closed", code, reason)."""
    async with websockets.connect(r.url(path), **r.kwargs(token)) as ws:
        try:
            await ws.send("hello")
            return ("open", await asyncio.wait_for(ws.recv(), 10))
        except websockets.ConnectionClosed:
            return ("closed", ws.close_code, ws.close_reason)


def outcome(r, path, token):
    return run(_outcome(r, path, token))


async def open_socket(r: Replica, path: str, token: str):
    """A socket that opened and echoed, or the close code it got instead."""
    ws = await websockets.connect(r.url(path), **r.kwargs(token))
    try:
        await ws.send("x")
        assert await asyncio.wait_for(ws.recv(), 10) == "x"
        return ws
    except websockets.ConnectionClosed:
        return ws.close_code


@pytest.fixture(scope="module")
def etcd(etcd_factory):
    return etcd_factory(1)


@pytest.fixture(scope="module")
def fleet(key, demo, envoy_factory, etcd):
    return replicas(2, key, demo, envoy_factory, etcd.cluster(), sb_config("gh-fleet/"))


# ------------------------------------------------------------------------------- single use


def test_a_connect_token_used_on_one_replica_is_refused_on_the_other(fleet, key, etcd):
    a, b = fleet
    before = b.stat("denied.replay")
    for _ in range(3):
        token = key.mint(sub=unique("u"), jti=unique("jti"))
        assert outcome(a, "/ws/once/x", token) == ("open", "hello")
        got = outcome(b, "/ws/once/x", token)
        assert got[:2] == ("closed", 4401), got
        assert outcome(a, "/ws/once/x", token)[:2] == ("closed", 4401)
    assert b.stat("denied.replay") == before + 3
    assert b.stat("store.replay") >= 3 and a.stat("store.claimed") >= 3
    # Keys are hashes: no jti, sub or token in clear in etcd.
    keys = etcd.keys("gh-fleet/")
    assert keys and all(k.startswith("gh-fleet/jti/") or k.startswith("gh-fleet/sock/") for k in keys)
    assert not any("jti-" in k or "u-" in k for k in keys), keys
    # Tokens ending close together share a lease: one grant per step, not one per token.
    leases = requests.post(etcd.url() + "/v3/lease/leases", json={}, timeout=5).json().get("leases", [])
    assert 1 <= len(leases) <= 3, leases


def reauth_frame(token: str) -> str:
    """jwt-auth's in-band re-auth frame (docs/jwt-auth.md, `reauth_type`)."""
    return json.dumps({"type": "gatehouse.reauth", "token": token})


def test_an_inband_reauth_token_used_on_one_replica_closes_a_socket_on_the_other(key, demo, envoy_factory, etcd):
    """Issue 15: a single-use re-auth token jwt-auth accepted on a live socket is claimed in etcd
    too (asynchronously, from the root tick: the socket goes on meanwhile), so the same token sent
    on a socket of another replica closes that socket with 4401; a fresh one is accepted there."""
    jwt_cfg = jwt_auth_config(key, sources=[{"websocket_protocol": {"prefix": "bearer."}}, {"authorization": {}}],
                              session_claims=["sid", "sub"], reauth_type="gatehouse.reauth")
    sb = sb_config(unique("gh-reauth") + "/")  # one prefix: both replicas share the keys
    a, b = [Replica(envoy_factory(demo, jwt_auth=jwt_cfg, session_binding=sb, extra_clusters={"etcd": etcd.cluster()}))
            for _ in range(2)]
    sid = unique("call")

    async def reauth(r: Replica, token: str):
        """Send `token` in band on a fresh socket of `r`, then keep talking: None while the socket
        stays open for 3 s, else its close code and reason."""
        async with websockets.connect(r.url("/ws/once/x"), **r.kwargs(key.mint(sid=sid))) as ws:
            await ws.send("hello")
            assert await asyncio.wait_for(ws.recv(), 5) == "hello"
            await ws.send(reauth_frame(token))
            try:
                for i in range(15):
                    await ws.send(f"ping{i}")
                    assert await asyncio.wait_for(ws.recv(), 5) == f"ping{i}"
                    await asyncio.sleep(0.2)
                return None
            except websockets.ConnectionClosed:
                return ws.close_code, ws.close_reason

    reused, fresh = key.mint(sid=sid), key.mint(sid=sid)
    before = b.stat("reauth.store_replay")
    assert run(reauth(a, reused), 60) is None, "a fresh re-auth token keeps the socket"
    assert wait_until(lambda: a.stat("reauth.store_claimed") >= 1, 5)
    assert run(reauth(b, reused), 60) == (4401, "token reused")
    assert b.stat("reauth.store_replay") == before + 1
    assert b.stat("ws.closed.replay") >= 1
    assert run(reauth(b, fresh), 60) is None, "a fresh re-auth token on the other replica is accepted"
    assert wait_until(lambda: b.stat("reauth.store_claimed") >= 1, 5)


def test_the_store_latency_is_a_histogram(fleet, key):
    a, _ = fleet
    assert outcome(a, "/ws/once/x", key.mint(jti=unique("jti")))[0] == "open"
    import re

    name = f"{SB.replace('.', '_')}_store_latency_ms"

    def recorded():
        text = requests.get(a.envoy.admin + "/stats/prometheus", timeout=5).text
        m = re.search(name + r"_count\{\} (\d+)", text)
        return m and int(m.group(1)) > 0 and f"{name}_bucket" in text

    # Histograms reach the admin page on Envoy's stats flush (every 5 s).
    assert wait_until(recorded, 12), "store.latency_ms recorded as a histogram"


# -------------------------------------------------------------------------------- socket cap


def test_the_cap_counts_sockets_on_every_replica(fleet, key, etcd):
    a, b = fleet
    sub = unique("capped")

    async def go():
        socks = []
        for i in range(CAP):
            socks.append(await open_socket((a, b)[i % 2], f"/ws/capped/{i}", key.mint(sub=sub)))
        ninth = [await _outcome(r, "/ws/capped/9", key.mint(sub=sub)) for r in (a, b)]
        other = await _outcome(b, "/ws/capped/o", key.mint(sub=unique("other")))
        await socks[0].close()
        await asyncio.sleep(1.5)  # freed on the next root tick
        after = await _outcome(b, "/ws/capped/10", key.mint(sub=sub))
        for ws in socks[1:]:
            await ws.close()
        return socks, ninth, other, after

    socks, ninth, other, after = run(go(), timeout=60)
    assert all(not isinstance(s, int) for s in socks), socks
    assert [n[:2] for n in ninth] == [("closed", 4429)] * 2, ninth
    assert other[0] == "open"
    assert after[0] == "open", "closing a socket on replica 0 frees a slot for replica 1"
    assert a.stat("denied.too_many_sockets") + b.stat("denied.too_many_sockets") >= 2


def test_the_cap_is_exact_under_parallel_connects(fleet, key):
    a, b = fleet
    sub = unique("parallel")

    async def go():
        tries = [open_socket((a, b)[i % 2], f"/ws/capped/p{i}", key.mint(sub=sub)) for i in range(2 * CAP)]
        got = await asyncio.gather(*tries)
        for ws in got:
            if not isinstance(ws, int):
                await ws.close()
        return got

    got = run(go(), timeout=60)
    opened = [g for g in got if not isinstance(g, int)]
    refused = [g for g in got if isinstance(g, int)]
    assert len(opened) == CAP, f"{len(opened)} opened under a cap of {CAP}"
    assert refused == [4429] * CAP


def test_a_killed_replica_frees_its_slots_within_the_lease_ttl(key, demo, envoy_factory, etcd):
    a, b = replicas(2, key, demo, envoy_factory, etcd.cluster(), sb_config("gh-kill/"))
    sub = unique("killed")

    async def hold():
        return [await open_socket(a, f"/ws/capped/{i}", key.mint(sub=sub)) for i in range(CAP)]

    held = run(hold(), timeout=60)
    assert all(not isinstance(s, int) for s in held)
    assert outcome(b, "/ws/capped/x", key.mint(sub=sub))[:2] == ("closed", 4429)
    a.envoy.proc.kill()
    a.envoy.proc.wait()
    killed = time.time()
    freed = None
    while time.time() - killed < LEASE_TTL + 6:
        if outcome(b, "/ws/capped/y", key.mint(sub=sub))[0] == "open":
            freed = time.time() - killed
            break
        time.sleep(0.5)
    assert freed is not None, f"replica 0's slots were not freed within {LEASE_TTL + 6} s"
    assert freed <= LEASE_TTL + 3, freed


# ------------------------------------------------------------------------------ etcd failures


def test_etcd_paused_refuses_connects_within_the_timeout_and_keeps_live_sockets(key, demo, envoy_factory, etcd_factory):
    store = etcd_factory(1)
    (r,) = replicas(1, key, demo, envoy_factory, store.cluster(), sb_config("gh-pause/"))
    sub = unique("paused")

    async def go():
        live = await open_socket(r, "/ws/capped/live", key.mint(sub=sub))
        store.pause()
        try:
            started = time.time()
            during_token = key.mint(jti=unique("jti"))
            during = await _outcome(r, "/ws/once/x", during_token)
            took = time.time() - started
            capped = await _outcome(r, "/ws/capped/more", key.mint(sub=sub))
            # The live socket keeps working while etcd is away (and past its lease TTL).
            echoes = []
            for _ in range(LEASE_TTL + 2):
                await live.send("ping")
                echoes.append(await asyncio.wait_for(live.recv(), 5))
                await asyncio.sleep(1)
        finally:
            store.resume()
        assert wait_until(store.healthy, 10)
        await asyncio.sleep(1)
        fresh = await _outcome(r, "/ws/once/x", key.mint(jti=unique("jti")))
        again = [await _outcome(r, "/ws/once/x", during_token) for _ in range(2)]
        await live.send("still")
        still = await asyncio.wait_for(live.recv(), 5)
        await live.close()
        return during, took, capped, echoes, fresh, again, still

    during, took, capped, echoes, fresh, again, still = run(go(), timeout=90)
    assert during[:2] == ("closed", 1013), during
    assert took < 3, f"refused after {took:.1f} s (timeout_ms {TIMEOUT_MS})"
    assert capped[:2] == ("closed", 1013), capped
    assert echoes == ["ping"] * (LEASE_TTL + 2)
    assert fresh[0] == "open", "recovered"
    # A token refused while etcd was paused is accepted at most once afterwards (etcd may have
    # applied the claim when it woke up): never twice.
    assert [g[0] for g in again].count("open") <= 1, again
    assert still == "still"
    assert r.stat("denied.store_unavailable") >= 2
    assert r.stat("store.error.unavailable") >= 2


def test_a_three_member_cluster_with_one_member_stopped_keeps_working(key, demo, envoy_factory, etcd_factory):
    store = etcd_factory(3)
    # Every write is fsynced by two members of this shared, busy machine: a roomier budget.
    a, b = replicas(2, key, demo, envoy_factory, store.cluster(), sb_config("gh-quorum/", timeout_ms=2000))
    store.pause(1)
    try:
        # The other two elect a leader if the paused member led (etcd's /health says so), and
        # each Envoy's health check takes the paused member out of rotation.
        assert wait_until(lambda: store.healthy(0) and store.healthy(2), 15), "no quorum of two"
        flags = [f"etcd::127.0.0.1:{client}::health_flags::/failed_active_hc" for client, _ in store.ports]

        def only_the_paused_member_is_out(r):
            text = requests.get(r.envoy.admin + "/clusters", timeout=5).text
            return [f in text for f in flags] == [False, True, False]

        for r in (a, b):
            assert wait_until(lambda r=r: only_the_paused_member_is_out(r), 15), \
                [l for l in requests.get(r.envoy.admin + "/clusters", timeout=5).text.splitlines() if "health_flags" in l]
        # The first connect of a new lease minute grants it (three writes): on this busy machine
        # allow it to warm up, then every connect must work.
        assert wait_until(lambda: outcome(a, "/ws/once/x", key.mint(jti=unique("jti")))[0] == "open", 15)
        # Two members fsync every write on this shared machine: a connect may still run out of
        # its budget now and then (1013, try again later: nothing was let through). What must
        # hold: the fleet decides — each token opens once, on a, and is refused as a replay on b.
        for _ in range(6):
            for _attempt in range(3):
                token = key.mint(jti=unique("jti"))
                first = outcome(a, "/ws/once/x", token)
                if first[:2] != ("closed", 1013):
                    break
            assert first == ("open", "hello")
            for _attempt in range(3):
                replay = outcome(b, "/ws/once/x", token)
                if replay[:2] != ("closed", 1013):
                    break
            assert replay[:2] == ("closed", 4401)
    finally:
        store.resume(1)


# ------------------------------------------------------------------------- bad store answers


class FakeEtcd(LocalServer):
    """Not etcd: answers every POST with `body` (the only stand-in; real etcd everywhere else)."""

    def __init__(self):
        self.body, self.status, self.calls = b"{}", 200, 0

        def answer(method, path, host, body):
            self.calls += 1
            return self.status, self.body

        super().__init__(answer)


HEADER = {"cluster_id": "1", "member_id": "1", "revision": "1", "raft_term": "1"}
BAD = {
    "malformed": (200, b'{"header": {"revision": '),
    "wrong_type": (200, json.dumps({"header": HEADER, "succeeded": "yes"}).encode()),
    "not_etcd": (200, b"{}"),
    "too_large": (200, json.dumps({"header": HEADER, "succeeded": True, "pad": "x" * 200_000}).encode()),
    "status": (500, json.dumps({"error": "etcdserver: too many requests", "code": 14}).encode()),
}
STAT = {"malformed": "malformed", "wrong_type": "wrong_type", "not_etcd": "wrong_type",
        "too_large": "too_large", "status": "status"}


@pytest.fixture(scope="module")
def fake():
    f = FakeEtcd()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def bad_fleet(key, demo, envoy_factory, fake):
    from conftest import cluster

    closed = replicas(1, key, demo, envoy_factory, cluster("etcd", fake.port), sb_config("gh-bad/"))[0]
    local = replicas(1, key, demo, envoy_factory, cluster("etcd", fake.port), sb_config("gh-bad/", "local"))[0]
    return closed, local


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_store_answers_are_an_error_a_stat_and_the_policy(bad_fleet, fake, key, case):
    closed, local = bad_fleet
    fake.status, fake.body = BAD[case]
    stat = f"store.error.{STAT[case]}"
    before = (closed.stat(stat), local.stat(stat), local.stat("store.local_fallback"))
    token = key.mint(jti=unique("jti"))
    got = outcome(closed, "/ws/once/x", token)
    assert got[:2] == ("closed", 1013), got
    assert closed.stat(stat) == before[0] + 1
    # `local`: this Envoy's own state decides, and still refuses a replay.
    assert outcome(local, "/ws/once/x", token)[0] == "open"
    assert outcome(local, "/ws/once/x", token)[:2] == ("closed", 4401)
    assert local.stat(stat) == before[1] + 2
    assert local.stat("store.local_fallback") == before[2] + 2
    assert f"no usable answer ({STAT[case]})" in closed.envoy.log_text()


# ------------------------------------------------------------------------------ warm path


def test_the_warm_http_path_makes_no_store_call(fleet, key):
    """A cached token on a plain request, on a route that claims nothing: no call to etcd at all
    (Envoy's own count of requests to the `etcd` cluster stays put; health checks are not
    requests). A single-use connect on the same Envoy does call it."""
    a, _ = fleet
    token = key.mint(sub=unique("warm"))
    headers = {"authorization": "Bearer " + token}

    def etcd_requests():
        return a.envoy.stats().get("cluster.etcd.upstream_rq_total", 0)

    # Let in-flight keep-alives and releases of earlier tests finish (no live sockets now).
    time.sleep(1)
    before, allowed = etcd_requests(), a.stat("allowed")
    for _ in range(50):
        assert requests.get(a.envoy.url + "/api/echo", headers=headers, timeout=5).status_code == 200
    assert a.stat("allowed") >= allowed + 50, "the requests went through session-binding"
    assert etcd_requests() == before, "the warm path called etcd"
    assert outcome(a, "/ws/once/x", key.mint(jti=unique("jti")))[0] == "open"
    assert etcd_requests() > before


# ------------------------------------------------------------------------- session deadlines

JA = "gatehouse.jwt_auth"


def jwt_store_config(key, prefix: str, when_unavailable: str = "closed") -> dict:
    return jwt_auth_config(key, sources=[{"websocket_protocol": {"prefix": "bearer."}}, {"authorization": {}}],
                           session_claims=["sid", "sub"],
                           store={"etcd": {"cluster": "etcd", "prefix": prefix, "timeout_ms": TIMEOUT_MS},
                                  "when_unavailable": when_unavailable})


def session_replicas(n, key, demo, envoy_factory, store_cluster: dict, prefix: str) -> list[Replica]:
    return [Replica(envoy_factory(demo, jwt_auth=jwt_store_config(key, prefix),
                                  extra_clusters={"etcd": store_cluster}))
            for _ in range(n)]


def jwt_stat(r: Replica, name: str) -> int:
    return r.envoy.stats().get(f"wasmcustom.{JA}.{name}", 0)


def refresh(r: Replica, token: str):
    """A guarded API call with a fresh token of the session (what a token-handler SPA does)."""
    got = requests.get(r.envoy.url + "/api/echo", headers={"authorization": f"Bearer {token}"}, timeout=10)
    assert got.status_code == 200, got.text


async def chat(r: Replica, token: str, seconds: float, on_tick=None):
    """Connect to `r`, send a frame every 0.5 s for `seconds` (calling `on_tick(elapsed)` first);
    (frames echoed, close code, close reason, seconds until it closed or None)."""
    echoed = 0
    async with websockets.connect(r.url("/ws/echo"), **r.kwargs(token)) as ws:
        start = time.monotonic()
        try:
            while time.monotonic() - start < seconds:
                if on_tick:
                    await asyncio.to_thread(on_tick, time.monotonic() - start)
                await ws.send("ping")
                assert await asyncio.wait_for(ws.recv(), 5) == "ping"
                echoed += 1
                await asyncio.sleep(0.5)
        except websockets.ConnectionClosed:
            return echoed, ws.close_code, ws.close_reason, time.monotonic() - start
        return echoed, ws.close_code, ws.close_reason, None


def test_a_socket_follows_refreshes_made_through_another_replica(key, demo, envoy_factory, etcd):
    a, b = session_replicas(2, key, demo, envoy_factory, etcd.cluster(), "gh-sess/")
    sid = unique("call")
    last = [0.0]
    stopped = [None]

    def refresh_on_b_for_20s(elapsed):
        if elapsed < 20 and elapsed - last[0] >= 3:
            last[0] = elapsed
            refresh(b, key.mint(ttl=6, sid=sid))
        elif elapsed >= 20 and stopped[0] is None:
            stopped[0] = elapsed

    # 6-second tokens, refreshed only through replica 1 every 3 s for 20 s, then no more.
    echoed, code, reason, closed_at = run(chat(a, key.mint(ttl=6, sid=sid), 40, refresh_on_b_for_20s), 90)
    assert closed_at is not None and closed_at >= 20, f"closed after {closed_at} s: {code} {reason}"
    assert (code, reason) == (4401, "session expired")
    assert echoed >= 35
    # The last refresh was at most 3 s before 20 s with a 6 s token, then the 3 s grace, a tick,
    # and the 1 s re-check of a held socket.
    assert closed_at < 20 + 6 + 3 + 3, closed_at
    assert jwt_stat(b, "store.deadline.written") >= 3
    assert jwt_stat(a, "store.deadline.adopted") >= 3
    assert jwt_stat(a, "store.deadline.expired") >= 1
    # Keys are hashes: no session id in clear.
    keys = etcd.keys("gh-sess/")
    assert keys and all(k.startswith("gh-sess/sess/") for k in keys), keys
    assert not any(sid in k for k in keys)


def test_etcd_paused_never_closes_a_socket_at_its_deadline(key, demo, envoy_factory, etcd_factory):
    store = etcd_factory(1)
    (r,) = session_replicas(1, key, demo, envoy_factory, store.cluster(), "gh-sess-pause/")
    sid = unique("call")

    async def go():
        ws = await websockets.connect(r.url("/ws/echo"), **r.kwargs(key.mint(ttl=2, sid=sid)))
        store.pause()
        try:
            echoes = []
            for _ in range(8):  # well past the token's 2 s and the 3 s grace
                await ws.send("ping")
                echoes.append(await asyncio.wait_for(ws.recv(), 5))
                await asyncio.sleep(1)
        finally:
            store.resume()
        assert wait_until(store.healthy, 10)
        # etcd answers again: nothing later for the session, the socket closes.
        try:
            for _ in range(20):
                await ws.send("ping")
                await asyncio.wait_for(ws.recv(), 5)
                await asyncio.sleep(0.5)
        except websockets.ConnectionClosed:
            pass
        return echoes, ws.close_code, ws.close_reason

    echoes, code, reason = run(go(), timeout=90)
    assert echoes == ["ping"] * 8, "held open while etcd is away"
    assert (code, reason) == (4401, "session expired")
    assert jwt_stat(r, "store.deadline.held") >= 3
    assert jwt_stat(r, "store.error.unavailable") >= 1

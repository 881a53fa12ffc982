"""session-binding in real Envoy (2 workers), behind gatehouse jwt-auth and behind Envoy's native
jwt_authn, with real WebSocket clients against the real demo upstream: session cookie (its hash in
the token, so a leaked token is useless without it), path hygiene and scope, client fingerprint,
single-use connect tokens across workers (bounded by `exp` and per subject), the socket cap, the
revocation feed (each kind, a live socket closed on its next frame, malformed entries skipped, the
feed down from the start or going down under each staleness policy), and in-band re-auth tokens."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import json
import time
import uuid

import pytest
import requests
import websockets

from conftest import ROOT, closes_without, free_port, run_async as run, wait_until, wasm_filter
from pages import JsonDocument
from tokens import AUDIENCE, ISSUER, Key, jwks, jwt_auth_config

pytestmark = pytest.mark.usefixtures("require_envoy")

SID_COOKIE = "__Host-gh_sid"
SB = "gatehouse.session_binding"

# Rules shared by both fronts. Rules are complete: each binds only what it names.
RULES = [
    {"match": {"prefix": "/ws/rooms/"}, "session": {"cookie": SID_COOKIE},
     "scope": [{"template": "/ws/rooms/{room}"}]},
    {"match": {"prefix": "/ws/tenants/"},
     "scope": [{"template": "/ws/tenants/{tenant}/agents/{agent}/...", "claims": {"tenant": "tenant_id", "agent": "agent_id"}}]},
    {"match": {"prefix": "/api/rooms/"}, "session": {"cookie": SID_COOKIE},
     "scope": [{"template": "/api/rooms/{room}"}]},
    {"match": {"prefix": "/ws/once/"}, "single_use": True},
    {"match": {"prefix": "/ws/capped/"}, "max_sockets": {"limit": 2, "per_claim": "sub"}},
    {"match": {"prefix": "/ws/fp/"}, "fingerprint": "required"},
    # The old binding (claim `sid` == cookie), only where it is asked for by name.
    {"match": {"prefix": "/ws/plain/"}, "session": {"mode": "plain", "cookie": SID_COOKIE}},
]


class FeedServer(JsonDocument):
    """The revocation feed: a document the test changes, and a server that can go down."""

    def __init__(self):
        super().__init__({"revoked": []})

    def set(self, *entries):
        """Publish `entries` and wait until the filters on every worker have fetched it."""
        self.document = {"revoked": list(entries)}
        seen = self.fetches
        wait_until(lambda: self.fetches >= seen + 6, 10)  # main thread + 2 workers, twice
        time.sleep(0.3)


def feed_config(port_name: str = "revocation", when_stale: str = "open", max_stale: int = 3) -> dict:
    return {"cluster": port_name, "path": "/revoked.json", "authority": "feed", "refresh_seconds": 1,
            "timeout_ms": 500, "max_stale_seconds": max_stale, "when_stale": when_stale}


# ------------------------------------------------------------------------------------ gateways


def native_filters(key_set: list[Key], sb_cfg: dict) -> list:
    """Envoy's own jwt_authn (payload and header in dynamic metadata), then session-binding
    reading its claims from there."""
    jwt_authn = {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"test": {
                "issuer": ISSUER, "audiences": [AUDIENCE],
                "local_jwks": {"inline_string": json.dumps(jwks(*key_set))},
                "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
                "payload_in_metadata": "jwt_payload", "header_in_metadata": "jwt_header",
            }},
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "test"}}],
        },
    }
    return [jwt_authn, wasm_filter("session_binding", sb_cfg)]


class Gateway:
    """An Envoy with a front (gatehouse jwt-auth or native jwt_authn) and session-binding, and how
    a client presents its token to that front."""

    def __init__(self, front: str, envoy, key: Key):
        self.front, self.envoy, self.key = front, envoy, key

    def ws_kwargs(self, token: str | None, cookie: str | None = None, user_agent: str | None = None) -> dict:
        headers = {}
        protocols = ["sip"]
        if token and self.front == "jwt_auth":
            protocols.append("bearer." + token)
        elif token:
            headers["authorization"] = "Bearer " + token
        if cookie:
            headers["cookie"] = cookie
        kwargs = {"subprotocols": protocols, "additional_headers": headers, "open_timeout": 10}
        if user_agent:
            kwargs["user_agent_header"] = user_agent
        return kwargs

    def url(self, path: str) -> str:
        return self.envoy.ws_url + path

    def stat(self, name: str) -> int:
        return self.envoy.stats().get(f"wasmcustom.{SB}.{name}", 0)


def make_gateway(front: str, key: Key, demo, envoy_factory, sb_extra: dict | None = None, clusters: dict | None = None,
                 keys: list[Key] | None = None) -> Gateway:
    sb_cfg = {"rules": RULES, **(sb_extra or {})}
    key_set = keys or [key]
    if front == "jwt_auth":
        jwt_cfg = jwt_auth_config(*key_set, sources=[{"websocket_protocol": {"prefix": "bearer."}}, {"authorization": {}}])
        envoy = envoy_factory(demo, jwt_auth=jwt_cfg, session_binding=sb_cfg, extra_clusters=clusters or {})
    else:
        sb_cfg["claims_from"] = [{"jwt_authn": {"payload_key": "jwt_payload", "header_key": "jwt_header"}}]
        envoy = envoy_factory(demo, http_filters=native_filters(key_set, sb_cfg), extra_clusters=clusters or {})
    return Gateway(front, envoy, key)


@pytest.fixture(scope="module", params=["jwt_auth", "jwt_authn"])
def gw(request, key, demo, envoy_factory):
    return make_gateway(request.param, key, demo, envoy_factory)


# ------------------------------------------------------------------------------------- clients


async def _outcome(gw: Gateway, path: str, token: str | None, **kw):
    """Connect, say hello, and return ("open", echo) or ("closed", code, reason)."""
    async with websockets.connect(gw.url(path), **gw.ws_kwargs(token, **kw)) as ws:
        try:
            await ws.send("hello")
            msg = await asyncio.wait_for(ws.recv(), 10)
            return ("open", msg)
        except websockets.ConnectionClosed:
            return ("closed", ws.close_code, ws.close_reason)


def outcome(gw, path, token, **kw):
    return run(_outcome(gw, path, token, **kw))


def sid_cookie(secret: str) -> str:
    return f"theme=dark; {SID_COOKIE}={secret}"


def sid_hash(secret: str) -> str:
    """What the token carries for the session cookie `secret`: base64url(SHA-256(secret))."""
    return base64.urlsafe_b64encode(hashlib.sha256(secret.encode()).digest()).rstrip(b"=").decode()


def session_token(gw, secret: str, **claims) -> str:
    """A token bound to the session cookie `secret` (its hash), with a public `sid` as well."""
    return gw.key.mint(sid=unique("sid"), sid_hash=sid_hash(secret), **claims)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# ---------------------------------------------------------------------------- session + scope


def test_session_and_room_bound_socket_opens(gw):
    secret = unique("secret")
    token = session_token(gw, secret, room="lobby")
    assert outcome(gw, "/ws/rooms/lobby", token, cookie=sid_cookie(secret)) == ("open", "hello")


@pytest.mark.parametrize("case", ["no_cookie", "other_cookie", "no_hash_claim"])
def test_session_mismatch_closes_4401(gw, case):
    secret = unique("secret")
    token = (gw.key.mint(sid=secret, room="lobby") if case == "no_hash_claim"
             else session_token(gw, secret, room="lobby"))
    cookie = {"no_cookie": None, "other_cookie": sid_cookie(unique("stolen")), "no_hash_claim": sid_cookie(secret)}[case]
    got = outcome(gw, "/ws/rooms/lobby", token, cookie=cookie)
    assert got[:2] == ("closed", 4401), got


@pytest.mark.parametrize("forged_from", ["sid", "sid_hash"])
def test_a_leaked_token_cannot_forge_its_session_cookie(gw, forged_from):
    """The attack of issue 13 #2: a leaked token plus `Cookie: <name>=<what the token says>`. The
    token carries only the cookie's hash, and neither its `sid` nor the hash itself opens it."""
    from tokens import claims_of

    secret = unique("secret")
    token = session_token(gw, secret, room="lobby")
    forged = claims_of(token)[forged_from]
    before = gw.stat("denied.session_mismatch")
    got = outcome(gw, "/ws/rooms/lobby", token, cookie=sid_cookie(forged))
    assert got[:2] == ("closed", 4401), got
    assert gw.stat("denied.session_mismatch") == before + 1
    r = requests.get(gw.envoy.url + "/api/rooms/lobby",
                     headers={"authorization": "Bearer " + token, "cookie": sid_cookie(forged)}, timeout=5)
    assert r.status_code == 401
    # With the real cookie the same token works.
    assert outcome(gw, "/ws/rooms/lobby", token, cookie=sid_cookie(secret))[0] == "open"


def test_the_weak_plain_mode_works_only_where_it_is_configured(gw):
    sid = unique("sid")
    token = gw.key.mint(sid=sid)
    assert outcome(gw, "/ws/plain/x", token, cookie=sid_cookie(sid))[0] == "open"
    assert outcome(gw, "/ws/plain/x", token, cookie=sid_cookie(unique("other")))[:2] == ("closed", 4401)
    # The same `sid == cookie` on a default (sha256) route is refused.
    assert outcome(gw, "/ws/rooms/lobby", gw.key.mint(sid=sid, room="lobby"), cookie=sid_cookie(sid))[:2] == ("closed", 4401)


def test_the_hmac_mode_needs_the_gateway_key_to_make_the_claim(key, demo, envoy_factory):
    """`mode: hmac_sha256`: the claim is HMAC-SHA256(gateway key, cookie); the key comes from
    the VM's environment. The plain SHA-256 of the cookie (what a token holder could compute
    for a guessed cookie) does not pass."""
    import hmac as hmac_mod
    import secrets

    gateway_key = secrets.token_urlsafe(32)
    sb_cfg = {"rules": [{"match": {"prefix": "/ws/"}, "session": {
        "cookie": SID_COOKIE, "mode": "hmac_sha256", "key": {"env": "GATEHOUSE_SESSION_KEY"}}}]}
    jwt_cfg = jwt_auth_config(key, sources=[{"websocket_protocol": {"prefix": "bearer."}}])
    envoy = envoy_factory(demo, jwt_auth=jwt_cfg, session_binding=sb_cfg, env={"GATEHOUSE_SESSION_KEY": gateway_key})
    gw = Gateway("jwt_auth", envoy, key)
    secret = unique("secret")
    mac = hmac_mod.new(gateway_key.encode(), secret.encode(), hashlib.sha256).digest()
    good = key.mint(sid_hash=base64.urlsafe_b64encode(mac).rstrip(b"=").decode())
    assert outcome(gw, "/ws/x", good, cookie=sid_cookie(secret))[0] == "open"
    assert outcome(gw, "/ws/x", key.mint(sid_hash=sid_hash(secret)), cookie=sid_cookie(secret))[:2] == ("closed", 4401)
    assert outcome(gw, "/ws/x", good, cookie=sid_cookie(unique("other")))[:2] == ("closed", 4401)
    assert gateway_key not in envoy.log_text()


@pytest.mark.parametrize("path", ["/ws/rooms/kitchen", "/ws/rooms/lobby/extra"])
def test_another_room_closes_4403(gw, path):
    secret = unique("secret")
    token = session_token(gw, secret, room="lobby")
    got = outcome(gw, path, token, cookie=sid_cookie(secret))
    assert got[:2] == ("closed", 4403), got


def test_tenant_and_agent_scope_with_list_claims(gw):
    token = gw.key.mint(tenant_id="t1", agent_id=["a1", "a2"])
    assert outcome(gw, "/ws/tenants/t1/agents/a2/calls/9", token)[0] == "open"
    assert outcome(gw, "/ws/tenants/t2/agents/a2", token)[:2] == ("closed", 4403)
    assert outcome(gw, "/ws/tenants/t1/agents/a3", token)[:2] == ("closed", 4403)


def test_plain_http_gets_401_and_403(gw):
    secret = unique("secret")
    token = session_token(gw, secret, room="lobby")
    url = gw.envoy.url
    ok = requests.get(url + "/api/rooms/lobby", headers={"authorization": "Bearer " + token, "cookie": sid_cookie(secret)}, timeout=5)
    assert ok.status_code == 200, ok.text
    no_cookie = requests.get(url + "/api/rooms/lobby", headers={"authorization": "Bearer " + token}, timeout=5)
    assert no_cookie.status_code == 401
    assert no_cookie.headers["content-type"] == "application/problem+json"
    other_room = requests.get(url + "/api/rooms/kitchen", headers={"authorization": "Bearer " + token, "cookie": sid_cookie(secret)}, timeout=5)
    assert other_room.status_code == 403


# ------------------------------------------------------------------------------- path hygiene


def raw_get(gw, path: str, headers: dict) -> int:
    """GET `path` exactly as written (requests/urllib3 would remove dot-segments first)."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.envoy.port, timeout=5)
    try:
        conn.request("GET", path, headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.mark.parametrize("path", [
    "/ws/tenants/t1/agents/a1/../../../t2/agents/a1",
    "/ws/tenants/t1/agents/a1/%2e%2e/%2E%2e/../t2/agents/a1",
    "/ws/tenants/t1/agents/a1/..%2f..%2f..%2ft2/agents/a1",
    "/ws/tenants/t1%2Fagents%2Fa1/agents/a1",
])
def test_paths_that_walk_out_of_a_scope_template_are_refused_4400(gw, path):
    """Issue 13 #6: the template binds `/ws/tenants/t1/…` as tenant t1, but upstream the path
    is tenant t2's. Refused before any rule or template looks at it."""
    token = gw.key.mint(tenant_id="t1", agent_id=["a1"])
    reason = "path_separator" if "%2f" in path.lower() else "path_dot_segment"
    before = gw.stat(f"denied.{reason}")
    got = outcome(gw, path, token)
    assert got[:2] == ("closed", 4400), got
    assert raw_get(gw, path, {"authorization": "Bearer " + token}) == 400
    if gw.front == "jwt_authn":
        # (Behind gatehouse jwt-auth, jwt-auth may refuse such a path itself, first.)
        assert gw.stat(f"denied.{reason}") == before + 2
    # The clean path binds as before.
    assert outcome(gw, "/ws/tenants/t1/agents/a1", token)[0] == "open"


# ---------------------------------------------------------------------------------- fingerprint


def cfp(user_agent: str, prefix: str = "127.0.0.0/24") -> str:
    digest = hashlib.sha256(f"{user_agent}|{prefix}".encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def test_client_fingerprint(gw):
    ua = "gatehouse-phone/1.0"
    good = gw.key.mint(cfp=cfp(ua))
    assert outcome(gw, "/ws/fp/x", good, user_agent=ua)[0] == "open"
    assert outcome(gw, "/ws/fp/x", good, user_agent="curl/8.0")[:2] == ("closed", 4401)
    assert outcome(gw, "/ws/fp/x", gw.key.mint(cfp=cfp(ua, "10.0.0.0/24")), user_agent=ua)[:2] == ("closed", 4401)
    # Required on this route; compared when present elsewhere.
    assert outcome(gw, "/ws/fp/x", gw.key.mint(), user_agent=ua)[:2] == ("closed", 4401)
    assert outcome(gw, "/ws/echo", gw.key.mint())[0] == "open"
    assert outcome(gw, "/ws/echo", good, user_agent="curl/8.0")[:2] == ("closed", 4401)


# --------------------------------------------------------------------------------- single use


def worker_counts(envoy) -> tuple[int, int]:
    stats = envoy.stats()
    prefix = f"listener.127.0.0.1_{envoy.port}."
    return (stats.get(prefix + "worker_0.downstream_cx_total", 0), stats.get(prefix + "worker_1.downstream_cx_total", 0))


def worker_of(envoy, before: tuple[int, int]) -> int | None:
    after = worker_counts(envoy)
    moved = [i for i in (0, 1) if after[i] > before[i]]
    return moved[0] if len(moved) == 1 else None


def test_replay_is_caught_across_both_workers(gw):
    envoy = gw.envoy
    replays_before = gw.stat("denied.replay")
    crossings: set[tuple[int, int]] = set()
    workers_seen: set[int] = set()
    attempts = 0
    # Until a replay was caught on the other worker in both directions (0→1 and 1→0).
    while len(crossings) < 2 and attempts < 40:
        attempts += 1
        token = gw.key.mint()
        before = worker_counts(envoy)
        assert outcome(gw, "/ws/once/a", token) == ("open", "hello")
        first = worker_of(envoy, before)
        before = worker_counts(envoy)
        got = outcome(gw, "/ws/once/a", token)
        second = worker_of(envoy, before)
        assert got[:2] == ("closed", 4401), f"replay #{attempts} was let through: {got}"
        workers_seen.update(w for w in (first, second) if w is not None)
        if first is not None and second is not None and first != second:
            crossings.add((first, second))
    assert workers_seen == {0, 1}, "both workers took connections"
    assert crossings == {(0, 1), (1, 0)}, f"no cross-worker replay in {attempts} attempts: {crossings}"
    assert gw.stat("denied.replay") - replays_before == attempts


def test_replay_over_plain_http_is_401(gw):
    token = gw.key.mint()
    # /ws/once/ over plain HTTP: the demo has no GET there but the filter answers first.
    h = {"authorization": "Bearer " + token}
    first = requests.get(gw.envoy.url + "/ws/once/x", headers=h, timeout=5)
    assert first.status_code != 401
    assert requests.get(gw.envoy.url + "/ws/once/x", headers=h, timeout=5).status_code == 401


def test_the_jti_store_is_capped_with_a_stat(key, demo, envoy_factory):
    gw = make_gateway("jwt_auth", key, demo, envoy_factory,
                      sb_extra={"jti": {"max_entries": 3, "buckets": 1, "when_full": "refuse"}})
    # Three subjects (one subject alone may hold at most half a bucket).
    for _ in range(3):
        assert outcome(gw, "/ws/once/x", key.mint(sub=unique("user")))[0] == "open"
    got = outcome(gw, "/ws/once/x", key.mint(sub=unique("user")))
    assert got[:2] == ("closed", 4429), got
    assert gw.stat("denied.jti_store_full") == 1
    # An expired entry makes room again: tokens that expired (exp + 30 s skew) are forgotten.


def test_single_use_refuses_tokens_the_store_would_forget_while_valid(gw):
    """Issue 13 #10: the store remembers a jti for at most `max_ttl_seconds` (3600 by default);
    a token valid longer could be replayed once it is forgotten."""
    before = gw.stat("denied.jti_unbounded")
    got = outcome(gw, "/ws/once/long", gw.key.mint(ttl=2 * 3600))
    assert got[:2] == ("closed", 4401), got
    assert gw.stat("denied.jti_unbounded") == before + 1
    assert outcome(gw, "/ws/once/short", gw.key.mint(ttl=600))[0] == "open"
    if gw.front == "jwt_authn":
        # Envoy's jwt_authn accepts a token without `exp`: session-binding refuses it single-use.
        got = outcome(gw, "/ws/once/forever", gw.key.mint(exp=None))
        assert got[:2] == ("closed", 4401), got
        assert gw.stat("denied.jti_unbounded") == before + 2


def test_one_subject_cannot_fill_the_jti_store(key, demo, envoy_factory):
    """Issue 13 #10: a subject holds at most `jti.max_per_subject` outstanding single-use ids; the
    next is 4429 and other subjects are untouched."""
    gw = make_gateway("jwt_auth", key, demo, envoy_factory,
                      sb_extra={"jti": {"max_entries": 64, "buckets": 1, "when_full": "evict", "max_per_subject": 2}})
    mallory, bob = unique("mallory"), unique("bob")
    bobs = key.mint(sub=bob)
    assert outcome(gw, "/ws/once/x", bobs)[0] == "open"
    for _ in range(2):
        assert outcome(gw, "/ws/once/x", key.mint(sub=mallory))[0] == "open"
    for _ in range(3):
        got = outcome(gw, "/ws/once/x", key.mint(sub=mallory))
        assert got[:2] == ("closed", 4429), got
    assert gw.stat("denied.jti_subject_full") == 3
    assert gw.stat("jti.evicted") == 0
    assert outcome(gw, "/ws/once/x", bobs)[:2] == ("closed", 4401), "bob's jti is still remembered"
    assert outcome(gw, "/ws/once/x", key.mint(sub=bob))[0] == "open"
    r = requests.get(gw.envoy.url + "/ws/once/x", headers={"authorization": "Bearer " + key.mint(sub=mallory)}, timeout=5)
    assert r.status_code == 429


# ---------------------------------------------------------------------------------- socket cap


def test_socket_cap_refuses_the_extra_socket_and_frees_a_slot_on_close(gw):
    sub = unique("capped")

    async def go():
        kw = gw.ws_kwargs
        a = await websockets.connect(gw.url("/ws/capped/1"), **kw(gw.key.mint(sub=sub)))
        b = await websockets.connect(gw.url("/ws/capped/2"), **kw(gw.key.mint(sub=sub)))
        for ws in (a, b):
            await ws.send("x")
            assert await ws.recv() == "x"
        third = await _outcome(gw, "/ws/capped/3", gw.key.mint(sub=sub))
        other_user = await _outcome(gw, "/ws/capped/4", gw.key.mint(sub=unique("other")))
        await a.close()
        await asyncio.sleep(0.5)
        after_close = await _outcome(gw, "/ws/capped/5", gw.key.mint(sub=sub))
        await b.close()
        return third, other_user, after_close

    third, other_user, after_close = run(go())
    assert third[:2] == ("closed", 4429), third
    assert other_user[0] == "open"
    assert after_close[0] == "open", "closing a socket frees its slot"


# ---------------------------------------------------------------------------------- revocation


@pytest.fixture
def feed():
    srv = FeedServer()
    yield srv
    srv.stop()


@pytest.mark.parametrize("front", ["jwt_auth", "jwt_authn"])
def test_revocation_of_each_kind_and_a_live_socket_closed_on_its_next_frame(front, demo, envoy_factory, feed):
    k1, k2 = Key.generate("EdDSA", kid=unique("k1")), Key.generate("EdDSA", kid=unique("k2"))
    gw = make_gateway(front, k1, demo, envoy_factory, keys=[k1, k2],
                      sb_extra={"revocation": feed_config(max_stale=30)}, clusters={"revocation": feed.port})
    assert wait_until(lambda: gw.stat("revocation.fetch_ok") >= 2, 10)
    now = int(time.time())
    live_token = k1.mint(sub="alice")
    old_mallory = k1.mint(sub="mallory", iat=now - 10)
    new_mallory = k1.mint(sub="mallory", iat=now)
    by_k2 = k2.mint(sub="bob")

    async def go():
        async with websockets.connect(gw.url("/ws/echo"), **gw.ws_kwargs(live_token)) as ws:
            await ws.send("before")
            assert await ws.recv() == "before"
            from tokens import claims_of
            await asyncio.to_thread(feed.set, {"jti": claims_of(live_token)["jti"]},
                                    {"sub": "mallory", "issued_before": now - 5}, {"kid": k2.kid})
            return await closes_without(ws, "after", "a frame after revocation must not reach the upstream")

    assert run(go()) == (4401, "token revoked")
    assert outcome(gw, "/ws/echo", live_token)[:2] == ("closed", 4401), "revoked jti"
    assert outcome(gw, "/ws/echo", old_mallory)[:2] == ("closed", 4401), "sub issued before"
    assert outcome(gw, "/ws/echo", new_mallory)[0] == "open", "sub issued after"
    assert outcome(gw, "/ws/echo", by_k2)[:2] == ("closed", 4401), "revoked kid"
    assert outcome(gw, "/ws/echo", k1.mint(sub="bob"))[0] == "open"
    assert gw.stat("denied.revoked_jti") >= 1 and gw.stat("denied.revoked_sub") >= 1 and gw.stat("denied.revoked_kid") >= 1
    assert gw.stat("ws.closed.revoked_jti") == 1


def test_one_malformed_entry_does_not_throw_away_the_others(key, demo, envoy_factory, feed):
    """Issue 13 #10: a feed entry of no known shape is skipped and counted; the valid ones apply."""
    from tokens import claims_of

    gw = make_gateway("jwt_auth", key, demo, envoy_factory, sb_extra={"revocation": feed_config(max_stale=30)},
                      clusters={"revocation": feed.port})
    revoked = key.mint()
    feed.set({"sub": "mallory"}, {"jti": claims_of(revoked)["jti"]}, {"what": "ever"}, "text")
    assert outcome(gw, "/ws/echo", revoked)[:2] == ("closed", 4401), "the valid entry applies"
    assert outcome(gw, "/ws/echo", key.mint())[0] == "open"
    assert gw.stat("denied.revoked_jti") == 1
    assert gw.stat("revocation.entry_skipped") >= 3
    assert "3 malformed entries skipped" in gw.envoy.log_text()


@pytest.mark.parametrize("when_stale", ["closed", "open"])
def test_a_list_never_loaded_is_stale(key, demo, envoy_factory, when_stale):
    """Issue 13 #10: the feed is down from the start. A VM that never loaded the list knows no
    revocation: under `closed` it refuses (503 / close 1013), under `open` it serves and counts."""
    gw = make_gateway("jwt_auth", key, demo, envoy_factory,
                      sb_extra={"revocation": feed_config(when_stale=when_stale, max_stale=300)},
                      clusters={"revocation": free_port()})
    assert wait_until(lambda: gw.stat("revocation.fetch_failed") >= 2, 10)
    assert gw.stat("revocation.fetch_ok") == 0
    got = outcome(gw, "/ws/echo", key.mint())
    r = requests.get(gw.envoy.url + "/api/echo", headers={"authorization": "Bearer " + key.mint()}, timeout=5)
    if when_stale == "closed":
        assert got[:2] == ("closed", 1013), got
        assert r.status_code == 503
        assert gw.stat("denied.revocation_stale") == 2
    else:
        assert got[0] == "open", got
        assert r.status_code == 200
        assert gw.stat("revocation.stale_served") >= 2


def test_feed_down_fail_open_keeps_serving_with_the_last_good_list(key, demo, envoy_factory, feed):
    gw = make_gateway("jwt_auth", key, demo, envoy_factory, sb_extra={"revocation": feed_config(when_stale="open", max_stale=2)},
                      clusters={"revocation": feed.port})
    revoked = key.mint()
    from tokens import claims_of
    feed.set({"jti": claims_of(revoked)["jti"]})
    feed.stop()
    assert wait_until(lambda: gw.stat("revocation.fetch_failed") >= 3, 10)
    time.sleep(3)  # past max_stale_seconds
    assert outcome(gw, "/ws/echo", key.mint())[0] == "open"
    assert outcome(gw, "/ws/echo", revoked)[:2] == ("closed", 4401), "the last good list still applies"
    assert gw.stat("revocation.stale_served") >= 1


def test_feed_down_fail_closed_refuses_and_closes_live_sockets(key, demo, envoy_factory, feed):
    gw = make_gateway("jwt_auth", key, demo, envoy_factory, sb_extra={"revocation": feed_config(when_stale="closed", max_stale=2)},
                      clusters={"revocation": feed.port})
    assert wait_until(lambda: gw.stat("revocation.fetch_ok") >= 2, 10)

    async def go():
        async with websockets.connect(gw.url("/ws/echo"), **gw.ws_kwargs(key.mint())) as ws:
            await ws.send("before")
            assert await ws.recv() == "before"
            feed.stop()
            await asyncio.sleep(4)  # max_stale_seconds 2, refresh 1 s
            code, _ = await closes_without(ws, "after", "a frame after the list went stale must not pass")
            return code

    assert run(go()) == 1013
    assert outcome(gw, "/ws/echo", key.mint())[:2] == ("closed", 1013)
    r = requests.get(gw.envoy.url + "/api/echo", headers={"authorization": "Bearer " + key.mint()}, timeout=5)
    assert r.status_code == 503
    assert gw.stat("denied.revocation_stale") >= 2


# ------------------------------------------------------------------------- the shipped local stack


def shipped_signaling_session() -> dict:
    """The `session` binding of the shipped config's signaling rule: the cookie's name comes from
    there (the local stack may rename it, e.g. to a `__Host-` name), never hardcoded here."""
    import yaml

    cfg = yaml.safe_load((ROOT / "envoy-config" / "envoy.yaml").read_text())
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    for f in hcm["http_filters"]:
        config = f["typed_config"].get("config", {})
        value = json.loads(config.get("configuration", {}).get("value", "{}"))
        if config.get("root_id") == "gatehouse":
            # The one-pass filter: session-binding's config is its stage's.
            value = value.get("session_binding")
        elif config.get("root_id") != "session_binding":
            value = None
        if value is not None:
            return next(r["session"] for r in value["rules"] if r.get("match") == {"route": "signaling"})
    raise AssertionError("no session-binding in envoy-config/envoy.yaml")


class LocalStack:
    """envoy-config/envoy.yaml as `cargo xtask up` runs it, and a client of its dev login."""

    def __init__(self, envoy):
        self.envoy = envoy
        self.gw = Gateway("jwt_auth", envoy, None)
        self.session = shipped_signaling_session()
        self.cookie = self.session["cookie"]

    def login(self, user: str, secret: str | None = None) -> tuple[str, str]:
        """A fresh token and its session secret (the session cookie the login set); with `secret`,
        in that session."""
        cookies = {self.cookie: secret} if secret else None
        r = requests.post(self.envoy.url + f"/dev/login?user={user}", cookies=cookies, timeout=5)
        assert r.ok, r.text
        return r.json()["access_token"], r.cookies[self.cookie]

    def logout(self, secret: str):
        r = requests.post(self.envoy.url + "/dev/logout", cookies={self.cookie: secret}, timeout=5)
        assert r.status_code == 204, r.text

    def cookie_header(self, secret: str | None) -> str | None:
        return f"{self.cookie}={secret}" if secret else None

    def connect(self, token: str, secret: str | None):
        return websockets.connect(self.gw.url("/ws/echo"), **self.gw.ws_kwargs(token, cookie=self.cookie_header(secret)))

    def outcome(self, token: str, secret: str | None):
        return _outcome(self.gw, "/ws/echo", token, cookie=self.cookie_header(secret))


@pytest.fixture(scope="module")
def local_stack(demo, envoy_factory):
    from conftest import start_shipped

    return LocalStack(start_shipped(envoy_factory, demo))


def test_the_local_stack_caps_signaling_sockets_per_user(local_stack):
    """session-binding on the shipped signaling route: 8 sockets per user, the 9th closes with
    4429, and closing one frees a slot."""
    stack = local_stack
    user = unique("stack-user")

    async def go():
        # The remote JWKS arrives shortly after start; the first upgrade may wait for it.
        sockets = []
        for _ in range(8):
            ws = await stack.connect(*stack.login(user))
            await ws.send("x")
            assert await ws.recv() == "x"
            sockets.append(ws)
        ninth = await stack.outcome(*stack.login(user))
        await sockets[0].close()
        await asyncio.sleep(0.5)
        after = await stack.outcome(*stack.login(user))
        for ws in sockets[1:]:
            await ws.close()
        return ninth, after

    ninth, after = run(go(), timeout=60)
    assert ninth[:2] == ("closed", 4429), ninth
    assert after[0] == "open"


def test_the_local_stack_binds_connect_tokens_to_their_session_and_uses_them_once(local_stack):
    stack = local_stack
    user = unique("alice")
    token, sid = stack.login(user)
    _, other_sid = stack.login(unique("mallory"))

    async def go():
        return (await stack.outcome(token, None), await stack.outcome(token, other_sid),
                await stack.outcome(token, sid), await stack.outcome(token, sid))

    no_cookie, other_session, first, replay = run(go())
    assert no_cookie[:2] == ("closed", 4401), "a token without its session cookie is useless"
    assert other_session[:2] == ("closed", 4401), "a token with another session's cookie is useless"
    assert first[0] == "open"
    assert replay[:2] == ("closed", 4401), "a connect token opens one socket"
    # A refresh stays in the session: its token opens a socket with the same cookie.
    fresh, same_sid = stack.login(user, sid)
    assert same_sid == sid
    assert claims_sid(fresh) == claims_sid(token)
    assert outcome(stack.gw, "/ws/echo", fresh, cookie=stack.cookie_header(sid))[0] == "open"


def test_the_local_stack_binds_to_a_cookie_secret_the_token_does_not_reveal(local_stack):
    """Issue 13 #2 on the shipped stack: the dev login's session cookie is a random secret, the
    token carries its SHA-256 (`sid_hash`) and a public `sid`; a leaked token with a cookie made
    from anything in it is refused."""
    from tokens import claims_of

    stack = local_stack
    assert stack.session.get("mode", "sha256") == "sha256", "the shipped config uses the strong binding"
    token, secret = stack.login(unique("carol"))
    claims = claims_of(token)
    assert claims["sid_hash"] == sid_hash(secret)
    assert secret not in token and claims["sid"] != secret

    async def go():
        return [await stack.outcome(token, claims[c]) for c in ("sid", "sid_hash")] + [await stack.outcome(token, secret)]

    from_sid, from_hash, real = run(go())
    assert from_sid[:2] == ("closed", 4401), "cookie = the token's sid"
    assert from_hash[:2] == ("closed", 4401), "cookie = the token's sid_hash"
    assert real[0] == "open"


def test_the_local_stack_closes_a_live_socket_at_logout(local_stack):
    """Logout puts the session on the demo's revocation feed; session-binding refreshes it every
    2 s and closes the session's socket with 4401 on its next frame; the session's tokens are
    refused from then on, on the signaling route and on the API."""
    stack = local_stack
    user = unique("bob")
    token, sid = stack.login(user)
    other_token, other_sid = stack.login(user)  # the same user in another browser

    async def go():
        async with stack.connect(token, sid) as ws, stack.connect(other_token, other_sid) as other:
            await ws.send("before")
            assert await ws.recv() == "before"
            await asyncio.to_thread(stack.logout, sid)
            await asyncio.sleep(3)  # the feed is fetched every 2 s
            closed = await closes_without(ws, "after", "nothing passes after revocation")
            await other.send("still here")
            return (*closed, await other.recv())

    assert run(go()) == (4401, "token revoked", "still here"), "only the logged-out session ends"
    fresh, new_secret = stack.login(user, sid)  # the revoked session is not resumed: a new one starts
    r = requests.get(stack.envoy.url + "/api/echo", headers={"authorization": "Bearer " + token}, timeout=5)
    assert r.status_code == 401, "the revoked session's token is refused on the API"
    assert stack.gw.stat("ws.closed.revoked_sid") >= 1
    assert stack.gw.stat("denied.revoked_sid") >= 1
    assert claims_sid(fresh) != claims_sid(token) and new_secret != sid


def claims_sid(token: str) -> str:
    from tokens import claims_of

    return claims_of(token)["sid"]


# ------------------------------------------------------------------------------ in-band re-auth


def reauth_frame(token: str) -> str:
    """jwt-auth's in-band re-auth frame (docs/jwt-auth.md, `reauth_type`)."""
    return json.dumps({"type": "gatehouse.reauth", "token": token})


def test_reauth_tokens_are_checked_against_the_feed_and_used_once(key, demo, envoy_factory, feed):
    """Issue 13 #9: a token that arrives in an in-band re-auth frame is checked like a connect
    token. jwt-auth verifies it and publishes its payload as filter state
    `gatehouse.jwt_auth.reauth_claims` (and `gatehouse.jwt_auth.reauth_kid`); session-binding
    reads it on the next client chunk, checks the revocation feed and, on a single-use route,
    claims its jti; a refusal closes the socket with 4401."""
    from tokens import claims_of

    jwt_cfg = jwt_auth_config(key, sources=[{"websocket_protocol": {"prefix": "bearer."}}, {"authorization": {}}],
                              session_claims=["sid", "sub"], reauth_type="gatehouse.reauth")
    envoy = envoy_factory(demo, jwt_auth=jwt_cfg,
                          session_binding={"rules": RULES, "revocation": feed_config(max_stale=30)},
                          extra_clusters={"revocation": feed.port})
    gw = Gateway("jwt_auth", envoy, key)
    assert wait_until(lambda: gw.stat("revocation.fetch_ok") >= 2, 10)
    sid = unique("call")
    reused, revoked = key.mint(sid=sid), key.mint(sid=sid)
    feed.set({"jti": claims_of(revoked)["jti"]})

    async def reauth(path: str, token: str, then_open: bool):
        async with websockets.connect(gw.url(path), **gw.ws_kwargs(key.mint(sid=sid))) as ws:
            await ws.send("hello")
            assert await asyncio.wait_for(ws.recv(), 5) == "hello"
            await ws.send(reauth_frame(token))
            if then_open:
                await ws.send("ping")
                assert await asyncio.wait_for(ws.recv(), 5) == "ping", "an accepted re-auth keeps the socket"
                return None
            return await closes_without(ws, "after", "nothing passes after a refused re-auth token")

    async def go():
        first = await reauth("/ws/once/a", reused, then_open=True)
        again = await reauth("/ws/once/b", reused, then_open=False)
        revoked_close = await reauth("/ws/echo", revoked, then_open=False)
        return first, again, revoked_close

    first, again, revoked_close = run(go(), 60)
    assert first is None
    assert again == (4401, "token reused")
    assert revoked_close == (4401, "token revoked")
    assert gw.stat("ws.closed.replay") == 1
    assert gw.stat("ws.closed.revoked_jti") == 1
    # The re-auth token was claimed: as a connect token it is a replay.
    assert outcome(gw, "/ws/once/c", reused)[:2] == ("closed", 4401)

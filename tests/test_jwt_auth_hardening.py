"""jwt-auth, the smaller findings of issue 13 (item 10), in real Envoy: `required_typ`, any
`crit` header refused, weak or non-verifying keys refused at load (inline) or skipped with a
stat (fetched), the token never echoed in a refusal's 101, and a JWKS refetch that keeps the
verified-token cache for keys that did not change."""

from __future__ import annotations

import asyncio
import json

import jwt
import pytest
import requests
import websockets
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from conftest import run_async, wait_until
from pages import JsonDocument
from tokens import AUDIENCE, ISSUER, Key, jwks, jwt_auth_config

pytestmark = pytest.mark.usefixtures("require_envoy")


def counter(gw, name):
    return gw.stats().get(f"wasmcustom.gatehouse.jwt_auth.{name}", 0)


def status(gw, token, path="/api/echo"):
    return requests.get(gw.url + path, headers={"authorization": f"Bearer {token}"}, timeout=10).status_code


@pytest.fixture(scope="module")
def gw(key, demo, envoy_factory):
    cfg = jwt_auth_config(key, required_typ=["at+jwt", "JWT"])
    return envoy_factory(demo, jwt_auth=cfg)


@pytest.mark.parametrize("typ,ok", [
    ("at+jwt", True), ("AT+JWT", True), ("application/at+jwt", True), ("JWT", True),
    ("logout+jwt", False), ("secevent+jwt", False),
])
def test_required_typ(gw, key, typ, ok):
    before = counter(gw, "denied.typ")
    got = status(gw, key.mint(headers={"typ": typ}))
    assert got == (200 if ok else 401), typ
    assert counter(gw, "denied.typ") == before + (0 if ok else 1)


def test_any_crit_header_is_refused(gw, key):
    for crit in (None, [], ["exp"]):
        token = key.mint(headers={"typ": "JWT", "crit": crit})
        assert "crit" in jwt.get_unverified_header(token), "the header carries crit"
        before = counter(gw, "denied.malformed")
        assert status(gw, token) == 401, crit
        assert counter(gw, "denied.malformed") == before + 1


def test_the_only_token_subprotocol_refusal_never_echoes_the_token(gw, key):
    token = key.mint(headers={"typ": "at+jwt"})

    async def go():
        async with websockets.connect(gw.ws_url + "/ws/echo", subprotocols=["bearer." + token], open_timeout=10) as ws:
            head = {k.lower(): v for k, v in ws.response.headers.raw_items()}
            try:
                await asyncio.wait_for(ws.recv(), 5)
            except websockets.ConnectionClosed:
                pass
            return ws.response.status_code, head, ws.close_code

    code, head, close = run_async(go())
    assert code == 101 and close == 4400
    assert "sec-websocket-protocol" not in head, head
    assert token[:20] not in json.dumps(head)


def rsa_jwk(bits: int, kid: str) -> dict:
    priv = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    jwk = json.loads(RSAAlgorithm.to_jwk(priv.public_key()))
    jwk.update({"kid": kid, "alg": "RS256", "use": "sig"})
    return jwk


@pytest.mark.parametrize("case,field", [
    ("rsa1024", "providers[0].jwks.inline.keys[0].n: RSA keys under 2048 bits are refused"),
    ("sign_only", "providers[0].jwks.inline.keys[0].key_ops"),
    ("enc", "providers[0].jwks.inline.keys[0].use"),
])
def test_weak_or_non_verifying_inline_keys_do_not_load(demo, envoy_factory, key, case, field):
    jwk = {
        "rsa1024": lambda: rsa_jwk(1024, "weak"),
        "sign_only": lambda: {**key.jwk, "key_ops": ["sign"]},
        "enc": lambda: {**key.jwk, "use": "enc"},
    }[case]()
    cfg = jwt_auth_config(key)
    cfg["providers"][0]["jwks"]["inline"]["keys"] = [jwk]
    with pytest.raises(Exception) as err:
        envoy_factory(demo, jwt_auth=cfg)
    assert f"config error at {field}" in str(err.value)


@pytest.fixture
def jwks_server():
    srv = JsonDocument({"keys": []})
    yield srv
    srv.stop()


def remote_cfg(**extra):
    return {
        "providers": [{
            "name": "remote", "issuer": ISSUER, "audiences": [AUDIENCE],
            "jwks": {"remote": {"cluster": "jwks", "path": "/jwks.json", "refresh_seconds": 300, "min_refetch_seconds": 0}},
        }],
        "clock_skew_seconds": 0,
        **extra,
    }


def test_fetched_weak_keys_are_skipped_with_a_stat_and_the_cache_survives_a_refetch(demo, envoy_factory, jwks_server):
    good = Key.generate("EdDSA", kid="good")
    jwks_server.document = {"keys": [rsa_jwk(1024, "weak"), {**Key.generate("EdDSA").jwk, "key_ops": ["sign"]}, good.jwk]}
    gw = envoy_factory(demo, jwt_auth=remote_cfg(), extra_clusters={"jwks": jwks_server.port})
    assert wait_until(lambda: counter(gw, "jwks.fetch_ok") >= 3), "main thread + 2 workers fetch at start"
    assert counter(gw, "jwks.key_skipped") >= 6, "two keys skipped per fetch"
    token = good.mint()
    with requests.Session() as s:
        auth = {"authorization": f"Bearer {token}"}
        get = lambda: s.get(gw.url + "/api/echo", headers=auth, timeout=10).status_code  # noqa: E731
        assert get() == 200
        hits = counter(gw, "cache.hit")
        # An unknown kid makes this worker refetch (min_refetch_seconds 0); the key set it gets
        # still has `good`, so the cached token stays cached.
        fetched = counter(gw, "jwks.fetch_ok")
        other = Key.generate("EdDSA", kid="nobody")
        assert s.get(gw.url + "/api/echo", headers={"authorization": f"Bearer {other.mint()}"}, timeout=10).status_code == 401
        assert counter(gw, "jwks.fetch_ok") > fetched, "the unknown kid caused a refetch"
        assert get() == 200
        assert counter(gw, "cache.hit") == hits + 1, "a refetch keeps the cache for keys that did not change"


def test_require_kid_refuses_a_kidless_token_when_several_keys_fit(demo, envoy_factory):
    k1, k2 = Key.generate("EdDSA", kid="one"), Key.generate("EdDSA", kid="two")
    cfg = jwt_auth_config(k1, k2)
    kidless = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "a", "exp": 2_000_000_000}, k2.private, algorithm="EdDSA")
    plain = envoy_factory(demo, jwt_auth=cfg)
    assert status(plain, kidless) == 200, "off by default: tried against every key"
    cfg["providers"][0]["require_kid"] = True
    strict = envoy_factory(demo, jwt_auth=cfg)
    assert status(strict, kidless) == 401
    assert counter(strict, "denied.unknown_key") == 1
    assert status(strict, k2.mint()) == 200

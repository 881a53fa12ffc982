"""jwt-auth on plain HTTP, in real Envoy, in front of the real demo upstream."""

from __future__ import annotations

import json
import re

import pytest
import requests

from tokens import AUDIENCE, ISSUER, Key, claims_of, hs256_with, jwt_auth_config, unsigned

pytestmark = pytest.mark.usefixtures("require_envoy")


@pytest.fixture(scope="module")
def keys():
    return {"ed": Key.generate("EdDSA"), "rsa": Key.generate("RS256"), "es": Key.generate("ES256")}


@pytest.fixture(scope="module")
def gw(keys, demo, envoy_factory):
    cfg = jwt_auth_config(
        keys["ed"],
        keys["rsa"],
        keys["es"],
        max_token_bytes=4096,
        forward_claims={"sub": "x-gatehouse-sub"},
        rules=[{"match": {"prefix": "/api/admin"}, "require": [{"claim": "scope", "contains": "admin"}]}],
    )
    return envoy_factory(demo, jwt_auth=cfg, access_log=True)


def get(gw, path="/api/echo", token=None, **headers):
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    return requests.get(gw.url + path, headers=headers, timeout=10)


def counter(gw, name):
    return gw.stats().get(f"wasmcustom.gatehouse.jwt_auth.{name}", 0)


@pytest.mark.parametrize("alg", ["ed", "rsa", "es"])
def test_valid_token_reaches_upstream_without_the_token(gw, keys, alg):
    token = keys[alg].mint()
    r = get(gw, token=token, **{"x-gatehouse-sub": "mallory"})
    assert r.status_code == 200, r.text
    seen = r.json()["headers"]
    assert "authorization" not in seen, "the token must not reach the upstream"
    assert seen["x-gatehouse-sub"] == "alice", "client-sent claim headers are replaced"


def test_claims_are_published_as_filter_state(gw, keys):
    token = keys["ed"].mint(sub="filter-state-check")
    assert get(gw, "/api/echo?fs=1", token=token).status_code == 200
    line = gw.wait_for_access_log("/api/echo?fs=1")
    published = json.loads(line.split(" ", 2)[2])
    assert published == claims_of(token)


def test_missing_token_is_401_without_error_code(gw):
    before = counter(gw, "denied.missing")
    r = get(gw)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="gatehouse"'
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["status"] == 401
    assert counter(gw, "denied.missing") == before + 1


def _bad_tokens(keys):
    ed = keys["ed"]
    good = ed.mint()
    flipped = good[:-2] + ("A" if good[-2] != "A" else "B") + good[-1]
    return {
        "expired": (ed.mint(ttl=-10), "expired"),
        "wrong_iss": (ed.mint(iss="https://evil.test"), "issuer"),
        "wrong_aud": (ed.mint(aud="someone-else"), "audience"),
        "nbf_future": (ed.mint(nbf=2_000_000_000), "not_yet_valid"),
        "bad_signature": (flipped, "signature"),
        "alg_none": (unsigned({"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": 2_000_000_000}), "algorithm"),
        # Key confusion: HS256 MACed with the RSA public key's PEM bytes, naming the RSA key.
        "hs256_rsa_pubkey": (
            hs256_with(keys["rsa"].public_pem(), claims_of(keys["rsa"].mint()), kid=keys["rsa"].kid),
            "algorithm",
        ),
        "unknown_kid": (Key.generate("EdDSA", kid="not-configured").mint(), "unknown_key"),
        "oversized": (ed.mint(padding="x" * 5000), "too_large"),
        "garbage": ("this-is-not-a-jwt", "malformed"),
    }


@pytest.mark.parametrize(
    "case",
    ["expired", "wrong_iss", "wrong_aud", "nbf_future", "bad_signature", "alg_none", "hs256_rsa_pubkey",
     "unknown_kid", "oversized", "garbage"],
)
def test_bad_tokens_get_401(gw, keys, case):
    token, reason = _bad_tokens(keys)[case]
    before = counter(gw, f"denied.{reason}")
    r = get(gw, token=token)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == 'Bearer realm="gatehouse", error="invalid_token"'
    assert r.headers["content-type"] == "application/problem+json"
    assert token[:20] not in r.text, "the problem body must never echo the token"
    assert counter(gw, f"denied.{reason}") == before + 1, f"stat denied.{reason}"


def test_valid_token_without_required_scope_is_403(gw, keys):
    r = get(gw, "/api/admin/users", token=keys["ed"].mint(scope="phone:call"))
    assert r.status_code == 403
    assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
    assert get(gw, "/api/admin/users", token=keys["ed"].mint(scope="admin")).status_code == 200


def test_token_in_query_string_is_refused(gw, keys):
    r = get(gw, f"/api/echo?access_token={keys['ed'].mint()}")
    assert r.status_code == 400
    assert counter(gw, "denied.query_token") >= 1


def test_cache_hits_are_counted_and_do_not_change_decisions(gw, keys):
    # The cache is per worker: one keep-alive connection keeps both requests on one worker.
    token = keys["ed"].mint(ttl=300)
    before = counter(gw, "cache.hit")
    with requests.Session() as s:
        auth = {"authorization": f"Bearer {token}"}
        assert s.get(gw.url + "/api/echo", headers=auth, timeout=10).status_code == 200
        assert s.get(gw.url + "/api/echo", headers=auth, timeout=10).status_code == 200
    assert counter(gw, "cache.hit") == before + 1


def test_bad_config_fails_to_load_with_one_line_naming_the_field(demo, envoy_factory, keys):
    cfg = jwt_auth_config(keys["ed"])
    cfg["providers"][0]["jwks"]["inline"]["keys"][0]["x"] = "!!"
    with pytest.raises(Exception) as err:
        envoy_factory(demo, jwt_auth=cfg)
    # As one stage of the one-pass filter the path starts at the stage (`jwt_auth.providers…`).
    assert re.search(r"config error at (jwt_auth\.)?providers\[0\]\.jwks\.inline\.keys\[0\]\.x: not base64url",
                     str(err.value)), str(err.value)

"""token-proxy in real Envoy, in front of the real demo upstream.

The cookies are made by Python `cryptography` (tests/cookies.py), not by gatehouse's Rust code,
so these tests prove byte compatibility with the Curity token-handler v1 format. The key reaches
Envoy as it does in production: `GATEHOUSE_COOKIE_KEYS` in Envoy's environment, listed in the
VM's `host_env_keys`, named by `encryption_keys_env`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib

import pytest
import requests

from conftest import COOKIE_KEYS_VAR, free_port, run_async
from cookies import IV_LEN, b64url, new_key, raw, seal, unseal
from tokens import Key, claims_of, jwt_auth_config

pytestmark = pytest.mark.usefixtures("require_envoy")

# What the upstream answers on /api/set-cookies/…: one gatehouse cookie set carelessly, one other.
UPSTREAM_SET_COOKIES = ["gh-at=upstream-value; Path=/; SameSite=Lax; Max-Age=60", "theme=dark; Path=/"]


def proxy_config(origin: str, **extra) -> dict:
    cfg = {
        "cookie_prefix": "gh",
        "encryption_keys_env": COOKIE_KEYS_VAR,
        "trusted_web_origins": [origin],
        "cors": {},
        "harden_cookies": {"names": ["gh-at", "gh-csrf"], "path": "/api"},
    }
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="module")
def keys(demo):
    # The current key is the demo's, so its login cookies are accepted here too.
    return {"current": demo.cookie_keys, "previous": new_key(), "other": new_key()}


@pytest.fixture(scope="module")
def signer():
    return Key.generate("EdDSA")


def start(envoy_factory, demo, env_keys: str, set_cookies=UPSTREAM_SET_COOKIES, **kwargs):
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    token_proxy = kwargs.pop("token_proxy", None) or proxy_config(origin)
    routes = [
        {
            "name": "set-cookies",
            "match": {"prefix": "/api/set-cookies"},
            "route": {"cluster": "demo"},
            "response_headers_to_add": [
                {"header": {"key": "set-cookie", "value": v}, "append_action": "APPEND_IF_EXISTS_OR_ADD"}
                for v in set_cookies
            ],
        },
        {"name": "default", "match": {"prefix": "/"}, "route": {"cluster": "demo", "timeout": "0s"}},
    ]
    envoy = envoy_factory(demo, port=port, routes=routes, access_log=True, env={COOKIE_KEYS_VAR: env_keys},
                          token_proxy=token_proxy, **kwargs)
    envoy.origin = origin
    return envoy


@pytest.fixture(scope="module")
def gw(keys, demo, envoy_factory):
    """token-proxy alone: the upstream sees the bearer token it sets."""
    return start(envoy_factory, demo, f"{keys['current']},{keys['previous']}")


@pytest.fixture(scope="module")
def chain(keys, signer, demo, envoy_factory):
    """token-proxy, then jwt-auth: the decrypted token is verified, its claims published."""
    return start(envoy_factory, demo, keys["current"],
                 jwt_auth=jwt_auth_config(signer, forward_claims={"sub": "x-gatehouse-sub"}))


def send(gw, method="GET", path="/api/echo", cookie: str | None = None, **headers) -> requests.Response:
    if cookie is not None:
        headers["cookie"] = cookie
    return requests.request(method, gw.url + path, headers=headers, timeout=10)


def counter(gw, name: str, filter_name: str = "token_proxy") -> int:
    return gw.stats().get(f"wasmcustom.gatehouse.{filter_name}.{name}", 0)


def logged_in(keys, token: str, csrf: str = "csrf-s3cret", key: str = "current") -> str:
    return f"gh-at={seal(keys[key], token)}; gh-csrf={seal(keys[key], csrf)}"


def assert_generic_401(r: requests.Response):
    assert r.status_code == 401, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == 401
    text = r.text.lower()
    for word in ("cookie", "csrf", "origin", "decrypt", "version", "base64"):
        assert word not in text, f"the body must not say which check failed: {r.text}"


def set_cookie_headers(r: requests.Response) -> list[str]:
    return r.raw.headers.getlist("set-cookie")


# ------------------------------------------------------------------------------ round trip


def test_round_trip_cookie_in_bearer_out(gw, keys, signer):
    token = signer.mint()
    others_before = 'theme=dark; lang=en-GB'
    others_after = 'quoted="a b"; flag; empty='
    header = f"{others_before}; gh-at={seal(keys['current'], token)}; gh-csrf={seal(keys['current'], 'x')}; {others_after}"
    before = counter(gw, "forwarded")
    r = send(gw, cookie=header)
    assert r.status_code == 200, r.text
    seen = r.json()["headers"]
    assert seen["authorization"] == f"Bearer {token}"
    assert seen["cookie"] == f"{others_before}; {others_after}", "other cookies arrive byte for byte"
    assert "gh-at" not in seen["cookie"] and "gh-csrf" not in seen["cookie"]
    assert counter(gw, "forwarded") == before + 1


def test_only_gatehouse_cookies_leaves_no_cookie_header(gw, keys, signer):
    r = send(gw, cookie=logged_in(keys, signer.mint()))
    assert r.status_code == 200, r.text
    assert "cookie" not in r.json()["headers"]


def test_no_gatehouse_cookie_passes_untouched(gw):
    before = counter(gw, "passed")
    r = send(gw, cookie="theme=dark")
    assert r.status_code == 200
    seen = r.json()["headers"]
    assert "authorization" not in seen and seen["cookie"] == "theme=dark"
    assert counter(gw, "passed") == before + 1


def test_demo_login_cookies_are_curity_v1_and_accepted(gw, demo, keys):
    """The demo encrypts with gatehouse's Rust code; Python decrypts it, and Envoy accepts it."""
    r = requests.post(demo.url + "/dev/login?user=cookie-user", timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    cookies = {c.split("=", 1)[0]: c for c in set_cookie_headers(r)}
    assert set(cookies) == {"__Host-gh-at", "__Host-gh-csrf", "__Host-gh-sid"}
    for name, c in cookies.items():
        attrs = [a.strip() for a in c.split(";")[1:]]
        # `__Host-` cookies: Secure, Path=/ and no Domain, or the browser drops them.
        assert {"HttpOnly", "Secure", "SameSite=Strict", "Path=/"} <= set(attrs), c
        assert not any(a.lower().startswith(("domain", "path=/api")) for a in attrs), c
    at = cookies["__Host-gh-at"].split(";")[0].split("=", 1)[1]
    csrf = cookies["__Host-gh-csrf"].split(";")[0].split("=", 1)[1]
    assert unseal(keys["current"], at) == body["access_token"]
    assert unseal(keys["current"], csrf) == body["csrf_token"]
    claims = claims_of(body["access_token"])
    assert claims["sub"] == "cookie-user"
    # The session cookie is a secret: the token carries its SHA-256 (session-binding's `sid_hash`)
    # and a public `sid` that is not the cookie.
    secret = cookies["__Host-gh-sid"].split(";")[0].split("=", 1)[1]
    assert claims["sid_hash"] == b64url(hashlib.sha256(secret.encode()).digest()) and claims["jti"]
    assert claims["sid"] and claims["sid"] != secret
    r = send(gw, "POST", cookie=f"gh-at={at}; gh-csrf={csrf}", origin=gw.origin, **{"x-gh-csrf": body["csrf_token"]})
    assert r.status_code == 200, r.text
    assert r.json()["headers"]["authorization"] == f"Bearer {body['access_token']}"


# --------------------------------------------------------------------- rejected cookies


def _flip(value: str, index: int) -> str:
    b = raw(value)
    b[index] ^= 0x01
    return b64url(bytes(b))


def _with(value: str, fn) -> str:
    return b64url(bytes(fn(raw(value))))


def _not_utf8(key: str) -> str:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    iv = bytes(IV_LEN)
    return b64url(b"\x01" + iv + AESGCM(bytes.fromhex(key)).encrypt(iv, b"\xff\xfe token", None))


def _bad_cookies(keys, good: str) -> dict[str, tuple[str, str]]:
    """case → (gh-at value, the reason token-proxy logs and counts)"""
    b = raw(good)
    return {
        "tampered_ciphertext": (_flip(good, 1 + IV_LEN + 2), "cookie_decrypt"),
        "tampered_tag": (_flip(good, len(b) - 1), "cookie_decrypt"),
        "tampered_iv": (_flip(good, 3), "cookie_decrypt"),
        "truncated_tag": (_with(good, lambda x: x[:-4]), "cookie_decrypt"),
        "truncated": (_with(good, lambda x: x[:29]), "cookie_truncated"),
        "truncated_text": (good[: len(good) // 12 * 4], "cookie_decrypt"),  # whole base64 quads
        "empty": ("", "cookie_truncated"),
        "wrong_version": (_with(good, lambda x: bytes([2]) + x[1:]), "cookie_version"),
        "version_zero": (_with(good, lambda x: bytes([0]) + x[1:]), "cookie_version"),
        "wrong_key": (seal(keys["other"], "a.b.c"), "cookie_decrypt"),
        "not_base64url": ("%%not*base64url%%", "cookie_encoding"),
        "padded_base64": (good + "==", "cookie_encoding"),
        "standard_base64": (base64.b64encode(bytes(b"\x01" + bytes(40) + b"\xfb\xff")).decode(), "cookie_encoding"),
        "oversized": ("A" * 20000, "cookie_too_large"),
        "not_utf8": (_not_utf8(keys["current"]), "cookie_content"),
    }


BAD_CASES = ["tampered_ciphertext", "tampered_tag", "tampered_iv", "truncated_tag", "truncated", "truncated_text",
             "empty", "wrong_version", "version_zero", "wrong_key", "not_base64url", "padded_base64",
             "standard_base64", "oversized", "not_utf8"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_cookie_is_401_and_envoy_serves_the_next_request(gw, keys, signer, case):
    token = signer.mint()
    good = seal(keys["current"], token)
    value, reason = _bad_cookies(keys, good)[case]
    before = counter(gw, f"denied.{reason}")
    r = send(gw, cookie=f"theme=dark; gh-at={value}")
    assert_generic_401(r)
    assert counter(gw, f"denied.{reason}") == before + 1, f"stat denied.{reason}"
    assert gw.proc.poll() is None, "Envoy is still running"
    # The very next request, with a good cookie, is served.
    r = send(gw, cookie=f"gh-at={good}")
    assert r.status_code == 200, r.text
    assert r.json()["headers"]["authorization"] == f"Bearer {token}"


def test_denials_are_logged_with_the_reason_never_the_cookie(gw, keys):
    value = seal(keys["other"], "secret.token.value")
    assert send(gw, path="/api/echo?logcheck=1", cookie=f"gh-at={value}").status_code == 401
    log = gw.log_text()
    assert "gatehouse.token_proxy: denied (cookie_decrypt) http /api/echo -> 401" in log
    assert value not in log and "secret.token.value" not in log
    assert keys["current"] not in log and keys["previous"] not in log, "keys never reach the log"


# ------------------------------------------------------------------------------- rotation


def test_previous_key_still_decrypts(gw, keys):
    for key in ("current", "previous"):
        r = send(gw, cookie=f"gh-at={seal(keys[key], f'token-under-{key}')}")
        assert r.status_code == 200, r.text
        assert r.json()["headers"]["authorization"] == f"Bearer token-under-{key}"
    assert_generic_401(send(gw, cookie=f"gh-at={seal(keys['other'], 'x')}"))


def test_after_rotation_the_dropped_key_no_longer_decrypts(keys, demo, envoy_factory):
    rotated = start(envoy_factory, demo, keys["current"])
    assert send(rotated, cookie=f"gh-at={seal(keys['current'], 't')}").status_code == 200
    assert_generic_401(send(rotated, cookie=f"gh-at={seal(keys['previous'], 't')}"))
    rotated.stop()


# ------------------------------------------------------------------- chained with jwt-auth


def test_chain_verifies_the_decrypted_token_and_publishes_its_claims(chain, keys, signer):
    token = signer.mint(sub="cookie-alice")
    r = send(chain, path="/api/echo?chain=1", cookie=logged_in(keys, token), **{"x-gatehouse-sub": "mallory"})
    assert r.status_code == 200, r.text
    seen = r.json()["headers"]
    assert seen["x-gatehouse-sub"] == "cookie-alice"
    assert "authorization" not in seen, "jwt-auth removes the token before the upstream"
    line = chain.wait_for_access_log("/api/echo?chain=1")
    assert '"sub":"cookie-alice"' in line.replace(" ", ""), line


@pytest.mark.parametrize("case,reason", [("expired", "expired"), ("unknown_key", "unknown_key")])
def test_chain_refuses_a_bad_jwt_inside_a_valid_cookie(chain, keys, signer, case, reason):
    token = signer.mint(ttl=-30) if case == "expired" else Key.generate("EdDSA").mint()
    forwarded = counter(chain, "forwarded")
    denied = counter(chain, f"denied.{reason}", "jwt_auth")
    r = send(chain, cookie=logged_in(keys, token))
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == 'Bearer realm="gatehouse", error="invalid_token"'
    assert counter(chain, "forwarded") == forwarded + 1, "token-proxy decrypted it"
    assert counter(chain, f"denied.{reason}", "jwt_auth") == denied + 1, "jwt-auth refused it"


def test_chain_without_cookies_or_token_is_refused_by_jwt_auth(chain):
    r = send(chain)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="gatehouse"'


# ------------------------------------------------------------------------------------ CSRF


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_state_changing_request_with_origin_and_csrf_header_passes(gw, keys, signer, method):
    token = signer.mint()
    r = send(gw, method, cookie=logged_in(keys, token, csrf="s3cret"), origin=gw.origin, **{"x-gh-csrf": "s3cret"})
    assert r.status_code == 200, r.text
    seen = r.json()["headers"]
    assert seen["authorization"] == f"Bearer {token}"
    assert "x-gh-csrf" not in seen, "the CSRF header stops at the gateway"


def _csrf_cases(gw, keys):
    good_cookie = logged_in(keys, "t", csrf="s3cret")
    return {
        "no_header": (good_cookie, {"origin": gw.origin}, "csrf"),
        "wrong_header": (good_cookie, {"origin": gw.origin, "x-gh-csrf": "s3cret-not"}, "csrf"),
        "empty_header": (good_cookie, {"origin": gw.origin, "x-gh-csrf": ""}, "csrf"),
        "untrusted_origin": (good_cookie, {"origin": "http://evil.test", "x-gh-csrf": "s3cret"}, "origin"),
        "other_port_origin": (good_cookie, {"origin": "http://127.0.0.1:1", "x-gh-csrf": "s3cret"}, "origin"),
        "null_origin": (good_cookie, {"origin": "null", "x-gh-csrf": "s3cret"}, "origin"),
        "missing_origin": (good_cookie, {"x-gh-csrf": "s3cret"}, "origin"),
        "no_csrf_cookie": (f"gh-at={seal(keys['current'], 't')}", {"origin": gw.origin, "x-gh-csrf": "s3cret"}, "csrf"),
        "csrf_cookie_wrong_key": (f"gh-at={seal(keys['current'], 't')}; gh-csrf={seal(keys['other'], 's3cret')}",
                                  {"origin": gw.origin, "x-gh-csrf": "s3cret"}, "cookie_decrypt"),
    }


@pytest.mark.parametrize("case", ["no_header", "wrong_header", "empty_header", "untrusted_origin", "other_port_origin",
                                  "null_origin", "missing_origin", "no_csrf_cookie", "csrf_cookie_wrong_key"])
def test_post_failing_csrf_checks_is_401(gw, keys, case):
    cookie, headers, reason = _csrf_cases(gw, keys)[case]
    before = counter(gw, f"denied.{reason}")
    r = send(gw, "POST", cookie=cookie, **headers)
    assert_generic_401(r)
    assert counter(gw, f"denied.{reason}") == before + 1


def test_get_without_csrf_header_or_origin_passes(gw, keys, signer):
    token = signer.mint()
    r = send(gw, "GET", cookie=logged_in(keys, token))
    assert r.status_code == 200, r.text
    assert r.json()["headers"]["authorization"] == f"Bearer {token}"


# ------------------------------------------------ WebSocket upgrades: cross-site hijacking


async def _upgrade(gw, cookie: str, origin: str | None, **headers):
    """Open /ws/echo with the cookie; returns (headers the upstream saw or None, close code)."""
    import json

    import websockets

    if origin is not None:
        headers["origin"] = origin
    async with websockets.connect(gw.ws_url + "/ws/echo", subprotocols=["sip"],
                                  additional_headers={"cookie": cookie, **headers}) as ws:
        try:
            await ws.send("__headers__")
            return json.loads(await asyncio.wait_for(ws.recv(), 5)), None
        except websockets.ConnectionClosed:
            return None, ws.close_code


def upgrade(gw, cookie: str, origin: str | None, **headers):
    return run_async(_upgrade(gw, cookie, origin, **headers), 20)


def test_a_websocket_upgrade_with_the_cookie_from_a_trusted_origin_gets_the_token(gw, keys, signer):
    token = signer.mint()
    seen, code = upgrade(gw, logged_in(keys, token), gw.origin)
    assert code is None and seen is not None
    assert seen["authorization"] == f"Bearer {token}"
    assert "gh-at" not in seen.get("cookie", "")


@pytest.mark.parametrize("origin, site", [
    ("http://evil.test", None),                 # cross-site WebSocket hijacking
    ("http://evil.test", "cross-site"),
    ("http://sub.127.0.0.1.nip.io", "same-site"),  # a sibling: SameSite does not stop it
    ("null", None),
    (None, None),                               # browsers always send Origin on an upgrade
    (None, "same-origin"),
], ids=["cross_site", "cross_site_fetch_metadata", "same_site", "null", "no_origin", "no_origin_same_origin"])
def test_a_websocket_upgrade_with_the_cookie_from_elsewhere_closes_4403(gw, keys, signer, origin, site):
    before = counter(gw, "denied.origin")
    headers = {"sec-fetch-site": site} if site else {}
    seen, code = upgrade(gw, logged_in(keys, signer.mint()), origin, **headers)
    assert seen is None, "the upgrade must not reach the upstream"
    assert code == 4403, "a completed handshake and a close frame: the page reads 4403, not 1006"
    assert counter(gw, "denied.origin") == before + 1
    assert "gatehouse.token_proxy: denied (origin) websocket /ws/echo -> close 4403" in gw.log_text()


def test_a_websocket_upgrade_the_browser_calls_same_origin_is_trusted(gw, keys, signer):
    token = signer.mint()
    # The origin the page was served from is not in the list, but the browser says the
    # request is same-origin (Sec-Fetch-Site is set by the browser, never by page script).
    seen, code = upgrade(gw, logged_in(keys, token), "http://localhost:1", **{"sec-fetch-site": "same-origin"})
    assert code is None and seen["authorization"] == f"Bearer {token}"


def test_a_websocket_upgrade_without_the_cookie_is_not_token_proxys_business(gw):
    seen, code = upgrade(gw, "theme=dark", "http://evil.test")
    assert code is None and seen is not None and "authorization" not in seen


# ------------------------------------------------------------------ client bearer, CORS


def test_client_bearer_is_refused_without_allow_tokens(gw):
    before = counter(gw, "denied.token_not_allowed")
    assert_generic_401(send(gw, authorization="Bearer a.b.c"))
    assert counter(gw, "denied.token_not_allowed") == before + 1


def test_preflight_from_trusted_origin_is_answered(gw):
    r = send(gw, "OPTIONS", origin=gw.origin, **{"access-control-request-method": "POST",
                                                  "access-control-request-headers": "x-gh-csrf"})
    assert r.status_code == 204, r.text
    assert r.headers["access-control-allow-origin"] == gw.origin
    assert r.headers["access-control-allow-credentials"] == "true"
    assert "x-gh-csrf" in r.headers["access-control-allow-headers"]


def test_preflight_from_untrusted_origin_is_401(gw):
    before = counter(gw, "denied.origin")
    r = send(gw, "OPTIONS", origin="http://evil.test", **{"access-control-request-method": "POST"})
    assert_generic_401(r)
    assert "access-control-allow-origin" not in r.headers
    assert counter(gw, "denied.origin") == before + 1


def test_responses_to_a_trusted_origin_carry_cors_headers_errors_included(gw, keys):
    ok = send(gw, cookie=logged_in(keys, "t"), origin=gw.origin)
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == gw.origin
    err = send(gw, "POST", cookie=logged_in(keys, "t"), origin=gw.origin)  # no CSRF header
    assert err.status_code == 401
    assert err.headers["access-control-allow-origin"] == gw.origin
    assert err.headers["access-control-allow-credentials"] == "true"


# ----------------------------------------------------------------- Set-Cookie hardening


def test_set_cookie_for_gatehouse_cookies_is_hardened_others_untouched(gw):
    r = send(gw, path="/api/set-cookies/x")
    assert r.status_code == 200
    cookies = set_cookie_headers(r)
    assert "gh-at=upstream-value; Max-Age=60; Path=/api; HttpOnly; Secure; SameSite=Strict" in cookies, cookies
    assert "theme=dark; Path=/" in cookies, cookies
    assert len(cookies) == 2


# ------------------------------------------------------------------------ __Host- cookies


def test_host_prefixed_cookies_are_read_hardened_host_only_and_keep_the_plain_csrf_header(keys, demo, envoy_factory,
                                                                                          signer):
    cfg = proxy_config("http://placeholder.test", cookie_prefix="__Host-gh",
                       harden_cookies={"names": ["__Host-gh-at", "__Host-gh-csrf"]})
    # The upstream sets it carelessly: a Domain (so sibling subdomains would get it) and a path.
    envoy = start(envoy_factory, demo, keys["current"], token_proxy=cfg,
                  set_cookies=["__Host-gh-at=v; Domain=127.0.0.1; Path=/api; SameSite=Lax"])
    cookies = set_cookie_headers(send(envoy, path="/api/set-cookies/x"))
    assert cookies == ["__Host-gh-at=v; Path=/; HttpOnly; Secure; SameSite=Strict"], cookies
    token = signer.mint()
    sealed = f"__Host-gh-at={seal(keys['current'], token)}; __Host-gh-csrf={seal(keys['current'], 's3cret')}"
    r = send(envoy, "POST", cookie=f"gh-at=tossed; {sealed}", origin=envoy.origin, **{"x-gh-csrf": "s3cret"})
    assert r.status_code == 401, "the trusted origin of this gateway is not in the list: refused"
    r = send(envoy, "POST", cookie=f"gh-at=tossed; {sealed}", **{"sec-fetch-site": "same-origin", "x-gh-csrf": "s3cret"})
    assert r.status_code == 200, r.text
    seen = r.json()["headers"]
    assert seen["authorization"] == f"Bearer {token}"
    assert seen["cookie"] == "gh-at=tossed", "a plain cookie of a similar name is not the credential"
    assert "x-gh-csrf" not in seen


def test_a_host_prefixed_cookie_with_another_path_fails_to_load_naming_the_field(keys, demo, envoy_factory):
    cfg = proxy_config("http://placeholder.test", cookie_prefix="__Host-gh",
                       harden_cookies={"names": ["__Host-gh-at"], "path": "/api"})
    with pytest.raises(Exception) as err:
        start(envoy_factory, demo, keys["current"], token_proxy=cfg)
    assert "config error at harden_cookies.path: must be `/` for the `__Host-` cookie `__Host-gh-at`" in str(err.value)


# ------------------------------------------------------------------- keys from the environment


def test_keys_env_not_set_for_the_vm_fails_to_load_naming_the_field(demo, envoy_factory):
    # Listed in host_env_keys, but not set in Envoy's environment.
    with pytest.raises(Exception) as err:
        start(envoy_factory, demo, None)
    assert (f"config error at encryption_keys_env: environment variable {COOKIE_KEYS_VAR} is not set in the Wasm VM"
            in str(err.value))


def test_malformed_keys_env_fails_to_load_without_logging_the_value(demo, envoy_factory):
    good = new_key()
    bad = f"{good},{good[:40]}"
    with pytest.raises(Exception) as err:
        start(envoy_factory, demo, bad)
    text = str(err.value)
    assert f"config error at encryption_keys_env: environment variable {COOKIE_KEYS_VAR}: key 2 of 2 is not 64 hex" in text
    assert good[:16] not in text, "the key material is never logged"


def test_inline_and_env_keys_together_fail_to_load(demo, envoy_factory):
    port = free_port()
    cfg = proxy_config(f"http://127.0.0.1:{port}", encryption_keys=[new_key()])
    with pytest.raises(Exception) as err:
        start(envoy_factory, demo, new_key(), token_proxy=cfg)
    assert "config error at encryption_keys_env: give either encryption_keys or encryption_keys_env, not both" in str(err.value)

"""turn-credentials in real Envoy behind jwt-auth, checked by a real coturn (Debian `coturn`,
`use-auth-secret`) on loopback: the credentials it mints allocate a relay that carries data to a
real peer (`turnutils_peer`); expired ones, ones minted with another secret and a tampered
username are refused by coturn; a secret rotation works the way docs/turn-credentials.md tells
it; and the demo phone page gets its credentials through the shipped local-stack config."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import random
import secrets
import shutil
import subprocess
import time

import pytest
import requests
import yaml

from conftest import ENVOY_BIN, ROOT, free_port, missing, start_shipped, stop, wait_for
from tokens import jwt_auth_config

pytestmark = pytest.mark.usefixtures("require_envoy")

ORIGIN = "https://phone.gatehouse.test"
SECRET_VAR = "GATEHOUSE_TURN_SECRET"
NEXT_SECRET_VAR = "GATEHOUSE_TURN_NEXT_SECRET"


def turn_rest_credential(secret: str, username: str) -> str:
    """The TURN REST API credential, computed independently of the filter: base64(HMAC-SHA1)."""
    return base64.b64encode(hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()).decode()


class Coturn:
    """A real coturn with `use-auth-secret` and one `static-auth-secret` line per secret (coturn
    accepts credentials signed with any of them: the overlap of a rotation), plus a real UDP peer
    (`turnutils_peer`) that echoes what the relay sends it."""

    def __init__(self, workdir, *turn_secrets: str):
        self.port = free_port()
        self.peer_port = free_port()
        base = random.randrange(50000, 60000, 50)
        self.log = workdir / "turn.log"
        conf = workdir / "turn.conf"
        conf.write_text("\n".join([
            "listening-ip=127.0.0.1", "relay-ip=127.0.0.1", f"listening-port={self.port}",
            f"min-port={base}", f"max-port={base + 49}", "use-auth-secret",
            *(f"static-auth-secret={s}" for s in turn_secrets), "realm=gatehouse.test", "no-tls", "no-dtls",
            "no-cli", "allow-loopback-peers", "fingerprint", f"log-file={self.log}", "simple-log",
            f"pidfile={workdir / 'turn.pid'}", f"userdb={workdir / 'turndb'}", "",
        ]))
        self.proc = subprocess.Popen(["turnserver", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        self.peer = subprocess.Popen(["turnutils_peer", "-L", "127.0.0.1", "-p", str(self.peer_port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for(lambda: self.log.exists() and "Total General servers" in self.log.read_text(errors="replace"),
                 20, "coturn", self.proc)

    def stop(self):
        stop(self.peer)
        stop(self.proc)

    def _uclient(self, username: str, credential: str) -> subprocess.CompletedProcess:
        # One UDP client: Allocate, CreatePermission + ChannelBind for the peer, one message
        # relayed to the peer and echoed back.
        return subprocess.run(
            ["turnutils_uclient", "-p", str(self.port), "-u", username, "-w", credential, "-n", "1", "-m", "1",
             "-e", "127.0.0.1", "-r", str(self.peer_port), "-X", "-c", "127.0.0.1"],
            capture_output=True, text=True, timeout=60,
        )

    def relays(self, username: str, credential: str) -> bool:
        """turnutils_uclient allocates with these credentials and its message makes the round
        trip through the relay and the peer."""
        r = self._uclient(username, credential)
        out = r.stdout + r.stderr
        return r.returncode == 0 and "Cannot complete Allocation" not in out and "Total lost packets 0 " in out

    def refuses(self, username: str, credential: str) -> bool:
        """turnutils_uclient cannot allocate, and coturn's log says why: it found no secret that
        makes these credentials valid (a wrong HMAC and a past expiry read the same there)."""
        r = self._uclient(username, credential)
        if r.returncode == 0 or "Cannot complete Allocation" not in r.stdout + r.stderr:
            return False
        needle = f"check_stun_auth: Cannot find credentials of user <{username}>"
        try:
            wait_for(lambda: needle in self.log.read_text(errors="replace"), 5, "coturn log")
        except RuntimeError:
            return False
        return True


@pytest.fixture(scope="module")
def turn_secret():
    return secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def next_secret():
    return secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def coturn(tmp_path_factory, turn_secret, next_secret):
    if not all(shutil.which(b) for b in ("turnserver", "turnutils_uclient", "turnutils_peer")):
        missing("coturn (apt-get install coturn)")
    c = Coturn(tmp_path_factory.mktemp("coturn"), turn_secret, next_secret)
    yield c
    c.stop()


def turn_config(coturn, **extra):
    cfg = {
        "urls": [f"turn:127.0.0.1:{coturn.port}?transport=udp"],
        "allowed_origins": [ORIGIN],
        "secret": {"env": SECRET_VAR},
    }
    cfg.update(extra)
    return cfg


def gateway(envoy_factory, demo, key, coturn, secret, env=None, **turn):
    # The endpoint's own check for missing claims is reachable: jwt-auth lets a request without
    # a token through on that path (a bad token is still refused by jwt-auth).
    jwt = jwt_auth_config(key, rules=[{"match": {"prefix": "/turn-credentials"}, "allow_missing": True}])
    return envoy_factory(demo, jwt_auth=jwt, turn_credentials=turn_config(coturn, **turn),
                         env={SECRET_VAR: secret, **(env or {})})


@pytest.fixture(scope="module")
def gw(envoy_factory, demo, key, coturn, turn_secret):
    return gateway(envoy_factory, demo, key, coturn, turn_secret)


def mint(gw, token=None, origin=ORIGIN, method="POST", headers=None):
    headers = dict(headers or {})
    if origin:
        headers["origin"] = origin
    if token:
        headers["authorization"] = f"Bearer {token}"
    return requests.request(method, gw.url + "/turn-credentials", headers=headers, timeout=10)


def ice_server(r: requests.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()["iceServers"][0]


def test_minted_credentials_relay_through_coturn(gw, key, coturn, turn_secret):
    r = mint(gw, key.mint(sub="alice"))
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    server = body["iceServers"][0]
    assert set(server) == {"urls", "username", "credential"}
    assert server["urls"] == [f"turn:127.0.0.1:{coturn.port}?transport=udp"]
    expiry, user = server["username"].split(":")
    assert user == "alice" and int(expiry) == body["expiresAt"]
    assert body["ttl"] == 3600 and abs(body["expiresAt"] - time.time() - 3600) < 5
    assert server["credential"] == turn_rest_credential(turn_secret, server["username"])
    assert coturn.relays(server["username"], server["credential"])
    assert gw.stats().get("wasmcustom.gatehouse.turn_credentials.minted", 0) >= 1


def test_coturn_refuses_a_tampered_username(gw, key, coturn):
    server = ice_server(mint(gw, key.mint(sub="alice")))
    expiry, _ = server["username"].split(":")
    assert coturn.refuses(f"{expiry}:mallory", server["credential"])
    assert coturn.refuses(f"{int(expiry) + 86400}:alice", server["credential"])


def test_coturn_refuses_expired_credentials(envoy_factory, demo, key, coturn, turn_secret):
    short = gateway(envoy_factory, demo, key, coturn, turn_secret, ttl_seconds=8)
    body = mint(short, key.mint(sub="alice")).json()
    server = body["iceServers"][0]
    assert body["ttl"] == 8
    # The same credentials work while they are valid and stop working once their time is up.
    assert coturn.relays(server["username"], server["credential"])
    time.sleep(max(0.0, body["expiresAt"] + 1.5 - time.time()))
    assert coturn.refuses(server["username"], server["credential"])


def test_coturn_refuses_credentials_of_another_secret(envoy_factory, demo, key, coturn):
    other = gateway(envoy_factory, demo, key, coturn, secrets.token_urlsafe(24))
    server = ice_server(mint(other, key.mint(sub="alice")))
    assert coturn.refuses(server["username"], server["credential"])


def test_a_secret_rotation_drops_no_call(envoy_factory, demo, key, coturn, turn_secret, next_secret):
    """docs/turn-credentials.md's rotation: coturn has both secrets; Envoy signs with the current
    one until next_secret_from, then with the next one (both from Envoy's environment)."""
    switch = int(time.time()) + 10
    rotating = gateway(envoy_factory, demo, key, coturn, turn_secret, env={NEXT_SECRET_VAR: next_secret},
                       next_secret={"env": NEXT_SECRET_VAR}, next_secret_from=switch)
    before = ice_server(mint(rotating, key.mint(sub="alice")))
    assert time.time() < switch, "Envoy took too long to start for this test"
    assert before["credential"] == turn_rest_credential(turn_secret, before["username"])
    time.sleep(max(0.0, switch - time.time() + 0.5))
    after = ice_server(mint(rotating, key.mint(sub="alice")))
    assert after["credential"] == turn_rest_credential(next_secret, after["username"])
    # Both work on the coturn that holds both secrets: nothing handed out before the switch breaks.
    assert coturn.relays(before["username"], before["credential"])
    assert coturn.relays(after["username"], after["credential"])


@pytest.mark.parametrize(
    "case,status,reason",
    [("missing_token", 401, "no_claims"), ("forged_claims_headers", 401, "no_claims"), ("expired_token", 401, None),
     ("foreign_origin", 403, "origin"), ("no_origin", 403, "origin"), ("get", 405, "method"),
     ("put", 405, "method"), ("colon_in_user", 403, "bad_user"), ("control_char_in_user", 403, "bad_user")],
)
def test_the_endpoint_refuses(gw, key, case, status, reason):
    stat = lambda: gw.stats().get(f"wasmcustom.gatehouse.turn_credentials.denied.{reason}", 0)  # noqa: E731
    before = stat()
    r = {
        "missing_token": lambda: mint(gw),
        # Claims come only from jwt-auth's filter state; nothing a client sends stands in for them.
        "forged_claims_headers": lambda: mint(gw, headers={"gatehouse.jwt_auth.claims": '{"sub":"alice"}',
                                                            "x-gatehouse-sub": "alice"}),
        "expired_token": lambda: mint(gw, key.mint(ttl=-5)),
        "foreign_origin": lambda: mint(gw, key.mint(), origin="https://evil.example"),
        "no_origin": lambda: mint(gw, key.mint(), origin=None),
        "get": lambda: mint(gw, key.mint(), method="GET"),
        "put": lambda: mint(gw, key.mint(), method="PUT"),
        "colon_in_user": lambda: mint(gw, key.mint(sub="a:b")),
        "control_char_in_user": lambda: mint(gw, key.mint(sub="a\tb")),
    }[case]()
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert "iceServers" not in r.text
    if case in ("get", "put"):
        assert r.headers["allow"] == "POST"
    if reason:
        assert stat() == before + 1


def test_the_filter_does_not_load_without_its_secret(tmp_path):
    """The shipped example, without GATEHOUSE_TURN_SECRET in Envoy's environment: the filter
    refuses its config with one line naming the field, and Envoy does not start."""
    env = {k: v for k, v in os.environ.items() if k not in (SECRET_VAR, NEXT_SECRET_VAR)}
    r = subprocess.run(
        [str(ENVOY_BIN), "--mode", "validate", "-c", str(ROOT / "envoy-config" / "examples" / "turn-credentials.yaml"),
         "--use-dynamic-base-id"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env,
    )
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert f"config error at secret.env: environment variable {SECRET_VAR} is not set" in out, out


# ------------------------------------------------------------------------- the shipped local stack


def test_the_demo_phone_page_gets_credentials_from_the_local_stack(demo, envoy_factory, coturn, turn_secret,
                                                                   browser_context, browser_page):
    """envoy-config/envoy.yaml as `cargo xtask up` runs it (free ports, `urls` pointed at the test
    coturn): the phone page logs in with the dev login, POSTs /turn-credentials with its token,
    and the credentials it got relay through the real coturn."""

    def edit(root_id, value):
        if root_id == "turn_credentials":
            assert value["secret"] == {"env": SECRET_VAR}, "the shipped config takes the secret from the environment"
            value["urls"] = [f"turn:127.0.0.1:{coturn.port}?transport=udp"]

    stack = start_shipped(envoy_factory, demo, edit, env={SECRET_VAR: turn_secret})
    browser_context.clear_cookies()
    page = browser_page
    page.goto(stack.url + "/")
    with page.expect_response(lambda r: r.url.endswith("/turn-credentials")) as response:
        page.click("#login")
    assert response.value.status == 200
    assert response.value.request.method == "POST"
    assert response.value.headers["cache-control"] == "no-store"
    server = response.value.json()["iceServers"][0]
    page.wait_for_function("() => document.getElementById('log').innerText.includes('TURN credentials for')")
    line = next(t for t in page.locator("#log li").all_inner_texts() if "TURN credentials" in t)
    assert f"TURN credentials for {server['username']} " in line and server["username"].endswith(":demo-user"), line
    assert coturn.relays(server["username"], server["credential"])
    assert stack.stats().get("wasmcustom.gatehouse.turn_credentials.minted", 0) >= 1

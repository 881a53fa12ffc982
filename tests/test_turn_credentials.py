"""turn-credentials in real Envoy behind jwt-auth, checked by a real coturn (Debian `coturn`,
`use-auth-secret`): the credentials it mints allocate a relay; expired ones, ones minted with
another secret and a tampered username do not."""

from __future__ import annotations

import random
import secrets
import shutil
import subprocess
import time

import pytest
import requests

from conftest import free_port, missing, stop, wait_for
from tokens import jwt_auth_config

pytestmark = pytest.mark.usefixtures("require_envoy")

ORIGIN = "https://phone.gatehouse.test"
SECRET_VAR = "GATEHOUSE_TURN_SECRET"


class Coturn:
    def __init__(self, workdir, secret: str):
        self.port = free_port()
        base = random.randrange(50000, 60000, 50)
        self.log = workdir / "turn.log"
        conf = workdir / "turn.conf"
        conf.write_text("\n".join([
            "listening-ip=127.0.0.1", "relay-ip=127.0.0.1", f"listening-port={self.port}",
            f"min-port={base}", f"max-port={base + 49}", "use-auth-secret",
            f"static-auth-secret={secret}", "realm=gatehouse.test", "no-tls", "no-dtls", "no-cli",
            "allow-loopback-peers", "fingerprint", f"log-file={self.log}", "simple-log",
            f"pidfile={workdir / 'turn.pid'}", f"userdb={workdir / 'turndb'}", "",
        ]))
        self.proc = subprocess.Popen(["turnserver", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        wait_for(lambda: self.log.exists() and "Total General servers" in self.log.read_text(errors="replace"),
                 20, "coturn", self.proc)

    def allocates(self, username: str, credential: str) -> bool:
        """A real TURN client (turnutils_uclient) allocates a relay with these credentials."""
        r = subprocess.run(
            ["turnutils_uclient", "-p", str(self.port), "-u", username, "-w", credential,
             "-n", "1", "-m", "1", "-e", "127.0.0.1", "-X", "-c", "127.0.0.1"],
            capture_output=True, text=True, timeout=30,
        )
        return r.returncode == 0 and "Cannot complete Allocation" not in r.stdout + r.stderr


@pytest.fixture(scope="module")
def turn_secret():
    return secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def coturn(tmp_path_factory, turn_secret):
    if not (shutil.which("turnserver") and shutil.which("turnutils_uclient")):
        missing("coturn (apt-get install coturn)")
    c = Coturn(tmp_path_factory.mktemp("coturn"), turn_secret)
    yield c
    stop(c.proc)


def turn_config(coturn, **extra):
    cfg = {
        "urls": [f"turn:127.0.0.1:{coturn.port}?transport=udp"],
        "allowed_origins": [ORIGIN],
        "secret": {"env": SECRET_VAR},
    }
    cfg.update(extra)
    return cfg


def gateway(envoy_factory, demo, key, coturn, secret, **turn):
    # The endpoint's own check for missing claims is reachable: jwt-auth lets a request without
    # a token through on that path (a bad token is still refused by jwt-auth).
    jwt = jwt_auth_config(key, rules=[{"match": {"prefix": "/turn-credentials"}, "allow_missing": True}])
    return envoy_factory(demo, jwt_auth=jwt, turn_credentials=turn_config(coturn, **turn), env={SECRET_VAR: secret})


@pytest.fixture(scope="module")
def gw(envoy_factory, demo, key, coturn, turn_secret):
    return gateway(envoy_factory, demo, key, coturn, turn_secret)


def mint(gw, token=None, origin=ORIGIN, method="POST"):
    headers = {"origin": origin} if origin else {}
    if token:
        headers["authorization"] = f"Bearer {token}"
    return requests.request(method, gw.url + "/turn-credentials", headers=headers, timeout=10)


def test_minted_credentials_allocate_on_coturn(gw, key, coturn):
    r = mint(gw, key.mint(sub="alice"))
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    server = body["iceServers"][0]
    assert server["urls"] == [f"turn:127.0.0.1:{coturn.port}?transport=udp"]
    expiry, user = server["username"].split(":")
    assert user == "alice" and int(expiry) == body["expiresAt"]
    assert body["ttl"] == 3600 and abs(body["expiresAt"] - time.time() - 3600) < 5
    assert coturn.allocates(server["username"], server["credential"])
    assert gw.stats().get("wasmcustom.gatehouse.turn_credentials.minted", 0) >= 1


def test_coturn_refuses_a_tampered_username(gw, key, coturn):
    server = mint(gw, key.mint(sub="alice")).json()["iceServers"][0]
    expiry, _ = server["username"].split(":")
    assert not coturn.allocates(f"{expiry}:mallory", server["credential"])
    assert not coturn.allocates(f"{int(expiry) + 86400}:alice", server["credential"])


def test_coturn_refuses_expired_credentials(envoy_factory, demo, key, coturn, turn_secret):
    short = gateway(envoy_factory, demo, key, coturn, turn_secret, ttl_seconds=1)
    server = mint(short, key.mint(sub="alice")).json()["iceServers"][0]
    time.sleep(2.5)
    assert not coturn.allocates(server["username"], server["credential"])


def test_coturn_refuses_credentials_of_another_secret(envoy_factory, demo, key, coturn):
    other = gateway(envoy_factory, demo, key, coturn, secrets.token_urlsafe(24))
    server = mint(other, key.mint(sub="alice")).json()["iceServers"][0]
    assert not coturn.allocates(server["username"], server["credential"])


def test_the_next_secret_signs_from_its_start_time(envoy_factory, demo, key, coturn, turn_secret):
    # Rotation: coturn has the new secret; Envoy switches to it at next_secret_from.
    rotating = gateway(envoy_factory, demo, key, coturn, secrets.token_urlsafe(24),
                       next_secret={"value": turn_secret}, next_secret_from=int(time.time()) - 1)
    server = mint(rotating, key.mint(sub="alice")).json()["iceServers"][0]
    assert coturn.allocates(server["username"], server["credential"])


@pytest.mark.parametrize(
    "case,status,reason",
    [("missing_token", 401, "no_claims"), ("expired_token", 401, None), ("foreign_origin", 403, "origin"),
     ("no_origin", 403, "origin"), ("get", 405, "method"), ("colon_in_user", 403, "bad_user")],
)
def test_the_endpoint_refuses(gw, key, case, status, reason):
    stat = lambda: gw.stats().get(f"wasmcustom.gatehouse.turn_credentials.denied.{reason}", 0)  # noqa: E731
    before = stat()
    r = {
        "missing_token": lambda: mint(gw),
        "expired_token": lambda: mint(gw, key.mint(ttl=-5)),
        "foreign_origin": lambda: mint(gw, key.mint(), origin="https://evil.example"),
        "no_origin": lambda: mint(gw, key.mint(), origin=None),
        "get": lambda: mint(gw, key.mint(), method="GET"),
        "colon_in_user": lambda: mint(gw, key.mint(sub="a:b")),
    }[case]()
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert "iceServers" not in r.text
    if case == "get":
        assert r.headers["allow"] == "POST"
    if reason:
        assert stat() == before + 1


def test_the_demo_phone_page_fetches_credentials(tmp_path_factory, envoy_factory, coturn, turn_secret, browser_page):
    """The phone page logs in (dev login) and gets TURN credentials from Envoy with its token."""
    from conftest import Demo

    demo = Demo(tmp_path_factory.mktemp("turn-demo"))
    try:
        port = free_port()
        jwt = {
            "providers": [{"name": "demo", "issuer": "https://demo.gatehouse.local", "audiences": ["gatehouse-demo"],
                           "jwks": {"remote": {"cluster": "demo", "path": "/.well-known/jwks.json"}}}],
            "rules": [{"match": {"prefix": "/turn-credentials"}}, {"match": {"prefix": "/"}, "allow_missing": True}],
        }
        gw = envoy_factory(demo, port=port, jwt_auth=jwt,
                           turn_credentials=turn_config(coturn, allowed_origins=[f"http://127.0.0.1:{port}"]),
                           env={SECRET_VAR: turn_secret})
        page = browser_page
        page.goto(gw.url + "/")
        page.click("#login")
        page.wait_for_function("() => document.getElementById('log').innerText.includes('TURN credentials')")
        line = next(l for l in page.locator("#log li").all_inner_texts() if "TURN credentials" in l)
        assert "TURN credentials for " in line and ":demo-user" in line, line
        assert f"turn:127.0.0.1:{coturn.port}" in line
    finally:
        demo.stop()

"""The browser phone on the local stack (issue 16), through envoy-config/envoy.yaml as `cargo xtask
up` runs it: real Envoy (both listeners), the real demo, real Kamailio with the shipped
envoy-config/kamailio/kamailio.cfg, real coturn, real Chromium with fake media devices. Pages are
served from 127.0.0.1 (the HTTPS listener, a throwaway CA)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import shutil
import ssl
import subprocess
import time
import uuid

import pytest
import requests
from websockets.sync.client import connect

from conftest import ROOT, Demo, free_port, missing, shipped_config, stop, tls_env, wait_for
from test_turn_credentials import Coturn

KAMAILIO_CFG = ROOT / "envoy-config" / "kamailio" / "kamailio.cfg"
DOCS_SCREENSHOT = ROOT / "docs" / "phone-in-call.png"
SID_COOKIE = "__Host-gh-sid"


class Kamailio:
    """The shipped kamailio.cfg on a free loopback port (its `WS_LISTEN` define)."""

    def __init__(self, workdir):
        if not shutil.which("kamailio"):
            missing("Kamailio (apt-get install kamailio kamailio-websocket-modules)")
        self.port = free_port()
        self.log = workdir / "kamailio.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                ["kamailio", "-f", str(KAMAILIO_CFG), "-A", f"WS_LISTEN=tcp:127.0.0.1:{self.port}", "-DD", "-E",
                 "-Y", str(workdir), "-P", str(workdir / "kamailio.pid"), "-m", "32", "-M", "8"],
                stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: "Listening on" in self.log.read_text(errors="replace") and self._open(), 20, "kamailio",
                 self.proc, self.log)

    def _open(self) -> bool:
        import socket
        try:
            socket.create_connection(("127.0.0.1", self.port), 1).close()
            return True
        except OSError:
            return False

    def stop(self):
        stop(self.proc)


class Stack:
    def __init__(self, envoy, demo, ca, kamailio, coturn, secret):
        self.envoy, self.demo, self.kamailio, self.coturn, self.turn_secret = envoy, demo, kamailio, coturn, secret
        self.https = f"https://127.0.0.1:{self.tls_port}"
        self.ca = str(ca)

    @property
    def tls_port(self):
        return self.envoy.tls_port

    def session(self) -> requests.Session:
        s = requests.Session()
        s.verify = self.ca
        s.trust_env = False  # REQUESTS_CA_BUNDLE would override `verify`
        return s

    def login(self, user: str, s: requests.Session | None = None) -> tuple[dict, requests.Session]:
        s = s or self.session()
        r = s.post(self.https + "/dev/login", json={"user": user}, timeout=10)
        assert r.status_code == 200, r.text
        return r.json(), s

    def ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca)

    def sip_socket(self, token: str, s: requests.Session, headers: dict | None = None, tls: bool = True):
        url = (f"wss://127.0.0.1:{self.tls_port}" if tls else self.envoy.ws_url) + "/ws/sip"
        return connect(url, subprotocols=["sip", "bearer." + token], ssl=self.ssl() if tls else None,
                       additional_headers={"cookie": f"{SID_COOKIE}={s.cookies[SID_COOKIE]}", **(headers or {})},
                       open_timeout=10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, envoy_factory):
    from conftest import DEMO_BIN
    if not DEMO_BIN.exists():
        missing(f"the demo binary ({DEMO_BIN})")
    if not (ROOT / "demo" / "static" / "vendor" / "jssip.min.js").exists():
        missing("the JsSIP bundle (cargo xtask build)")
    if not shutil.which("turnserver"):
        missing("coturn (apt-get install coturn)")
    work = tmp_path_factory.mktemp("phone")
    demo = Demo(work)
    kamailio = Kamailio(work)
    secret = uuid.uuid4().hex + uuid.uuid4().hex
    coturn = Coturn(work, secret)
    tls = tls_env(work)
    tls_port = free_port()

    def bootstrap(envoy):
        envoy.tls_port = tls_port
        origins = [f"http://127.0.0.1:{envoy.port}", f"https://127.0.0.1:{tls_port}"]

        def edit(root_id, value):
            if root_id == "token_proxy":
                value["trusted_web_origins"] = origins
            if root_id == "turn_credentials":
                value["allowed_origins"] = origins
                value["urls"] = [f"turn:127.0.0.1:{coturn.port}?transport=udp"]

        cfg = shipped_config(envoy, demo, edit, tls_port=tls_port)
        for c in cfg["static_resources"]["clusters"]:
            if c["name"] == "kamailio":
                c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
                    "port_value"] = kamailio.port
        return cfg

    envoy = envoy_factory(demo, bootstrap=bootstrap,
                          env={"GATEHOUSE_COOKIE_KEYS": demo.cookie_keys, "GATEHOUSE_TURN_SECRET": secret, **tls})
    yield Stack(envoy, demo, work / "ca.pem", kamailio, coturn, secret)
    for p in (coturn, kamailio, demo):
        p.stop()


# ------------------------------------------------------------------------------------ SIP

def sip_request(method: str, user: str, to: str | None = None, body: str = "") -> str:
    to = to or user
    tag, branch, call_id = (uuid.uuid4().hex[:8] for _ in range(3))
    ruri = "sip:gatehouse.local" if method == "REGISTER" else f"sip:{to}@gatehouse.local"
    lines = [
        f"{method} {ruri} SIP/2.0",
        f"Via: SIP/2.0/WSS abc.invalid;branch=z9hG4bK{branch}",
        "Max-Forwards: 70",
        f"From: <sip:{user}@gatehouse.local>;tag={tag}",
        f"To: <sip:{to}@gatehouse.local>",
        f"Call-ID: {call_id}",
        f"CSeq: 1 {method}",
        f"Contact: <sip:{user}@abc.invalid;transport=ws>",
        "Expires: 60" if method == "REGISTER" else "Content-Type: text/plain",
        f"Content-Length: {len(body.encode())}",
        "", body,
    ]
    return "\r\n".join(lines)


def status_of(ws, method: str) -> int:
    """The final status of the first response to `method` on this socket."""
    deadline = time.time() + 10
    while time.time() < deadline:
        msg = ws.recv(timeout=max(0.1, deadline - time.time()))
        if isinstance(msg, bytes):
            msg = msg.decode()
        first = msg.split("\r\n", 1)[0]
        if first.startswith("SIP/2.0 ") and f" {method}\r\n" in msg.split("CSeq:", 1)[1][:40] + "\r\n":
            code = int(first.split()[1])
            if code >= 200:
                return code
    raise AssertionError(f"no final response to {method}")


def test_a_token_registers_only_its_own_sip_identity(stack):
    body, s = stack.login("1002")
    with stack.sip_socket(body["access_token"], s) as ws:
        assert ws.subprotocol == "sip"
        ws.send(sip_request("REGISTER", "1001"))
        assert status_of(ws, "REGISTER") == 403, "a 1002 token registers as 1001"
        ws.send(sip_request("INVITE", "1001", to="1003"))
        assert status_of(ws, "INVITE") == 403, "a 1002 token calls as 1001"
        ws.send(sip_request("MESSAGE", "1001", to="1003", body="hi"))
        assert status_of(ws, "MESSAGE") == 403
        ws.send(sip_request("REGISTER", "1002"))
        assert status_of(ws, "REGISTER") == 200


def test_a_client_sent_identity_header_counts_for_nothing(stack):
    body, s = stack.login("1002")
    with stack.sip_socket(body["access_token"], s, headers={"x-gatehouse-sip-identity": "1001"}) as ws:
        ws.send(sip_request("REGISTER", "1001"))
        assert status_of(ws, "REGISTER") == 403
    # A token without a sip_identity (the login without a body) opens no SIP socket at all.
    s2 = stack.session()
    token = s2.post(stack.https + "/dev/login", timeout=10).json()["access_token"]
    with pytest.raises(Exception):
        with stack.sip_socket(token, s2, headers={"x-gatehouse-sip-identity": "1001"}) as ws:
            ws.send(sip_request("REGISTER", "1001"))
            ws.recv(timeout=5)
    log = stack.kamailio.log.read_text(errors="replace")
    assert "verified as 1001" not in log, "Kamailio took a client's header for an identity"


def test_plain_ws_is_refused_on_the_sip_route_with_4400(stack):
    from websockets.exceptions import ConnectionClosed
    body, s = stack.login("1001")
    with stack.sip_socket(body["access_token"], s, tls=False) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
    assert closed.value.rcvd.code == 4400
    assert stack.envoy.stats().get("wasmcustom.gatehouse.jwt_auth.denied.insecure_transport", 0) >= 1

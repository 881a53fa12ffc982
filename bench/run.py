#!/usr/bin/env python3
"""The gatehouse benchmark: wrk against Envoy (`--concurrency 1`) on loopback, one scenario per
Envoy, all in one run so their ratios are comparable. See docs/performance.md.

Run it as `cargo xtask bench [args]` (builds dist/, creates .venv, checks wrk), or directly with a
Python that has the test requirements: `.venv/bin/python bench/run.py --help`.

Every scenario answers from a `direct_response` route (`ok`, or a generated 50 KB HTML page for
page-guard and its baseline), so no upstream process competes for the CPU and Envoy's own CPU time
is the listener, the HTTP codec and the filter chain under test. For each scenario: start Envoy,
check one request with the token is 200 (and one without is 401 where a JWT filter is active, the
scenario's other refusals, and page-guard's rewrite of the page), warm up, then measure with wrk
while reading Envoy's utime+stime from /proc/<pid>/stat before and after; the page scenarios also
measure latency with one connection. The `/ws/` scenarios (ws_scenarios) instead route to the
demo's WebSocket echo and stream frames on open sockets, or open socket after socket, from this
process. The fleet-store scenarios (store_scenarios, run_store_warm) run the shipped `/ws/`
connect with single use and the socket cap on a real etcd on loopback against per-process state,
and count the warm `/api/` path's store calls. Envoy, wrk, the demo and etcd are the only
processes started, and only they are stopped, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT / "tests"))

from conftest import (DIST, ENVOY_BIN, FILTERS, ONE_MODULE, ONE_VM_ID, Demo, Etcd, cluster, free_port,  # noqa: E402
                      one_pass_filter, shipped_config, stop, unfold_one_pass, wait_for, wasm_filter)
from cookies import new_key, seal  # noqa: E402
from tokens import AUDIENCE, ISSUER, Key, jwks, jwt_auth_config  # noqa: E402

import websockets  # noqa: E402

DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
RSS_BEGIN, RSS_END = "<!-- bench:rss:begin -->", "<!-- bench:rss:end -->"
LUA = BENCH / "tokens.lua"
WASM_TARGET = "wasm32-wasip1"
NOOP_PACKAGE = "gatehouse-bench-noop"
NOOP_WASM = ROOT / "target" / "bench" / "noop.wasm"
WASM_OPT_ARGS = ["-Oz", "--enable-bulk-memory", "--enable-sign-ext", "--enable-nontrapping-float-to-int",
                 "--enable-mutable-globals", "--strip-debug"]
ALGS = ["EdDSA", "ES256", "RS256"]

# Targets (printed as PASS/FAIL, never asserted).
WARM_OVER_NOOP_US = 5.0
WARM_VS_NATIVE_CACHED = 0.85
CHAIN_VS_BASELINE = 0.85
VERIFY_TARGET_US = {"EdDSA": 200.0, "ES256": 300.0, "RS256": 300.0}
NEW_TOKEN_OVER_VERIFY_US = 10.0   # a new token with the default cache (full) vs `cache_entries: 0`
DEFAULT_CACHE_ENTRIES = 1024      # jwt-auth's default `cache_entries`: the cold tokens must outnumber it
PAGE_GUARD_ADDED_P50_US = 500.0   # p50 added to the 50 KB page, one connection (no queueing)
WASM_MAX_KB = 500
ONE_MODULE_MAX_KB = 900           # dist/gatehouse.wasm holds every filter
RSS_OVER_NONE_MB = 45.0           # every filter loaded, over no filter, at --concurrency 4
RSS_PER_WORKER_MB = 2.0           # what every filter loaded adds per extra worker


# ------------------------------------------------------------------------------------ processes

STARTED: list[subprocess.Popen] = []


def _terminate(signum, _frame):
    # SIGTERM (e.g. from a CI timeout) unwinds like Ctrl-C, so the `finally` blocks stop our Envoys.
    raise KeyboardInterrupt(f"signal {signum}")


def stop_started():
    for proc in list(STARTED):
        stop(proc)  # conftest.stop: SIGTERM to this PID, then SIGKILL after 10 s
        STARTED.remove(proc)


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 5):
    """(status, response headers, body) of one GET."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def http_status(url: str, headers: dict[str, str] | None = None, timeout: float = 5) -> int:
    return http_get(url, headers, timeout)[0]


def http_json(url: str, timeout: float = 5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2:].split()  # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def find_envoy(arg: str | None) -> Path:
    for candidate in (arg, ENVOY_BIN, Path(sys.executable).parent / "envoy", shutil.which("envoy")):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    sys.exit(f"bench: Envoy not found ({ENVOY_BIN}); run `cargo xtask bench`, or pass --envoy")


class Envoy:
    """One Envoy with `http_filters` in front of a direct_response route that answers `body`
    (with `content_type`, else Envoy's text/plain) on every path."""

    def __init__(self, binary: Path, workdir: Path, http_filters: list[dict], body: str = "ok\n",
                 content_type: str | None = None, upstream: int | None = None, routes: list[dict] | None = None,
                 clusters: list[dict] = ()):
        """`upstream`: instead of the direct_response, every path goes to this loopback port (the
        demo) with WebSocket upgrades on, as the shipped `signaling` route does (timeout 0s), or
        `routes` do (to the cluster `upstream`). `clusters`: more clusters (e.g. etcd)."""
        self.port, self.admin_port = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.log = workdir / "envoy.log"
        route = {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": body}}}
        if upstream is not None:
            route = {"name": "signaling", "match": {"prefix": "/"}, "route": {"cluster": "upstream", "timeout": "0s"}}
        if content_type:
            route["response_headers_to_add"] = [{"header": {"key": "content-type", "value": content_type},
                                                 "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]
        hcm = {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "bench",
            "route_config": {
                # direct_response bodies are capped at 4096 bytes unless raised here.
                "max_direct_response_body_size_bytes": max(4096, len(body.encode())),
                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes or [route]}],
            },
            "http_filters": http_filters + [{
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }],
        }
        static: dict = {}
        if upstream is not None:
            # As in envoy-config/envoy.yaml: WebSocket upgrades, refusal close frames sent at once.
            hcm.update(upgrade_configs=[{"upgrade_type": "websocket"}], delayed_close_timeout="0s")
            static["clusters"] = [cluster("upstream", upstream)]
        if clusters:
            static["clusters"] = static.get("clusters", []) + list(clusters)
        config = {
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": self.admin_port}}},
            "static_resources": {**static, "listeners": [{
                "name": "bench",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": self.port}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": hcm}]}],
            }]},
        }
        config_path = workdir / "envoy.json"
        config_path.write_text(json.dumps(config, indent=1))
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(binary), "-c", str(config_path), "--use-dynamic-base-id", "--concurrency", "1",
                 "--log-level", "warn"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        STARTED.append(self.proc)
        try:
            wait_for(lambda: http_status(self.admin + "/ready", timeout=2) == 200, 60, "envoy", self.proc, self.log)
        except BaseException:
            self.stop()
            raise

    def cpu_seconds(self) -> float:
        """utime + stime of the Envoy process (all its threads)."""
        return cpu_seconds(self.proc.pid)

    def rss_mb(self) -> float:
        """Resident memory of the Envoy process: every wasm module adds a VM per worker."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kb / 1024

    def counters(self, prefix: str) -> dict:
        body = http_json(self.admin + "/stats?format=json&filter=" + urllib.request.quote(prefix))
        return {s["name"]: s["value"] for s in body["stats"] if "value" in s}

    def stop(self):
        if self.proc in STARTED:
            stop(self.proc)
            STARTED.remove(self.proc)


# ------------------------------------------------------------------------------------- filters


def noop_filter(calls: list[str] = ()) -> dict:
    """The same Envoy Wasm filter block the tests use, pointed at the no-op module; `calls` are
    the host calls it makes on every request's headers (bench/noop/src/lib.rs), none by default."""
    f = copy.deepcopy(wasm_filter("jwt_auth", {}))
    f["name"] = "bench.noop"
    cfg = f["typed_config"]["config"]
    cfg["name"], cfg["root_id"] = "bench.noop", "noop"
    cfg["vm_config"]["vm_id"] = "bench.noop"
    cfg["vm_config"]["code"]["local"]["filename"] = str(NOOP_WASM)
    cfg["configuration"]["value"] = "\n".join(calls)
    return f


def floor_calls(token: str, everything: bool) -> list[str]:
    """The host calls jwt-auth makes on a warm request of the bench (`everything`), or only the
    three no bearer-token check can skip: read the token, strip it, publish the claims."""
    header, payload = (base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)) for part in token.split(".")[:2])
    claims = f"publish gatehouse.jwt_auth.claims {payload.decode()}"
    if not everything:
        return ["read authorization", "remove authorization", claims]
    kid = json.loads(header)["kid"]
    return ["read :path", "read upgrade", "read authorization", "time", "remove authorization", claims,
            f"publish gatehouse.jwt_auth.kid {kid}", "count", "count"]


def native_filter(key: Key, cache: bool) -> dict:
    """Envoy's jwt_authn with the same key, issuer and audience as jwt-auth. Like jwt-auth it strips
    the token (`forward: false`) and publishes the claims (`payload_in_metadata`)."""
    provider = {
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "local_jwks": {"inline_string": json.dumps(jwks(key))},
        "forward": False,
        "payload_in_metadata": "claims",
    }
    if cache:
        provider["jwt_cache_config"] = {"jwt_cache_size": 1024}
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"bench": provider},
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "bench"}}],
        },
    }


# ------------------------------------------------------------------------------------ the page

# page-guard's placeholder: what the upstream writes into the nonce of the tags it trusts.
NONCE_MARKER = "GH_BENCH_NONCE_MARKER_5e1d7a3c"
PAGE_BYTES = 50 * 1024
HTML = "text/html; charset=utf-8"


def sri(data: bytes) -> str:
    return "sha384-" + base64.b64encode(hashlib.sha384(data).digest()).decode()


# Three of the page's five external scripts and stylesheets are in the SRI manifest.
SRI_MANIFEST = {url: sri(url.encode()) for url in
                ("/static/phone.css", "/static/phone.js", "https://cdn.example.com/sip/sip.min.js")}


def html_page(size: int = PAGE_BYTES) -> str:
    """A call-centre page of `size` bytes (within a few hundred): a head with stylesheets and
    scripts (some in SRI_MANIFEST), inline scripts and a style marked with NONCE_MARKER, an
    unmarked inline script, a long contact table, and a script whose strings contain `<script`.
    ASCII only, so characters are bytes."""
    m = NONCE_MARKER
    head = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Gatehouse phone &mdash; agent desk</title>
<link rel="preload" href="/static/fonts/inter.woff2" as="font" type="font/woff2" crossorigin>
<link rel="icon" href="/favicon.ico">
<link rel="stylesheet" href="/static/phone.css">
<link rel="stylesheet" href="/static/theme.css?v=42" media="screen">
<style nonce="{m}">:root {{ --accent: #0a6; }} body {{ font: 15px/1.4 Inter, sans-serif; }}</style>
<script nonce="{m}">window.__CONFIG__ = {{"signaling": "wss://signal.example.com/ws", "room": "r-1842", "features": ["video", "transfer", "record"]}};</script>
<script nonce="{m}" src="/static/phone.js" defer></script>
<script nonce="{m}" src="https://cdn.example.com/sip/sip.min.js" defer></script>
<script src="/static/analytics.js" async></script>
</head>
<body class="desk">
<header class="top"><nav aria-label="main"><ul>
""" + "".join(f'<li><a href="/desk/{n}" class="nav-link" data-section="{n}">{n.title()}</a></li>\n'
              for n in ("calls", "queues", "contacts", "history", "voicemail", "reports", "settings", "help")) + """</ul></nav>
<div id="status" role="status" aria-live="polite">Connecting&hellip;</div></header>
<main id="main">
<section class="dialer"><form id="dial" action="/desk/calls" method="post">
<label for="number">Number</label><input id="number" name="number" type="tel" autocomplete="tel" placeholder="+44 20 7946 0000">
<button type="submit" class="btn btn-primary" data-action="call">Call</button></form></section>
<section class="contacts"><h2>Contacts</h2>
<table class="contacts"><thead><tr><th scope="col">Name</th><th scope="col">Team</th><th scope="col">Extension</th><th scope="col">Status</th><th scope="col"></th></tr></thead><tbody>
"""
    tail = f"""</tbody></table></section>
</main>
<footer class="bottom"><p>&copy; 2026 Example Ltd &middot; <a href="/legal/privacy">Privacy</a> &middot; <a href="/legal/terms">Terms</a></p></footer>
<script nonce="{m}">
  // Strings that look like tags: the script ends only at its closing tag.
  var legacy = "<script src='/static/legacy.js'><\\/script>";
  var hint = '<script nonce="x">alert(1)<\\/script> is not markup inside a string';
  document.getElementById("status").textContent = legacy.length > 0 && hint ? "Ready" : "Offline";
</script>
<script>if (window.__CONFIG__) {{ document.body.dataset.ready = "1"; }}</script>
</body>
</html>
"""
    teams = ("Sales", "Support", "Billing", "Onboarding", "Escalations")
    states = ("available", "on a call", "away", "offline")
    rows, i = [], 0
    while len(head) + sum(map(len, rows)) + len(tail) < size - 400:
        rows.append(
            f'<tr id="c{i}" class="contact {states[i % 4].replace(" ", "-")}"><td><a href="/desk/contacts/{i}">'
            f'Agent {i:04d}</a><br><small class="email">agent{i:04d}@example.com</small></td>'
            f'<td>{teams[i % 5]}</td><td><code>{2000 + i}</code></td><td><span class="badge">{states[i % 4]}</span>'
            f'</td><td><button type="button" class="btn" data-action="call" data-ext="{2000 + i}">Call</button></td></tr>\n'
        )
        i += 1
    return head + "".join(rows) + tail


def page_guard_config() -> dict:
    """Close to envoy-config/examples/page-guard.yaml: CSP with the nonce, SRI, the other headers."""
    return {
        "csp": {
            "default-src": ["'self'"],
            "script-src": ["'strict-dynamic'"],
            "connect-src": ["'self'", "wss://signal.example.com"],
            "img-src": ["'self'", "data:"],
            "base-uri": ["'none'"],
            "object-src": ["'none'"],
        },
        "nonce": {"placeholder": NONCE_MARKER},
        "sri": {"manifest": SRI_MANIFEST},
        "permissions_policy": {"microphone": ["self"], "camera": ["self"], "geolocation": []},
        "reports": {"path": "/_gatehouse/csp-report"},
    }


def check_page(page: str, guarded: bool):
    """A sanity check of the page scenarios' first response: the whole page, as HTML; with
    page-guard, a CSP nonce written into every marked tag and no placeholder left."""

    def check(headers, body: bytes):
        text = body.decode()
        ctype = headers.get("content-type", "")
        if not ctype.startswith("text/html"):
            raise RuntimeError(f"the page came back as {ctype!r}, not text/html")
        if not guarded:
            if text != page:
                raise RuntimeError(f"the page came back changed ({len(body)} bytes, not {len(page.encode())})")
            return
        csp = headers.get("content-security-policy", "")
        # One nonce for scripts, another for styles.
        nonces = set(re.findall(r"'nonce-([A-Za-z0-9+/_=-]+)'", csp))
        if not nonces:
            raise RuntimeError(f"no nonce in Content-Security-Policy {csp!r}")
        if NONCE_MARKER in text:
            raise RuntimeError(f"the placeholder is still in the body ({text.count(NONCE_MARKER)} times)")
        marked = page.count(f'nonce="{NONCE_MARKER}"')
        written = sum(text.count(f'nonce="{n}"') for n in nonces)
        if written != marked:
            raise RuntimeError(f"the nonce is in {written} tags, the page marked {marked}")
        if (integrity := text.count('integrity="sha384-')) != len(SRI_MANIFEST):
            raise RuntimeError(f"{integrity} tags got integrity, {len(SRI_MANIFEST)} are in the manifest")
        if len(body) != int(headers.get("content-length", -1)):
            raise RuntimeError(f"Content-Length {headers.get('content-length')} for {len(body)} bytes")

    return check


# ------------------------------------------------------------------------------------ scenarios


@dataclass
class Scenario:
    key: str
    label: str
    filters: list[dict]
    token: str | None                 # the token of the sanity request (and of every request when warm)
    token_file: Path | None = None    # cold: wrk cycles through this file (more tokens than cache entries)
    warmup_file: Path | None = None   # cold: the warm-up's tokens, none of them in token_file (the measured
                                      # run must not hit what the warm-up cached)
    guarded: bool = False             # a JWT filter is active: a request without a token must be 401
    jwt_auth: str | None = None       # "warm" / "cold": check the jwt-auth cache counters afterwards
    cookie: str | None = None         # a Cookie header on every request
    bearer: bool = True               # send the token as Authorization (not in the token-proxy chain,
                                      # where the cookie carries it)
    refusals: tuple = ()              # (what, path, headers, status): more sanity requests that must be refused
    path: str = "/"
    body: str = "ok\n"                # what the direct_response route answers
    content_type: str | None = None   # its content-type (None: Envoy's text/plain)
    check: Callable | None = None     # check(headers, body) of the sanity response; raises if wrong
    counted: tuple[str, ...] = ()     # counters (after `gatehouse.`) whose increase is noted
    one_connection: bool = False      # also measure latency with `wrk -c1` (no queueing in Envoy)

    def headers(self) -> dict[str, str]:
        h = {}
        if self.token is not None and self.bearer:
            h["Authorization"] = f"Bearer {self.token}"
        if self.cookie is not None:
            h["Cookie"] = self.cookie
        return h


@dataclass
class Result:
    rps: float
    p50_us: float
    p99_us: float
    requests: int
    non2xx: int
    socket_errors: int
    cpu_us: float
    rss_mb: float
    note: str = ""
    p50_c1_us: float | None = None    # p50 with one connection (Scenario.one_connection)


@dataclass
class Summary:
    runs: list[Result] = field(default_factory=list)

    def med(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)

    def total(self, attr: str) -> int:
        return sum(getattr(r, attr) for r in self.runs)


BENCH_SID, BENCH_ROOM = "s-7d0c2a91e4b3", "r-1842"


def jwt_auth_module(cfg: dict, wasm: Path | None = None) -> dict:
    """jwt-auth's filter block, from dist/ or from another build of the module (`--before`)."""
    f = wasm_filter("jwt_auth", cfg)
    if wasm is not None:
        f["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = str(wasm)
    return f


def scenarios(keys: dict[str, Key], tokens: dict[str, str], token_files: dict[str, tuple[Path, Path]],
              algs: list[str], before: Path | None = None):
    out = [
        Scenario("none", "no filter", [], tokens[algs[0]]),
        Scenario("noop", "no-op wasm", [noop_filter()], tokens[algs[0]]),
        # The no-op module making only host calls: what they cost without any logic around them.
        Scenario("floor-min", "no-op wasm + read, strip token, publish claims",
                 [noop_filter(floor_calls(tokens[algs[0]], everything=False))], tokens[algs[0]]),
        Scenario("floor", "no-op wasm + jwt-auth's warm host calls",
                 [noop_filter(floor_calls(tokens[algs[0]], everything=True))], tokens[algs[0]],
                 counted=("bench.count",)),
    ]
    for alg in algs:
        key = keys[alg]

        def cold(name: str, label: str, cfg: dict, wasm: Path | None = None) -> Scenario:
            measured, warmup = token_files[alg]
            return Scenario(name, label, [jwt_auth_module(cfg, wasm)], tokens[alg], token_file=measured,
                            warmup_file=warmup, guarded=True, jwt_auth="cold")

        out += [
            Scenario(f"native-{alg}", f"native jwt_authn {alg}", [native_filter(key, cache=False)], tokens[alg],
                     guarded=True),
            Scenario(f"native-cache-{alg}", f"native jwt_authn {alg} + jwt_cache", [native_filter(key, cache=True)],
                     tokens[alg], guarded=True),
            Scenario(f"warm-{alg}", f"jwt-auth {alg} warm", [wasm_filter("jwt_auth", jwt_auth_config(key))],
                     tokens[alg], guarded=True, jwt_auth="warm"),
            # Cold: a new token on every request. With the default cache, as users run it (full,
            # every request a miss: a reconnect storm), and with `cache_entries: 0` (the verify alone).
            cold(f"cold-{alg}", f"jwt-auth {alg} cold, default cache", jwt_auth_config(key)),
            cold(f"cold-nocache-{alg}", f"jwt-auth {alg} cold, cache_entries: 0",
                 jwt_auth_config(key, cache_entries=0)),
        ]
        if before is not None:
            out.append(cold(f"cold-before-{alg}", f"jwt-auth {alg} cold, default cache, `--before` module",
                            jwt_auth_config(key), before))
    # token-proxy + jwt-auth chained, warm: the encrypted HttpOnly cookie becomes the bearer token.
    alg = algs[0]
    cookie_key = new_key()
    proxy = wasm_filter("token_proxy", {"cookie_prefix": "gh", "encryption_keys": [cookie_key]})
    proxy_cfg = {"cookie_prefix": "gh", "encryption_keys": [cookie_key]}
    cookie = f"gh-at={seal(cookie_key, tokens[alg])}"
    out.append(Scenario("chain", f"token-proxy + jwt-auth {alg} warm",
                        [proxy, wasm_filter("jwt_auth", jwt_auth_config(keys[alg]))], tokens[alg], guarded=True,
                        jwt_auth="warm", cookie=cookie, bearer=False))
    # The same chain as ONE filter (root_id gatehouse, the one pass).
    out.append(Scenario("chain-onepass", f"token-proxy + jwt-auth {alg} warm, one pass",
                        [one_pass_filter({"token_proxy": proxy_cfg, "jwt_auth": jwt_auth_config(keys[alg])})],
                        tokens[alg], guarded=True, jwt_auth="warm", cookie=cookie, bearer=False))
    # The shipped /api/ chain: token-proxy → jwt-auth → session-binding (which reads jwt-auth's
    # claims: filter state between separate filters, in memory in one pass), separate vs one pass.
    api_binding = {"rules": [{"match": {"prefix": "/"}}]}
    out += [
        Scenario("api", f"/api/ chain {alg} warm, 3 filters",
                 [proxy, wasm_filter("jwt_auth", jwt_auth_config(keys[alg])),
                  wasm_filter("session_binding", api_binding)],
                 tokens[alg], guarded=True, jwt_auth="warm", cookie=cookie, bearer=False,
                 counted=("session_binding.allowed",)),
        Scenario("api-onepass", f"/api/ chain {alg} warm, one pass",
                 [one_pass_filter({"token_proxy": proxy_cfg, "jwt_auth": jwt_auth_config(keys[alg]),
                                   "session_binding": api_binding})],
                 tokens[alg], guarded=True, jwt_auth="warm", cookie=cookie, bearer=False,
                 counted=("session_binding.allowed",)),
    ]
    # jwt-auth + session-binding chained, warm: session-binding reads jwt-auth's verified claims
    # (filter state) and checks the session cookie's SHA-256 against `sid_hash` and the path's
    # room against `room` on every request. No single_use: a jti store would refuse the repeated
    # token.
    sid_hash = base64.urlsafe_b64encode(hashlib.sha256(BENCH_SID.encode()).digest()).rstrip(b"=").decode()
    bound = keys[alg].mint(ttl=6 * 3600, sid_hash=sid_hash, room=BENCH_ROOM)
    binding = {
        "claims_from": [{"jwt_auth": {}}],
        "rules": [{"match": {"prefix": "/rooms/"}, "session": {"cookie": "gh_sid"},
                   "scope": [{"template": "/rooms/{room}"}], "fingerprint": "if_present"}],
    }
    out.append(Scenario("bound", f"jwt-auth + session-binding {alg} warm",
                        [wasm_filter("jwt_auth", jwt_auth_config(keys[alg])), wasm_filter("session_binding", binding)],
                        bound, guarded=True, jwt_auth="warm", cookie=f"gh_sid={BENCH_SID}",
                        path=f"/rooms/{BENCH_ROOM}", counted=("session_binding.allowed",),
                        refusals=(("the token without the session cookie", f"/rooms/{BENCH_ROOM}",
                                   {"Authorization": f"Bearer {bound}"}, 401),
                                  ("the token and cookie on another room", "/rooms/r-0001",
                                   {"Authorization": f"Bearer {bound}", "Cookie": f"gh_sid={BENCH_SID}"}, 403))))
    # page-guard on a 50 KB HTML page, against the same page without filters.
    page = html_page()
    out += [
        Scenario("page", f"no filter, {len(page.encode()) / 1024:.0f} KB page", [], None, body=page, content_type=HTML,
                 check=check_page(page, guarded=False), one_connection=True),
        Scenario("page-guard", f"page-guard, {len(page.encode()) / 1024:.0f} KB page",
                 [wasm_filter("page_guard", page_guard_config())], None, body=page, content_type=HTML,
                 check=check_page(page, guarded=True), counted=("page_guard.rewritten",), one_connection=True),
    ]
    return out


# ------------------------------------------------------------------------------------------ wrk

_DURATION = re.compile(r"([\d.]+)(us|ms|s|m)\b")
_UNIT_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6}


def _us(text: str) -> float:
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise ValueError(f"wrk duration {text!r}")
    return float(m.group(1)) * _UNIT_US[m.group(2)]


def wrk(args, url: str, seconds: int, sc: Scenario, connections: int | None = None, warmup: bool = False) -> dict:
    connections = connections or args.connections
    cmd = ["wrk", f"-t{min(args.threads, connections)}", f"-c{connections}", f"-d{seconds}s", "--latency",
           "--timeout", "10s"]
    if sc.token_file is not None:
        cmd += ["-s", str(LUA), url, "--", str(sc.warmup_file if warmup and sc.warmup_file else sc.token_file)]
    else:
        for name, value in sc.headers().items():
            cmd += ["-H", f"{name}: {value}"]
        cmd.append(url)
    done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    out = done.stdout
    if done.returncode != 0 or "requests in" not in out:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{out}\n{done.stderr}")
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.M))
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_us": _us(lat["50"]),
        "p99_us": _us(lat["99"]),
        "non2xx": int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0,
        "socket_errors": sum(int(x) for x in socket.groups()) if socket else 0,
        "raw": out,
    }


def run_scenario(args, envoy_bin: Path, workdir: Path, sc: Scenario) -> Result:
    wd = workdir / sc.key
    wd.mkdir(parents=True, exist_ok=True)
    envoy = Envoy(envoy_bin, wd, sc.filters, body=sc.body, content_type=sc.content_type)
    url = envoy.base + sc.path
    try:
        status, headers, body = http_get(url, sc.headers())
        if status != 200:
            raise RuntimeError(f"{sc.key}: the sanity request with the token got {status}, not 200\n"
                               + envoy.log.read_text(errors="replace")[-4000:])
        if sc.check is not None:
            try:
                sc.check(headers, body)
            except RuntimeError as e:
                raise RuntimeError(f"{sc.key}: {e}\n" + envoy.log.read_text(errors="replace")[-4000:]) from None
        if sc.guarded and (status := http_status(url)) != 401:
            raise RuntimeError(f"{sc.key}: a request without a token got {status}, not 401: is the filter active?")
        for what, path, refused_headers, expected in sc.refusals:
            if (status := http_status(envoy.base + path, refused_headers)) != expected:
                raise RuntimeError(f"{sc.key}: {what} got {status}, not {expected}: is the filter active?")
        if args.warmup > 0:
            wrk(args, url, args.warmup, sc, warmup=True)
        counted = sc.jwt_auth or sc.counted
        before = envoy.counters("gatehouse.") if counted else {}
        cpu0 = envoy.cpu_seconds()
        w = wrk(args, url, args.seconds, sc)
        cpu1 = envoy.cpu_seconds()
        rss = envoy.rss_mb()
        after = envoy.counters("gatehouse.") if counted else {}
        # Latency without queueing: one request at a time (after the counters and CPU are read).
        one = wrk(args, url, args.seconds, sc, connections=1) if sc.one_connection else None
        notes = []
        if sc.jwt_auth:
            delta = {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1]: after.get(k, 0) - before.get(k, 0)
                     for k in after if ".jwt_auth." in k}
            hits, misses = delta.get("cache.hit", 0), delta.get("cache.miss", 0)
            note = f"cache hit/miss {hits}/{misses}"
            if sc.jwt_auth == "cold" and hits:
                note += " (cold run hit the cache!)"
            if sc.jwt_auth == "warm" and misses > 1:
                note += " (warm run missed the cache!)"
            notes.append(note)
        for name in sc.counted:
            stat = f"wasmcustom.gatehouse.{name}"
            n = after.get(stat, 0) - before.get(stat, 0)
            # wrk counts the requests that completed; a few more may have been in flight.
            notes.append(f"{name} {n}" + ("" if n >= w["requests"] else " (fewer than the requests!)"))
        requests = max(w["requests"], 1)
        runs = [w, one] if one else [w]
        return Result(rps=w["rps"], p50_us=w["p50_us"], p99_us=w["p99_us"], requests=w["requests"],
                      non2xx=sum(r["non2xx"] for r in runs), socket_errors=sum(r["socket_errors"] for r in runs),
                      cpu_us=(cpu1 - cpu0) / requests * 1e6, rss_mb=rss, note=", ".join(notes),
                      p50_c1_us=one["p50_us"] if one else None)
    finally:
        envoy.stop()


# ---------------------------------------------------------------------------------- WebSockets
#
# The shipped `/ws/` (signaling) chain: token-proxy off, jwt-auth (the connect token in
# Sec-WebSocket-Protocol, ≤ 300 s old, scope phone:call, the live socket closed at the token's end
# or on re-auth) → session-binding (the socket bound to the login's session cookie, the revocation
# feed checked on every frame). Envoy routes every path to the demo's WebSocket echo. Two loads:
# frames streamed on open sockets (CPU per echoed frame) and sockets opened one after the other
# (CPU per upgrade). Without the shipped `single_use` and `max_sockets`: they need the etcd store,
# a round trip per upgrade that is the store's cost, not the chain's.

WS_SOCKETS = 8                      # open sockets streaming frames (and concurrent upgraders)
WS_FRAME = json.dumps({"type": "signal", "room": BENCH_ROOM, "sdp": "v=0 " + "a" * 80})  # ~120 B, text
WS_ONE_PASS_FRAME_RATIO = 0.5       # issue 14: one pass ≤ half of the separate filters' per-frame cost


@dataclass
class WsScenario:
    key: str
    label: str
    filters: list[dict]
    load: str                         # "frames": stream on WS_SOCKETS open sockets; "upgrades": open, echo, close
    guarded: bool = False             # a socket without the token / session cookie must be refused


@dataclass
class WsResult:
    rate: float                       # echoed frames/s, or upgrades/s
    count: int
    cpu_us: float                     # Envoy CPU per echoed frame (one frame each way) or per upgrade
    rss_mb: float
    errors: int = 0
    note: str = ""


def ws_chain(key: Key) -> tuple[dict, dict, str, str]:
    """(jwt-auth config, session-binding config, connect token, session cookie) of the shipped
    signaling route, with the bench's key inline and the demo's revocation feed."""
    jwt = jwt_auth_config(
        key, sources=[{"websocket_protocol": {"prefix": "bearer."}}], session_claims=["sid", "sub"],
        reauth_type="gatehouse.reauth", max_lifetime_seconds=3600, max_socket_seconds=43200,
        rules=[{"match": {"route": "signaling"}, "max_age_seconds": 300,
                "require": [{"claim": "scope", "contains": "phone:call"}]}])
    binding = {
        "rules": [{"match": {"route": "signaling"},
                   "session": {"mode": "sha256", "claim": "sid_hash", "cookie": "gh_sid"}, "fingerprint": "if_present"}],
        "revocation": {"cluster": "upstream", "path": "/dev/revoked.json", "refresh_seconds": 2,
                       "max_stale_seconds": 300, "when_stale": "open"},
    }
    sid_hash = base64.urlsafe_b64encode(hashlib.sha256(BENCH_SID.encode()).digest()).rstrip(b"=").decode()
    token = key.mint(ttl=1800, sid="s-bench", sid_hash=sid_hash)
    return jwt, binding, token, f"gh_sid={BENCH_SID}"


def ws_scenarios(key: Key) -> tuple[list[WsScenario], str, str]:
    jwt, binding, token, cookie = ws_chain(key)
    separate = [wasm_filter("jwt_auth", jwt), wasm_filter("session_binding", binding)]
    onepass = [one_pass_filter({"jwt_auth": jwt, "session_binding": binding})]
    out = []
    for load, what in (("frames", "frames"), ("upgrades", "upgrades")):
        out += [
            WsScenario(f"ws-{load}-none", f"/ws/ {what}, no filter", [], load),
            WsScenario(f"ws-{load}-noop", f"/ws/ {what}, no-op wasm", [noop_filter()], load),
            WsScenario(f"ws-{load}", f"/ws/ {what}, jwt-auth + session-binding, 2 filters", separate, load,
                       guarded=True),
            WsScenario(f"ws-{load}-onepass", f"/ws/ {what}, one pass", onepass, load, guarded=True),
        ]
    return out, token, cookie


async def ws_open(url: str, token: str, cookie: str):
    return await websockets.connect(url, subprotocols=["sip", "bearer." + token], compression=None,
                                    additional_headers={"Cookie": cookie}, open_timeout=10, max_queue=None)


async def ws_echo(ws) -> None:
    await ws.send(WS_FRAME)
    if (got := await ws.recv()) != WS_FRAME:
        raise RuntimeError(f"the echo answered {got!r:.80}")


async def ws_refused(url: str, token: str, cookie: str) -> str | None:
    """None if the socket is refused (an HTTP error or a close before any echo), else what got through."""
    try:
        ws = await ws_open(url, token, cookie)
    except (websockets.InvalidStatus, websockets.InvalidHandshake, websockets.ConnectionClosed):
        return None
    try:
        await ws_echo(ws)
        return "a frame was echoed"
    except websockets.ConnectionClosed:
        return None
    finally:
        await ws.close()


async def ws_load(args, envoy: Envoy, url: str, sc: WsScenario, token: str, cookie: str):
    """(count, Envoy CPU seconds, errors) of the measured run, after a warm-up of the same load."""
    errors = 0

    async def frames(socks, seconds: float) -> int:
        async def pump(ws) -> int:
            n, end = 0, time.monotonic() + seconds
            while time.monotonic() < end:
                await ws_echo(ws)
                n += 1
            return n
        return sum(await asyncio.gather(*(pump(ws) for ws in socks)))

    async def upgrades(seconds: float) -> int:
        async def churn() -> int:
            nonlocal errors
            n, end = 0, time.monotonic() + seconds
            while time.monotonic() < end:
                try:
                    ws = await ws_open(url, token, cookie)
                    try:
                        await ws_echo(ws)
                    finally:
                        await ws.close()
                    n += 1
                except (OSError, websockets.WebSocketException, RuntimeError):
                    errors += 1
            return n
        return sum(await asyncio.gather(*(churn() for _ in range(WS_SOCKETS))))

    if sc.load == "frames":
        socks = [await ws_open(url, token, cookie) for _ in range(WS_SOCKETS)]
        try:
            if args.warmup > 0:
                await frames(socks, args.warmup)
            cpu0 = envoy.cpu_seconds()
            n = await frames(socks, args.seconds)
            cpu1 = envoy.cpu_seconds()
        finally:
            await asyncio.gather(*(ws.close() for ws in socks), return_exceptions=True)
    else:
        if args.warmup > 0:
            await upgrades(args.warmup)
        errors = 0
        cpu0 = envoy.cpu_seconds()
        n = await upgrades(args.seconds)
        cpu1 = envoy.cpu_seconds()
    return n, cpu1 - cpu0, errors


def run_ws_scenario(args, envoy_bin: Path, workdir: Path, demo: Demo, sc: WsScenario, token: str,
                    cookie: str) -> WsResult:
    wd = workdir / sc.key
    wd.mkdir(parents=True, exist_ok=True)
    envoy = Envoy(envoy_bin, wd, sc.filters, upstream=demo.port)
    url = envoy.base.replace("http://", "ws://") + "/ws/echo"
    try:
        async def go():
            ws = await ws_open(url, token, cookie)
            try:
                await ws_echo(ws)
            finally:
                await ws.close()
            if sc.guarded:
                for what, t, c in (("a socket without the token", "x", cookie),
                                   ("a socket without the session cookie", token, "gh_sid=other")):
                    if (leak := await ws_refused(url, t, c)) is not None:
                        raise RuntimeError(f"{sc.key}: {what} was not refused ({leak}): is the filter active?")
            before = envoy.counters("gatehouse.")
            n, cpu, errors = await ws_load(args, envoy, url, sc, token, cookie)
            after = envoy.counters("gatehouse.")
            return n, cpu, errors, before, after

        try:
            n, cpu, errors, before, after = asyncio.run(go())
        except (OSError, websockets.WebSocketException) as e:
            raise RuntimeError(f"{sc.key}: {e!r}\n" + envoy.log.read_text(errors="replace")[-4000:]) from None
        closed = {k.split("gatehouse.", 1)[1]: after[k] - before.get(k, 0) for k in after
                  if (".ws." in k or ".denied" in k) and after[k] - before.get(k, 0)}
        note = ", ".join(f"{k} {v}" for k, v in sorted(closed.items()))
        return WsResult(rate=n / args.seconds, count=n, cpu_us=cpu / max(n, 1) * 1e6, rss_mb=envoy.rss_mb(),
                        errors=errors + sum(closed.values()), note=note)
    finally:
        envoy.stop()


def ws_report(order: list[WsScenario], results: dict[str, Summary]) -> tuple[list[str], list[tuple[bool, str]]]:
    lines, checks = [], []
    for load, unit, what in (("frames", "frame", "echoed frames/s"), ("upgrades", "upgrade", "upgrades/s")):
        rows = [sc for sc in order if sc.load == load]
        if not rows or f"ws-{load}-none" not in results:
            continue
        base = results[f"ws-{load}-none"]
        b_rate, b_cpu = base.med("rate"), base.med("cpu_us")
        lines += [
            "",
            f"| `/ws/` {load} ({WS_SOCKETS} sockets) | {what} | × no filter | Envoy CPU µs/{unit} | over no filter | "
            f"Envoy RSS MB | errors |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for sc in rows:
            if sc.key not in results:
                continue
            s = results[sc.key]
            over = "" if sc.key == f"ws-{load}-none" else f"{s.med('cpu_us') - b_cpu:+.1f}"
            lines.append(f"| {sc.label} | {s.med('rate'):,.0f} | {s.med('rate') / b_rate:.2f} | {s.med('cpu_us'):.1f} | "
                         f"{over} | {s.med('rss_mb'):.0f} | {s.total('errors')} |")
        sep, one = results.get(f"ws-{load}"), results.get(f"ws-{load}-onepass")
        if sep and one:
            sep_over, one_over = sep.med("cpu_us") - b_cpu, one.med("cpu_us") - b_cpu
            ratio = one_over / sep_over if sep_over > 0 else float("inf")
            lines += ["", f"One pass vs the two filters, Envoy CPU per {unit} over no filter: {one_over:.1f} vs "
                      f"{sep_over:.1f} µs (ratio {ratio:.2f}); whole: {one.med('cpu_us'):.1f} vs {sep.med('cpu_us'):.1f} µs; "
                      f"{one.med('rate') / sep.med('rate'):.2f} × the two filters' {what}."]
            if load == "frames":
                checks.append((ratio <= WS_ONE_PASS_FRAME_RATIO,
                               f"/ws/ one pass {one_over:.1f} µs per frame over no filter ≤ {WS_ONE_PASS_FRAME_RATIO} × "
                               f"the two filters' {sep_over:.1f} µs (ratio {ratio:.2f})"))
    return lines, checks


# ---------------------------------------------------------------------------- the fleet store
#
# Issue 15: the shipped signaling route's connect as it is shipped — one pass, jwt-auth →
# session-binding with `single_use` and `max_sockets` — with `store` on a real etcd on loopback
# (both stages, as in envoy-config/envoy.yaml) against the same without `store` (this Envoy's
# shared data). Every connect needs a new single-use token: they are minted ahead, each with its
# own `sub` (a new user per connect: in etcd a closed socket's slot is released on the next tick,
# so 8 loops of one user would meet the cap of 8), all in one session (`sid`, the cookie). Each
# connect is also a new token for jwt-auth (a cache miss, one verify), the same in both. And the
# warm HTTP path: a cached token on `/api/` through the same chain with `store` must not call etcd.

STORE_ADDED_P99_MS = 2.0            # issue 15: ≤ 2 ms added p99 per connect on loopback
STORE_PREFIX = "gatehouse-bench/"
STORE_TOKENS_PER_S = 1200           # minted ahead per second of load (more are minted if they run out)


def store_config() -> dict:
    return {"etcd": {"cluster": "etcd", "prefix": STORE_PREFIX, "timeout_ms": 250}, "when_unavailable": "closed"}


def store_chain(key: Key, store: bool, jwt_store: bool | None = None) -> tuple[dict, dict]:
    """(jwt-auth, session-binding) stage configs of the shipped `signaling` and `api` routes, with
    the bench's key inline and the demo's revocation feed; `store`: session-binding on etcd, and
    jwt-auth too unless `jwt_store` says otherwise (both, as shipped)."""
    jwt = jwt_auth_config(
        key, sources=[{"websocket_protocol": {"prefix": "bearer."}}, {"authorization": {}}], clock_skew_seconds=30,
        session_claims=["sid", "sub"], reauth_type="gatehouse.reauth", max_lifetime_seconds=3600,
        max_socket_seconds=43200,
        rules=[{"match": {"route": "signaling"}, "max_age_seconds": 300,
                "require": [{"claim": "scope", "contains": "phone:call"}]},
               {"match": {"route": "api"}, "forward": True}])
    binding = {
        "rules": [{"match": {"route": "signaling"},
                   "session": {"mode": "sha256", "claim": "sid_hash", "cookie": "gh_sid"},
                   "single_use": True, "fingerprint": "if_present",
                   "max_sockets": {"limit": 8, "per_claim": "sub"}},
                  {"match": {"route": "api"}}],
        "revocation": {"cluster": "upstream", "path": "/dev/revoked.json", "refresh_seconds": 2,
                       "max_stale_seconds": 300, "when_stale": "open"},
        "sockets": {"slot_ttl_seconds": 15},
    }
    if store:
        binding["store"] = store_config()
    if store if jwt_store is None else jwt_store:
        jwt["store"] = store_config()
    return jwt, binding


STORE_ROUTES = [
    {"name": "signaling", "match": {"prefix": "/ws/"}, "route": {"cluster": "upstream", "timeout": "0s"}},
    {"name": "api", "match": {"prefix": "/api/"}, "route": {"cluster": "upstream"}},
]


@dataclass
class StoreScenario:
    key: str
    label: str
    store: str | None                 # both stages with `store` on the etcd whose data is on "disk" (as
                                      # users run it) or "tmpfs" (the disk's fsync taken out), or None


@dataclass
class StoreResult:
    rate: float                       # upgrades/s, 8 loops
    count: int
    cpu_us: float                     # Envoy CPU per upgrade
    etcd_cpu_us: float                # etcd's CPU per upgrade (0 without the store)
    etcd_rq: float                    # Envoy's requests to etcd per upgrade (claims, releases, leases, deadlines)
    p50_ms: float                     # client-measured upgrade time (connect → 101), 8 loops
    p99_ms: float
    p50_1_ms: float                   # the same, one connect at a time (no queueing)
    p99_1_ms: float
    rss_mb: float
    errors: int = 0
    note: str = ""


def store_scenarios() -> list[StoreScenario]:
    return [
        StoreScenario("ws-store-local", "per-process state (no `store`)", store=None),
        StoreScenario("ws-store-etcd", "etcd store", store="disk"),
        StoreScenario("ws-store-etcd-tmpfs", "etcd store, etcd's data on tmpfs (no disk fsync)", store="tmpfs"),
    ]


class TokenPool:
    """New single-use connect tokens, minted ahead (each its own `jti` and `sub`, one session)."""

    def __init__(self, key: Key, count: int):
        self.key = key
        sid_hash = base64.urlsafe_b64encode(hashlib.sha256(BENCH_SID.encode()).digest()).rstrip(b"=").decode()
        self.claims = {"sid": "s-bench", "sid_hash": sid_hash}
        self.n = 0
        self.tokens = [self.mint() for _ in range(count)]

    def mint(self) -> str:
        self.n += 1
        return self.key.mint(ttl=600, sub=f"bench-{os.getpid()}-{self.n}", **self.claims)

    def take(self) -> str:
        return self.tokens.pop() if self.tokens else self.mint()


def quantile_ms(seconds: list[float], q: float) -> float:
    if not seconds:
        return float("nan")
    xs = sorted(seconds)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3


async def store_churn(url: str, pool: TokenPool, cookie: str, seconds: float, loops: int):
    """(connects, their upgrade times in seconds, errors): `loops` at once open a socket with a new
    token, echo one frame and close it, for `seconds`. The time is from the connect to the 101."""
    times: list[float] = []
    errors = 0

    async def loop() -> int:
        nonlocal errors
        n, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            token = pool.take()
            try:
                t0 = time.perf_counter()
                ws = await ws_open(url, token, cookie)
                dt = time.perf_counter() - t0
                try:
                    await ws_echo(ws)   # a refused socket is a 101 and a close: the echo fails
                finally:
                    await ws.close()
                times.append(dt)
                n += 1
            except (OSError, websockets.WebSocketException, RuntimeError):
                errors += 1
        return n

    n = sum(await asyncio.gather(*(loop() for _ in range(loops))))
    return n, times, errors


def store_counters(envoy: Envoy) -> dict[str, int]:
    """Every store counter of both stages, and Envoy's requests to the `etcd` cluster."""
    out = {k.split("gatehouse.", 1)[1]: v for k, v in envoy.counters("gatehouse.").items() if ".store." in k
           or k.endswith("denied.store_unavailable")}
    stats = http_json(envoy.admin + "/stats?format=json&filter=" + urllib.request.quote("^cluster\\.etcd\\.upstream_rq_total$"))
    out["cluster.etcd.upstream_rq_total"] = next((s["value"] for s in stats["stats"] if "value" in s), 0)
    return out


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)}


def run_store_scenario(args, envoy_bin: Path, workdir: Path, demo: Demo, etcds: dict, key: Key,
                       sc: StoreScenario) -> StoreResult:
    """The upgrade path with single use and the cap, on etcd (`etcds[sc.store]`) or on this Envoy's
    shared data."""
    wd = workdir / sc.key
    wd.mkdir(parents=True, exist_ok=True)
    etcd = etcds.get(sc.store) or etcds["disk"]   # without a store: only for the CPU reads
    jwt, binding = store_chain(key, sc.store is not None)
    envoy = Envoy(envoy_bin, wd, [one_pass_filter({"jwt_auth": jwt, "session_binding": binding})],
                  upstream=demo.port, routes=STORE_ROUTES, clusters=[etcd.cluster()] if sc.store else ())
    url = envoy.base.replace("http://", "ws://") + "/ws/echo"
    cookie = f"gh_sid={BENCH_SID}"
    pool = TokenPool(key, STORE_TOKENS_PER_S * (args.warmup + 2 * args.seconds))
    try:
        async def go():
            token = pool.take()
            ws = await ws_open(url, token, cookie)
            try:
                await ws_echo(ws)
            finally:
                await ws.close()
            for what, t, c in (("the same connect token again (single use)", token, cookie),
                               ("a socket without the token", "x", cookie),
                               ("a socket without the session cookie", pool.take(), "gh_sid=other")):
                if (leak := await ws_refused(url, t, c)) is not None:
                    raise RuntimeError(f"{sc.key}: {what} was not refused ({leak}): is the filter active?")
            if args.warmup > 0:
                await store_churn(url, pool, cookie, args.warmup, WS_SOCKETS)
            before, all0 = store_counters(envoy), envoy.counters("gatehouse.")
            cpu0, etcd0 = envoy.cpu_seconds(), cpu_seconds(etcd.procs[0].pid)
            n, times, errors = await store_churn(url, pool, cookie, args.seconds, WS_SOCKETS)
            cpu1, etcd1 = envoy.cpu_seconds(), cpu_seconds(etcd.procs[0].pid)
            after = store_counters(envoy)
            _, one, errors1 = await store_churn(url, pool, cookie, args.seconds, 1)
            refused = delta(envoy.counters("gatehouse."), all0)
            return n, times, one, errors + errors1, delta(after, before), cpu1 - cpu0, etcd1 - etcd0, refused

        try:
            n, times, one, errors, counted, cpu, etcd_cpu, refused = asyncio.run(go())
        except (OSError, websockets.WebSocketException) as e:
            raise RuntimeError(f"{sc.key}: {e!r}\n" + envoy.log.read_text(errors="replace")[-4000:]) from None
        claimed = counted.get("session_binding.store.claimed", 0)
        if sc.store and claimed < n:
            raise RuntimeError(f"{sc.key}: etcd confirmed {claimed} claims for {n} connects: is the store on?")
        if not sc.store and any(k.startswith(("session_binding.store", "jwt_auth.store")) for k in counted):
            raise RuntimeError(f"{sc.key}: store counters moved without a store: {counted}")
        # What refused the connects that failed (both phases), e.g. etcd taken out of rotation by
        # its health check on an overloaded machine (`denied.store_unavailable`).
        note = ", ".join(f"{k.split('gatehouse.', 1)[1]} {v}" for k, v in sorted(refused.items())
                         if ".denied." in k or ".ws.closed." in k or ".store.error." in k)
        return StoreResult(rate=n / args.seconds, count=n, cpu_us=cpu / max(n, 1) * 1e6,
                           etcd_cpu_us=etcd_cpu / max(n, 1) * 1e6 if sc.store else 0.0,
                           etcd_rq=counted.get("cluster.etcd.upstream_rq_total", 0) / max(n, 1),
                           p50_ms=quantile_ms(times, 0.5), p99_ms=quantile_ms(times, 0.99),
                           p50_1_ms=quantile_ms(one, 0.5), p99_1_ms=quantile_ms(one, 0.99),
                           rss_mb=envoy.rss_mb(), errors=errors, note=note)
    finally:
        envoy.stop()


def etcd_requests(etcd) -> int:
    """Requests etcd itself served over gRPC (the JSON gateway is a gRPC client of it), from its
    /metrics; health checks (`/health`) are not among them."""
    with urllib.request.urlopen(etcd.url() + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("grpc_server_started_total{"))


@dataclass
class WarmStoreResult:
    requests: int                     # /api/ requests wrk completed, all with the same (cached) token
    non2xx: int
    envoy_etcd: int                   # Envoy's requests to the etcd cluster meanwhile
    etcd_grpc: int                    # requests etcd served meanwhile
    store_stats: dict                 # the filters' store counters that moved meanwhile
    control: int                      # etcd requests of one single-use connect afterwards (must be > 0)
    cache_hits: int


def run_store_warm(args, envoy_bin: Path, workdir: Path, demo: Demo, etcd, key: Key, name: str,
                   jwt_store: bool) -> WarmStoreResult:
    """The warm HTTP path with `store` configured: wrk on `/api/echo` (to the demo, as shipped) with
    one cached token carrying the login's session (`sid`); nothing may reach etcd. `jwt_store`:
    jwt-auth has `store` too (session deadlines), as shipped."""
    wd = workdir / name
    wd.mkdir(parents=True, exist_ok=True)
    jwt, binding = store_chain(key, True, jwt_store)
    envoy = Envoy(envoy_bin, wd, [one_pass_filter({"jwt_auth": jwt, "session_binding": binding})],
                  upstream=demo.port, routes=STORE_ROUTES, clusters=[etcd.cluster()])
    token = key.mint(ttl=3000, sub=f"bench-warm-{os.getpid()}", jti=None, **TokenPool(key, 0).claims)
    sc = Scenario(name, "warm /api/ with store", [], token, path="/api/echo")
    try:
        url = envoy.base + "/api/echo"
        if (status := http_status(url, sc.headers())) != 200:
            raise RuntimeError(f"{name}: /api/echo with the token got {status}\n"
                               + envoy.log.read_text(errors="replace")[-4000:])
        if (status := http_status(url)) != 401:
            raise RuntimeError(f"{name}: /api/echo without a token got {status}, not 401")
        if args.warmup > 0:
            wrk(args, url, args.warmup, sc)
        time.sleep(1)   # the first request's work on the tick (if any) is done
        before, etcd0 = store_counters(envoy), etcd_requests(etcd)
        hits0 = envoy.counters("gatehouse.jwt_auth.cache.hit")
        w = wrk(args, url, args.seconds, sc)
        time.sleep(1)   # anything the requests queued for the tick has gone out
        after, etcd1 = store_counters(envoy), etcd_requests(etcd)
        hits1 = envoy.counters("gatehouse.jwt_auth.cache.hit")
        moved = delta(after, before)
        envoy_etcd = moved.pop("cluster.etcd.upstream_rq_total", 0)

        async def connect():
            ws = await ws_open(envoy.base.replace("http://", "ws://") + "/ws/echo", TokenPool(key, 1).take(),
                               f"gh_sid={BENCH_SID}")
            try:
                await ws_echo(ws)
            finally:
                await ws.close()

        c0 = etcd_requests(etcd)
        asyncio.run(connect())
        control = etcd_requests(etcd) - c0
        return WarmStoreResult(requests=w["requests"], non2xx=w["non2xx"] + w["socket_errors"], envoy_etcd=envoy_etcd,
                               etcd_grpc=etcd1 - etcd0, store_stats=moved, control=control,
                               cache_hits=sum(hits1.values()) - sum(hits0.values()))
    finally:
        envoy.stop()


def store_report(order: list[StoreScenario], results: dict[str, Summary],
                 warm: dict[str, WarmStoreResult]) -> tuple[list[str], list[tuple[bool, str]]]:
    lines, checks = [], []

    class Med(Summary):
        def med(self, attr: str) -> float:
            """The median of the rounds that measured it (a phase where every connect failed has none)."""
            xs = [getattr(r, attr) for r in self.runs if getattr(r, attr) == getattr(r, attr)]
            return statistics.median(xs) if xs else float("nan")

    results = {k: Med(v.runs) for k, v in results.items()}
    if results:
        lines += [
            "",
            f"| `/ws/` connects, one pass, `single_use` + `max_sockets` ({WS_SOCKETS} loops) | upgrades/s | "
            "Envoy CPU µs/upgrade | etcd requests/upgrade | etcd CPU µs/upgrade | upgrade p50 | p99 | "
            "one at a time p50 | p99 | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for sc in order:
            if sc.key not in results:
                continue
            s = results[sc.key]
            lines.append(f"| {sc.label} | {s.med('rate'):,.0f} | {s.med('cpu_us'):.1f} | {s.med('etcd_rq'):.2f} | "
                         f"{s.med('etcd_cpu_us'):.1f} | {s.med('p50_ms'):.2f} ms | {s.med('p99_ms'):.2f} ms | "
                         f"{s.med('p50_1_ms'):.2f} ms | {s.med('p99_1_ms'):.2f} ms | {s.total('errors')} |")
        notes = [f"{sc.label}: {'; '.join(r.note for r in results[sc.key].runs if r.note)}" for sc in order
                 if sc.key in results and any(r.note for r in results[sc.key].runs)]
        if notes:
            lines += ["", "Store errors and refusals the filters counted during these runs: " + "; ".join(notes) + "."]
        local = results.get("ws-store-local")
        for sc in order:
            etcd = results.get(sc.key)
            if local is None or etcd is None or sc.store is None:
                continue
            add50, add99 = etcd.med("p50_1_ms") - local.med("p50_1_ms"), etcd.med("p99_1_ms") - local.med("p99_1_ms")
            lines += ["", f"{sc.label[0].upper() + sc.label[1:]} against per-process state, per connect (one at a time, "
                      f"client-measured upgrade time): {add50:+.2f} ms at p50, {add99:+.2f} ms at p99; with {WS_SOCKETS} "
                      f"loops at once {etcd.med('p50_ms') - local.med('p50_ms'):+.2f} / "
                      f"{etcd.med('p99_ms') - local.med('p99_ms'):+.2f} ms; Envoy CPU "
                      f"{etcd.med('cpu_us') - local.med('cpu_us'):+.1f} µs per upgrade, etcd's own "
                      f"{etcd.med('etcd_cpu_us'):.1f} µs; {etcd.med('rate') / local.med('rate'):.2f} × the upgrades/s."]
            checks.append((add99 <= STORE_ADDED_P99_MS,  # NaN (nothing measured) fails
                           f"{sc.label} adds {add99:+.2f} ms p99 per connect (one at a time) ≤ {STORE_ADDED_P99_MS:.0f} ms"))
    for name, w in warm.items():
        stats = ", ".join(f"`{k}` {v}" for k, v in sorted(w.store_stats.items())) or "none moved"
        calls = w.envoy_etcd + w.etcd_grpc
        why = ""
        if w.store_stats.get("jwt_auth.store.deadline.written"):
            why = (" The writes are jwt-auth's session deadline, queued by every allowed request and written on the "
                   "root tick at most every 2 s per session: off the request path, but the same unchanged deadline "
                   "written again while the token is reused.")
        lines += ["", f"Warm `/api/` path, {name}: {w.requests:,} requests with one cached token ({w.cache_hits:,} "
                  f"cache hits, {w.non2xx} non-2xx): Envoy → etcd requests {w.envoy_etcd}, requests etcd served "
                  f"{w.etcd_grpc}, store counters: {stats}. One single-use connect on the same Envoy afterwards: "
                  f"{w.control} etcd requests (the count sees store calls).{why}"]
        checks.append((calls == 0 and w.control > 0 and w.non2xx == 0,
                       f"0 store calls on the warm path ({name}): {w.envoy_etcd} from Envoy, {w.etcd_grpc} at etcd "
                       f"in {w.requests:,} requests"))
    return lines, checks


# -------------------------------------------------------------------------------------- memory

RSS_CONCURRENCY = (1, 4, 8)
RSS_SETTLE_SECONDS = 3
RSS_LOAD_SECONDS = 3
# (key, label): no gatehouse filter, the empty module in their place (what any wasm module costs),
# each filter from its own module and VM, every filter from the one module under one vm_id. The
# shipped envoy.yaml's other filters, routes and clusters in all of them.
RSS_VARIANTS = [
    ("none", "no filter"),
    ("noop", "an empty wasm module (bench/noop) instead"),
    ("separate", "five modules (dist/<filter>.wasm), a vm_id each"),
    ("one", f"dist/{ONE_MODULE} five times, one vm_id"),
    ("onepass", "the one-pass filter (root_id gatehouse, as shipped)"),
    # The shipped bootstrap's `memory_allocator_manager` (free allocator pages given back to the
    # OS) taken out: what it saves, each against a no-filter Envoy without it too.
    ("none/kept", "no filter, allocator pages kept (no memory_allocator_manager)"),
    ("onepass/kept", "the one-pass filter, allocator pages kept"),
]
# What a "…/kept" variant is measured against: the same bootstrap with no filter.
RSS_BASELINE = {"none/kept": "none/kept", "onepass/kept": "none/kept"}


def rss_config(variant: str, port: int, admin_port: int, demo_port: int) -> dict:
    """envoy-config/envoy.yaml on free ports in front of the demo, with its gatehouse filters as
    `variant` says (its other filters, routes and clusters as shipped)."""
    cfg = shipped_config(SimpleNamespace(port=port, admin_port=admin_port), SimpleNamespace(port=demo_port))
    variant, kept = variant.removesuffix("/kept"), variant.endswith("/kept")
    if kept:
        cfg.pop("memory_allocator_manager", None)
    if variant != "onepass":
        # The shipped one-pass filter as the separate filters of its stages.
        cfg = unfold_one_pass(cfg)
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    kept = []
    for f in hcm["http_filters"]:
        plugin = f["typed_config"].get("config", {})
        root_id = plugin.get("root_id")
        if root_id is None:
            kept.append(f)
        elif variant == "noop" and not any(k["name"] == "bench.noop" for k in kept):
            kept.append(noop_filter())
        elif variant == "separate":
            plugin["vm_config"].update(vm_id=f"gatehouse.{root_id}",
                                       code={"local": {"filename": str(DIST / FILTERS[root_id][1])}})
            kept.append(f)
        elif variant in ("one", "onepass"):
            plugin["vm_config"].update(vm_id=ONE_VM_ID, code={"local": {"filename": str(DIST / ONE_MODULE)}})
            kept.append(f)
    hcm["http_filters"] = kept
    return cfg


def rss_sample(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def measure_rss(envoy_bin: Path, workdir: Path, demo: Demo, variant: str, concurrency: int) -> tuple[float, float]:
    """Envoy's VmRSS (MB) idle after the start (JWKS and revocation feed fetched), and after
    RSS_LOAD_SECONDS of wrk on the shipped `/api/` route with a dev-login token."""
    wd = workdir / f"rss-{variant.replace('/', '-')}-{concurrency}"
    wd.mkdir(parents=True, exist_ok=True)
    port, admin_port = free_port(), free_port()
    config = wd / "envoy.json"
    config.write_text(json.dumps(rss_config(variant, port, admin_port, demo.port), indent=1))
    log = wd / "envoy.log"
    env = dict(os.environ, GATEHOUSE_COOKIE_KEYS=demo.cookie_keys, GATEHOUSE_TURN_SECRET=new_key())
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(envoy_bin), "-c", str(config), "--use-dynamic-base-id", "--concurrency",
                                 str(concurrency), "--log-level", "warn"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
    STARTED.append(proc)
    try:
        admin = f"http://127.0.0.1:{admin_port}"
        wait_for(lambda: http_status(admin + "/ready", timeout=2) == 200, 60, "envoy", proc, log)
        time.sleep(RSS_SETTLE_SECONDS)
        idle = rss_sample(proc.pid)
        base = f"http://127.0.0.1:{port}"
        req = urllib.request.Request(base + "/dev/login?user=rss", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=5) as r:
            token = json.loads(r.read())["access_token"]
        url = base + "/api/echo"
        if (status := http_status(url, {"Authorization": f"Bearer {token}"})) != 200:
            raise RuntimeError(f"rss {variant}: /api/echo with the token got {status}\n"
                               + log.read_text(errors="replace")[-4000:])
        if variant in ("separate", "one") and (status := http_status(url)) != 401:
            raise RuntimeError(f"rss {variant}: /api/echo without a token got {status}, not 401")
        wrk_proc = subprocess.run(["wrk", "-t1", "-c8", f"-d{RSS_LOAD_SECONDS}s", "-H", f"Authorization: Bearer {token}",
                                   url], capture_output=True, text=True, timeout=RSS_LOAD_SECONDS + 30)
        if wrk_proc.returncode != 0:
            raise RuntimeError(f"rss {variant}: wrk failed: {wrk_proc.stderr}")
        time.sleep(1)
        return idle, rss_sample(proc.pid)
    finally:
        stop(proc)
        STARTED.remove(proc)


def run_rss(envoy_bin: Path, workdir: Path) -> dict[tuple[str, int], tuple[float, float]]:
    """(variant, concurrency) → (idle MB, after-load MB), every variant at every concurrency in
    one run, next to each other."""
    out = {}
    (workdir / "rss-demo").mkdir(parents=True, exist_ok=True)
    demo = Demo(workdir / "rss-demo")
    try:
        for concurrency in RSS_CONCURRENCY:
            for variant, label in RSS_VARIANTS:
                out[variant, concurrency] = measure_rss(envoy_bin, workdir, demo, variant, concurrency)
                idle, loaded = out[variant, concurrency]
                print(f"  rss --concurrency {concurrency}  {label:<48} idle {idle:6.1f} MB  after load {loaded:6.1f} MB",
                      flush=True)
    finally:
        demo.stop()
    return out


def rss_report(rss: dict[tuple[str, int], tuple[float, float]], envoy_version: str) -> tuple[str, list[str]]:
    lo, hi = RSS_CONCURRENCY[-2], RSS_CONCURRENCY[-1]
    lines = [
        f"Envoy RSS (MB), the shipped `envoy-config/envoy.yaml` filters (token-proxy, jwt-auth, "
        f"session-binding, turn-credentials, page-guard) in front of the demo: idle {RSS_SETTLE_SECONDS} s after "
        f"the start, and after {RSS_LOAD_SECONDS} s of `wrk -t1 -c8` on `/api/echo` with a token; (+ over no filter). "
        f"Per extra worker: the {lo} → {hi} workers difference / {hi - lo}. Every Envoy runs the shipped bootstrap "
        f"(its `memory_allocator_manager` gives free allocator pages back to the OS) but the last two rows of each "
        f"state, without it, each against a no-filter Envoy without it.",
        "",
        "| filters | state | " + " | ".join(f"`--concurrency {c}`" for c in RSS_CONCURRENCY) + " | per extra worker |",
        "|---|---|" + "---:|" * (len(RSS_CONCURRENCY) + 1),
    ]
    for state, i in (("idle", 0), ("after load", 1)):
        for variant, label in RSS_VARIANTS:
            base = RSS_BASELINE.get(variant, "none")
            cells = []
            for c in RSS_CONCURRENCY:
                mb, none = rss[variant, c][i], rss[base, c][i]
                cells.append(f"{mb:.0f}" if variant == base else f"{mb:.0f} ({mb - none:+.0f})")
            per = (rss[variant, hi][i] - rss[variant, lo][i]) / (hi - lo)
            if variant != base:
                per -= (rss[base, hi][i] - rss[base, lo][i]) / (hi - lo)
            cells.append(f"{per:.1f}" if variant == base else f"{per:+.1f}")
            lines.append(f"| {label} | {state} | " + " | ".join(cells) + " |")
    checks = []
    for state, i in (("idle", 0), ("after load", 1)):
        over = rss["one", lo][i] - rss["none", lo][i]
        checks.append((over <= RSS_OVER_NONE_MB, f"every filter from dist/{ONE_MODULE}, {state}: "
                       f"{over:+.0f} MB over no filter at --concurrency {lo} ≤ {RSS_OVER_NONE_MB:.0f} MB"))
        per = ((rss["one", hi][i] - rss["one", lo][i]) - (rss["none", hi][i] - rss["none", lo][i])) / (hi - lo)
        checks.append((per <= RSS_PER_WORKER_MB, f"every filter from dist/{ONE_MODULE}, {state}: "
                       f"{per:+.1f} MB per extra worker ≤ {RSS_PER_WORKER_MB:.0f} MB"))
    size = (DIST / ONE_MODULE).stat().st_size / 1024
    checks.append((size <= ONE_MODULE_MAX_KB, f"dist/{ONE_MODULE} {size:.0f} KB ≤ {ONE_MODULE_MAX_KB} KB"))
    target_lines = [f"{verdict(ok)}  {text}" for ok, text in checks]
    lines += ["", "Targets:", "", "```", *target_lines, "```", "",
              f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPUs "
              f"({platform.machine()}), load average {os.getloadavg()[0]:.2f}; {envoy_version}."]
    return "\n".join(lines), target_lines


# ------------------------------------------------------------------------------------ building


def build_noop(skip: bool):
    built = ROOT / "target" / WASM_TARGET / "release" / (NOOP_PACKAGE.replace("-", "_") + ".wasm")
    if not skip:
        cargo = os.environ.get("CARGO", "cargo")
        print(f"bench: building {NOOP_PACKAGE} ({WASM_TARGET}, release)", flush=True)
        subprocess.run([cargo, "build", "-j2", "--release", "--target", WASM_TARGET, "-p", NOOP_PACKAGE],
                       cwd=ROOT, check=True)
    NOOP_WASM.parent.mkdir(parents=True, exist_ok=True)
    if shutil.which("wasm-opt"):
        subprocess.run(["wasm-opt", *WASM_OPT_ARGS, "-o", str(NOOP_WASM), str(built)], check=True)
    else:
        shutil.copyfile(built, NOOP_WASM)


def mint_tokens(workdir: Path, algs: list[str], count: int):
    """Per alg: a key, the sanity token, and two files of unique tokens: `count` for the measured
    cold runs, and a quarter as many for their warm-ups."""
    keys, tokens, files = {}, {}, {}
    for alg in algs:
        t0 = time.monotonic()
        key = Key.generate(alg)
        keys[alg] = key
        tokens[alg] = key.mint(ttl=6 * 3600)
        paths = workdir / f"tokens-{alg}.txt", workdir / f"warmup-{alg}.txt"
        for path, n in zip(paths, (count, max(count // 4, 1))):
            with open(path, "w") as f:
                for _ in range(n):
                    f.write(key.mint(ttl=6 * 3600) + "\n")
        files[alg] = paths
        print(f"bench: minted {count} + {max(count // 4, 1)} {alg} tokens ({len(tokens[alg])} bytes each) in "
              f"{time.monotonic() - t0:.1f} s", flush=True)
    return keys, tokens, files


# ------------------------------------------------------------------------------------ reporting


def fmt_us(us: float) -> str:
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} µs"


def fmt_delta(us: float) -> str:
    return ("+" if us >= 0 else "−") + fmt_us(abs(us))


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def scenario_table(order: list[Scenario], results: dict[str, Summary]) -> list[str]:
    base = results["none"]
    b_rps, b_cpu = base.med("rps"), base.med("cpu_us")
    lines = [
        "| scenario | req/s | × no filter | p50 | p99 | Envoy CPU µs/req | × no filter | Envoy RSS MB | non-2xx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for sc in order:
        s = results[sc.key]
        bad = s.total("non2xx") + s.total("socket_errors")
        lines.append(
            f"| {sc.label} | {s.med('rps'):,.0f} | {s.med('rps') / b_rps:.2f} | {fmt_us(s.med('p50_us'))} | "
            f"{fmt_us(s.med('p99_us'))} | {s.med('cpu_us'):.1f} | {s.med('cpu_us') / b_cpu:.2f} | {s.med('rss_mb'):.0f} | {bad} |"
        )
    return lines


def cold_path(args, algs, results: dict[str, Summary]) -> tuple[list[str], list[tuple[bool, str]]]:
    """New tokens with the default cache (full, every request a miss) against `cache_entries: 0`
    (the verify alone) and, with `--before`, another build of jwt-auth with the default cache."""
    cpu = {k: v.med("cpu_us") for k, v in results.items()}
    before = all(f"cold-before-{alg}" in cpu for alg in algs)

    def paired(a: str, b: str) -> float:
        """Median over rounds of a − b measured in the same round (neighbours in time): steadier on
        a shared machine than the difference of the two medians."""
        return statistics.median(x.cpu_us - y.cpu_us for x, y in zip(results[a].runs, results[b].runs))

    over = "Envoy CPU µs/request over no filter"
    lines = [
        "",
        f"The cold path ({args.tokens} unique tokens cycled, so the default {DEFAULT_CACHE_ENTRIES}-entry cache is "
        f"full and every request is a miss; {over}; the differences are medians of the differences within each "
        f"round):",
        "",
        "| alg | warm | new token, `cache_entries: 0` | new token, default cache | "
        + ("new token, default cache, `--before` | " if before else "")
        + "one verify (no cache − warm) | default cache on a miss (− no cache) |"
        + (" `--before` cache on a miss (− no cache) |" if before else ""),
        "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if before else ""),
    ]
    checks = []
    for alg in algs:
        warm, nocache, cold = (cpu[f"{k}-{alg}"] for k in ("warm", "cold-nocache", "cold"))
        row = f"| {alg} | {warm - cpu['none']:.1f} | {nocache - cpu['none']:.1f} | {cold - cpu['none']:.1f} | "
        if before:
            row += f"{cpu[f'cold-before-{alg}'] - cpu['none']:.1f} | "
        miss = paired(f"cold-{alg}", f"cold-nocache-{alg}")
        row += f"{paired(f'cold-nocache-{alg}', f'warm-{alg}'):.1f} | {miss:+.1f} |"
        if before:
            row += f" {paired(f'cold-before-{alg}', f'cold-nocache-{alg}'):+.1f} |"
        lines.append(row)
        checks.append((miss <= NEW_TOKEN_OVER_VERIFY_US,
                       f"a new {alg} token with the default cache costs {miss:+.1f} µs over the verify alone "
                       f"(`cache_entries: 0`) ≤ +{NEW_TOKEN_OVER_VERIFY_US:.0f} µs"))
    return lines, checks


def run_line(args, load_before, load_after, envoy_version: str, wall: float) -> str:
    host = f"{os.cpu_count()} CPUs ({platform.machine()})"
    return (
        f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {host}, "
        f"load average {load_before[0]:.2f} before / {load_after[0]:.2f} after; {envoy_version}; "
        f"wrk `-t{args.threads} -c{args.connections}`, {args.warmup:g} s warm-up + {args.seconds:g} s measured per "
        f"scenario, {args.rounds} round(s){' (medians)' if args.rounds > 1 else ''}, {args.tokens} cold tokens "
        f"per alg; whole run {wall / 60:.1f} min."
    )


def counter_notes(order: list[Scenario], results: dict[str, Summary]) -> list[str]:
    bad = [(sc.label, results[sc.key]) for sc in order
           if results[sc.key].total("non2xx") or results[sc.key].total("socket_errors")]
    notes = [f"{sc.label}: {'; '.join(r.note for r in results[sc.key].runs)}" for sc in order
             if any(r.note for r in results[sc.key].runs)]
    lines = []
    if notes:
        lines += ["", "Filter counters during the measured runs: " + "; ".join(notes) + "."]
    if bad:
        lines += ["", "**Errors**: " + "; ".join(
            f"{label}: {s.total('non2xx')} non-2xx, {s.total('socket_errors')} socket errors" for label, s in bad)]
    return lines


def targets(checks: list[tuple[bool, str]]) -> tuple[list[str], list[str]]:
    target_lines = [f"{verdict(ok)}  {text}" for ok, text in checks]
    return ["", "Targets:", "", "```", *target_lines, "```"], target_lines


def cold_report(args, algs, order: list[Scenario], results: dict[str, Summary], envoy_version: str,
                load_before, load_after, wall: float) -> tuple[str, list[str]]:
    """`--cold`: the scenario table and the cold-path table only."""
    lines = scenario_table(order, results)
    cold, checks = cold_path(args, algs, results)
    shown, target_lines = targets(checks)
    lines += cold + shown + ["", run_line(args, load_before, load_after, envoy_version, wall)]
    return "\n".join(lines + counter_notes(order, results)), target_lines


def report(args, algs, order: list[Scenario], results: dict[str, Summary], envoy_version: str,
           load_before, load_after, wall: float, ws: tuple[list[str], list] = ([], []),
           fleet: tuple[list[str], list] = ([], [])) -> tuple[str, list[str]]:
    """The whole run's report; `ws`, `fleet`: the WebSocket and store tables and their checks
    (ws_report, store_report)."""
    lines = scenario_table(order, results)
    cpu = {k: v.med("cpu_us") for k, v in results.items()}
    rps = {k: v.med("rps") for k, v in results.items()}
    lines += [
        "",
        "Derived (Envoy CPU per request, µs):",
        "",
        "| alg | jwt-auth warm − no-op wasm | jwt-auth one verify (cold, no cache − warm) | native one verify (no cache − cache) | "
        "jwt-auth warm req/s ÷ native cached |",
        "|---|---:|---:|---:|---:|",
    ]
    for alg in algs:
        lines.append(
            f"| {alg} | {cpu[f'warm-{alg}'] - cpu['noop']:.1f} | {cpu[f'cold-nocache-{alg}'] - cpu[f'warm-{alg}']:.1f} | "
            f"{cpu[f'native-{alg}'] - cpu[f'native-cache-{alg}']:.1f} | "
            f"{rps[f'warm-{alg}'] / rps[f'native-cache-{alg}']:.2f} |"
        )

    cold, cold_checks = cold_path(args, algs, results)
    lines += cold
    chain_alg = algs[0]
    lines += [
        "",
        f"Host-call floor ({chain_alg} token): the no-op module making the host calls of jwt-auth's warm "
        f"path and nothing else costs {cpu['floor'] - cpu['noop']:.1f} µs of Envoy CPU per request over the "
        f"no-op module and serves {rps['floor'] / rps[f'native-cache-{chain_alg}']:.2f} × native cached "
        f"jwt_authn's requests/s; jwt-auth warm is {cpu[f'warm-{chain_alg}'] - cpu['floor']:+.1f} µs over that "
        f"floor (its own logic). Only the three calls no bearer-token check can skip (read the token, strip "
        f"it, publish the claims): {cpu['floor-min'] - cpu['noop']:.1f} µs over the no-op module, "
        f"{rps['floor-min'] / rps[f'native-cache-{chain_alg}']:.2f} × native cached requests/s.",
    ]
    p50 = {k: v.med("p50_us") for k, v in results.items()}
    p50_c1 = {k: statistics.median(r.p50_c1_us for r in v.runs) for k, v in results.items()
              if all(r.p50_c1_us is not None for r in v.runs)}
    added_p50 = p50_c1["page-guard"] - p50_c1["page"]
    lines += [
        "",
        f"token-proxy + jwt-auth chained ({chain_alg}, warm): {rps['chain']:,.0f} req/s = "
        f"{rps['chain'] / rps['none']:.2f} × no filter, {rps['chain'] / rps[f'warm-{chain_alg}']:.2f} × jwt-auth "
        f"alone; {cpu['chain'] - cpu[f'warm-{chain_alg}']:.1f} µs of Envoy CPU per request over jwt-auth alone.",
        "",
        f"jwt-auth + session-binding chained ({chain_alg}, warm; session cookie, room scope, fingerprint "
        f"if present): {rps['bound']:,.0f} req/s = {rps['bound'] / rps['none']:.2f} × no filter, "
        f"{rps['bound'] / rps[f'warm-{chain_alg}']:.2f} × jwt-auth alone; "
        f"{cpu['bound'] - cpu[f'warm-{chain_alg}']:.1f} µs of Envoy CPU per request over jwt-auth alone.",
        "",
        f"page-guard on the {PAGE_BYTES // 1024} KB page: {rps['page-guard']:,.0f} req/s = "
        f"{rps['page-guard'] / rps['page']:.2f} × the same page without filters; p50 with one connection "
        f"{fmt_us(p50_c1['page-guard'])} vs {fmt_us(p50_c1['page'])} ({fmt_delta(added_p50)}), with "
        f"{args.connections} connections {fmt_us(p50['page-guard'])} vs {fmt_us(p50['page'])} "
        f"({fmt_delta(p50['page-guard'] - p50['page'])}, mostly queueing behind the one worker); "
        f"{cpu['page-guard'] - cpu['page']:.1f} µs of Envoy CPU per request over the page without filters.",
    ]

    lines += ws[0] + fleet[0]
    sizes = []
    for wasm in sorted(DIST.glob("*.wasm")) + [NOOP_WASM]:
        shown = wasm.relative_to(ROOT)
        sizes.append((str(shown), wasm.stat().st_size / 1024, wasm.parent == DIST))
    lines += ["", "`.wasm` sizes (raw bytes, KB = 1024 B): "
              + ", ".join(f"`{name}` {kb:.0f} KB" for name, kb, _ in sizes)]

    checks = []
    for alg in algs:
        over = cpu[f"warm-{alg}"] - cpu["noop"]
        checks.append((over <= WARM_OVER_NOOP_US,
                       f"jwt-auth {alg} warm CPU/request {cpu[f'warm-{alg}']:.1f} µs ≤ no-op wasm "
                       f"{cpu['noop']:.1f} + {WARM_OVER_NOOP_US:.0f} µs (over by {over:+.1f} µs)"))
    for alg in algs:
        ratio = rps[f"warm-{alg}"] / rps[f"native-cache-{alg}"]
        checks.append((ratio >= WARM_VS_NATIVE_CACHED,
                       f"jwt-auth {alg} warm req/s {rps[f'warm-{alg}']:,.0f} ≥ {WARM_VS_NATIVE_CACHED} × native "
                       f"cached {rps[f'native-cache-{alg}']:,.0f} (ratio {ratio:.2f})"))
    for alg in algs:
        verify = cpu[f"cold-nocache-{alg}"] - cpu[f"warm-{alg}"]
        checks.append((verify <= VERIFY_TARGET_US[alg],
                       f"one {alg} verify in Envoy {verify:.1f} µs ≤ {VERIFY_TARGET_US[alg]:.0f} µs"))
    checks += cold_checks
    ratio = rps["chain"] / rps["none"]
    checks.append((ratio >= CHAIN_VS_BASELINE,
                   f"token-proxy + jwt-auth warm req/s {rps['chain']:,.0f} ≥ {CHAIN_VS_BASELINE} × no filter "
                   f"{rps['none']:,.0f} (ratio {ratio:.2f})"))
    checks += ws[1] + fleet[1]
    checks.append((added_p50 < PAGE_GUARD_ADDED_P50_US,
                   f"page-guard adds {fmt_delta(added_p50)} at p50 to the {PAGE_BYTES // 1024} KB page (one connection) "
                   f"< {PAGE_GUARD_ADDED_P50_US:.0f} µs"))
    for name, kb, in_dist in sizes:
        if in_dist:
            limit = ONE_MODULE_MAX_KB if name == f"dist/{ONE_MODULE}" else WASM_MAX_KB
            checks.append((kb <= limit, f"{name} {kb:.0f} KB ≤ {limit} KB"))
    shown, target_lines = targets(checks)
    lines += shown + ["", run_line(args, load_before, load_after, envoy_version, wall)]
    return "\n".join(lines + counter_notes(order, results)), target_lines


def write_doc(table: str, begin: str = BEGIN, end: str = END):
    text = DOC.read_text() if DOC.exists() else f"# Performance\n\n{begin}\n{end}\n"
    section = f"{begin}\n{table}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOC.write_text(text)


# ----------------------------------------------------------------------------------------- main


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=5, help="measured wrk run per scenario (default 5)")
    p.add_argument("--soak", type=int, metavar="SECONDS",
                   help="instead of the scenarios: the soak, mixed traffic through the shipped config "
                        "for SECONDS (bench/soak.py; e.g. 600)")
    p.add_argument("--warmup", type=int, default=1, help="wrk warm-up run before measuring (default 1)")
    p.add_argument("--threads", type=int, default=1, help="wrk -t (default 1)")
    p.add_argument("--connections", type=int, default=8, help="wrk -c (default 8)")
    p.add_argument("--tokens", type=int, default=4000,
                   help=f"unique tokens minted per alg for the cold runs, more than jwt-auth's default cache_entries "
                        f"({DEFAULT_CACHE_ENTRIES}) so every cold request misses (default 4000)")
    p.add_argument("--rounds", type=int, default=1, help="repeat every scenario N times, report medians (default 1)")
    p.add_argument("--algs", default=",".join(ALGS), help=f"comma-separated subset of {','.join(ALGS)}")
    p.add_argument("--cold", action="store_true",
                   help="only the cold-path scenarios (no filter, no-op wasm, jwt-auth warm and cold); prints its "
                        "table, never rewrites the doc")
    p.add_argument("--before", type=Path, metavar="WASM",
                   help="another build of jwt-auth.wasm (e.g. from an earlier commit): adds a cold scenario with "
                        "the default cache on it, in the same run")
    p.add_argument("--only", metavar="KEYS",
                   help="comma-separated scenario keys to run (e.g. none,noop,warm-ES256,chain,chain-onepass,api,"
                        "api-onepass, ws-frames-onepass, ws-store-local,ws-store-etcd,ws-store-etcd-tmpfs,store-warm,"
                        "store-warm-binding); prints its table and targets, never rewrites the doc")
    p.add_argument("--envoy", help="Envoy binary (default: .venv/bin/envoy, or $GATEHOUSE_ENVOY)")
    p.add_argument("--no-build", action="store_true", help="do not run cargo for bench/noop (use the last build)")
    p.add_argument("--no-doc", action="store_true", help=f"do not rewrite the table in {DOC.relative_to(ROOT)}")
    p.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs, tokens)")
    p.add_argument("--rss-only", action="store_true",
                   help="only the Envoy RSS table (no filter / five modules / the one module at --concurrency 1, 4, 8)")
    p.add_argument("--no-rss", action="store_true", help="skip the Envoy RSS table")
    args = p.parse_args()
    args.algs = [a.strip() for a in args.algs.split(",") if a.strip()]
    if not args.algs or set(args.algs) - set(ALGS):
        p.error(f"--algs: choose from {ALGS}")
    if args.seconds < 1 or args.rounds < 1 or args.tokens <= DEFAULT_CACHE_ENTRIES:
        p.error(f"--seconds ≥ 1, --rounds ≥ 1, --tokens > {DEFAULT_CACHE_ENTRIES} (jwt-auth's default cache_entries)")
    if args.before is not None and not args.before.is_file():
        p.error(f"--before: {args.before} is not a file")
    return args


def main() -> int:
    args = parse_args()
    if args.soak:
        import soak

        return soak.main(["--seconds", str(args.soak)] + (["--no-doc"] if args.no_doc else []))
    signal.signal(signal.SIGTERM, _terminate)
    started_at = time.monotonic()
    envoy_bin = find_envoy(args.envoy)
    if not shutil.which("wrk"):
        sys.exit("bench: wrk is not installed (apt-get install wrk)")
    for name in ("jwt-auth.wasm", "token-proxy.wasm", "session-binding.wasm", "page-guard.wasm", ONE_MODULE):
        if not (DIST / name).exists():
            sys.exit(f"bench: dist/{name} is missing: run `cargo xtask build` (or `cargo xtask bench`)")
    build_noop(args.no_build)
    version = subprocess.run([str(envoy_bin), "--version"], capture_output=True, text=True).stdout.strip()
    m = re.search(r"/(\d+\.\d+\.\d+)/", version)
    envoy_version = f"Envoy {m.group(1)}" if m else "Envoy"

    workdir = Path(tempfile.mkdtemp(prefix="gatehouse-bench-"))
    results: dict[str, Summary] = {}
    ws_results: dict[str, Summary] = {}   # WsResult runs, apart: their fields are not Result's
    store_results: dict[str, Summary] = {}
    warm_store: dict[str, WarmStoreResult] = {}
    demo = None
    etcds: dict[str, Etcd] = {}
    try:
        if not args.no_rss:
            print(f"bench: Envoy RSS, {len(RSS_VARIANTS)} configs × --concurrency "
                  f"{', '.join(map(str, RSS_CONCURRENCY))}", flush=True)
            rss_table, _ = rss_report(run_rss(envoy_bin, workdir), envoy_version)
            print("\n" + rss_table + "\n")
            if not args.no_doc:
                write_doc(rss_table, RSS_BEGIN, RSS_END)
                print(f"bench: wrote the RSS table into {DOC.relative_to(ROOT)}")
        if args.rss_only:
            return 0
        keys, tokens, files = mint_tokens(workdir, args.algs, args.tokens)
        order = scenarios(keys, tokens, files, args.algs, args.before)
        ws_order, ws_token, ws_cookie = ws_scenarios(keys[args.algs[0]])
        store_order = store_scenarios()
        # The warm-path checks: as shipped (`store` on both stages), and session-binding's alone.
        warm_keys = {"store-warm": "as shipped: `store` on jwt-auth and session-binding",
                     "store-warm-binding": "`store` on session-binding only"}
        if args.cold:
            order = [sc for sc in order if sc.key in ("none", "noop") or sc.key.startswith(("warm-", "cold-"))]
            ws_order, store_order, warm_keys = [], [], {}
        if args.only:
            keep = {k.strip() for k in args.only.split(",")}
            order = [sc for sc in order if sc.key in keep]
            ws_order = [sc for sc in ws_order if sc.key in keep]
            store_order = [sc for sc in store_order if sc.key in keep]
            warm_keys = {k: v for k, v in warm_keys.items() if k in keep}
            args.no_doc = True
        if ws_order or store_order or warm_keys:
            (workdir / "ws-demo").mkdir(parents=True, exist_ok=True)
            demo = Demo(workdir / "ws-demo")
        if store_order or warm_keys:
            # A real etcd on loopback, started as the tests start theirs (conftest.Etcd); and one
            # with its data on tmpfs for the scenario that takes the disk out.
            if not shutil.which("etcd"):
                sys.exit("bench: etcd is not installed (apt-get install etcd-server, see .ci/system-packages)")
            (workdir / "etcd").mkdir()
            etcds["disk"] = Etcd(workdir / "etcd", 1)
            if any(sc.store == "tmpfs" for sc in store_order):
                etcds["tmpfs"] = Etcd(Path(tempfile.mkdtemp(prefix="gatehouse-bench-etcd-", dir="/dev/shm")), 1)
            for key, what in warm_keys.items():
                w = run_store_warm(args, envoy_bin, workdir, demo, etcds["disk"], keys[args.algs[0]], key,
                                   jwt_store=key == "store-warm")
                warm_store[what] = w
                print(f"  {key:<40} {w.requests:>9,} requests  Envoy→etcd {w.envoy_etcd}  at etcd {w.etcd_grpc}  "
                      f"store counters {w.store_stats or 'none'}  control connect {w.control}", flush=True)
        load_before = os.getloadavg()
        est = (sum(args.seconds * (2 if sc.one_connection else 1) + args.warmup + 2 for sc in order)
               + len(ws_order) * (args.seconds + args.warmup + 3)
               + len(store_order) * (2 * args.seconds + args.warmup + 6)) * args.rounds
        print(f"bench: {len(order) + len(ws_order) + len(store_order)} scenarios × {args.rounds} round(s), about {est / 60:.1f} min; "
              f"{envoy_version} --concurrency 1; wrk -t{args.threads} -c{args.connections} "
              f"{args.warmup:g}+{args.seconds:g} s; load average {load_before[0]:.2f}", flush=True)
        for rnd in range(args.rounds):
            # Every other round runs backwards, so no scenario always follows the same neighbour.
            for sc in (order if rnd % 2 == 0 else order[::-1]):
                r = run_scenario(args, envoy_bin, workdir, sc)
                results.setdefault(sc.key, Summary()).runs.append(r)
                warn = f"  non-2xx {r.non2xx} socket errors {r.socket_errors}" if r.non2xx or r.socket_errors else ""
                one = f"  p50 -c1 {fmt_us(r.p50_c1_us)}" if r.p50_c1_us is not None else ""
                print(f"  [{rnd + 1}/{args.rounds}] {sc.label:<38} {r.rps:>9,.0f} req/s  p50 {fmt_us(r.p50_us):>9}  "
                      f"p99 {fmt_us(r.p99_us):>9}  Envoy CPU {r.cpu_us:7.1f} µs/req"
                      f"{one}{'  ' + r.note if r.note else ''}{warn}", flush=True)
            for ws in (ws_order if rnd % 2 == 0 else ws_order[::-1]):
                r = run_ws_scenario(args, envoy_bin, workdir, demo, ws, ws_token, ws_cookie)
                ws_results.setdefault(ws.key, Summary()).runs.append(r)
                unit = "frame" if ws.load == "frames" else "upgrade"
                print(f"  [{rnd + 1}/{args.rounds}] {ws.label:<38} {r.rate:>9,.0f} {ws.load}/s  Envoy CPU "
                      f"{r.cpu_us:7.1f} µs/{unit}{'  errors ' + str(r.errors) if r.errors else ''}"
                      f"{'  ' + r.note if r.note else ''}", flush=True)
            for st in (store_order if rnd % 2 == 0 else store_order[::-1]):
                r = run_store_scenario(args, envoy_bin, workdir, demo, etcds, keys[args.algs[0]], st)
                store_results.setdefault(st.key, Summary()).runs.append(r)
                print(f"  [{rnd + 1}/{args.rounds}] {st.label:<38} {r.rate:>9,.0f} upgrades/s  Envoy CPU "
                      f"{r.cpu_us:7.1f} µs/upgrade  etcd CPU {r.etcd_cpu_us:6.1f} µs  p50/p99 {r.p50_ms:.2f}/"
                      f"{r.p99_ms:.2f} ms  one at a time {r.p50_1_ms:.2f}/{r.p99_1_ms:.2f} ms"
                      f"{'  errors ' + str(r.errors) if r.errors else ''}", flush=True)
        load_after = os.getloadavg()
        ws = ws_report(ws_order, ws_results)
        fleet = store_report(store_order, store_results, warm_store)
        if args.only:
            shown, _ = targets(ws[1] + fleet[1]) if ws[1] + fleet[1] else ([], [])
            table = "\n".join((scenario_table(order, results) if order else []) + ws[0] + fleet[0] + shown + [
                "", run_line(args, load_before, load_after, envoy_version, time.monotonic() - started_at)])
        else:
            table, target_lines = (cold_report if args.cold else report)(
                args, args.algs, order, results, envoy_version, load_before, load_after,
                time.monotonic() - started_at, *([ws, fleet] if not args.cold else []))
        print("\n" + table + "\n")
        if not args.no_doc and not args.cold:
            write_doc(table)
            print(f"bench: wrote the table into {DOC.relative_to(ROOT)}")
        return 0
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
        return 130
    finally:
        if demo is not None:
            demo.stop()
        for e in etcds.values():
            e.stop()
            shutil.rmtree(e.workdir, ignore_errors=True)
        stop_started()
        if args.keep:
            print(f"bench: work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

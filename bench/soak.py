#!/usr/bin/env python3
"""The soak: the local stack (envoy-config/envoy.yaml in front of the demo, as `cargo xtask up`
runs it, on free loopback ports) under mixed traffic for a while, reporting every error and how
Envoy's RSS moves after the first minute. See docs/performance.md.

Run it as `cargo xtask bench --soak SECONDS` (builds dist/ and the demo first), or
`.venv/bin/python bench/soak.py --seconds 600`.

The traffic, all at once, each kind in its own loop (a loop sends its next request when the last
one has answered, so the load follows what the machine can do):
- api: the token-handler way — a dev login (encrypted cookies + CSRF), then `GET /api/echo` and
  `POST /api/echo` (Origin + CSRF header) with the cookies only; every answer must be 200 and the
  upstream must have seen a bearer token.
- upgrades: a login, a `/ws/echo` upgrade with the token in `Sec-WebSocket-Protocol` and the
  session cookie, 20 echoed frames, a clean close.
- frames: a few sockets that stay open and echo frames back to back; a socket closed by the
  gateway with 4401 when its token ends is expected and reconnects (counted, not an error).
- page: the phone page (`GET /`): 200 with a nonce CSP.
An error is any other status, close code, mismatch or exception. Goals: 0 errors, RSS growth
< 5 % from the end of the first minute to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import requests
import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import (COOKIE_KEYS_VAR, DEMO_BIN, DIST, ONE_MODULE, Demo, Envoy, pytest_sessionfinish,  # noqa: E402
                      shipped_config)

DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- bench:soak:begin -->", "<!-- bench:soak:end -->"
GROWTH_GOAL = 0.05
WARMUP_S = 60
SAMPLE_EVERY_S = 10


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cookies_of(resp: requests.Response) -> dict[str, str]:
    """The cookies a response set, `Secure` or not (requests keeps `Secure` cookies off plain
    http, and the local stack's cookies are `__Host-`)."""
    out = {}
    for c in resp.raw.headers.getlist("set-cookie"):
        name, _, rest = c.partition("=")
        out[name.strip()] = rest.split(";", 1)[0]
    return out


def cookie_header(jar: dict[str, str]) -> str:
    return "; ".join(f"{k}={v}" for k, v in jar.items())


class Soak:
    def __init__(self, envoy: Envoy, seconds: float):
        self.envoy = envoy
        self.deadline = time.monotonic() + seconds
        self.ok: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.first_errors: list[str] = []
        self.origin = envoy.url

    def error(self, kind: str, what: str):
        self.errors[kind] += 1
        if len(self.first_errors) < 10:
            self.first_errors.append(f"{kind}: {what}")

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    def login(self, session: requests.Session) -> tuple[str, str, dict[str, str]]:
        r = session.post(self.envoy.url + f"/dev/login?user=soak-{secrets.token_hex(4)}", timeout=10)
        if r.status_code != 200:
            raise RuntimeError(f"login {r.status_code}")
        body = r.json()
        return body["access_token"], body["csrf_token"], cookies_of(r)

    # ------------------------------------------------------------------------------ the loops

    def api(self):
        s = requests.Session()
        while self.running():
            try:
                _, csrf, jar = self.login(s)
                cookie = cookie_header(jar)
                for _ in range(20):
                    r = s.get(self.envoy.url + "/api/echo", headers={"cookie": cookie}, timeout=10)
                    if r.status_code != 200 or "bearer" not in r.text.lower():
                        self.error("api", f"GET {r.status_code} {r.text[:120]}")
                    else:
                        self.ok["api"] += 1
                    r = s.post(self.envoy.url + "/api/echo", data=b"x", timeout=10,
                               headers={"cookie": cookie, "origin": self.origin, "x-gh-csrf": csrf})
                    if r.status_code != 200:
                        self.error("api", f"POST {r.status_code} {r.text[:120]}")
                    else:
                        self.ok["api"] += 1
            except Exception as e:  # noqa: BLE001 - every failure is a counted error
                self.error("api", repr(e))

    def page(self):
        s = requests.Session()
        while self.running():
            try:
                r = s.get(self.envoy.url + "/", timeout=10)
                csp = r.headers.get("content-security-policy", "")
                if r.status_code != 200 or "'nonce-" not in csp:
                    self.error("page", f"{r.status_code} {r.text[:100]!r} csp={csp[:40]!r}")
                else:
                    self.ok["page"] += 1
            except Exception as e:  # noqa: BLE001
                self.error("page", repr(e))

    def ws_args(self, token: str, jar: dict[str, str]) -> dict:
        sid = {k: v for k, v in jar.items() if k.endswith("-sid")}
        return {"subprotocols": ["sip", "bearer." + token], "open_timeout": 10,
                "additional_headers": {"cookie": cookie_header(sid)}, "max_size": 2**20}

    async def upgrades(self):
        s = requests.Session()
        while self.running():
            try:
                token, _, jar = await asyncio.to_thread(self.login, s)
                async with websockets.connect(self.envoy.ws_url + "/ws/echo", **self.ws_args(token, jar)) as ws:
                    for i in range(20):
                        await ws.send(f"frame {i}")
                        if await asyncio.wait_for(ws.recv(), 10) != f"frame {i}":
                            raise RuntimeError("echo mismatch")
                self.ok["upgrades"] += 1
            except Exception as e:  # noqa: BLE001
                self.error("upgrades", repr(e))

    async def frames(self):
        s = requests.Session()
        while self.running():
            try:
                token, _, jar = await asyncio.to_thread(self.login, s)
                async with websockets.connect(self.envoy.ws_url + "/ws/echo", **self.ws_args(token, jar)) as ws:
                    payload = "f" * 256
                    while self.running():
                        await ws.send(payload)
                        if await asyncio.wait_for(ws.recv(), 10) != payload:
                            raise RuntimeError("echo mismatch")
                        self.ok["frames"] += 1
            except websockets.ConnectionClosed as e:
                if e.rcvd and e.rcvd.code == 4401:
                    self.ok["frames.expired"] += 1   # the token ended: the gateway closed it, as it should
                else:
                    self.error("frames", repr(e))
            except Exception as e:  # noqa: BLE001
                self.error("frames", repr(e))

    async def run(self, api: int, pages: int, upgrades: int, sockets: int):
        threads = [asyncio.to_thread(self.api) for _ in range(api)] + [asyncio.to_thread(self.page) for _ in range(pages)]
        await asyncio.gather(*threads, *(self.upgrades() for _ in range(upgrades)), *(self.frames() for _ in range(sockets)))


def sample_rss(envoy: Envoy, soak: Soak, samples: list[tuple[float, float]], start: float):
    while soak.running():
        samples.append((time.monotonic() - start, rss_mb(envoy.proc.pid)))
        time.sleep(SAMPLE_EVERY_S)
    samples.append((time.monotonic() - start, rss_mb(envoy.proc.pid)))


UPSTREAM_STATS = ("upstream_cx_total", "upstream_cx_destroy_local", "upstream_cx_destroy_remote",
                  "upstream_cx_destroy_remote_with_active_rq", "upstream_rq_total", "upstream_rq_retry", "upstream_rq_503")


def upstream(stats: dict[str, int]) -> dict[str, int]:
    """Envoy's counters of its connections and requests to the demo (the `demo` cluster)."""
    return {name: stats.get(f"cluster.demo.{name}", 0) for name in UPSTREAM_STATS}


def report(seconds: int, soak: Soak, samples: list[tuple[float, float]], module: str,
           refusals: dict[str, int], demo_cluster: dict[str, int] | None = None) -> tuple[str, bool]:
    after_warmup = next((mb for t, mb in samples if t >= min(WARMUP_S, seconds / 2)), samples[0][1])
    end = samples[-1][1]
    growth = (end - after_warmup) / after_warmup if after_warmup else 0.0
    errors = sum(soak.errors.values())
    ok = errors == 0 and growth < GROWTH_GOAL
    lines = [
        f"Soak: {seconds} s of mixed traffic through the shipped `envoy-config/envoy.yaml` "
        f"(`{module}`, Envoy `--concurrency 2`), {time.strftime('%Y-%m-%d')}.",
        "",
        "| traffic | answered as expected | errors |",
        "|---|---|---|",
    ]
    for kind in ("api", "upgrades", "frames", "page"):
        lines.append(f"| {kind} | {soak.ok[kind]:,} | {soak.errors[kind]} |")
    lines += [
        "",
        f"Sockets closed 4401 at their token's end and reopened: {soak.ok['frames.expired']}. "
        f"Envoy RSS: {samples[0][1]:.1f} MB at start, {after_warmup:.1f} MB after the first minute, "
        f"{end:.1f} MB at the end: growth {growth * 100:+.1f} % (goal < {GROWTH_GOAL * 100:.0f} %), "
        f"errors {errors} (goal 0): **{'PASS' if ok else 'FAIL'}**.",
    ]
    if demo_cluster:
        c = demo_cluster
        lines += ["", f"Envoy → demo (cluster `demo`): {c['upstream_rq_total']:,} requests on {c['upstream_cx_total']:,} "
                  f"connections; Envoy closed {c['upstream_cx_destroy_local']:,} of them, the demo "
                  f"{c['upstream_cx_destroy_remote']:,} ({c['upstream_cx_destroy_remote_with_active_rq']:,} with a "
                  f"request in flight: every upgraded socket's connection ends so); {c['upstream_rq_retry']} retries, "
                  f"{c['upstream_rq_503']} 503s."]
    if refusals:
        lines += ["", "Refusals the filters counted (expected ones are the 4401s above): "
                  + ", ".join(f"`{k}` {v}" for k, v in sorted(refusals.items())) + "."]
    if soak.first_errors:
        lines += ["", "First errors:", ""] + [f"- `{e}`" for e in soak.first_errors]
    return "\n".join(lines), ok


def write_doc(text: str):
    doc = DOC.read_text()
    if BEGIN not in doc:
        doc = doc.rstrip("\n") + f"\n\n## Soak\n\n{BEGIN}\n{END}\n"
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=600)
    p.add_argument("--api", type=int, default=2, help="API loops (default 2)")
    p.add_argument("--pages", type=int, default=1, help="page loops (default 1)")
    p.add_argument("--upgrades", type=int, default=2, help="upgrade loops (default 2)")
    p.add_argument("--sockets", type=int, default=4, help="long-lived frame sockets (default 4)")
    p.add_argument("--no-doc", action="store_true", help="do not write docs/performance.md")
    args = p.parse_args(argv)
    for path in (DEMO_BIN, DIST / ONE_MODULE):
        if not path.exists():
            sys.exit(f"soak: {path} is missing: run `cargo xtask build` (or `cargo xtask bench --soak N`)")

    workdir = Path(tempfile.mkdtemp(prefix="gatehouse-soak-"))
    (workdir / "demo").mkdir()
    demo = Demo(workdir / "demo")
    envoy = None
    try:
        env = {COOKIE_KEYS_VAR: demo.cookie_keys, "GATEHOUSE_TURN_SECRET": secrets.token_hex(32)}
        (workdir / "envoy").mkdir()
        envoy = Envoy(workdir / "envoy", demo, bootstrap=lambda e: shipped_config(e, demo), env=env)
        soak = Soak(envoy, args.seconds)
        print(f"soak: {args.seconds} s against {envoy.url} (Envoy pid {envoy.proc.pid})", flush=True)
        samples: list[tuple[float, float]] = []
        start = time.monotonic()

        async def go():
            await asyncio.gather(asyncio.to_thread(sample_rss, envoy, soak, samples, start),
                                 soak.run(args.api, args.pages, args.upgrades, args.sockets))

        asyncio.run(go())
        stats = envoy.stats()
        refusals = {k.removeprefix("wasmcustom."): v for k, v in stats.items()
                    if k.startswith("wasmcustom.gatehouse.") and v and any(w in k for w in (".denied", ".refused", ".error"))}
        text, ok = report(args.seconds, soak, samples, os.environ.get("GATEHOUSE_MODULE", "one") + " module", refusals,
                          upstream(stats))
        print("\n" + text + "\n")
        if not args.no_doc:
            write_doc(text)
            print(f"soak: wrote the result into {DOC.relative_to(ROOT)}")
        print(f"soak: Envoy's and the demo's logs are in {workdir}")
        (workdir / "soak.json").write_text(json.dumps({"ok": dict(soak.ok), "errors": dict(soak.errors), "rss": samples}))
        return 0 if ok else 1
    finally:
        if envoy:
            envoy.stop()  # keeps its log in the workdir
        demo.stop()
        pytest_sessionfinish(None, 0)  # the shipped config's etcd


if __name__ == "__main__":
    sys.exit(main())

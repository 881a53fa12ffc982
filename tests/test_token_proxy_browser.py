"""token-proxy with a real headless Chromium, through real Envoy (ropnop style: what can the page,
and a page on another origin, actually do with the cookies?).

The page logs in with the demo's dev login, which sets the encrypted `__Host-gh-at` /
`__Host-gh-csrf` cookies (HttpOnly, Secure, SameSite=Strict, Path=/, no Domain: the `__Host-`
prefix, which Chromium accepts on http://127.0.0.1) and returns the CSRF value. Envoy's
token-proxy holds the same key, from its environment.
"""

from __future__ import annotations

import json

import pytest

from conftest import COOKIE_KEYS_VAR, free_port, start_shipped

OFF = {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}

LOGIN = """
async () => {
  const r = await fetch("/dev/login", { method: "POST" });
  return { status: r.status, body: await r.json() };
}
"""

# The phone page's call: same-origin fetch, cookies sent by the browser, CSRF value as a header.
CALL_API = """
async ([url, csrf]) => {
  const headers = csrf === null ? {} : { "x-gh-csrf": csrf };
  const r = await fetch(url, { method: "POST", credentials: "same-origin", headers });
  return { status: r.status, body: await r.text() };
}
"""

# From another origin: a credentialed CORS request (needs a preflight: custom header) ...
CROSS_ORIGIN_CORS = """
async ([url, csrf]) => {
  try {
    const r = await fetch(url, { method: "POST", credentials: "include", headers: { "x-gh-csrf": csrf } });
    return { status: r.status, body: await r.text() };
  } catch (e) {
    return { error: String(e) };
  }
}
"""

# ... and a "simple" request, which the browser sends without asking (the classic CSRF).
CROSS_ORIGIN_SIMPLE = """
async (url) => {
  try {
    const r = await fetch(url, { method: "POST", credentials: "include", mode: "no-cors", body: "x=1" });
    return { type: r.type };
  } catch (e) {
    return { error: String(e) };
  }
}
"""

SUBMIT_FORM = """
(url) => {
  const f = document.createElement("form");
  f.method = "POST";
  f.action = url;
  const i = document.createElement("input");
  i.name = "x-gh-csrf";
  i.value = "a guess";
  f.appendChild(i);
  document.body.appendChild(f);
  f.submit();
}
"""


@pytest.fixture(scope="module")
def gw(demo, envoy_factory, require_envoy):
    """token-proxy on /api/ and /ws/ only (the page, the login and the JWKS are public). Alone
    in the chain, so the echo upstream shows the bearer token it was given."""
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    routes = [
        {"name": "api", "match": {"prefix": "/api/"}, "route": {"cluster": "demo"}},
        # A WebSocket route token-proxy guards: the login cookies ride along with the upgrade.
        {"name": "ws", "match": {"prefix": "/ws/"}, "route": {"cluster": "demo", "timeout": "0s"}},
        {"name": "public", "match": {"prefix": "/"}, "route": {"cluster": "demo"},
         "typed_per_filter_config": {"gatehouse.token_proxy": OFF}},
    ]
    cfg = {"cookie_prefix": "__Host-gh", "encryption_keys_env": COOKIE_KEYS_VAR, "trusted_web_origins": [origin], "cors": {}}
    envoy = envoy_factory(demo, port=port, routes=routes, access_log=True,
                          env={COOKIE_KEYS_VAR: demo.cookie_keys}, token_proxy=cfg)
    envoy.origin = origin
    return envoy


@pytest.fixture
def page(browser_context, browser_page):
    # Cookies are per host, not per port: start every test logged out.
    browser_context.clear_cookies()
    return browser_page


def counter(gw, name: str) -> int:
    return gw.stats().get(f"wasmcustom.gatehouse.token_proxy.{name}", 0)


def login(page, gw) -> dict:
    page.goto(gw.url + "/")
    r = page.evaluate(LOGIN)
    assert r["status"] == 200, r
    return r["body"]


def test_after_login_document_cookie_does_not_contain_the_token(gw, page, browser_context):
    body = login(page, gw)
    visible = page.evaluate("document.cookie")
    assert "gh-at" not in visible and "gh-csrf" not in visible, visible
    assert body["access_token"] not in visible
    # The browser did store them: HttpOnly, and Secure is accepted on http://127.0.0.1.
    # (Playwright's URL filter leaves out Secure cookies for http URLs: read the whole jar.)
    jar = {c["name"]: c for c in browser_context.cookies() if c["domain"] == "127.0.0.1"}
    assert set(jar) >= {"__Host-gh-at", "__Host-gh-csrf", "__Host-gh-sid"}, jar
    for name in ("__Host-gh-at", "__Host-gh-csrf", "__Host-gh-sid"):
        c = jar[name]
        # `__Host-`: a host-only cookie (no Domain: the jar's domain has no leading dot).
        assert (c["httpOnly"], c["secure"], c["sameSite"], c["path"]) == (True, True, "Strict", "/"), c
        assert not c["domain"].startswith("."), c
        assert body["access_token"] not in c["value"], "the cookie is encrypted"


def test_fetch_post_with_csrf_header_works_and_the_upstream_saw_the_bearer(gw, page):
    body = login(page, gw)
    r = page.evaluate(CALL_API, ["/api/echo", body["csrf_token"]])
    assert r["status"] == 200, r
    seen = json.loads(r["body"])["headers"]
    assert seen["authorization"] == f"Bearer {body['access_token']}"
    assert "x-gh-csrf" not in seen
    assert "gh-at" not in seen.get("cookie", "") and "gh-csrf" not in seen.get("cookie", "")


def test_the_same_post_without_the_header_fails(gw, page):
    login(page, gw)
    before = counter(gw, "denied.csrf")
    r = page.evaluate(CALL_API, ["/api/echo", None])
    assert r["status"] == 401, r
    assert counter(gw, "denied.csrf") == before + 1


def test_a_page_on_another_origin_cannot_make_an_authenticated_post(gw, demo, page):
    body = login(page, gw)
    # Another origin: the demo served directly on its own port. Same host, so the browser's
    # cookies for 127.0.0.1 (SameSite=Strict is same-*site*) would go along.
    page.goto(demo.url + "/")
    forwarded = counter(gw, "forwarded")
    denied = counter(gw, "denied.origin")

    # Even knowing the CSRF value: the preflight from an untrusted origin is refused.
    cors = page.evaluate(CROSS_ORIGIN_CORS, [gw.url + "/api/echo?xsite=cors", body["csrf_token"]])
    assert "error" in cors, cors
    # A simple POST and a form POST are sent with the cookies, and refused for their Origin.
    simple = page.evaluate(CROSS_ORIGIN_SIMPLE, gw.url + "/api/echo?xsite=simple")
    assert simple == {"type": "opaque"}, simple
    with page.expect_navigation() as nav:
        page.evaluate(SUBMIT_FORM, gw.url + "/api/echo?xsite=form")
    assert nav.value.status == 401

    for marker in ("xsite=cors", "xsite=simple", "xsite=form"):
        line = gw.wait_for_access_log(marker)
        assert f"{marker} 401 " in line, line
    assert counter(gw, "denied.origin") == denied + 3
    assert counter(gw, "forwarded") == forwarded, "no request from the other origin got a bearer token"


# A page opens a WebSocket to the gateway and reports how it ended (or what the upstream saw).
OPEN_SOCKET = """
(url) => new Promise((resolve) => {
  const ws = new WebSocket(url, ["sip"]);
  ws.onopen = () => ws.send("__headers__");
  ws.onmessage = (e) => { resolve({ opened: true, seen: JSON.parse(e.data) }); ws.close(); };
  ws.onclose = (e) => resolve({ code: e.code, reason: e.reason });
})
"""


def test_a_page_on_another_origin_cannot_open_a_websocket_with_the_cookies(gw, demo, page):
    login(page, gw)
    ws_url = gw.url.replace("http://", "ws://") + "/ws/echo"
    # The gateway's own page: the browser sends the cookies and a trusted Origin.
    mine = page.evaluate(OPEN_SOCKET, ws_url)
    assert mine.get("opened"), mine
    assert mine["seen"]["authorization"].startswith("Bearer "), "token-proxy gave the upgrade the token"
    # Another origin on the same host (cookies are per host, and same-site for SameSite): the
    # browser sends the cookies with the upgrade (CORS does not apply to WebSockets), and the
    # page reads close code 4403, not 1006.
    page.goto(demo.url + "/")
    denied = counter(gw, "denied.origin")
    forwarded = counter(gw, "forwarded")
    theirs = page.evaluate(OPEN_SOCKET, ws_url)
    assert theirs == {"code": 4403, "reason": "forbidden"}, theirs
    assert counter(gw, "denied.origin") == denied + 1
    assert counter(gw, "forwarded") == forwarded, "the other origin's socket never got the token"


# ------------------------------------------------------------- the shipped local stack config


@pytest.fixture(scope="module")
def stack(demo, envoy_factory, require_envoy):
    """envoy-config/envoy.yaml as `cargo xtask up` runs it, on free ports in front of the test
    demo (token-proxy then jwt-auth on /api/, remote JWKS from the demo)."""

    return start_shipped(envoy_factory, demo)


def wait_for_log_entry(page, text: str):
    page.wait_for_function("(t) => [...document.querySelectorAll('#log li')].some(li => li.textContent.includes(t))",
                           arg=text, timeout=10000)


def test_phone_page_calls_the_api_with_cookies_through_the_shipped_config(stack, page):
    page.goto(stack.url + "/")
    page.click("#login")
    wait_for_log_entry(page, "logged in")
    page.click("#api")
    # token-proxy turned the cookies into a bearer token, jwt-auth verified it and forwarded `sub`.
    wait_for_log_entry(page, "API: HTTP 200 as demo-user")
    assert "gh-" not in page.evaluate("document.cookie")
    # The signaling socket (a fresh connect token in Sec-WebSocket-Protocol, with the session
    # cookie __Host-gh-sid; token-proxy is off there) still works.
    page.click("#connect")
    wait_for_log_entry(page, "socket open, subprotocol sip")

"""The demo phone page in headless Chromium, through Envoy: its signaling socket outlives its
connect tokens while the page keeps refreshing them (in-band re-auth), and closes with 4401 once
the user logs out and the session's last token expires."""

from __future__ import annotations

import pytest

from conftest import Demo

pytestmark = pytest.mark.usefixtures("require_envoy")

TTL = 3  # seconds: the page refreshes every TTL / 2


@pytest.fixture(scope="module")
def stack(tmp_path_factory, envoy_factory):
    demo = Demo(tmp_path_factory.mktemp("short-demo"), GATEHOUSE_DEMO_TOKEN_TTL=str(TTL),
                GATEHOUSE_DEMO_PING_SECONDS="1")
    cfg = {
        "providers": [{
            "name": "demo",
            "issuer": "https://demo.gatehouse.local",
            "audiences": ["gatehouse-demo"],
            "jwks": {"remote": {"cluster": "demo", "path": "/.well-known/jwks.json"}},
        }],
        "clock_skew_seconds": 0,
        "session_claims": ["sid", "sub"],
        "reauth_type": "gatehouse.reauth",
        "rules": [{"match": {"prefix": "/ws/"}}, {"match": {"prefix": "/"}, "allow_missing": True}],
    }
    yield envoy_factory(demo, jwt_auth=cfg)
    demo.stop()


def log_lines(page):
    return page.locator("#log li").all_inner_texts()


def test_the_phone_keeps_its_socket_through_refreshes_and_loses_it_after_logout(stack, browser_page):
    page = browser_page
    page.goto(stack.url + "/")
    page.click("#login")
    page.wait_for_function("() => !document.getElementById('connect').disabled")
    page.click("#connect")
    page.wait_for_function("() => document.getElementById('log').innerText.includes('socket open')")
    page.wait_for_timeout(TTL * 1000 * 3)  # three token lifetimes
    lines = log_lines(page)
    assert not any("closed:" in line for line in lines), lines
    assert sum("re-authenticated in band" in line for line in lines) >= 2, lines
    assert stack.stats().get("wasmcustom.gatehouse.jwt_auth.ws.reauth", 0) >= 2

    page.click("#logout")
    page.wait_for_function("() => document.getElementById('log').innerText.includes('closed: code')",
                           timeout=(TTL + 3) * 1000)
    closed = next(line for line in log_lines(page) if "closed:" in line)
    assert "closed: code 4401 (session expired)" in closed, closed

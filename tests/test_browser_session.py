"""The demo phone page in headless Chromium, through envoy-config/envoy.yaml as `cargo xtask up`
runs it: its signaling socket outlives its connect tokens while the page keeps refreshing them
(in-band re-auth), and closes with 4401 as soon as the user logs out (the session goes on the
demo's revocation feed, which session-binding reads)."""

from __future__ import annotations

import pytest

from conftest import Demo, start_shipped

pytestmark = pytest.mark.usefixtures("require_envoy")

TTL = 6  # seconds: the page refreshes every TTL / 2


@pytest.fixture(scope="module")
def stack(tmp_path_factory, envoy_factory):
    demo = Demo(tmp_path_factory.mktemp("short-demo"), GATEHOUSE_DEMO_TOKEN_TTL=str(TTL),
                GATEHOUSE_DEMO_PING_SECONDS="1")

    def edit(root_id, value):
        if root_id == "jwt_auth":
            # No grace: without its refreshes the socket would close at the token's exp.
            value["clock_skew_seconds"] = 0
        elif root_id == "session_binding":
            value["revocation"]["refresh_seconds"] = 1

    yield start_shipped(envoy_factory, demo, edit)
    demo.stop()


def log_lines(page):
    return page.locator("#log li").all_inner_texts()


def test_the_phone_keeps_its_socket_through_refreshes_and_loses_it_at_logout(stack, browser_context, browser_page):
    browser_context.clear_cookies()
    page = browser_page
    page.goto(stack.url + "/")
    page.click("#login")
    page.wait_for_function("() => !document.getElementById('connect').disabled")
    page.click("#connect")
    page.wait_for_function("() => document.getElementById('log').innerText.includes('socket open')")
    page.wait_for_timeout(TTL * 1000 * 2)  # two token lifetimes
    lines = log_lines(page)
    assert not any("closed:" in line for line in lines), lines
    assert sum("re-authenticated in band" in line for line in lines) >= 2, lines
    assert stack.stats().get("wasmcustom.gatehouse.jwt_auth.ws.reauth", 0) >= 2

    page.click("#logout")
    # Revoked within the feed's refresh (1 s here) + the demo's ping (1 s here): well before the
    # session's last token expires (at least TTL / 2 after the last refresh).
    page.wait_for_function("() => document.getElementById('log').innerText.includes('closed: code')",
                           timeout=TTL * 1000)
    closed = next(line for line in log_lines(page) if "closed:" in line)
    assert "closed: code 4401 (token revoked)" in closed, closed
    assert stack.stats().get("wasmcustom.gatehouse.session_binding.ws.closed.revoked_sid", 0) == 1

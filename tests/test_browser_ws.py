"""A real headless Chromium opens a page served through Envoy, which opens a WebSocket through
jwt-auth. What the browser's JS sees as CloseEvent.code is what the filter chose."""

from __future__ import annotations

import pytest

from tokens import jwt_auth_config

OPEN_SOCKET = """
async ([url, token]) => {
  return await new Promise((resolve) => {
    const ws = new WebSocket(url, ["sip", "bearer." + token]);
    const timer = setTimeout(() => resolve({timeout: true}), 10000);
    ws.onopen = () => ws.send("ping from chromium");
    ws.onmessage = (e) => { clearTimeout(timer); const p = ws.protocol; ws.close(1000); resolve({echo: e.data, protocol: p}); };
    ws.onclose = (e) => { clearTimeout(timer); resolve({code: e.code, reason: e.reason, wasClean: e.wasClean}); };
  });
}
"""


@pytest.fixture(scope="module")
def gw(key, demo, envoy_factory, require_envoy):
    # The phone page itself is public; the WebSocket is guarded.
    cfg = jwt_auth_config(key, rules=[{"match": {"prefix": "/ws/"}}, {"match": {"prefix": "/"}, "allow_missing": True}])
    return envoy_factory(demo, jwt_auth=cfg)


def test_browser_sees_4401_for_a_bad_token_and_echo_for_a_good_one(gw, key, browser_page):
    page = browser_page
    page.goto(gw.url + "/")
    ws_url = gw.ws_url + "/ws/echo"
    good = page.evaluate(OPEN_SOCKET, [ws_url, key.mint()])
    assert good == {"echo": "ping from chromium", "protocol": "sip"}
    bad = page.evaluate(OPEN_SOCKET, [ws_url, "not.a.token"])
    assert bad["code"] == 4401, bad
    assert bad["reason"] == "unauthorized"
    expired = page.evaluate(OPEN_SOCKET, [ws_url, key.mint(ttl=-5)])
    assert expired["code"] == 4401, expired

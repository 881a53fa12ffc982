"""A flood of bad requests is a flood of stats, not of log lines: denial lines are bounded per VM
at info level (the stats count every one), and the line after a gap says how many were left out."""

from __future__ import annotations

import re

import pytest
import requests

from tokens import Key, jwt_auth_config

pytestmark = pytest.mark.usefixtures("require_envoy")

# filters/host: DENIAL_LINES_PER_MINUTE
LINES_PER_MINUTE = 20


def test_denial_lines_are_bounded_and_the_stats_stay_exact(demo, envoy_factory):
    gw = envoy_factory(demo, jwt_auth=jwt_auth_config(Key.generate("EdDSA")))
    n = 300
    with requests.Session() as s:
        for _ in range(n):
            assert s.get(gw.url + "/api/echo", timeout=5).status_code == 401
    assert gw.stats().get("wasmcustom.gatehouse.jwt_auth.denied.missing") == n
    info = [line for line in gw.log_text().splitlines()
            if "[info]" in line and "denied (missing)" in line]
    # One limiter per VM: two workers, and a minute boundary may fall inside the run.
    assert 1 <= len(info) <= 2 * 2 * LINES_PER_MINUTE, len(info)
    assert len(info) < n / 3, len(info)
    # Every denial is still there at debug level (the tests run wasm at debug).
    debug = [line for line in gw.log_text().splitlines() if "[debug]" in line and "denied (missing)" in line]
    assert len(info) + len(debug) == n, (len(info), len(debug))
    left_out = [int(m.group(1)) for line in info if (m := re.search(r"\((\d+) more denial lines left out", line))]
    assert sum(left_out) <= n - len(info)

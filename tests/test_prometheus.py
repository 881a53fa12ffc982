"""The shipped config's stats tags: Prometheus gets one metric per outcome kind with the reason as
a `reason` label, while Envoy's /stats (and every test reading it) keeps the full names."""

from __future__ import annotations

import re

import requests

from conftest import start_shipped


def test_denial_reasons_are_a_prometheus_label(envoy_factory, demo):
    gw = start_shipped(envoy_factory, demo)
    assert requests.get(gw.url + "/api/echo", timeout=5).status_code == 401
    r = requests.get(gw.url + "/api/echo", headers={"authorization": "Bearer not.a.jwt"}, timeout=5)
    assert r.status_code == 401
    text = requests.get(gw.admin + "/stats/prometheus", timeout=5).text
    lines = {m.group(1): float(m.group(2)) for m in
             re.finditer(r"^(gatehouse_jwt_auth_denied\{[^}]*\}) (\S+)$", text, re.M)}
    assert lines.get('gatehouse_jwt_auth_denied{reason="missing"}') == 1, lines
    assert any('reason="' in k and v == 1 for k, v in lines.items() if "missing" not in k), lines
    # No reason left baked into a metric name (Envoy names custom Wasm metrics without its
    # `envoy_` prefix and the `wasmcustom` namespace).
    assert "gatehouse_jwt_auth_denied_missing" not in text
    assert gw.stats().get("wasmcustom.gatehouse.jwt_auth.denied.missing") == 1
    # One tag extractor per stat: Envoy warns when two give the same tag to one stat.
    assert "Skipping duplicate tag" not in gw.log_text()

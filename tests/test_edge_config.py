"""The shipped connection-manager settings every gatehouse route relies on: one clean path for
Envoy's routing and the filters' rules, and no client-sent copy of a claim header on any route."""

from __future__ import annotations

import copy
import json
import secrets
import subprocess

import requests

from conftest import COOKIE_KEYS_VAR, ROOT, shipped_config

GATEHOUSE_CLI = ROOT / "target" / "release" / "gatehouse"


def test_gatehouse_check_finds_the_path_settings_in_every_shipped_config():
    for config in sorted((ROOT / "envoy-config").rglob("*.yaml")):
        r = subprocess.run([str(GATEHOUSE_CLI), "check", str(config)], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "normalize_path" not in r.stdout and "merge_slashes" not in r.stdout, f"{config}:\n{r.stdout}"


def test_gatehouse_check_warns_when_the_connection_manager_does_not_normalize(tmp_path):
    import yaml
    cfg = yaml.safe_load((ROOT / "envoy-config" / "envoy.yaml").read_text())
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    del hcm["normalize_path"], hcm["merge_slashes"]
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([str(GATEHOUSE_CLI), "check", str(path), "--root", str(ROOT)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    warns = [line for line in r.stdout.splitlines() if line.startswith("warn ")]
    assert any("`normalize_path: true`" in w for w in warns), r.stdout
    assert any("`merge_slashes: true`" in w for w in warns), r.stdout


def _with_open_route(envoy, demo):
    """The shipped config plus a route to the demo's echo on which every gatehouse filter is off,
    like the shipped public routes."""
    cfg = shipped_config(envoy, demo)
    vhost = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"]["virtual_hosts"][0]
    dev = next(r for r in vhost["routes"] if r["name"] == "dev")
    open_route = copy.deepcopy(dev)
    open_route.update(name="open", match={"prefix": "/api/open/"})
    vhost["routes"].insert(0, open_route)
    # The one-pass filter switches its stages off by route name: as on `dev`.
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    for f in hcm["http_filters"]:
        config = f.get("typed_config", {}).get("config", {})
        if config.get("root_id") == "gatehouse":
            value = json.loads(config["configuration"]["value"])
            dev_off = next(r for r in value.get("off", []) if r["match"] == {"route": "dev"})
            value["off"].insert(0, {**dev_off, "match": {"route": "open"}})
            config["configuration"]["value"] = json.dumps(value)
    return cfg


def test_client_sent_claim_headers_never_reach_the_upstream_even_where_jwt_auth_is_off(envoy_factory, demo):
    envoy = envoy_factory(demo, bootstrap=lambda e: _with_open_route(e, demo),
                          env={COOKIE_KEYS_VAR: demo.cookie_keys, "GATEHOUSE_TURN_SECRET": secrets.token_hex(32)})
    r = requests.get(f"{envoy.url}/api/open/echo",
                     headers={"x-gatehouse-sub": "admin", "x-gatehouse-sip-identity": "1001"}, timeout=5)
    assert r.status_code == 200, r.text
    seen = {k.lower(): v for k, v in r.json()["headers"].items()}
    assert "x-gatehouse-sub" not in seen, seen
    assert "x-gatehouse-sip-identity" not in seen, seen  # Kamailio's only source of identity


def test_envoy_refuses_encoded_slashes_and_resolves_dot_segments_before_the_filters(envoy_factory, demo):
    envoy = envoy_factory(demo, bootstrap=lambda e: _with_open_route(e, demo),
                          env={COOKIE_KEYS_VAR: demo.cookie_keys, "GATEHOUSE_TURN_SECRET": secrets.token_hex(32)})
    import http.client
    def raw_get(path: str) -> int:
        c = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=5)
        c.request("GET", path)
        status = c.getresponse().status
        c.close()
        return status
    # An encoded slash: refused by Envoy itself.
    assert raw_get("/api/open/..%2Fecho") == 400
    # A dot-segment out of the open prefix resolves to the guarded /api/echo: jwt-auth asks for a token.
    assert raw_get("/api/open/../echo") == 401
    assert raw_get("/api/open/%2e%2e/echo") == 401
    assert raw_get("/api/open/echo") == 200

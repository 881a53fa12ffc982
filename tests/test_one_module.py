"""dist/gatehouse.wasm holds every filter: the plugin's root_id picks the filter, and the filters
configured with the same vm_id share one VM per worker. Run on the shipped local stack
(envoy-config/envoy.yaml, its one-pass filter unfolded into the separate filters of its stages)
pointed at the one module, whatever GATEHOUSE_MODULE says."""

from __future__ import annotations

import json
import re
import secrets

import pytest
import requests

from conftest import COOKIE_KEYS_VAR, FILTERS, ONE_MODULE, ONE_VM_ID, shipped_config, unfold_one_pass, wait_until

KNOWN = "known: gatehouse, jwt_auth, token_proxy, session_binding, page_guard, turn_credentials"


def gatehouse_plugins(cfg: dict) -> list[dict]:
    listener = cfg["static_resources"]["listeners"][0]
    filters = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    return [f["typed_config"]["config"] for f in filters if f["typed_config"].get("config", {}).get("root_id")]


def one_module(envoy, demo, root_ids: dict | None = None) -> dict:
    """The shipped config with every gatehouse filter in dist/gatehouse.wasm under one vm_id;
    `root_ids` renames some plugins' root_id."""
    cfg = unfold_one_pass(shipped_config(envoy, demo))
    for plugin in gatehouse_plugins(cfg):
        plugin["vm_config"].update(vm_id=ONE_VM_ID, code={"local": {"filename": f"dist/{ONE_MODULE}"}})
        plugin["root_id"] = (root_ids or {}).get(plugin["root_id"], plugin["root_id"])
    return cfg


def secrets_env(demo) -> dict:
    return {COOKIE_KEYS_VAR: demo.cookie_keys, "GATEHOUSE_TURN_SECRET": secrets.token_hex(32)}


@pytest.fixture(scope="module")
def stack(envoy_factory, demo):
    return envoy_factory(demo, bootstrap=lambda envoy: one_module(envoy, demo), env=secrets_env(demo))


def test_the_shipped_stack_loads_every_root_id_from_the_one_module(stack):
    cfg = json.loads(stack.config.read_text())
    assert sorted(p["root_id"] for p in gatehouse_plugins(cfg)) == sorted(r for r, _ in FILTERS.values())
    assert {p["vm_config"]["code"]["local"]["filename"] for p in gatehouse_plugins(cfg)} == {f"dist/{ONE_MODULE}"}


def separate_modules(envoy, demo) -> dict:
    cfg = unfold_one_pass(shipped_config(envoy, demo))
    for plugin in gatehouse_plugins(cfg):
        root_id = plugin["root_id"]
        plugin["vm_config"].update(vm_id=f"gatehouse.{root_id}",
                                   code={"local": {"filename": f"dist/{FILTERS[root_id][1]}"}})
    return cfg


def active_vms(envoy) -> int:
    return envoy.stats()["wasm.envoy.wasm.runtime.v8.active"]


def test_the_filters_share_one_vm_per_thread(stack, envoy_factory, demo):
    """The five filters with one vm_id run in as many VMs as one filter does (the main thread's and
    one per worker); from their separate modules, five times as many."""
    separate = envoy_factory(demo, bootstrap=lambda envoy: separate_modules(envoy, demo), env=secrets_env(demo))
    try:
        assert active_vms(separate) == 5 * active_vms(stack)
    finally:
        separate.stop()


def test_each_filter_of_the_one_module_works(stack):
    # page_guard: the page gets a CSP with this response's nonce.
    page = requests.get(stack.url + "/", timeout=10)
    assert page.status_code == 200
    assert re.search(r"script-src [^;]*'nonce-", page.headers["content-security-policy"]), page.headers
    # jwt_auth: no token, no API.
    assert requests.get(stack.url + "/api/echo", timeout=10).status_code == 401
    # token_proxy → jwt_auth: the login cookie becomes the verified bearer token (JWKS fetched by
    # jwt_auth's root context through the dispatching root).
    login = requests.post(stack.url + "/dev/login?user=one-module", timeout=10)
    assert login.ok, login.text
    jar = "; ".join(c.split(";", 1)[0] for c in login.raw.headers.getlist("set-cookie"))
    seen = requests.get(stack.url + "/api/echo", headers={"cookie": jar}, timeout=10)
    assert seen.status_code == 200, seen.text
    assert seen.json()["headers"]["authorization"].startswith("Bearer ")
    # turn_credentials: a signed-in page gets ICE servers.
    token = login.json()["access_token"]
    turn = requests.post(stack.url + "/turn-credentials", headers={"authorization": f"Bearer {token}", "origin": stack.url},
                         timeout=10)
    assert turn.status_code == 200, turn.text
    assert turn.json()["iceServers"][0]["username"].endswith(":one-module")
    # session_binding: its root context fetches the revocation feed on its timer, and it passed the
    # API request.
    stats = lambda: stack.stats()  # noqa: E731
    assert wait_until(lambda: stats().get("wasmcustom.gatehouse.session_binding.revocation.fetch_ok", 0) >= 1, 10)
    assert stats().get("wasmcustom.gatehouse.session_binding.passed", 0) + \
        stats().get("wasmcustom.gatehouse.session_binding.allowed", 0) >= 1
    # After logout the session is revoked: its cookie no longer reaches the API.
    assert requests.post(stack.url + "/dev/logout", headers={"cookie": jar, "origin": stack.url}, timeout=10).ok
    assert wait_until(lambda: requests.get(stack.url + "/api/echo", headers={"cookie": jar}, timeout=10).status_code != 200, 10)


def test_an_unknown_root_id_fails_to_load_naming_the_known_ones(envoy_factory, demo):
    with pytest.raises(RuntimeError) as refused:
        envoy_factory(demo, bootstrap=lambda envoy: one_module(envoy, demo, {"page_guard": "page_gaurd"}),
                      env=secrets_env(demo))
    log = str(refused.value)
    lines = [line for line in log.splitlines() if "is not a filter of this module" in line]
    assert lines, log
    assert "critical" in lines[0], lines
    assert f"gatehouse: root_id `page_gaurd` is not a filter of this module ({KNOWN})" in lines[0], lines

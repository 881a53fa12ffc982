"""page-guard in a real headless Chromium through real Envoy: a marked script runs, a script
injected without the marker is blocked (securitypolicyviolation, and it has no effect), a script
whose served bytes differ from the manifest is blocked by SRI, a script outside the manifest is
blocked by Integrity-Policy, the CSP report endpoint receives the violation report,
Permissions-Policy is in force, and the style nonce does not run a script."""

from __future__ import annotations

import time

import pytest

from pages import Page
from test_page_guard import PLACEHOLDER, config, manifest, routes, upstream_pages

RECORD_VIOLATIONS = """
window.__violations = [];
document.addEventListener('securitypolicyviolation', (e) => {
  window.__violations.push({directive: e.effectiveDirective, blocked: e.blockedURI, disposition: e.disposition});
});
"""


@pytest.fixture(scope="module")
def pages():
    p = upstream_pages()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def gw(demo, pages, envoy_factory):
    return envoy_factory(demo, page_guard=config(manifest(), reports={"path": "/_gatehouse/csp", "endpoint": None}), extra_clusters={"pages": pages.port}, routes=routes())


def test_nonce_sri_integrity_policy_and_reports_in_chromium(gw, pages, browser_page):
    page = browser_page
    console: list[str] = []
    page.on("console", lambda m: console.append(m.text))
    page.add_init_script(RECORD_VIOLATIONS)
    resp = page.goto(gw.url + "/page")
    assert resp.status == 200
    page.wait_for_load_state("load")
    state = page.evaluate("""() => ({
        marked: window.marked, injected: window.injected, good: window.good,
        tampered: window.tampered, unlisted: window.unlisted, violations: window.__violations,
    })""")
    assert state["marked"] == 1, "the script the upstream marked runs"
    assert state.get("injected") is None, "the injected script without the marker has no effect"
    assert state["good"] == 1, "a script whose bytes match the manifest runs"
    assert state.get("tampered") is None, "a script whose bytes differ from the manifest is blocked"
    assert state.get("unlisted") is None, "a script outside the manifest is blocked by Integrity-Policy"
    inline = [v for v in state["violations"] if v["directive"] == "script-src-elem" and v["blocked"] == "inline"]
    assert inline, state["violations"]
    assert any("integrity" in c.lower() and "tampered.js" in c for c in console), console

    # Permissions-Policy: sent, and in force in the document.
    assert resp.headers["permissions-policy"] == "camera=(self), geolocation=(), microphone=(self)"
    allows = page.evaluate("""() => document.featurePolicy ? {
        geolocation: document.featurePolicy.allowsFeature('geolocation'),
        microphone: document.featurePolicy.allowsFeature('microphone'),
    } : null""")
    if allows is not None:
        assert allows == {"geolocation": False, "microphone": True}

    # The browser reports the violation to the endpoint page-guard answers locally.
    deadline = time.time() + 20
    stat = "wasmcustom.gatehouse.page_guard.report.script-src-elem"
    while time.time() < deadline and not gw.stats().get(stat):
        time.sleep(0.5)
    assert gw.stats().get(stat, 0) >= 1, ("no CSP report reached the endpoint", {k: v for k, v in gw.stats().items() if "page_guard" in k}, pages.requests)
    assert not any(p.startswith("/_gatehouse/csp") for p, _ in pages.requests), "reports never go upstream"


def test_the_style_nonce_does_not_run_a_script(gw, pages, browser_page):
    """Scripts and styles have nonces of their own (issue 13): a script created with the nonce
    a marked `<style>` carries is blocked, one with the script nonce runs, and the marked style
    applies."""
    pages.routes["/two-nonces"] = Page(f"""<!doctype html><html><head>
<style nonce="{PLACEHOLDER}">p {{ color: rgb(0, 128, 0); }}</style>
<script nonce="{PLACEHOLDER}">
  function add(nonce, code) {{
    var s = document.createElement('script'); s.nonce = nonce; s.textContent = code; document.head.appendChild(s);
  }}
  add(document.querySelector('style').nonce, 'window.viaStyleNonce = 1;');
  add(document.currentScript.nonce, 'window.viaScriptNonce = 1;');
</script></head><body><p id="p">styled</p></body></html>""")
    page = browser_page
    page.add_init_script(RECORD_VIOLATIONS)
    page.goto(gw.url + "/two-nonces")
    page.wait_for_load_state("load")
    state = page.evaluate("""() => ({
        style: window.viaStyleNonce, script: window.viaScriptNonce,
        color: getComputedStyle(document.getElementById('p')).color, violations: window.__violations,
    })""")
    assert state["script"] == 1, state
    assert state.get("style") is None, ("the style nonce ran a script", state)
    assert state["color"] == "rgb(0, 128, 0)", "the marked style applies"
    assert [v for v in state["violations"] if v["directive"] == "script-src-elem"], state


# ------------------------------------------------------------------ the demo phone page, as shipped

def shipped_page_guard_config() -> dict:
    import json

    import yaml

    from conftest import ROOT, unfold_one_pass

    # The shipped one-pass filter's page_guard stage, as the separate filter it unfolds into.
    doc = unfold_one_pass(yaml.safe_load((ROOT / "envoy-config" / "envoy.yaml").read_text()))
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (pg,) = [f for f in hcm["http_filters"] if f["name"] == "gatehouse.page_guard"]
    assert pg["typed_config"]["config"]["allow_on_headers_stop_iteration"] is True
    return json.loads(pg["typed_config"]["config"]["configuration"]["value"])


def test_the_shipped_manifest_matches_the_demo_files():
    """envoy.yaml's SRI manifest is what `gatehouse sri-manifest demo/static` gives: a change to
    phone.js or phone.css without regenerating it would get them blocked in the browser."""
    import json
    import subprocess

    from conftest import ROOT

    cli = ROOT / "target" / "release" / "gatehouse"
    assert cli.exists(), "cargo xtask build builds the CLI"
    out = subprocess.run([str(cli), "sri-manifest", "demo/static"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert shipped_page_guard_config()["sri"]["manifest"] == json.loads(out.stdout), (
        "regenerate the manifest in envoy-config/envoy.yaml: target/release/gatehouse sri-manifest demo/static")


def test_demo_phone_page_runs_under_the_shipped_policy(demo, envoy_factory, browser_page):
    gw = envoy_factory(demo, page_guard=shipped_page_guard_config())
    page = browser_page
    page.add_init_script(RECORD_VIOLATIONS)
    resp = page.goto(gw.url + "/")
    h = resp.headers
    assert "'nonce-" in h["content-security-policy"]
    assert h["permissions-policy"] == "camera=(self), geolocation=(), microphone=(self)"
    assert h["integrity-policy"].startswith("blocked-destinations=(script)")
    script = page.locator("script[src='/phone.js']")
    assert script.get_attribute("integrity").startswith("sha384-")
    # phone.js ran (nonce + SRI), and its fetch to the dev login is allowed by connect-src.
    page.click("#login")
    page.wait_for_function("() => !document.getElementById('connect').disabled", timeout=10000)
    assert page.evaluate("window.__violations") == []

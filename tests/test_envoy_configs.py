"""Every Envoy config the project ships is valid for the Envoy version the project runs, and
every gatehouse filter config in it compiles (the same check users run with `gatehouse check`)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import COOKIE_KEYS_VAR, ENVOY_BIN, ROOT, tls_env
from cookies import new_key

CONFIGS = sorted((ROOT / "envoy-config").rglob("*.yaml"))
GATEHOUSE_CLI = ROOT / "target" / "release" / "gatehouse"


def test_there_are_configs_to_check():
    assert ROOT / "envoy-config" / "envoy.yaml" in CONFIGS
    assert len(CONFIGS) >= 2, "one example per filter"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_envoy_validates(config: Path, require_envoy, tmp_path):
    # Run from the repo root: the shipped configs name the filters as dist/<filter>.wasm.
    # Validation loads the filters, so token-proxy needs its key from the environment, as in
    # production (no shipped config carries a key).
    # The HTTPS listener's certificate comes from the environment too.
    env = dict(os.environ, **{COOKIE_KEYS_VAR: new_key(), "GATEHOUSE_TURN_SECRET": new_key()}, **tls_env(tmp_path))
    r = subprocess.run(
        [str(ENVOY_BIN), "--mode", "validate", "-c", str(config), "--use-dynamic-base-id"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def has_token_proxy(config: Path) -> bool:
    """A separate token-proxy filter, or a one-pass filter with a token_proxy stage."""
    text = config.read_text()
    return "root_id: token_proxy" in text or ("root_id: gatehouse" in text and '"token_proxy"' in text)


@pytest.mark.parametrize("config", [c for c in CONFIGS if has_token_proxy(c)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_configs_do_not_load_without_the_cookie_key(config: Path, require_envoy, tmp_path):
    """A config whose token-proxy takes its keys from the environment refuses to start without
    them, naming the field; nothing falls back to a key written somewhere."""
    env = {k: v for k, v in os.environ.items() if k != COOKIE_KEYS_VAR}
    env["GATEHOUSE_TURN_SECRET"] = new_key()
    env.update(tls_env(tmp_path))
    r = subprocess.run(
        [str(ENVOY_BIN), "--mode", "validate", "-c", str(config), "--use-dynamic-base-id"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env,
    )
    out = r.stdout + r.stderr
    # In a one-pass filter the field is named under its stage.
    assert re.search(rf"config error at (token_proxy\.)?encryption_keys_env: environment variable {COOKIE_KEYS_VAR} is not set", out), out
    assert re.search(r"Unable to create Wasm plugin gatehouse(\.token_proxy)?\b", out), out


def test_no_shipped_config_carries_a_cookie_key():
    import re
    for config in CONFIGS:
        text = config.read_text()
        assert '"encryption_keys"' not in text, f"{config}: keys come from the environment"
        assert not re.search(r"\b[0-9a-fA-F]{64}\b", text), f"{config}: looks like a key"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_gatehouse_check_compiles_every_filter(config: Path):
    assert GATEHOUSE_CLI.exists(), "cargo xtask build builds the CLI"
    r = subprocess.run([str(GATEHOUSE_CLI), "check", str(config)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok " in r.stdout, "each shipped config carries at least one gatehouse filter"

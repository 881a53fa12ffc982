"""Every Envoy config the project ships is valid for the Envoy version the project runs, and
every gatehouse filter config in it compiles (the same check users run with `gatehouse check`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import ENVOY_BIN, ROOT

CONFIGS = sorted((ROOT / "envoy-config").rglob("*.yaml"))
GATEHOUSE_CLI = ROOT / "target" / "release" / "gatehouse"


def test_there_are_configs_to_check():
    assert ROOT / "envoy-config" / "envoy.yaml" in CONFIGS
    assert len(CONFIGS) >= 2, "one example per filter"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_envoy_validates(config: Path, require_envoy):
    # Run from the repo root: the shipped configs name the filters as dist/<filter>.wasm.
    r = subprocess.run(
        [str(ENVOY_BIN), "--mode", "validate", "-c", str(config), "--use-dynamic-base-id"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_gatehouse_check_compiles_every_filter(config: Path):
    assert GATEHOUSE_CLI.exists(), "cargo xtask build builds the CLI"
    r = subprocess.run([str(GATEHOUSE_CLI), "check", str(config)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok " in r.stdout, "each shipped config carries at least one gatehouse filter"

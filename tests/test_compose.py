"""docker-compose.yml cannot be run here (no Docker engine), so it is kept correct by
construction: it must describe the same stack as `cargo xtask up`, and everything it references
(files, mounts, ports, the Envoy version) must exist and match."""

from __future__ import annotations

import json
import re
import subprocess

import yaml

from conftest import ENVOY_BIN, FILTERS, ONE_MODULE, ONE_PASS_ROOT_ID, ONE_VM_ID, ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
ENVOY_YAML = yaml.safe_load((ROOT / "envoy-config" / "envoy.yaml").read_text())
SERVICES = COMPOSE["services"]


def mounts(service: dict) -> dict[str, str]:
    """container path → host path (relative to the repo root)"""
    out = {}
    for volume in service.get("volumes", []):
        host, container = volume.split(":")[:2]
        out[container] = host
    return out


def walk(node, seen=None):
    """Every dict in `node`, once: a YAML alias (envoy.yaml's two listeners share one connection
    manager) loads as the same object."""
    seen = set() if seen is None else seen
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v, seen)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v, seen)


def wasm_files() -> list[str]:
    return [n["filename"] for n in walk(ENVOY_YAML) if "filename" in n]


def test_envoy_image_is_the_version_the_tests_run(require_envoy):
    tag = SERVICES["envoy"]["image"]
    assert tag.startswith("envoyproxy/envoy:v"), tag
    version = subprocess.run([str(ENVOY_BIN), "--version"], capture_output=True, text=True).stdout
    ours = re.search(r"/(\d+\.\d+\.\d+)/", version).group(1)
    assert tag.split(":v")[1] == ours, f"compose runs {tag}, the tests run Envoy {ours}"


def test_envoy_runs_the_shipped_config_from_the_mounted_folders():
    envoy = SERVICES["envoy"]
    workdir = envoy["working_dir"]
    m = mounts(envoy)
    command = envoy["command"]
    config = command[command.index("-c") + 1]
    assert f"{workdir}/envoy-config" in m and m[f"{workdir}/envoy-config"] == "./envoy-config"
    assert (ROOT / "envoy-config" / config.removeprefix("envoy-config/")).exists()
    assert config.startswith("envoy-config/")
    # Every wasm file envoy.yaml loads is relative to the working dir and inside a mount of dist/.
    assert wasm_files(), "envoy.yaml loads the gatehouse filters"
    for filename in wasm_files():
        assert not filename.startswith("/"), filename
        top = filename.split("/")[0]
        assert m.get(f"{workdir}/{top}") == f"./{top}", f"{filename} is not mounted"
        assert (ROOT / filename).exists(), f"{filename} is not built by cargo xtask build"


def test_the_stack_runs_every_filter_from_the_one_module_in_one_vm():
    """Envoy shares a VM between plugins only when their whole vm_config matches: the same vm_id,
    code and environment for every gatehouse filter, from dist/gatehouse.wasm."""
    plugins = [n for n in walk(ENVOY_YAML) if "root_id" in n]
    # The one-pass filter, with every filter as a stage.
    assert [p["root_id"] for p in plugins] == [ONE_PASS_ROOT_ID]
    stages = json.loads(plugins[0]["configuration"]["value"])
    assert sorted(k for k in stages if k != "off") == sorted(r for r, _ in FILTERS.values())
    assert wasm_files() == [f"dist/{ONE_MODULE}"] * len(plugins)
    (vm_config,) = {json.dumps(p["vm_config"], sort_keys=True) for p in plugins}
    assert json.loads(vm_config)["vm_id"] == ONE_VM_ID


def test_ports_and_addresses_match_the_envoy_config():
    demo = SERVICES["demo"]
    assert SERVICES["envoy"]["network_mode"] == "service:demo"
    listener = ENVOY_YAML["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener["address"] == "0.0.0.0", "the listener must be reachable through the published port"
    published = [p.rsplit(":", 1)[1] for p in demo["ports"]]
    assert str(listener["port_value"]) in published
    cluster = next(c for c in ENVOY_YAML["static_resources"]["clusters"] if c["name"] == "demo")
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert demo["environment"]["GATEHOUSE_DEMO_ADDR"] == f"{endpoint['address']}:{endpoint['port_value']}"


def test_demo_image_builds_the_demo_crate():
    build = SERVICES["demo"]["build"]
    dockerfile = ROOT / build["context"] / build["dockerfile"]
    text = dockerfile.read_text()
    assert "-p gatehouse-demo" in text
    assert 'name = "gatehouse-demo"' in (ROOT / "demo" / "Cargo.toml").read_text()
    keys = SERVICES["demo"]["environment"]["GATEHOUSE_KEYS_DIR"]
    assert keys in mounts(SERVICES["demo"]), "the demo keys live in a volume, never in the image"
    rust = re.search(r"FROM rust:(\d+\.\d+)", text).group(1)
    msrv = re.search(r'rust-version = "(\d+\.\d+)"', (ROOT / "Cargo.toml").read_text()).group(1)
    assert tuple(map(int, rust.split("."))) >= tuple(map(int, msrv.split(".")))


def stage_filters(root_id: str) -> list[dict]:
    """The `root_id` filters (or one-pass filters with that stage) of envoy.yaml, each as its
    plugin config with that filter's configuration."""
    found = []
    for n in walk(ENVOY_YAML):
        if n.get("root_id") == root_id:
            found.append(n)
        elif n.get("root_id") == ONE_PASS_ROOT_ID:
            stage = json.loads(n["configuration"]["value"]).get(root_id)
            if stage is not None:
                found.append({**n, "configuration": {**n["configuration"], "value": json.dumps(stage)}})
    return found


def token_proxy_filters() -> list[dict]:
    return stage_filters("token_proxy")


def test_cookie_key_comes_from_the_environment_in_both_services():
    """The demo encrypts the login cookies and Envoy's token-proxy decrypts them: both get the
    same GATEHOUSE_COOKIE_KEYS, which compose requires from the environment (or a git-ignored
    .env) with a clear error when unset — never a value written in a committed file."""
    (filter_config,) = token_proxy_filters()
    variable = json.loads(filter_config["configuration"]["value"])["encryption_keys_env"]
    assert variable in filter_config["vm_config"]["environment_variables"]["host_env_keys"], \
        "Envoy hands the Wasm VM only the variables listed in host_env_keys"
    for name in ("demo", "envoy"):
        value = SERVICES[name]["environment"][variable]
        m = re.fullmatch(r"\$\{(\w+):\?(.+)\}", value)
        assert m, f"{name}: {variable} must be required from the environment (${{{variable}:?message}}), got {value!r}"
        assert m.group(1) == variable
        assert variable in m.group(2), "the error names the variable"
    gitignored = (ROOT / ".gitignore").read_text().split()
    assert "/.env" in gitignored or ".env" in gitignored, ".env holds the key: never committed"
    assert ".env" in (ROOT / ".dockerignore").read_text().split(), ".env never goes into an image"


def test_kamailio_and_coturn_run_in_the_stack_envoy_points_at():
    """Kamailio runs the shipped kamailio.cfg at the address envoy.yaml's `kamailio` cluster names;
    coturn listens where turn-credentials' `urls` point, with the secret turn-credentials signs
    with; both pinned, in the demo's network namespace like Envoy."""
    kamailio, coturn = SERVICES["kamailio"], SERVICES["coturn"]
    for service in (kamailio, coturn):
        assert service["network_mode"] == "service:demo"
        image, _, tag = service["image"].partition(":")
        assert tag and tag != "latest" and re.match(r"\d+\.\d+\.\d+", tag), service["image"]
    command = kamailio["command"]
    config = command[command.index("-f") + 1]
    host = next(h for c, h in mounts(kamailio).items() if config.startswith(c + "/"))
    assert (ROOT / host / config.rsplit("/", 1)[1]).exists()
    cfg_text = (ROOT / "envoy-config" / "kamailio" / "kamailio.cfg").read_text()
    listen = re.search(r"#!define WS_LISTEN tcp:([\d.]+):(\d+)", cfg_text)
    cluster = next(c for c in ENVOY_YAML["static_resources"]["clusters"] if c["name"] == "kamailio")
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert (listen.group(1), int(listen.group(2))) == (endpoint["address"], endpoint["port_value"])

    (turn,) = stage_filters("turn_credentials")
    turn_cfg = json.loads(turn["configuration"]["value"])
    args = dict(a.removeprefix("--").split("=", 1) for a in coturn["command"] if "=" in a)
    assert all(f"127.0.0.1:{args['listening-port']}" in url for url in turn_cfg["urls"])
    assert "--use-auth-secret" in coturn["command"]
    secret_var = turn_cfg["secret"]["env"]
    assert re.fullmatch(r"\$\{" + secret_var + r":\?.+\}", args["static-auth-secret"])
    published = [p.split("/")[0].rsplit(":", 1)[1] for p in SERVICES["demo"]["ports"]]
    assert args["listening-port"] in published
    assert f"{args['min-port']}-{args['max-port']}" in published


def test_the_https_listener_is_published_with_its_certificate_from_the_environment():
    tls = next(l for l in ENVOY_YAML["static_resources"]["listeners"] if l["name"] == "ingress_tls")
    published = [p.split("/")[0].rsplit(":", 1)[1] for p in SERVICES["demo"]["ports"]]
    assert str(tls["address"]["socket_address"]["port_value"]) in published
    (cert,) = tls["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]["tls_certificates"]
    for source in (cert["certificate_chain"], cert["private_key"]):
        var = source["environment_variable"]
        assert re.fullmatch(r"\$\{" + var + r":\?.+\}", SERVICES["envoy"]["environment"][var])
    # The same connection manager as the plain listener (one filter chain, one route table).
    plain = ENVOY_YAML["static_resources"]["listeners"][0]
    assert tls["filter_chains"][0]["filters"] == plain["filter_chains"][0]["filters"]


def test_the_demo_image_bundles_the_pinned_jssip():
    text = (ROOT / "demo" / "Dockerfile").read_text()
    assert "COPY demo/package.json demo/package-lock.json" in text and "npm ci" in text
    lock = json.loads((ROOT / "demo" / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/jssip"]["version"] == "3.13.8"
def test_etcd_is_the_official_image_of_the_version_the_tests_run_next_to_envoy():
    """The fleet store (docs/fleet.md): quay.io/coreos/etcd pinned to the etcd the tests run
    (Debian etcd-server), serving envoy.yaml's `etcd` cluster address in the shared namespace."""
    import shutil

    etcd = SERVICES["etcd"]
    image, tag = etcd["image"].split(":")
    assert image == "quay.io/coreos/etcd" and tag.startswith("v"), etcd["image"]
    if shutil.which("etcd"):
        version = subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout
        ours = re.search(r"etcd Version: (\d+\.\d+\.\d+)", version).group(1)
        assert tag == f"v{ours}", f"compose runs {tag}, the tests run etcd {ours}"
    assert etcd["network_mode"] == "service:demo"
    assert "etcd" in SERVICES["envoy"]["depends_on"]
    cluster = next(c for c in ENVOY_YAML["static_resources"]["clusters"] if c["name"] == "etcd")
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    url = f"--listen-client-urls=http://{endpoint['address']}:{endpoint['port_value']}"
    assert url in etcd["command"], f"etcd does not listen where envoy.yaml's etcd cluster points ({url})"
    data = next(a.split("=", 1)[1] for a in etcd["command"] if a.startswith("--data-dir="))
    assert data in mounts(etcd), "etcd's data lives in a volume"
    store = next(json.loads(n["configuration"]["value"])["store"] for n in stage_filters("session_binding"))
    assert store["etcd"]["cluster"] == "etcd"

"""The end-to-end harness: the real demo upstream, real Envoy with a per-test config, real Chromium.

- Envoy and the demo run on free ports; readiness is polled (demo `/healthz`, Envoy admin `/ready`).
- Secrets reach Envoy the way production gives them: in its process environment, listed in each
  gatehouse filter's `vm_config.environment_variables.host_env_keys` (`envoy_factory(env=…)`).
  The demo gets a fresh login-cookie key (`demo.cookie_keys`) in `GATEHOUSE_COOKIE_KEYS`.
- Only the PIDs started here are ever killed.
- When a test fails, the log of every Envoy it used is attached to the report.
- Envoy or Chromium missing: the test fails when `CI` is set, and is skipped otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "dist"
DEMO_BIN = ROOT / "target" / "release" / "gatehouse-demo"
ENVOY_BIN = Path(os.environ.get("GATEHOUSE_ENVOY", ROOT / ".venv" / "bin" / "envoy"))
ACCESS_LOG_FORMAT = "%REQ(:PATH)% %RESPONSE_CODE% %FILTER_STATE(wasm.gatehouse.jwt_auth.claims:PLAIN)%\n"
# The login cookies' AES-256 keys (64 hex each, comma-separated, current first): the demo
# encrypts with them, token-proxy reads them from Envoy's environment (`encryption_keys_env`).
COOKIE_KEYS_VAR = "GATEHOUSE_COOKIE_KEYS"

# Filter name → (root_id, wasm file in dist/), in the order they run on a request.
FILTERS = {
    "token_proxy": ("token_proxy", "token-proxy.wasm"),
    "jwt_auth": ("jwt_auth", "jwt-auth.wasm"),
    "session_binding": ("session_binding", "session-binding.wasm"),
    "turn_credentials": ("turn_credentials", "turn-credentials.wasm"),
    # On the response path: its order among the request-side filters does not matter.
    "page_guard": ("page_guard", "page-guard.wasm"),
}
# The module every filter is in (the root_id picks the filter), and the vm_id the shipped configs
# give all of them so that they share one VM per worker.
ONE_MODULE = "gatehouse.wasm"
ONE_VM_ID = "gatehouse"
# GATEHOUSE_MODULE=one (default): every test runs its filters from dist/gatehouse.wasm in one VM,
# as the shipped configs do; =separate: each filter from its own module (dist/<filter>.wasm), in a
# VM of its own; =onepass: adjacent gatehouse filters of a test's chain become one one-pass
# filter (`root_id: gatehouse`) with those stages (see [`fold_one_pass`]).
MODULE = os.environ.get("GATEHOUSE_MODULE", "one")
if MODULE not in ("one", "separate", "onepass"):
    raise ValueError(f"GATEHOUSE_MODULE={MODULE!r}: expected one, separate or onepass")
ONE_PASS_ROOT_ID = "gatehouse"


def module_of(name: str) -> tuple[str, str]:
    """(wasm file in dist/, vm_id) that filter `name` runs from under GATEHOUSE_MODULE."""
    if MODULE in ("one", "onepass") or name == ONE_PASS_ROOT_ID:
        return ONE_MODULE, ONE_VM_ID
    return FILTERS[name][1], f"gatehouse.{name}"


def one_pass_filter(stages: dict, host_env_keys=(), name: str = "gatehouse") -> dict:
    """The one-pass filter (`root_id: gatehouse`) running `stages` ({stage: its filter config})."""
    vm_config = {
        "vm_id": ONE_VM_ID,
        "runtime": "envoy.wasm.runtime.v8",
        "code": {"local": {"filename": str(DIST / ONE_MODULE)}},
    }
    if host_env_keys:
        vm_config["environment_variables"] = {"host_env_keys": sorted(set(host_env_keys))}
    return {
        "name": name,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": name,
                "root_id": ONE_PASS_ROOT_ID,
                # page-guard holds the response headers while it reads the body.
                "allow_on_headers_stop_iteration": True,
                "vm_config": vm_config,
                "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": json.dumps(stages)},
            },
        },
    }


def fold_one_pass(http_filters: list) -> list:
    """GATEHOUSE_MODULE=onepass: each run of adjacent gatehouse filters (separate root_ids) in an
    HTTP filter chain becomes one one-pass filter with those stages; anything else (native
    jwt_authn, Lua, the router) stays where it is. Otherwise the chain as it is."""
    if MODULE != "onepass":
        return http_filters
    out, run = [], []

    def flush():
        if not run:
            return
        stages, env_keys = {}, []
        for f in run:
            config = f["typed_config"]["config"]
            stages[config["root_id"]] = json.loads(config["configuration"]["value"])
            env_keys += config["vm_config"].get("environment_variables", {}).get("host_env_keys", [])
        out.append(one_pass_filter(stages, env_keys))
        run.clear()

    for f in http_filters:
        config = f.get("typed_config", {}).get("config", {})
        if isinstance(config, dict) and config.get("root_id") in FILTERS:
            run.append(f)
        else:
            flush()
            out.append(f)
    flush()
    return out


def missing(what: str):
    """A missing real component fails under CI (never a silent skip) and skips elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing, and CI is set: run `cargo xtask test` to install it")
    pytest.skip(f"{what} is missing (run `cargo xtask test`)")


def run_async(coro, timeout: float = 30):
    """Run a coroutine to completion on its own thread and loop (Playwright's sync API keeps a
    loop running on the main thread, so asyncio.run there would fail)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, asyncio.wait_for(coro, timeout)).result()


async def closes_without(ws, frame: str, why: str, timeout: float = 10, send: bool = True) -> tuple[int, str]:
    """Send `frame` (or, with `send=False`, wait for the upstream's), then read until the socket
    closes, failing with `why` if `frame` arrives (it crossed the filter). Returns the close code
    and reason."""
    import websockets

    if send:
        await ws.send(frame)
    try:
        while True:
            msg = await asyncio.wait_for(ws.recv(), timeout)
            assert msg != frame, why
    except websockets.ConnectionClosed:
        return ws.close_code, ws.close_reason


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, timeout: float = 10.0) -> bool:
    """Poll `pred` every 0.1 s; whether it became true within `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            text = log.read_text(errors="replace") if log else ""
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{text}")
        try:
            if pred():
                return
        except (requests.RequestException, OSError):
            pass
        time.sleep(0.1)
    text = log.read_text(errors="replace") if log else ""
    raise RuntimeError(f"{what}: not ready after {timeout} s\n{text}")


def stop(proc: subprocess.Popen):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------- demo


class Demo:
    """The demo upstream (target/release/gatehouse-demo) on a free port with its own keys: a
    signing key in `keys_dir`, and a fresh login-cookie key `cookie_keys` (GATEHOUSE_COOKIE_KEYS)."""

    def __init__(self, workdir: Path, **env_overrides: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.keys_dir = workdir / "keys"
        self.log = workdir / "demo.log"
        self.cookie_keys = secrets.token_hex(32)
        env = dict(os.environ, GATEHOUSE_DEMO_ADDR=f"127.0.0.1:{self.port}", GATEHOUSE_KEYS_DIR=str(self.keys_dir),
                   **{COOKIE_KEYS_VAR: self.cookie_keys}, **env_overrides)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([str(DEMO_BIN)], env=env, stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: requests.get(self.url + "/healthz", timeout=2).ok, 30, "demo", self.proc, self.log)

    def stop(self):
        stop(self.proc)


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    if not DEMO_BIN.exists():
        missing(f"the demo binary ({DEMO_BIN})")
    d = Demo(tmp_path_factory.mktemp("demo"))
    yield d
    d.stop()


# --------------------------------------------------------------------------------------- envoy

RUNNING: list["Envoy"] = []


def unfold_one_pass(cfg: dict) -> dict:
    """An Envoy config whose one-pass filters (`root_id: gatehouse`) become the separate filters
    of their stages, in the same order, each route's `off` stages switched off with Envoy's own
    per-route `FilterConfig{disabled}`: the same chain as separate filters."""
    for listener in cfg["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for net in chain["filters"]:
                hcm = net.get("typed_config", {})
                if "http_filters" not in hcm:
                    continue
                out = []
                for f in hcm["http_filters"]:
                    config = f.get("typed_config", {}).get("config", {})
                    if not (isinstance(config, dict) and config.get("root_id") == ONE_PASS_ROOT_ID):
                        out.append(f)
                        continue
                    stages = json.loads(config["configuration"]["value"])
                    off = stages.pop("off", [])
                    for stage, value in stages.items():
                        plugin = json.loads(json.dumps(config))
                        plugin.update(name=f"gatehouse.{stage}", root_id=stage)
                        if stage != "page_guard":
                            plugin.pop("allow_on_headers_stop_iteration", None)
                        plugin["configuration"]["value"] = json.dumps(value)
                        out.append({"name": f"gatehouse.{stage}", "typed_config": {**f["typed_config"], "config": plugin}})
                    for rule in off:
                        route_name = rule["match"].get("route")
                        for vhost in hcm.get("route_config", {}).get("virtual_hosts", []):
                            for route in vhost["routes"]:
                                if route.get("name") == route_name:
                                    per = route.setdefault("typed_per_filter_config", {})
                                    for stage in rule["stages"]:
                                        per[f"gatehouse.{stage}"] = {
                                            "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}
                hcm["http_filters"] = out
    return cfg


def shipped_config(envoy, demo: "Demo", edit=None, tls_port: int | None = None) -> dict:
    """envoy-config/envoy.yaml as `cargo xtask up` runs it, moved onto the test's free ports and in
    front of the test's demo. The page's origin is this Envoy's, so token-proxy and
    turn-credentials trust it.
    `edit(root_id, config)` may change a gatehouse filter's JSON configuration in place.
    The HTTPS listener (`ingress_tls`, certificate from GATEHOUSE_TLS_CERT / _KEY, see
    [`tls_env`]) is kept, on `tls_port`, only when one is given."""
    import yaml

    cfg = yaml.safe_load((ROOT / "envoy-config" / "envoy.yaml").read_text())
    if MODULE == "separate":
        # The shipped one-pass filter as the separate filters of its stages.
        cfg = unfold_one_pass(cfg)
    cfg["admin"]["address"]["socket_address"]["port_value"] = envoy.admin_port
    listeners = cfg["static_resources"]["listeners"]
    listener = listeners[0]
    listener["address"]["socket_address"].update(address="127.0.0.1", port_value=envoy.port)
    for other in listeners[1:]:
        other["address"]["socket_address"].update(address="127.0.0.1", port_value=tls_port)
    if tls_port is None:
        del listeners[1:]
    for c in cfg["static_resources"]["clusters"]:
        if c["name"] == "demo":
            c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] = demo.port
        if c["name"] == "etcd":
            # The shipped fleet store: one etcd for the session's shipped-config Envoys.
            c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] = shared_etcd().ports[0][0]
    origin = f"http://127.0.0.1:{envoy.port}"
    for f in listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]:
        config = f["typed_config"].get("config", {})
        root_id = config.get("root_id")
        if not root_id:
            continue
        wasm, vm_id = module_of(root_id)
        config["vm_config"].update(vm_id=vm_id, code={"local": {"filename": f"dist/{wasm}"}})
        value = json.loads(config["configuration"]["value"])
        # The one-pass filter's config holds each stage's config under the stage's root_id.
        stages = value if root_id == ONE_PASS_ROOT_ID else {root_id: value}
        for stage_id, stage in stages.items():
            if stage_id == "token_proxy":
                stage["trusted_web_origins"] = [origin]
            if stage_id == "turn_credentials" and "allowed_origins" in stage:
                stage["allowed_origins"] = [origin]
            if edit:
                edit(stage_id, stage)
        config["configuration"]["value"] = json.dumps(value)
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = fold_one_pass(hcm["http_filters"])
    return cfg


def tls_env(workdir: Path) -> dict[str, str]:
    """GATEHOUSE_TLS_CERT / GATEHOUSE_TLS_KEY for the shipped HTTPS listener: a throwaway CA
    (`workdir/ca.pem`, for clients to trust) and a certificate for 127.0.0.1 and localhost, like
    the ones `cargo xtask up` generates into .local/tls/."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gatehouse test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM).decode()
    (workdir / "ca.pem").write_text(pem(ca))
    return {
        "GATEHOUSE_TLS_CERT": pem(cert) + pem(ca),
        "GATEHOUSE_TLS_KEY": key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()).decode(),
    }


def start_shipped(envoy_factory, demo: "Demo", edit=None, env: dict | None = None):
    """An Envoy running [`shipped_config`], with the secrets the shipped config reads from the
    environment (the demo's cookie keys; a fresh TURN secret unless `env` gives one)."""
    secrets_env = {COOKIE_KEYS_VAR: demo.cookie_keys, "GATEHOUSE_TURN_SECRET": secrets.token_hex(32), **(env or {})}
    return envoy_factory(demo, bootstrap=lambda envoy: shipped_config(envoy, demo, edit), env=secrets_env)


def cluster(name: str, port: int) -> dict:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}],
        },
    }


def wasm_filter(name: str, cfg: dict, host_env_keys: list[str] | tuple = ()) -> dict:
    """A gatehouse Wasm HTTP filter; `host_env_keys` are the Envoy environment variables its VM
    may read (vm_config.environment_variables)."""
    root_id = FILTERS[name][0]
    wasm, vm_id = module_of(name)
    vm_config = {
        "vm_id": vm_id,
        "runtime": "envoy.wasm.runtime.v8",
        "code": {"local": {"filename": str(DIST / wasm)}},
    }
    if host_env_keys:
        vm_config["environment_variables"] = {"host_env_keys": sorted(host_env_keys)}
    plugin = {}
    if name == "page_guard":
        # page-guard holds the response headers while it reads the body (Content-Length changes).
        plugin["allow_on_headers_stop_iteration"] = True
    return {
        "name": f"gatehouse.{name}",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": f"gatehouse.{name}",
                "root_id": root_id,
                **plugin,
                "vm_config": vm_config,
                "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": json.dumps(cfg)},
            },
        },
    }


class Envoy:
    """Real Envoy in front of the demo, with the gatehouse filters given as keyword arguments.

    `env`: variables set in Envoy's environment (nothing else of the harness's environment named
    GATEHOUSE_COOKIE_KEYS leaks in) and listed in every gatehouse filter's `host_env_keys`; a
    value of None is listed but not set.
    `port`: the listener port, when a test needs it before the start (e.g. for an origin).
    `http_filters`: the HTTP filters before the router, as Envoy config dicts (e.g. native
    `jwt_authn` or Lua around [`wasm_filter`]s), instead of the gatehouse filters given as keywords.
    `bootstrap`: a whole Envoy config instead of the generated one, made by `bootstrap(envoy)`
    once the ports are chosen (`envoy.port`, `envoy.admin_port`); Envoy runs from the repo root,
    so the shipped configs' `dist/…` paths resolve."""

    def __init__(self, workdir: Path, demo: Demo, access_log: bool = False, extra_clusters: dict | None = None,
                 routes: list | None = None, env: dict[str, str] | None = None, port: int | None = None,
                 bootstrap=None, http_filters: list | None = None, **filters: dict):
        unknown = set(filters) - set(FILTERS)
        if unknown:
            raise ValueError(f"unknown gatehouse filters: {sorted(unknown)}")
        self.workdir = workdir
        self.port, self.admin_port = port or free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.log = workdir / "envoy.log"
        self.access_log = workdir / "access.log"
        hcm = {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "ingress",
            # Close frames sent by a filter's local reply must reach the browser at once and cleanly.
            "delayed_close_timeout": "0s",
            "upgrade_configs": [{"upgrade_type": "websocket"}],
            "route_config": {
                "virtual_hosts": [{
                    "name": "all",
                    "domains": ["*"],
                    "routes": routes or [{"name": "default", "match": {"prefix": "/"}, "route": {"cluster": "demo", "timeout": "0s"}}],
                }]
            },
            "http_filters": fold_one_pass(http_filters if http_filters is not None else
                                          [wasm_filter(n, c, tuple(env or ())) for n, c in filters.items() if c is not None])
            + [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        }
        if access_log:
            hcm["access_log"] = [{
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": str(self.access_log),
                    "log_format": {"text_format_source": {"inline_string": ACCESS_LOG_FORMAT}},
                },
            }]
        config = {
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": self.admin_port}}},
            "static_resources": {
                "listeners": [{
                    "name": "ingress",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": self.port}},
                    "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
                }],
                "clusters": [cluster("demo", demo.port)] + [p if isinstance(p, dict) else cluster(n, p) for n, p in (extra_clusters or {}).items()],
            },
        }
        if bootstrap is not None:
            config = bootstrap(self)
        self.config = workdir / "envoy.json"
        self.config.write_text(json.dumps(config, indent=1))
        process_env = {k: v for k, v in os.environ.items() if k != COOKIE_KEYS_VAR}
        # A value of None lists the variable for the VMs but leaves it unset in Envoy's environment.
        process_env.update({k: v for k, v in (env or {}).items() if v is not None})
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(ENVOY_BIN), "-c", str(self.config), "--use-dynamic-base-id", "--concurrency", "2",
                 "--log-level", "info", "--component-log-level", "wasm:debug"],
                stdout=out, stderr=subprocess.STDOUT, env=process_env, cwd=ROOT,
            )
        RUNNING.append(self)
        wait_for(lambda: requests.get(self.admin + "/ready", timeout=2).ok, 60, "envoy", self.proc, self.log)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stats(self) -> dict:
        body = requests.get(self.admin + "/stats?format=json", timeout=5).json()
        return {s["name"]: s["value"] for s in body["stats"] if "value" in s}

    def wait_for_access_log(self, needle: str, timeout: float = 10) -> str:
        """The first access-log line containing `needle` (Envoy flushes the file asynchronously)."""
        found: list[str] = []

        def seen():
            if self.access_log.exists():
                found.extend(l for l in self.access_log.read_text().splitlines() if needle in l)
            return bool(found)

        wait_for(seen, timeout, f"access log line with {needle!r}")
        return found[0]

    def stop(self):
        stop(self.proc)
        if self in RUNNING:
            RUNNING.remove(self)


@pytest.fixture(scope="module")
def key():
    """An EdDSA signing key made by PyJWT/cryptography, one per test module."""
    from tokens import Key

    return Key.generate("EdDSA")


@pytest.fixture(scope="session")
def require_envoy():
    if not ENVOY_BIN.exists():
        missing(f"Envoy ({ENVOY_BIN})")
    for wasm in {module_of(name)[0] for name in FILTERS}:
        if not (DIST / wasm).exists():
            missing(f"dist/{wasm} (cargo xtask build)")


@pytest.fixture(scope="session")
def envoy_factory(tmp_path_factory, require_envoy):
    """envoy_factory(demo, jwt_auth=cfg, token_proxy=cfg, access_log=False, extra_clusters={}, routes=None,
    env={"GATEHOUSE_COOKIE_KEYS": keys}, port=None, bootstrap=None).
    Raises with the Envoy log when Envoy does not start (e.g. a config the filter refuses)."""
    started: list[Envoy] = []

    def make(demo: Demo, **kwargs) -> Envoy:
        workdir = tmp_path_factory.mktemp("envoy")
        try:
            envoy = Envoy(workdir, demo, **kwargs)
        except RuntimeError:
            for e in list(RUNNING):
                if e.workdir == workdir:
                    e.stop()
            raise
        started.append(envoy)
        return envoy

    yield make
    for envoy in started:
        envoy.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for envoy in RUNNING:
            report.sections.append((f"envoy log ({envoy.log})", envoy.log_text()[-20000:]))


# ------------------------------------------------------------------------------------- browser


def chromium_path() -> str | None:
    return os.environ.get("GATEHOUSE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def browser_context():
    exe = chromium_path()
    if not exe:
        missing("Chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright (tests/requirements.txt)")
    user_data = tempfile.mkdtemp(prefix="gatehouse-chromium-")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            user_data,
            executable_path=exe,
            headless=True,
            # The phone tests: the HTTPS listener's throwaway certificate, fake microphones.
            ignore_https_errors=True,
            args=["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        yield context
        context.close()
    shutil.rmtree(user_data, ignore_errors=True)


@pytest.fixture
def browser_page(browser_context):
    page = browser_context.new_page()
    yield page
    page.close()


# ---------------------------------------------------------------------------------------- etcd


class Etcd:
    """Real etcd (Debian `etcd-server`) on free loopback ports: one member, or a cluster of
    `members`. `pause(i)` / `resume(i)` SIGSTOP / SIGCONT member i; `kill(i)` ends it. Only the
    PIDs started here are signalled."""

    def __init__(self, workdir: Path, members: int = 1):
        self.workdir = workdir
        self.binary = shutil.which("etcd")
        self.ports = [(free_port(), free_port()) for _ in range(members)]
        names = [f"m{i}" for i in range(members)]
        initial = ",".join(f"{n}=http://127.0.0.1:{peer}" for n, (_, peer) in zip(names, self.ports))
        token = f"gatehouse-test-{os.getpid()}-{self.ports[0][0]}"
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        for name, (client, peer) in zip(names, self.ports):
            log = workdir / f"etcd-{name}.log"
            self.logs.append(log)
            with open(log, "wb") as out:
                self.procs.append(subprocess.Popen(
                    [self.binary, "--name", name, "--data-dir", str(workdir / name),
                     "--listen-client-urls", f"http://127.0.0.1:{client}",
                     "--advertise-client-urls", f"http://127.0.0.1:{client}",
                     "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                     "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                     "--initial-cluster", initial, "--initial-cluster-state", "new",
                     "--initial-cluster-token", token],
                    stdout=out, stderr=subprocess.STDOUT))
        for i, proc in enumerate(self.procs):
            wait_for(lambda i=i: self.healthy(i), 30, f"etcd member {i}", proc, self.logs[i])

    def url(self, i: int = 0) -> str:
        return f"http://127.0.0.1:{self.ports[i][0]}"

    def healthy(self, i: int = 0) -> bool:
        """Member i answers and the cluster has a leader (etcd's /health)."""
        try:
            return requests.get(self.url(i) + "/health", timeout=2).json().get("health") == "true"
        except (requests.RequestException, ValueError):
            return False

    def cluster(self, name: str = "etcd") -> dict:
        """The Envoy cluster reaching every member, with the health check envoy-config/envoy.yaml
        ships (a stopped member leaves the rotation within about a second)."""
        c = cluster(name, self.ports[0][0])
        c["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": client}}}}
            for client, _ in self.ports]
        c["health_checks"] = [{"timeout": "1s", "interval": "1s", "no_traffic_interval": "1s",
                               "unhealthy_threshold": 1, "healthy_threshold": 1,
                               "http_health_check": {"path": "/health"}}]
        return c

    def keys(self, prefix: str) -> list[str]:
        """The keys under `prefix` (decoded), read from member 0."""
        import base64

        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        r = requests.post(self.url() + "/v3/kv/range", timeout=5, json={
            "key": base64.b64encode(prefix.encode()).decode(),
            "range_end": base64.b64encode(end.encode()).decode(), "keys_only": True})
        return [base64.b64decode(kv["key"]).decode() for kv in r.json().get("kvs", [])]

    def pause(self, i: int = 0):
        self.procs[i].send_signal(signal.SIGSTOP)

    def resume(self, i: int = 0):
        self.procs[i].send_signal(signal.SIGCONT)

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
            stop(proc)


@pytest.fixture(scope="session")
def etcd_factory(tmp_path_factory):
    """etcd_factory(members=1) → a running [`Etcd`]; stopped at the end of the session."""
    if not shutil.which("etcd"):
        missing("etcd (apt-get install etcd-server)")
    started: list[Etcd] = []

    def make(members: int = 1) -> Etcd:
        e = Etcd(tmp_path_factory.mktemp("etcd"), members)
        started.append(e)
        return e

    yield make
    for e in started:
        e.stop()


_SHARED_ETCD: list[Etcd] = []


def shared_etcd() -> Etcd:
    """One etcd for every Envoy running the shipped config (its `etcd` cluster), started on
    first use and stopped when the session ends."""
    if not _SHARED_ETCD:
        if not shutil.which("etcd"):
            missing("etcd (apt-get install etcd-server)")
        _SHARED_ETCD.append(Etcd(Path(tempfile.mkdtemp(prefix="gatehouse-etcd-")), 1))
    return _SHARED_ETCD[0]


def pytest_sessionfinish(session, exitstatus):
    for e in _SHARED_ETCD:
        e.stop()
        shutil.rmtree(e.workdir, ignore_errors=True)

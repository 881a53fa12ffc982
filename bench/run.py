#!/usr/bin/env python3
"""The gatehouse benchmark: wrk against Envoy (`--concurrency 1`) on loopback, one scenario per
Envoy, all in one run so their ratios are comparable. See docs/performance.md.

Run it as `cargo xtask bench [args]` (builds dist/, creates .venv, checks wrk), or directly with a
Python that has the test requirements: `.venv/bin/python bench/run.py --help`.

Every scenario answers from a `direct_response` route, so no upstream process competes for the CPU
and Envoy's own CPU time is the listener, the HTTP codec and the filter chain under test. For each
scenario: start Envoy, check one request with the token is 200 (and one without is 401 where a
JWT filter is active), warm up, then measure with wrk while reading Envoy's utime+stime from
/proc/<pid>/stat before and after. Envoy and wrk are the only processes started, and only they are
stopped, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT / "tests"))

from conftest import DIST, ENVOY_BIN, free_port, stop, wait_for, wasm_filter  # noqa: E402
from cookies import new_key, seal  # noqa: E402
from tokens import AUDIENCE, ISSUER, Key, jwks, jwt_auth_config  # noqa: E402

DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
LUA = BENCH / "tokens.lua"
WASM_TARGET = "wasm32-wasip1"
NOOP_PACKAGE = "gatehouse-bench-noop"
NOOP_WASM = ROOT / "target" / "bench" / "noop.wasm"
WASM_OPT_ARGS = ["-Oz", "--enable-bulk-memory", "--enable-sign-ext", "--enable-nontrapping-float-to-int",
                 "--enable-mutable-globals", "--strip-debug"]
ALGS = ["EdDSA", "ES256", "RS256"]

# Targets (printed as PASS/FAIL, never asserted).
WARM_OVER_NOOP_US = 5.0
WARM_VS_NATIVE_CACHED = 0.85
CHAIN_VS_BASELINE = 0.85
VERIFY_TARGET_US = {"EdDSA": 200.0, "ES256": 300.0, "RS256": 300.0}
WASM_MAX_KB = 500


# ------------------------------------------------------------------------------------ processes

STARTED: list[subprocess.Popen] = []


def _terminate(signum, _frame):
    # SIGTERM (e.g. from a CI timeout) unwinds like Ctrl-C, so the `finally` blocks stop our Envoys.
    raise KeyboardInterrupt(f"signal {signum}")


def stop_started():
    for proc in list(STARTED):
        stop(proc)  # conftest.stop: SIGTERM to this PID, then SIGKILL after 10 s
        STARTED.remove(proc)


def http_status(url: str, token: str | None = None, timeout: float = 5, cookie: str | None = None) -> int:
    req = urllib.request.Request(url)
    if cookie is not None:
        req.add_header("Cookie", cookie)
    elif token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def http_json(url: str, timeout: float = 5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def find_envoy(arg: str | None) -> Path:
    for candidate in (arg, ENVOY_BIN, Path(sys.executable).parent / "envoy", shutil.which("envoy")):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    sys.exit(f"bench: Envoy not found ({ENVOY_BIN}); run `cargo xtask bench`, or pass --envoy")


class Envoy:
    """One Envoy with `http_filters` in front of a direct_response route."""

    def __init__(self, binary: Path, workdir: Path, http_filters: list[dict]):
        self.port, self.admin_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.log = workdir / "envoy.log"
        hcm = {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "bench",
            "route_config": {"virtual_hosts": [{
                "name": "all",
                "domains": ["*"],
                "routes": [{"match": {"prefix": "/"},
                            "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}],
            }]},
            "http_filters": http_filters + [{
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }],
        }
        config = {
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": self.admin_port}}},
            "static_resources": {"listeners": [{
                "name": "bench",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": self.port}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": hcm}]}],
            }]},
        }
        config_path = workdir / "envoy.json"
        config_path.write_text(json.dumps(config, indent=1))
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(binary), "-c", str(config_path), "--use-dynamic-base-id", "--concurrency", "1",
                 "--log-level", "warn"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        STARTED.append(self.proc)
        try:
            wait_for(lambda: http_status(self.admin + "/ready", timeout=2) == 200, 60, "envoy", self.proc, self.log)
        except BaseException:
            self.stop()
            raise

    def cpu_seconds(self) -> float:
        """utime + stime of the Envoy process (all its threads), from /proc/<pid>/stat."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            stat = f.read()
        fields = stat[stat.rindex(")") + 2:].split()  # fields[0] is field 3 (state)
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        """Resident memory of the Envoy process: every wasm module adds a VM per worker."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kb / 1024

    def counters(self, prefix: str) -> dict:
        body = http_json(self.admin + "/stats?format=json&filter=" + urllib.request.quote(prefix))
        return {s["name"]: s["value"] for s in body["stats"] if "value" in s}

    def stop(self):
        if self.proc in STARTED:
            stop(self.proc)
            STARTED.remove(self.proc)


# ------------------------------------------------------------------------------------- filters


def noop_filter() -> dict:
    """The same Envoy Wasm filter block the tests use, pointed at the no-op module."""
    f = copy.deepcopy(wasm_filter("jwt_auth", {}))
    f["name"] = "bench.noop"
    cfg = f["typed_config"]["config"]
    cfg["name"], cfg["root_id"] = "bench.noop", "noop"
    cfg["vm_config"]["vm_id"] = "bench.noop"
    cfg["vm_config"]["code"]["local"]["filename"] = str(NOOP_WASM)
    return f


def native_filter(key: Key, cache: bool) -> dict:
    """Envoy's jwt_authn with the same key, issuer and audience as jwt-auth. Like jwt-auth it strips
    the token (`forward: false`) and publishes the claims (`payload_in_metadata`)."""
    provider = {
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "local_jwks": {"inline_string": json.dumps(jwks(key))},
        "forward": False,
        "payload_in_metadata": "claims",
    }
    if cache:
        provider["jwt_cache_config"] = {"jwt_cache_size": 1024}
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"bench": provider},
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "bench"}}],
        },
    }


# ------------------------------------------------------------------------------------ scenarios


@dataclass
class Scenario:
    key: str
    label: str
    filters: list[dict]
    token: str                        # the token of the sanity request (and of every request when warm)
    token_file: Path | None = None    # cold: wrk cycles through this file
    guarded: bool = False             # a JWT filter is active: a request without a token must be 401
    jwt_auth: str | None = None       # "warm" / "cold": check the jwt-auth cache counters afterwards
    cookie: str | None = None         # sent instead of Authorization (the token-proxy chain)


@dataclass
class Result:
    rps: float
    p50_us: float
    p99_us: float
    requests: int
    non2xx: int
    socket_errors: int
    cpu_us: float
    rss_mb: float
    note: str = ""


@dataclass
class Summary:
    runs: list[Result] = field(default_factory=list)

    def med(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)

    def total(self, attr: str) -> int:
        return sum(getattr(r, attr) for r in self.runs)


def scenarios(keys: dict[str, Key], tokens: dict[str, str], token_files: dict[str, Path], algs: list[str]):
    out = [
        Scenario("none", "no filter", [], tokens[algs[0]]),
        Scenario("noop", "no-op wasm", [noop_filter()], tokens[algs[0]]),
    ]
    for alg in algs:
        key = keys[alg]
        out += [
            Scenario(f"native-{alg}", f"native jwt_authn {alg}", [native_filter(key, cache=False)], tokens[alg],
                     guarded=True),
            Scenario(f"native-cache-{alg}", f"native jwt_authn {alg} + jwt_cache", [native_filter(key, cache=True)],
                     tokens[alg], guarded=True),
            Scenario(f"warm-{alg}", f"jwt-auth {alg} warm", [wasm_filter("jwt_auth", jwt_auth_config(key))],
                     tokens[alg], guarded=True, jwt_auth="warm"),
            Scenario(f"cold-{alg}", f"jwt-auth {alg} cold", [wasm_filter("jwt_auth", jwt_auth_config(key, cache_entries=0))],
                     tokens[alg], token_file=token_files[alg], guarded=True, jwt_auth="cold"),
        ]
    # token-proxy + jwt-auth chained, warm: the encrypted HttpOnly cookie becomes the bearer token.
    alg = algs[0]
    cookie_key = new_key()
    proxy = wasm_filter("token_proxy", {"cookie_prefix": "gh", "encryption_keys": [cookie_key]})
    out.append(Scenario("chain", f"token-proxy + jwt-auth {alg} warm",
                        [proxy, wasm_filter("jwt_auth", jwt_auth_config(keys[alg]))], tokens[alg], guarded=True,
                        jwt_auth="warm", cookie=f"gh-at={seal(cookie_key, tokens[alg])}"))
    return out


# ------------------------------------------------------------------------------------------ wrk

_DURATION = re.compile(r"([\d.]+)(us|ms|s|m)\b")
_UNIT_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6}


def _us(text: str) -> float:
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise ValueError(f"wrk duration {text!r}")
    return float(m.group(1)) * _UNIT_US[m.group(2)]


def wrk(args, url: str, seconds: int, sc: Scenario) -> dict:
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds}s", "--latency", "--timeout", "10s"]
    if sc.token_file is not None:
        cmd += ["-s", str(LUA), url, "--", str(sc.token_file)]
    elif sc.cookie is not None:
        cmd += ["-H", f"Cookie: {sc.cookie}", url]
    else:
        cmd += ["-H", f"Authorization: Bearer {sc.token}", url]
    done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    out = done.stdout
    if done.returncode != 0 or "requests in" not in out:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{out}\n{done.stderr}")
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.M))
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_us": _us(lat["50"]),
        "p99_us": _us(lat["99"]),
        "non2xx": int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0,
        "socket_errors": sum(int(x) for x in socket.groups()) if socket else 0,
        "raw": out,
    }


def run_scenario(args, envoy_bin: Path, workdir: Path, sc: Scenario) -> Result:
    wd = workdir / sc.key
    wd.mkdir(parents=True, exist_ok=True)
    envoy = Envoy(envoy_bin, wd, sc.filters)
    try:
        status = http_status(envoy.url, sc.token, cookie=sc.cookie)
        if status != 200:
            raise RuntimeError(f"{sc.key}: the sanity request with the token got {status}, not 200\n"
                               + envoy.log.read_text(errors="replace")[-4000:])
        if sc.guarded and (status := http_status(envoy.url)) != 401:
            raise RuntimeError(f"{sc.key}: a request without a token got {status}, not 401: is the filter active?")
        if args.warmup > 0:
            wrk(args, envoy.url, args.warmup, sc)
        before_stats = envoy.counters("gatehouse.jwt_auth") if sc.jwt_auth else {}
        cpu0 = envoy.cpu_seconds()
        w = wrk(args, envoy.url, args.seconds, sc)
        cpu1 = envoy.cpu_seconds()
        rss = envoy.rss_mb()
        note = ""
        if sc.jwt_auth:
            after = envoy.counters("gatehouse.jwt_auth")
            delta = {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1]: after.get(k, 0) - before_stats.get(k, 0)
                     for k in after}
            hits, misses = delta.get("cache.hit", 0), delta.get("cache.miss", 0)
            note = f"cache hit/miss {hits}/{misses}"
            if sc.jwt_auth == "cold" and hits:
                note += " (cold run hit the cache!)"
            if sc.jwt_auth == "warm" and misses > 1:
                note += " (warm run missed the cache!)"
        requests = max(w["requests"], 1)
        return Result(rps=w["rps"], p50_us=w["p50_us"], p99_us=w["p99_us"], requests=w["requests"],
                      non2xx=w["non2xx"], socket_errors=w["socket_errors"],
                      cpu_us=(cpu1 - cpu0) / requests * 1e6, rss_mb=rss, note=note)
    finally:
        envoy.stop()


# ------------------------------------------------------------------------------------ building


def build_noop(skip: bool):
    built = ROOT / "target" / WASM_TARGET / "release" / (NOOP_PACKAGE.replace("-", "_") + ".wasm")
    if not skip:
        cargo = os.environ.get("CARGO", "cargo")
        print(f"bench: building {NOOP_PACKAGE} ({WASM_TARGET}, release)", flush=True)
        subprocess.run([cargo, "build", "-j2", "--release", "--target", WASM_TARGET, "-p", NOOP_PACKAGE],
                       cwd=ROOT, check=True)
    NOOP_WASM.parent.mkdir(parents=True, exist_ok=True)
    if shutil.which("wasm-opt"):
        subprocess.run(["wasm-opt", *WASM_OPT_ARGS, "-o", str(NOOP_WASM), str(built)], check=True)
    else:
        shutil.copyfile(built, NOOP_WASM)


def mint_tokens(workdir: Path, algs: list[str], count: int):
    keys, tokens, files = {}, {}, {}
    for alg in algs:
        t0 = time.monotonic()
        key = Key.generate(alg)
        keys[alg] = key
        tokens[alg] = key.mint(ttl=6 * 3600)
        path = workdir / f"tokens-{alg}.txt"
        with open(path, "w") as f:
            for _ in range(count):
                f.write(key.mint(ttl=6 * 3600) + "\n")
        files[alg] = path
        print(f"bench: minted {count} {alg} tokens ({len(tokens[alg])} bytes each) in "
              f"{time.monotonic() - t0:.1f} s", flush=True)
    return keys, tokens, files


# ------------------------------------------------------------------------------------ reporting


def fmt_us(us: float) -> str:
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} µs"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(args, algs, order: list[Scenario], results: dict[str, Summary], envoy_version: str,
           load_before, load_after, wall: float) -> tuple[str, list[str]]:
    base = results["none"]
    b_rps, b_cpu = base.med("rps"), base.med("cpu_us")
    lines = [
        "| scenario | req/s | × no filter | p50 | p99 | Envoy CPU µs/req | × no filter | Envoy RSS MB | non-2xx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for sc in order:
        s = results[sc.key]
        bad = s.total("non2xx") + s.total("socket_errors")
        lines.append(
            f"| {sc.label} | {s.med('rps'):,.0f} | {s.med('rps') / b_rps:.2f} | {fmt_us(s.med('p50_us'))} | "
            f"{fmt_us(s.med('p99_us'))} | {s.med('cpu_us'):.1f} | {s.med('cpu_us') / b_cpu:.2f} | {s.med('rss_mb'):.0f} | {bad} |"
        )

    cpu = {k: v.med("cpu_us") for k, v in results.items()}
    rps = {k: v.med("rps") for k, v in results.items()}
    lines += [
        "",
        "Derived (Envoy CPU per request, µs):",
        "",
        "| alg | jwt-auth warm − no-op wasm | jwt-auth one verify (cold − warm) | native one verify (no cache − cache) | "
        "jwt-auth warm req/s ÷ native cached |",
        "|---|---:|---:|---:|---:|",
    ]
    for alg in algs:
        lines.append(
            f"| {alg} | {cpu[f'warm-{alg}'] - cpu['noop']:.1f} | {cpu[f'cold-{alg}'] - cpu[f'warm-{alg}']:.1f} | "
            f"{cpu[f'native-{alg}'] - cpu[f'native-cache-{alg}']:.1f} | "
            f"{rps[f'warm-{alg}'] / rps[f'native-cache-{alg}']:.2f} |"
        )

    chain_alg = algs[0]
    lines += [
        "",
        f"token-proxy + jwt-auth chained ({chain_alg}, warm): {rps['chain']:,.0f} req/s = "
        f"{rps['chain'] / rps['none']:.2f} × no filter, {rps['chain'] / rps[f'warm-{chain_alg}']:.2f} × jwt-auth "
        f"alone; {cpu['chain'] - cpu[f'warm-{chain_alg}']:.1f} µs of Envoy CPU per request over jwt-auth alone.",
    ]

    sizes = []
    for wasm in sorted(DIST.glob("*.wasm")) + [NOOP_WASM]:
        shown = wasm.relative_to(ROOT)
        sizes.append((str(shown), wasm.stat().st_size / 1024, wasm.parent == DIST))
    lines += ["", "`.wasm` sizes (raw bytes, KB = 1024 B): "
              + ", ".join(f"`{name}` {kb:.0f} KB" for name, kb, _ in sizes)]

    checks = []
    for alg in algs:
        over = cpu[f"warm-{alg}"] - cpu["noop"]
        checks.append((over <= WARM_OVER_NOOP_US,
                       f"jwt-auth {alg} warm CPU/request {cpu[f'warm-{alg}']:.1f} µs ≤ no-op wasm "
                       f"{cpu['noop']:.1f} + {WARM_OVER_NOOP_US:.0f} µs (over by {over:+.1f} µs)"))
    for alg in algs:
        ratio = rps[f"warm-{alg}"] / rps[f"native-cache-{alg}"]
        checks.append((ratio >= WARM_VS_NATIVE_CACHED,
                       f"jwt-auth {alg} warm req/s {rps[f'warm-{alg}']:,.0f} ≥ {WARM_VS_NATIVE_CACHED} × native "
                       f"cached {rps[f'native-cache-{alg}']:,.0f} (ratio {ratio:.2f})"))
    for alg in algs:
        verify = cpu[f"cold-{alg}"] - cpu[f"warm-{alg}"]
        checks.append((verify <= VERIFY_TARGET_US[alg],
                       f"one {alg} verify in Envoy {verify:.1f} µs ≤ {VERIFY_TARGET_US[alg]:.0f} µs"))
    ratio = rps["chain"] / rps["none"]
    checks.append((ratio >= CHAIN_VS_BASELINE,
                   f"token-proxy + jwt-auth warm req/s {rps['chain']:,.0f} ≥ {CHAIN_VS_BASELINE} × no filter "
                   f"{rps['none']:,.0f} (ratio {ratio:.2f})"))
    for name, kb, in_dist in sizes:
        if in_dist:
            checks.append((kb <= WASM_MAX_KB, f"{name} {kb:.0f} KB ≤ {WASM_MAX_KB} KB"))
    target_lines = [f"{verdict(ok)}  {text}" for ok, text in checks]
    lines += ["", "Targets:", "", "```", *target_lines, "```"]

    bad = [(sc.label, results[sc.key]) for sc in order
           if results[sc.key].total("non2xx") or results[sc.key].total("socket_errors")]
    notes = [f"{sc.label}: {'; '.join(r.note for r in results[sc.key].runs)}" for sc in order
             if any(r.note for r in results[sc.key].runs)]
    host = f"{os.cpu_count()} CPUs ({platform.machine()})"
    lines += [
        "",
        f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {host}, "
        f"load average {load_before[0]:.2f} before / {load_after[0]:.2f} after; {envoy_version}; "
        f"wrk `-t{args.threads} -c{args.connections}`, {args.warmup:g} s warm-up + {args.seconds:g} s measured per "
        f"scenario, {args.rounds} round(s){' (medians)' if args.rounds > 1 else ''}, {args.tokens} cold tokens "
        f"per alg; whole run {wall / 60:.1f} min.",
    ]
    if notes:
        lines += ["", "jwt-auth counters during the measured runs: " + "; ".join(notes) + "."]
    if bad:
        lines += ["", "**Errors**: " + "; ".join(
            f"{label}: {s.total('non2xx')} non-2xx, {s.total('socket_errors')} socket errors" for label, s in bad)]
    return "\n".join(lines), target_lines


def write_doc(table: str):
    text = DOC.read_text() if DOC.exists() else f"# Performance\n\n{BEGIN}\n{END}\n"
    section = f"{BEGIN}\n{table}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOC.write_text(text)


# ----------------------------------------------------------------------------------------- main


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=5, help="measured wrk run per scenario (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="wrk warm-up run before measuring (default 1)")
    p.add_argument("--threads", type=int, default=1, help="wrk -t (default 1)")
    p.add_argument("--connections", type=int, default=8, help="wrk -c (default 8)")
    p.add_argument("--tokens", type=int, default=5000, help="unique tokens minted per alg for the cold runs (default 5000)")
    p.add_argument("--rounds", type=int, default=1, help="repeat every scenario N times, report medians (default 1)")
    p.add_argument("--algs", default=",".join(ALGS), help=f"comma-separated subset of {','.join(ALGS)}")
    p.add_argument("--envoy", help="Envoy binary (default: .venv/bin/envoy, or $GATEHOUSE_ENVOY)")
    p.add_argument("--no-build", action="store_true", help="do not run cargo for bench/noop (use the last build)")
    p.add_argument("--no-doc", action="store_true", help=f"do not rewrite the table in {DOC.relative_to(ROOT)}")
    p.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs, tokens)")
    args = p.parse_args()
    args.algs = [a.strip() for a in args.algs.split(",") if a.strip()]
    if not args.algs or set(args.algs) - set(ALGS):
        p.error(f"--algs: choose from {ALGS}")
    if args.seconds < 1 or args.rounds < 1 or args.tokens < 1:
        p.error("--seconds ≥ 1, --rounds ≥ 1, --tokens ≥ 1")
    return args


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, _terminate)
    started_at = time.monotonic()
    envoy_bin = find_envoy(args.envoy)
    if not shutil.which("wrk"):
        sys.exit("bench: wrk is not installed (apt-get install wrk)")
    for name in ("jwt-auth.wasm", "token-proxy.wasm"):
        if not (DIST / name).exists():
            sys.exit(f"bench: dist/{name} is missing: run `cargo xtask build` (or `cargo xtask bench`)")
    build_noop(args.no_build)
    version = subprocess.run([str(envoy_bin), "--version"], capture_output=True, text=True).stdout.strip()
    m = re.search(r"/(\d+\.\d+\.\d+)/", version)
    envoy_version = f"Envoy {m.group(1)}" if m else "Envoy"

    workdir = Path(tempfile.mkdtemp(prefix="gatehouse-bench-"))
    results: dict[str, Summary] = {}
    try:
        keys, tokens, files = mint_tokens(workdir, args.algs, args.tokens)
        order = scenarios(keys, tokens, files, args.algs)
        load_before = os.getloadavg()
        est = len(order) * args.rounds * (args.seconds + args.warmup + 2)
        print(f"bench: {len(order)} scenarios × {args.rounds} round(s), about {est / 60:.1f} min; "
              f"{envoy_version} --concurrency 1; wrk -t{args.threads} -c{args.connections} "
              f"{args.warmup:g}+{args.seconds:g} s; load average {load_before[0]:.2f}", flush=True)
        for rnd in range(args.rounds):
            for sc in order:
                r = run_scenario(args, envoy_bin, workdir, sc)
                results.setdefault(sc.key, Summary()).runs.append(r)
                warn = f"  non-2xx {r.non2xx} socket errors {r.socket_errors}" if r.non2xx or r.socket_errors else ""
                print(f"  [{rnd + 1}/{args.rounds}] {sc.label:<38} {r.rps:>9,.0f} req/s  p50 {fmt_us(r.p50_us):>9}  "
                      f"p99 {fmt_us(r.p99_us):>9}  Envoy CPU {r.cpu_us:7.1f} µs/req"
                      f"{'  ' + r.note if r.note else ''}{warn}", flush=True)
        load_after = os.getloadavg()
        table, target_lines = report(args, args.algs, order, results, envoy_version, load_before, load_after,
                                     time.monotonic() - started_at)
        print("\n" + table + "\n")
        if not args.no_doc:
            write_doc(table)
            print(f"bench: wrote the table into {DOC.relative_to(ROOT)}")
        return 0
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
        return 130
    finally:
        stop_started()
        if args.keep:
            print(f"bench: work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

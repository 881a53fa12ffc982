"""deploy/: the Istio and Envoy Gateway manifests are what those versions accept, load the images
`cargo xtask package` built, and give the filters configs they compile.

- Every manifest is validated against the CRD schema of the Istio / Envoy Gateway version named in
  docs/kubernetes.md (tests/fixtures/crds/, third-party copies), with unknown fields refused.
- `package` renders deploy/ into <out>/deploy/: every image is named by the digest it produced and
  every `sha256` is that image's manifest digest (what Istio and Envoy Gateway compare it with).
- Each plugin's config is compiled by `gatehouse check`, in the Wasm filter config the plugin
  becomes, with the root_id and environment the manifest gives it.
"""

from __future__ import annotations

import copy
import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import DIST, ROOT, missing

DEPLOY = ROOT / "deploy"
CRDS = ROOT / "tests" / "fixtures" / "crds"
CLI = ROOT / "target" / "release" / "gatehouse"
WASM_FILTER = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
STRING_VALUE = "type.googleapis.com/google.protobuf.StringValue"
MODULES = ["jwt-auth", "token-proxy", "session-binding", "turn-credentials", "page-guard"]
SECRET = "gatehouse-secrets"
# Well-formed values for the variables the manifests take from the Secret.
ENV = {"GATEHOUSE_COOKIE_KEYS": "11" * 32, "GATEHOUSE_TURN_SECRET": "turn-secret-of-at-least-32-bytes-0123"}


def strict(schema):
    """A CRD's openAPIV3Schema as a JSON schema: `nullable` becomes a null type, int-or-string an
    anyOf, and an object with `properties` refuses other fields unless the CRD keeps unknown
    fields (the API server would prune them silently: a typo would just vanish)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if schema.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def load_crds() -> dict:
    """(apiVersion, kind) → JSON schema, for every CRD fixture."""
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml*")):
        text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
        for crd in yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
            if not crd:
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = strict(version["schema"]["openAPIV3Schema"])
                schema["properties"]["apiVersion"] = {"const": f"{group}/{version['name']}"}
                schema["properties"]["kind"] = {"const": kind}
                # metadata is not in a CRD's schema (the API server owns it): name and namespace here.
                schema["properties"]["metadata"] = {
                    "type": "object", "required": ["name", "namespace"],
                    "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
                                   "namespace": {"type": "string"}},
                    "additionalProperties": False}
                schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
                schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


SCHEMAS = load_crds()


def manifests(root: Path) -> list[tuple[Path, dict]]:
    """Every resource in root/**.yaml except kustomizations and patches."""
    out = []
    for path in sorted(root.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or path.name.endswith(".patch.yaml"):
            continue
        out += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def wasm_plugins(docs) -> list[dict]:
    """Each gatehouse filter the manifests configure, as the Wasm filter config it becomes:
    kind, root_id, image, sha256, config (parsed), env (host variables the VM gets), and
    allow_on_headers_stop_iteration (Envoy Gateway: as the EnvoyPatchPolicy sets it)."""
    patched = set()
    for _, doc in docs:
        if doc["kind"] == "EnvoyPatchPolicy":
            for patch in doc["spec"]["jsonPatches"]:
                op = patch["operation"]
                if op.get("path") == "allow_on_headers_stop_iteration" and op.get("value") is True:
                    patched |= set(re.findall(r"'(envoy\.filters\.http\.wasm/[^']+)'", op.get("jsonPath", "")))
    out = []
    for _, doc in docs:
        spec = doc["spec"]
        if doc["kind"] == "WasmPlugin":
            env = [e["name"] for e in spec.get("vmConfig", {}).get("env", []) if e.get("valueFrom") == "HOST"]
            out.append({"kind": "WasmPlugin", "root_id": spec["pluginName"], "image": spec["url"].removeprefix("oci://"),
                        "sha256": spec["sha256"], "config": spec["pluginConfig"], "env": env,
                        "allow_on_headers_stop_iteration": False})
        elif doc["kind"] == "EnvoyFilter":
            for patch in spec["configPatches"]:
                if patch["applyTo"] != "EXTENSION_CONFIG":
                    continue
                wasm = patch["patch"]["value"]["typed_config"]
                assert wasm["@type"] == WASM_FILTER
                config, vm = wasm["config"], wasm["config"]["vm_config"]
                remote = vm["code"]["remote"]
                out.append({"kind": "EnvoyFilter", "root_id": config["root_id"],
                            "image": remote["http_uri"]["uri"].removeprefix("oci://"), "sha256": remote["sha256"],
                            "config": json.loads(config["configuration"]["value"]),
                            "env": vm.get("environment_variables", {}).get("host_env_keys", []),
                            "allow_on_headers_stop_iteration": config.get("allow_on_headers_stop_iteration", False)})
        elif doc["kind"] == "EnvoyExtensionPolicy":
            meta = doc["metadata"]
            for i, w in enumerate(spec["wasm"]):
                # The name Envoy Gateway gives the filter of entry i.
                name = f"envoy.filters.http.wasm/envoyextensionpolicy/{meta['namespace']}/{meta['name']}/wasm/{i}"
                out.append({"kind": "EnvoyExtensionPolicy", "root_id": w["rootID"], "image": w["code"]["image"]["url"],
                            "sha256": w["code"]["image"]["sha256"], "config": w["config"],
                            "env": w.get("env", {}).get("hostKeys", []),
                            "allow_on_headers_stop_iteration": name in patched})
    return out


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """`cargo xtask package`'s output (no push): images.json and the rendered deploy/."""
    for m in MODULES:
        if not (DIST / f"{m}.wasm").exists():
            missing(f"dist/{m}.wasm (run `cargo xtask build`)")
    out = tmp_path_factory.mktemp("package")
    subprocess.run([sys.executable, str(ROOT / "xtask" / "package.py"), "--registry", "registry.test:5000/gh",
                    "--tag", "t1", "--no-push", "--out", str(out)], check=True, cwd=ROOT, capture_output=True)
    return json.loads((out / "images.json").read_text()), out / "deploy"


def test_the_fixture_schemas_are_the_versions_the_docs_name():
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    assert ("extensions.istio.io/v1alpha1", "WasmPlugin") in SCHEMAS
    assert ("networking.istio.io/v1alpha3", "EnvoyFilter") in SCHEMAS
    for kind in ("EnvoyExtensionPolicy", "EnvoyPatchPolicy", "EnvoyProxy"):
        assert ("gateway.envoyproxy.io/v1alpha1", kind) in SCHEMAS
    assert "Istio 1.30" in docs and "Envoy Gateway 1.9" in docs


def test_the_schemas_refuse_a_misspelt_field():
    """The strict conversion is what makes the validation worth something."""
    [(_, plugin)] = [(p, d) for p, d in manifests(DEPLOY) if d["kind"] == "WasmPlugin"][:1]
    bad = copy.deepcopy(plugin)
    bad["spec"]["failStategy"] = bad["spec"].pop("failStrategy")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMAS[(bad["apiVersion"], bad["kind"])])
    bad = copy.deepcopy(plugin)
    bad["spec"]["failStrategy"] = "FAIL_CLOSED"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMAS[(bad["apiVersion"], bad["kind"])])


@pytest.mark.parametrize("where", ["deploy", "rendered"])
def test_every_manifest_matches_its_crd_schema(where, request):
    root = DEPLOY if where == "deploy" else request.getfixturevalue("rendered")[1]
    docs = manifests(root)
    assert {d["kind"] for _, d in docs} == {"WasmPlugin", "EnvoyFilter", "EnvoyExtensionPolicy", "EnvoyPatchPolicy",
                                            "EnvoyProxy"}
    for path, doc in docs:
        schema = SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        assert schema is not None, f"{path}: no CRD fixture for {doc['apiVersion']} {doc['kind']}"
        jsonschema.validate(doc, schema)


def test_kustomizations_list_every_resource_file():
    for kustomization in DEPLOY.rglob("kustomization.yaml"):
        listed = yaml.safe_load(kustomization.read_text())["resources"]
        files = sorted(p.name for p in kustomization.parent.glob("*.yaml")
                       if p.name != "kustomization.yaml" and not p.name.endswith(".patch.yaml"))
        assert sorted(listed) == files, kustomization


def test_both_platforms_run_every_filter_fail_closed_in_request_order():
    docs = manifests(DEPLOY)
    order = ["token_proxy", "jwt_auth", "session_binding", "turn_credentials", "page_guard"]
    # Istio: the WasmPlugins by phase then priority (higher first), then page_guard's EnvoyFilter
    # right before the router.
    istio = sorted((d for _, d in docs if d["kind"] == "WasmPlugin"),
                   key=lambda d: (d["spec"]["phase"] != "AUTHN", -d["spec"].get("priority", 0)))
    assert [d["spec"]["pluginName"] for d in istio] == order[:-1]
    assert all(d["spec"]["failStrategy"] == "FAIL_CLOSE" for d in istio)
    [envoy_filter] = [d for _, d in docs if d["kind"] == "EnvoyFilter"]
    [extension, http_filter] = envoy_filter["spec"]["configPatches"]
    assert extension["patch"]["value"]["typed_config"]["config"]["fail_open"] is False
    assert http_filter["patch"]["operation"] == "INSERT_BEFORE"
    assert http_filter["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == "envoy.filters.http.router"
    assert http_filter["patch"]["value"]["name"] == extension["patch"]["value"]["name"]
    [eep] = [d for _, d in docs if d["kind"] == "EnvoyExtensionPolicy"]
    assert [w["rootID"] for w in eep["spec"]["wasm"]] == order
    assert all(w["failOpen"] is False for w in eep["spec"]["wasm"])
    for p in wasm_plugins(docs):
        assert p["image"].split("/")[-1].split(":")[0] == p["root_id"].replace("_", "-"), p


def test_page_guard_may_hold_the_response_headers_on_both_platforms():
    """page_guard needs allow_on_headers_stop_iteration: the Istio EnvoyFilter sets it, and the
    EnvoyPatchPolicy sets it on the filter Envoy Gateway generates for page_guard's entry."""
    docs = manifests(DEPLOY)
    plugins = wasm_plugins(docs)
    holding = {p["kind"] for p in plugins if p["root_id"] == "page_guard" and p["allow_on_headers_stop_iteration"]}
    assert holding == {"EnvoyFilter", "EnvoyExtensionPolicy"}
    assert not any(p["allow_on_headers_stop_iteration"] for p in plugins if p["root_id"] != "page_guard")
    [eep] = [d for _, d in docs if d["kind"] == "EnvoyExtensionPolicy"]
    [epp] = [d for _, d in docs if d["kind"] == "EnvoyPatchPolicy"]
    assert epp["spec"]["targetRef"] == eep["spec"]["targetRefs"][0]


def test_the_secret_reaches_every_variable_a_plugin_reads():
    """Each variable a VM takes from the host is set from the Secret in that platform's Envoy."""
    docs = manifests(DEPLOY)
    istio_env = yaml.safe_load((DEPLOY / "istio" / "gateway-env.patch.yaml").read_text())
    [container] = istio_env["spec"]["template"]["spec"]["containers"]
    [proxy] = [d for _, d in docs if d["kind"] == "EnvoyProxy"]
    eg_env = proxy["spec"]["provider"]["kubernetes"]["envoyDeployment"]["container"]["env"]
    from_secret = {
        "WasmPlugin": {e["name"] for e in container["env"] if e["valueFrom"]["secretKeyRef"]["name"] == SECRET},
        "EnvoyFilter": set(),
        "EnvoyExtensionPolicy": {e["name"] for e in eg_env if e["valueFrom"]["secretKeyRef"]["name"] == SECRET},
    }
    for p in wasm_plugins(docs):
        referenced = set(re.findall(r"GATEHOUSE_[A-Z_]+", json.dumps(p["config"])))
        assert referenced <= set(p["env"]), (p["root_id"], "reads a variable its VM does not get")
        assert set(p["env"]) <= from_secret[p["kind"]], p


def test_rendered_images_are_the_built_ones_by_digest(rendered):
    images, out = rendered
    docs = manifests(out)
    text = "".join(p.read_text() for p in out.rglob("*.yaml"))
    assert "registry.example.com" not in text and "0" * 64 not in text
    plugins = wasm_plugins(docs)
    assert len(plugins) == 10
    for p in plugins:
        repo, digest = p["image"].split("@")
        module = repo.removeprefix("registry.test:5000/gh/")
        assert digest == images["modules"][module]["oci"]["digest"], p["root_id"]
        assert p["sha256"] == digest.removeprefix("sha256:"), p["root_id"]


def test_every_plugin_config_compiles(tmp_path):
    """`gatehouse check` on the Wasm filter each plugin becomes (config as a JSON StringValue, the
    manifest's host variables listed, the Secret's values in the environment)."""
    if not CLI.exists():
        missing("target/release/gatehouse (run `cargo xtask build`)")
    filters = []
    for p in wasm_plugins(manifests(DEPLOY)):
        filters.append({"name": f"{p['kind']}.{p['root_id']}", "typed_config": {"@type": WASM_FILTER, "config": {
            "root_id": p["root_id"],
            "allow_on_headers_stop_iteration": p["allow_on_headers_stop_iteration"],
            "vm_config": {"runtime": "envoy.wasm.runtime.v8",
                          "code": {"local": {"filename": f"dist/{p['root_id'].replace('_', '-')}.wasm"}},
                          "environment_variables": {"host_env_keys": p["env"]}},
            "configuration": {"@type": STRING_VALUE, "value": json.dumps(p["config"])}}}})
    config = tmp_path / "plugins.json"
    config.write_text(json.dumps({"http_filters": filters}))
    run = subprocess.run([str(CLI), "check", str(config), "--root", str(ROOT)], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", **ENV})
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("ok ") == 10, run.stdout

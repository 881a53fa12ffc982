"""`cargo xtask package`: the OCI images reach a real registry and come back with the same .wasm.

The images are pushed (by skopeo, as `package --registry` does) to a real OCI registry (Debian
`docker-registry`) on loopback, then read back by digest by two clients that are not skopeo: the
Python `oras` client for the Wasm OCI artifact, and plain registry API GETs for the compat image
(the way Istio and Envoy Gateway unpack it: the one tar+gzip layer holding `plugin.wasm`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile

import pytest
import requests

from conftest import DIST, ROOT, free_port, missing, wait_for

MODULES = ["gatehouse", "jwt-auth", "token-proxy", "session-binding", "turn-credentials", "page-guard"]
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """HOST:PORT of a fresh docker-registry on loopback (only its own PID is killed)."""
    binary = shutil.which("docker-registry")
    if binary is None:
        missing("docker-registry (apt-get install docker-registry)")
    if shutil.which("skopeo") is None:
        missing("skopeo (apt-get install skopeo)")
    work = tmp_path_factory.mktemp("registry")
    port = free_port()
    (work / "config.yml").write_text(
        "version: 0.1\n"
        f"storage:\n  filesystem:\n    rootdirectory: {work / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log = work / "registry.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, "serve", str(work / "config.yml")], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code == 200,
                 15, "docker-registry", proc, log)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def packaged(registry, tmp_path_factory):
    """Run the packaging step of `cargo xtask package --registry … --insecure` on dist/."""
    for m in MODULES:
        if not (DIST / f"{m}.wasm").exists():
            missing(f"dist/{m}.wasm (run `cargo xtask build`)")
    out = tmp_path_factory.mktemp("package")
    subprocess.run([sys.executable, str(ROOT / "xtask" / "package.py"), "--registry", f"{registry}/gatehouse",
                    "--tag", "t1", "--insecure", "--out", str(out)], check=True, cwd=ROOT)
    return json.loads((out / "images.json").read_text()), out


def get_manifest(registry: str, repo: str, digest: str) -> dict:
    r = requests.get(f"http://{registry}/v2/{repo}/manifests/{digest}", headers={"Accept": OCI_MANIFEST}, timeout=10)
    r.raise_for_status()
    assert sha256(r.content) == digest.removeprefix("sha256:"), "the manifest is not the one its digest names"
    return r.json()


def get_blob(registry: str, repo: str, desc: dict) -> bytes:
    r = requests.get(f"http://{registry}/v2/{repo}/blobs/{desc['digest']}", timeout=30)
    r.raise_for_status()
    assert sha256(r.content) == desc["digest"].removeprefix("sha256:")
    assert len(r.content) == desc["size"]
    return r.content


def test_every_module_is_listed_with_its_wasm_sha256(packaged):
    images, _ = packaged
    assert sorted(images["modules"]) == sorted(MODULES)
    for m, built in images["modules"].items():
        assert built["sha256"] == sha256((DIST / f"{m}.wasm").read_bytes())
        assert built["oci"]["digest"] != built["compat"]["digest"]


def test_the_wasm_artifact_pulled_by_digest_with_oras_is_the_module(packaged, registry, tmp_path):
    import oras.client

    images, _ = packaged
    client = oras.client.OrasClient(hostname=registry, insecure=True)
    for m, built in images["modules"].items():
        ref = built["oci"]["by_digest"]
        manifest = client.get_manifest(ref)
        assert manifest["config"]["mediaType"] == "application/vnd.module.wasm.config.v1+json"
        [layer] = manifest["layers"]
        assert layer["mediaType"] == "application/vnd.module.wasm.content.layer.v1+wasm"
        [pulled] = client.pull(target=ref, outdir=str(tmp_path / m))
        assert sha256(open(pulled, "rb").read()) == built["sha256"], m


def test_the_compat_image_pulled_by_digest_holds_plugin_wasm(packaged, registry):
    images, _ = packaged
    for m, built in images["modules"].items():
        repo = f"gatehouse/{m}"
        manifest = get_manifest(registry, repo, built["compat"]["digest"])
        assert manifest["annotations"]["module.wasm.image/variant"] == "compat"
        [layer] = manifest["layers"]
        assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        config = json.loads(get_blob(registry, repo, manifest["config"]))
        tar_bytes = gzip.decompress(get_blob(registry, repo, layer))
        assert config["rootfs"]["diff_ids"] == ["sha256:" + sha256(tar_bytes)]
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            assert tar.getnames() == ["plugin.wasm"]
            wasm = tar.extractfile("plugin.wasm").read()
        assert sha256(wasm) == built["sha256"], m


def test_tags_name_the_same_images_as_the_digests(packaged, registry):
    images, _ = packaged
    built = images["modules"]["gatehouse"]
    for variant in ("oci", "compat"):
        r = requests.head(f"http://{registry}/v2/gatehouse/gatehouse/manifests/{built[variant]['tag']}",
                          headers={"Accept": OCI_MANIFEST}, timeout=10)
        assert r.headers["Docker-Content-Digest"] == built[variant]["digest"]


def test_packaging_is_reproducible(packaged, tmp_path):
    """The digests depend only on the .wasm bytes: a second run without a push gives the same."""
    images, _ = packaged
    subprocess.run([sys.executable, str(ROOT / "xtask" / "package.py"), "--tag", "t1", "--out", str(tmp_path)],
                   check=True, cwd=ROOT, capture_output=True)
    again = json.loads((tmp_path / "images.json").read_text())
    for m in MODULES:
        for variant in ("oci", "compat"):
            assert again["modules"][m][variant]["digest"] == images["modules"][m][variant]["digest"]

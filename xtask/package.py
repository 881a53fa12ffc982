#!/usr/bin/env python3
"""`cargo xtask package`: the OCI images of every module in dist/, without a Docker daemon.

For each dist/<module>.wasm it writes one OCI image layout, dist/oci/<module>/, holding two
images (the two formats Istio's WasmPlugin and Envoy Gateway's EnvoyExtensionPolicy pull):

- tag `<tag>`: the Wasm OCI artifact ("oci" variant of the Wasm image spec): config
  `application/vnd.module.wasm.config.v1+json`, one layer
  `application/vnd.module.wasm.content.layer.v1+wasm` that is the .wasm file itself;
- tag `<tag>-compat`: the "compat" image: a standard OCI image with one tar+gzip layer holding
  `plugin.wasm`, annotated `module.wasm.image/variant: compat`.

The files are written byte-for-byte reproducibly (no timestamps), so the digests depend only on
the .wasm bytes. With --registry the layouts are pushed by `skopeo copy --preserve-digests` (a
kept client speaks the registry protocol, not this script). dist/images.json lists, per module,
the .wasm sha256 and both images' digests and references; dist/deploy/ is deploy/ with the
placeholder images and sha256 replaced by the built Wasm OCI artifacts (by digest) and their
manifest digests (what Istio and Envoy Gateway compare `sha256` with for an image).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "dist"
OUT = DIST  # where oci/, images.json and deploy/ go (--out)
MODULES = ["gatehouse", "jwt-auth", "token-proxy", "session-binding", "turn-credentials", "page-guard"]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
WASM_CONFIG = "application/vnd.module.wasm.config.v1+json"
WASM_LAYER = "application/vnd.module.wasm.content.layer.v1+wasm"
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
TAR_GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

# What deploy/ says where a built image belongs (see docs/kubernetes.md): a reference to
# `registry.example.com/gatehouse/<module>:latest`, and on a later line the sha256 of that image.
PLACEHOLDER_REGISTRY = "registry.example.com/gatehouse"
PLACEHOLDER_IMAGE = re.compile(re.escape(PLACEHOLDER_REGISTRY) + r"/([a-z-]+):latest")
PLACEHOLDER_SHA256 = "0" * 64


def shown(path: Path) -> str:
    """`path` relative to the repository when it is inside it (dist/oci/…), else as is."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def canonical(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


class Layout:
    """An OCI image layout directory (image-layout spec): oci-layout, index.json, blobs/."""

    def __init__(self, path: Path):
        if path.exists():
            shutil.rmtree(path)
        (path / "blobs" / "sha256").mkdir(parents=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self.path = path
        self.manifests: list[dict] = []

    def blob(self, data: bytes, media_type: str, annotations: dict | None = None) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (self.path / "blobs" / "sha256" / digest).write_bytes(data)
        desc = {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}
        if annotations:
            desc["annotations"] = annotations
        return desc

    def image(self, tag: str, config: dict, annotations: dict | None = None) -> str:
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, **config}
        if annotations:
            manifest["annotations"] = annotations
        desc = self.blob(canonical(manifest), OCI_MANIFEST)
        desc["annotations"] = {"org.opencontainers.image.ref.name": tag}
        self.manifests.append(desc)
        return desc["digest"]

    def close(self):
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": self.manifests}
        (self.path / "index.json").write_bytes(canonical(index))


def plugin_tar_gz(wasm: bytes) -> tuple[bytes, str]:
    """The compat layer (gzip of a tar with plugin.wasm) and its diff_id (sha256 of the tar)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("plugin.wasm")
        info.size = len(wasm)
        info.mode = 0o444
        info.mtime = 0
        tar.addfile(info, io.BytesIO(wasm))
    tar_bytes = raw.getvalue()
    compressed = gzip.compress(tar_bytes, compresslevel=9, mtime=0)
    return compressed, "sha256:" + hashlib.sha256(tar_bytes).hexdigest()


def package(module: str, tag: str) -> dict:
    wasm = (DIST / f"{module}.wasm").read_bytes()
    layout = Layout(OUT / "oci" / module)
    title = {"org.opencontainers.image.title": f"{module}.wasm"}

    wasm_digest = layout.image(tag, {
        "config": layout.blob(b"{}", WASM_CONFIG),
        "layers": [layout.blob(wasm, WASM_LAYER, title)],
    })

    layer, diff_id = plugin_tar_gz(wasm)
    config = {"architecture": "wasm", "os": "wasip1", "config": {},
              "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
    compat_digest = layout.image(f"{tag}-compat", {
        "config": layout.blob(canonical(config), IMAGE_CONFIG),
        "layers": [layout.blob(layer, TAR_GZIP_LAYER)],
    }, {"module.wasm.image/variant": "compat"})
    layout.close()
    return {
        "wasm": f"dist/{module}.wasm",
        "sha256": hashlib.sha256(wasm).hexdigest(),
        "size": len(wasm),
        "layout": shown(OUT / "oci" / module),
        "oci": {"tag": tag, "digest": wasm_digest},
        "compat": {"tag": f"{tag}-compat", "digest": compat_digest},
    }


def push(module: str, image: dict, registry: str, insecure: bool):
    dest = f"{registry}/{module}"
    args = ["skopeo", "copy", "--quiet", "--preserve-digests"]
    if insecure:
        args.append("--dest-tls-verify=false")
    args += [f"oci:{OUT / 'oci' / module}:{image['tag']}", f"docker://{dest}:{image['tag']}"]
    subprocess.run(args, check=True)


def render(text: str, images: dict, registry: str) -> str:
    """One deploy/ manifest with each placeholder image replaced by the built one (by digest)
    and each placeholder sha256 by the digest of the image named last before it."""
    module = None
    out = []
    for line in text.splitlines(keepends=True):
        found = PLACEHOLDER_IMAGE.search(line)
        if found:
            module = found.group(1)
            digest = images["modules"][module]["oci"]["digest"]
            line = line.replace(found.group(0), f"{registry}/{module}@{digest}")
        elif PLACEHOLDER_SHA256 in line:
            if module is None:
                raise SystemExit(f"xtask: a placeholder sha256 before any image: {line.strip()}")
            line = line.replace(PLACEHOLDER_SHA256, images["modules"][module]["oci"]["digest"].removeprefix("sha256:"))
        out.append(line)
    return "".join(out)


def render_deploy(images: dict, registry: str):
    """<out>/deploy/: deploy/ with the built images in place of the placeholders."""
    src, out = ROOT / "deploy", OUT / "deploy"
    if out.exists():
        shutil.rmtree(out)
    for path in sorted(src.rglob("*")):
        target = out / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        text = path.read_text()
        target.write_text(render(text, images, registry) if path.suffix in (".yaml", ".yml") else text)


def main() -> int:
    p = argparse.ArgumentParser(prog="cargo xtask package")
    p.add_argument("--registry", help="HOST[:PORT]/REPO to push to (default: no push)")
    p.add_argument("--tag", required=True)
    p.add_argument("--insecure", action="store_true",
                   help="plain HTTP / unverified TLS to the registry (a local test registry)")
    p.add_argument("--no-push", action="store_true",
                   help="name --registry in images.json and dist/deploy/ but push nothing")
    p.add_argument("--out", type=Path, default=DIST, help="instead of dist/ (tests)")
    a = p.parse_args()
    global OUT
    OUT = a.out.resolve()
    pushing = bool(a.registry) and not a.no_push
    if pushing and not shutil.which("skopeo"):
        print("xtask: `skopeo` is not installed (try: apt-get install skopeo)", file=sys.stderr)
        return 1
    registry = a.registry or PLACEHOLDER_REGISTRY
    images = {"tag": a.tag, "registry": registry, "pushed": pushing, "modules": {}}
    for module in MODULES:
        built = package(module, a.tag)
        for variant in ("oci", "compat"):
            ref = f"{registry}/{module}"
            built[variant]["reference"] = f"{ref}:{built[variant]['tag']}"
            built[variant]["by_digest"] = f"{ref}@{built[variant]['digest']}"
            if pushing:
                push(module, built[variant], a.registry, a.insecure)
        images["modules"][module] = built
        print(f"xtask: {module}.wasm sha256:{built['sha256']}")
        print(f"         {built['oci']['by_digest']}  (Wasm OCI artifact, tag {built['oci']['tag']})")
        print(f"         {built['compat']['by_digest']}  (compat image, tag {built['compat']['tag']})")
    (OUT / "images.json").write_text(json.dumps(images, indent=2) + "\n")
    render_deploy(images, registry)
    print(f"xtask: wrote {shown(OUT)}/images.json, oci/, deploy/" + ("" if pushing else
          " (nothing pushed: give --registry HOST/REPO)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

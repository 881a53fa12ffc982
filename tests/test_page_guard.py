"""page-guard in real Envoy: the security headers, a fresh nonce per HTML response written only
into marked tags (also when a tag arrives split across body chunks), SRI integrity from the
manifest, Content-Length fixed, compressed bodies untouched, bodies over the cap streamed, and
the local CSP report endpoint."""

from __future__ import annotations

import gzip
import json
import re

import pytest
import requests

from pages import Page, Pages, sri

PLACEHOLDER = "GH_TEST_PLACEHOLDER_7f3a9c2e"
GOOD_JS = b"window.good = 1;\n"
ORIGINAL_JS = b"window.tampered = 'original';\n"


def config(pages_sri: dict, **over) -> dict:
    cfg = {
        "csp": {
            "default-src": ["'self'"],
            "script-src": [],
            "connect-src": ["'self'", "wss://signal.example"],
            "frame-ancestors": ["'none'"],
            "base-uri": ["'none'"],
            "object-src": ["'none'"],
        },
        "nonce": {"placeholder": PLACEHOLDER},
        "sri": {"manifest": pages_sri},
        "permissions_policy": {"microphone": ["self"], "camera": ["self"], "geolocation": []},
        "reports": {"path": "/_gatehouse/csp"},
        "remove_headers": ["x-powered-by"],
        "max_body_bytes": 65536,
        "rules": [{"match": {"prefix": "/off/"}, "disabled": True}],
    }
    cfg.update(over)
    return cfg


PAGE = f"""<!doctype html>
<html><head><title>guarded</title>
<link rel="stylesheet" href="/good.css">
<script nonce="{PLACEHOLDER}">window.marked = 1;</script>
<script>window.injected = 1;</script>
<script nonce="{PLACEHOLDER}" src="/good.js"></script>
<script nonce="{PLACEHOLDER}" src="/tampered.js"></script>
<script nonce="{PLACEHOLDER}" src="/unlisted.js"></script>
</head><body><p>{PLACEHOLDER}</p><script>var s = "<script nonce='{PLACEHOLDER}'>";</script></body></html>
"""


def upstream_pages() -> Pages:
    """The upstream of these tests: PAGE and the scripts and stylesheet it loads."""
    p = Pages()
    p.routes["/page"] = Page(PAGE)
    p.routes["/good.js"] = Page(GOOD_JS, "text/javascript")
    p.routes["/good.css"] = Page(b"p { color: green; }\n", "text/css")
    # The manifest has the hash of ORIGINAL_JS; the upstream serves other bytes.
    p.routes["/tampered.js"] = Page(b"window.tampered = 'evil';\n", "text/javascript")
    p.routes["/unlisted.js"] = Page(b"window.unlisted = 1;\n", "text/javascript")
    return p


@pytest.fixture(scope="module")
def pages():
    p = upstream_pages()
    yield p
    p.stop()


def manifest() -> dict:
    return {
        "/good.js": sri(GOOD_JS),
        "/good.css": sri(b"p { color: green; }\n"),
        "/tampered.js": sri(ORIGINAL_JS),
    }


def routes():
    return [{"name": "pages", "match": {"prefix": "/"}, "route": {"cluster": "pages", "timeout": "0s"}}]


@pytest.fixture(scope="module")
def gw(demo, pages, envoy_factory):
    return envoy_factory(demo, page_guard=config(manifest()), extra_clusters={"pages": pages.port}, routes=routes())


def nonce_of(resp) -> str:
    m = re.search(r"'nonce-([A-Za-z0-9+/=]+)'", resp.headers["content-security-policy"])
    assert m, resp.headers["content-security-policy"]
    return m.group(1)


def test_headers_of_a_guarded_page(gw):
    r = requests.get(gw.url + "/page", timeout=5)
    assert r.status_code == 200
    h = r.headers
    csp = h["content-security-policy"]
    nonce = nonce_of(r)
    assert f"script-src 'nonce-{nonce}'" in csp
    assert f"style-src 'self' 'nonce-{nonce}'" in csp
    for d in ["connect-src 'self' wss://signal.example", "frame-ancestors 'none'", "base-uri 'none'",
              "object-src 'none'", "report-uri /_gatehouse/csp", "report-to gatehouse-csp"]:
        assert d in csp, csp
    assert h["permissions-policy"] == "camera=(self), geolocation=(), microphone=(self)"
    assert h["referrer-policy"] == "strict-origin-when-cross-origin"
    assert h["x-content-type-options"] == "nosniff"
    assert h["cross-origin-opener-policy"] == "same-origin"
    assert h["reporting-endpoints"] == 'gatehouse-csp="/_gatehouse/csp"'
    assert h["integrity-policy"] == "blocked-destinations=(script), endpoints=(gatehouse-csp)"
    assert "strict-transport-security" not in h, "plain http"
    # Two responses, two nonces (128 bits each).
    again = nonce_of(requests.get(gw.url + "/page", timeout=5))
    assert again != nonce
    assert len(__import__("base64").b64decode(nonce)) == 16


def test_body_rewritten_and_content_length_fixed(gw, pages):
    r = requests.get(gw.url + "/page", timeout=5)
    nonce = nonce_of(r)
    body = r.text
    assert PLACEHOLDER not in body
    assert int(r.headers["content-length"]) == len(r.content)
    assert body.count(f'nonce="{nonce}"') == 4, body
    assert "<script>window.injected = 1;</script>" in body, "an unmarked script gets no nonce"
    assert f'<script integrity="{sri(GOOD_JS)}" crossorigin="anonymous" nonce="{nonce}" src="/good.js">' in body
    assert f'<link integrity="{sri(b"p { color: green; }" + bytes([10]))}" crossorigin="anonymous" rel="stylesheet"' in body
    assert 'src="/unlisted.js"' in body and body.count("integrity=") == 3
    # The script body keeps its text; the placeholder inside it is removed, not replaced.
    assert "var s = \"<script nonce=''>\";" in body
    # The upstream was asked for an uncompressed body.
    assert pages.requests[-1][1].get("accept-encoding") == "identity"
    stats = gw.stats()
    assert stats["wasmcustom.gatehouse.page_guard.rewritten"] >= 1
    assert stats["wasmcustom.gatehouse.page_guard.placeholder_removed"] >= 1


def test_tags_split_across_chunks(gw, pages):
    body = PAGE.encode()
    # Cut inside the marked tags, inside the placeholder, inside `</script>`, every few bytes.
    cuts = sorted({m.start() + k for m in re.finditer(re.escape(PLACEHOLDER.encode()), body) for k in (3, 10)}
                  | set(range(7, len(body), 37)))
    pages.routes["/split"] = Page(PAGE, chunks=cuts)
    r = requests.get(gw.url + "/split", timeout=10)
    nonce = nonce_of(r)
    expected = requests.get(gw.url + "/page", timeout=5)
    assert r.text.replace(nonce, "N") == expected.text.replace(nonce_of(expected), "N")
    assert int(r.headers["content-length"]) == len(r.content), "buffered: Content-Length set"


def test_compressed_html_is_left_alone(gw, pages):
    gz = gzip.compress(PAGE.encode())
    pages.routes["/gz"] = Page(gz, headers={"content-encoding": "gzip"})
    raw = requests.get(gw.url + "/gz", timeout=5, stream=True)
    assert raw.raw.read(decode_content=False) == gz, "the compressed body is never touched"
    # No nonce was written, so none is allowed: marked scripts stay blocked (fail closed).
    assert "'nonce-" not in raw.headers["content-security-policy"]
    assert gw.stats()["wasmcustom.gatehouse.page_guard.skipped.compressed"] >= 1


def test_over_the_cap_streams_and_still_rewrites(gw, pages):
    filler = "<p>" + "x" * 1000 + "</p>\n"
    big = PAGE.replace("<body>", "<body>" + filler * 100)  # ~100 KB > the 64 KB cap
    pages.routes["/big"] = Page(big)
    pages.routes["/big-chunked"] = Page(big, chunks=list(range(8192, len(big), 8192)))
    for path in ["/big", "/big-chunked"]:
        r = requests.get(gw.url + path, timeout=10)
        nonce = nonce_of(r)
        assert r.headers.get("content-length") is None or int(r.headers["content-length"]) == len(r.content)
        assert PLACEHOLDER not in r.text
        assert r.text.count(f'nonce="{nonce}"') == 4
        assert len(r.text) > 100_000
    assert gw.stats()["wasmcustom.gatehouse.page_guard.over_cap"] >= 2


@pytest.mark.parametrize("size", ["small", "over_the_cap"])
def test_a_page_with_trailers_is_rewritten_too(demo, pages, envoy_factory, size):
    """An upstream that ends the body with trailers: the last body chunk is not the end of the
    stream, the trailers are. The page must still be rewritten, never forwarded as it was."""
    from conftest import cluster

    with_trailers = cluster("pages", pages.port)
    with_trailers["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http_protocol_options": {"enable_trailers": True}}}}
    gw = envoy_factory(demo, page_guard=config(manifest()), extra_clusters={"pages": with_trailers}, routes=routes())
    body = PAGE if size == "small" else PAGE.replace("<body>", "<body>" + ("<p>" + "x" * 1000 + "</p>\n") * 100)
    pages.routes["/trailers"] = Page(body, chunks=list(range(8192, len(body), 8192)), trailers={"x-checksum": "abc"})
    r = requests.get(gw.url + "/trailers", timeout=10)
    assert r.status_code == 200
    nonce = nonce_of(r)
    assert PLACEHOLDER not in r.text, "the placeholder never reaches the browser"
    assert r.text.count(f'nonce="{nonce}"') == 4
    assert r.headers.get("content-length") is None or int(r.headers["content-length"]) == len(r.content)


def test_non_html_and_disabled_routes(gw, pages):
    r = requests.get(gw.url + "/good.js", timeout=5)
    assert r.content == GOOD_JS
    assert "'nonce-" not in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"
    pages.routes["/off/page"] = Page(PAGE, headers={"x-powered-by": "upstream"})
    r = requests.get(gw.url + "/off/page", timeout=5)
    assert "content-security-policy" not in r.headers
    assert r.headers["x-powered-by"] == "upstream"
    pages.routes["/powered"] = Page(PAGE, headers={"x-powered-by": "upstream"})
    assert "x-powered-by" not in requests.get(gw.url + "/powered", timeout=5).headers


def test_upstream_csp_replaced_or_merged(demo, pages, envoy_factory):
    pages.routes["/own-csp"] = Page(PAGE, headers={"content-security-policy": "img-src 'none'",
                                                   "referrer-policy": "no-referrer"})
    gw = envoy_factory(demo, page_guard=config(manifest(), upstream_headers="merge"),
                       extra_clusters={"pages": pages.port}, routes=routes())
    r = requests.get(gw.url + "/own-csp", timeout=5)
    csps = r.raw.headers.getlist("content-security-policy")
    assert len(csps) == 2 and "img-src 'none'" in csps, csps
    assert r.headers["referrer-policy"] == "no-referrer"


def test_hsts_only_over_https_or_from_a_trusted_hop(demo, pages, envoy_factory):
    """Plain http gets no Strict-Transport-Security; behind a TLS-terminating proxy the filter is
    told to trust, `x-forwarded-proto: https` counts as https."""
    trusting = envoy_factory(demo, page_guard=config(manifest(), trust_forwarded_proto=True),
                             extra_clusters={"pages": pages.port}, routes=routes())
    r = requests.get(trusting.url + "/page", headers={"x-forwarded-proto": "https"}, timeout=5)
    assert r.headers["strict-transport-security"].startswith("max-age="), r.headers
    assert "strict-transport-security" not in requests.get(trusting.url + "/page", timeout=5).headers


def test_a_client_cannot_claim_https_to_a_filter_that_does_not_trust_the_hop(gw):
    r = requests.get(gw.url + "/page", headers={"x-forwarded-proto": "https"}, timeout=5)
    assert "strict-transport-security" not in r.headers


def test_csp_report_endpoint(gw, pages):
    before = len(pages.requests)
    csp2 = {"csp-report": {"document-uri": "http://127.0.0.1/page", "effective-directive": "script-src-elem",
                           "violated-directive": "script-src-elem", "blocked-uri": "inline", "disposition": "enforce"}}
    r = requests.post(gw.url + "/_gatehouse/csp", data=json.dumps(csp2),
                      headers={"content-type": "application/csp-report"}, timeout=5)
    assert r.status_code == 204
    api = [{"type": "csp-violation", "age": 0, "url": "http://127.0.0.1/page",
            "body": {"effectiveDirective": "connect-src", "blockedURL": "wss://evil", "documentURL": "http://127.0.0.1/page",
                     "disposition": "enforce"}}]
    r = requests.post(gw.url + "/_gatehouse/csp", data=json.dumps(api),
                      headers={"content-type": "application/reports+json"}, timeout=5)
    assert r.status_code == 204
    r = requests.post(gw.url + "/_gatehouse/csp", data="nope", headers={"content-type": "text/plain"}, timeout=5)
    assert r.status_code == 204
    assert requests.get(gw.url + "/_gatehouse/csp", timeout=5).status_code == 405
    assert len(pages.requests) == before, "reports are never forwarded upstream"
    stats = gw.stats()
    assert stats["wasmcustom.gatehouse.page_guard.report.script-src-elem"] >= 1
    assert stats["wasmcustom.gatehouse.page_guard.report.connect-src"] >= 1
    assert stats["wasmcustom.gatehouse.page_guard.report.invalid.content_type"] >= 1
    assert "violation of script-src-elem" in gw.log_text()


def test_a_bad_config_stops_the_filter_with_one_clear_line(demo, pages, envoy_factory):
    with pytest.raises(RuntimeError) as e:
        envoy_factory(demo, page_guard=config(manifest(), csp={"script-src": ["self"]}),
                      extra_clusters={"pages": pages.port}, routes=routes())
    assert "config error at csp.script-src[0]: CSP keywords are quoted" in str(e.value)

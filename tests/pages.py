"""Small upstreams the tests define, on 127.0.0.1 only:

- `Pages`: pages for the page-guard tests, optionally in separate chunks (so a tag arrives split
  across body chunks), gzip-encoded, or with upstream security headers; like a static file
  server it honours `Range` (one range: a 206 with Content-Range; several: a 206
  `multipart/byteranges`), so a test can show what a partial reply would hand out;
- `JsonDocument`: one JSON document a filter fetches through an Envoy cluster (a remote JWKS, a
  revocation feed), which the test changes, counts fetches of, and takes down."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import posixpath
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

def sri(data: bytes) -> str:
    return "sha384-" + base64.b64encode(hashlib.sha384(data).digest()).decode()

def ranges(header: str | None, size: int) -> list[tuple[int, int]]:
    """`Range: bytes=0-0,5-` → [(0, 0), (5, size - 1)] (inclusive); [] when absent or unusable."""
    if not header or not header.strip().startswith("bytes="):
        return []
    out = []
    for spec in header.strip()[len("bytes="):].split(","):
        first, _, last = spec.strip().partition("-")
        try:
            if first:
                a, b = int(first), (int(last) if last else size - 1)
            else:
                a, b = size - int(last), size - 1
        except ValueError:
            return []
        if a > b or a >= size:
            return []
        out.append((max(a, 0), min(b, size - 1)))
    return out


class Page:
    def __init__(self, body: bytes | str, content_type: str = "text/html; charset=utf-8",
                 chunks: list[int] | None = None, headers: dict[str, str] | None = None, status: int = 200,
                 trailers: dict[str, str] | None = None):
        self.body = body.encode() if isinstance(body, str) else body
        self.content_type = content_type
        self.chunks = chunks  # cut points: sent with Transfer-Encoding: chunked, a pause between
        self.headers = headers or {}
        self.status = status
        self.trailers = trailers or {}  # sent after the last chunk (chunked encoding)

class Pages:
    """`pages.routes[path] = Page(...)`; `pages.port`; `pages.requests` records (path, headers)."""

    def __init__(self):
        self.routes: dict[str, Page] = {}
        self.requests: list[tuple[str, dict]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                # Like a file server, resolve dot-segments and encoded separators (`/a/../b`,
                # `%2e%2e`, `%2f`) before looking the page up.
                path = self.path.split("?")[0]
                page = outer.routes.get(path) or outer.routes.get(posixpath.normpath(unquote(path)))
                if page is None:
                    self.send_response(404)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                # `Request-Range`: the old spelling Apache httpd still honours.
                parts = ranges(self.headers.get("range") or self.headers.get("request-range"), len(page.body))
                if parts and page.status == 200 and page.chunks is None and not page.trailers:
                    self.send_partial(page, parts)
                    return
                self.send_response(page.status)
                self.send_header("content-type", page.content_type)
                for k, v in page.headers.items():
                    self.send_header(k, v)
                if page.chunks is None and not page.trailers:
                    self.send_header("content-length", str(len(page.body)))
                    self.end_headers()
                    self.wfile.write(page.body)
                    return
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                cuts = [0] + (page.chunks or []) + [len(page.body)]
                for a, b in zip(cuts, cuts[1:]):
                    if b > a:
                        self.wfile.write(b"%x\r\n%s\r\n" % (b - a, page.body[a:b]))
                        self.wfile.flush()
                        time.sleep(0.05)
                self.wfile.write(b"0\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in page.trailers.items()) + b"\r\n")
                self.wfile.flush()

            def send_partial(self, page, parts):
                if len(parts) == 1:
                    a, b = parts[0]
                    body = page.body[a:b + 1]
                    self.send_response(206)
                    self.send_header("content-type", page.content_type)
                    self.send_header("content-range", f"bytes {a}-{b}/{len(page.body)}")
                else:
                    boundary = "GH_BYTERANGES"
                    body = b"".join(
                        f"--{boundary}\r\ncontent-type: {page.content_type}\r\n"
                        f"content-range: bytes {a}-{b}/{len(page.body)}\r\n\r\n".encode() + page.body[a:b + 1] + b"\r\n"
                        for a, b in parts) + f"--{boundary}--\r\n".encode()
                    self.send_response(206)
                    self.send_header("content-type", f"multipart/byteranges; boundary={boundary}")
                for k, v in page.headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class LocalServer:
    """A local HTTP server on a free loopback port: every GET and POST is answered by
    `answer(method, path, host, body) -> (status, body)` as JSON; `stop()` takes it down."""

    def __init__(self, answer):
        class Handler(BaseHTTPRequestHandler):
            def reply(self, method: str):
                sent = self.rfile.read(int(self.headers.get("content-length", 0) or 0))
                status, body = answer(method, self.path, self.headers.get("host"), sent)
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self.reply("GET")

            def do_POST(self):
                self.reply("POST")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.up = True

    def stop(self):
        if self.up:
            self.up = False
            self.httpd.shutdown()
            self.httpd.server_close()


class JsonDocument(LocalServer):
    """Answers every GET with `document` as JSON; `fetches` counts them; `stop()` takes it down."""

    def __init__(self, document):
        self.document = document
        self.fetches = 0

        def answer(method, path, host, body):
            self.fetches += 1
            return 200, json.dumps(self.document).encode()

        super().__init__(answer)

"""Small upstreams the tests define, on 127.0.0.1 only:

- `Pages`: pages for the page-guard tests, optionally in separate chunks (so a tag arrives split
  across body chunks), gzip-encoded, or with upstream security headers;
- `JsonDocument`: one JSON document a filter fetches through an Envoy cluster (a remote JWKS, a
  revocation feed), which the test changes, counts fetches of, and takes down."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

def sri(data: bytes) -> str:
    return "sha384-" + base64.b64encode(hashlib.sha384(data).digest()).decode()

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
                page = outer.routes.get(self.path.split("?")[0])
                if page is None:
                    self.send_response(404)
                    self.send_header("content-length", "0")
                    self.end_headers()
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

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class JsonDocument:
    """Answers every GET with `document` as JSON; `fetches` counts them; `stop()` takes it down."""

    def __init__(self, document):
        self.document = document
        self.fetches = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.fetches += 1
                body = json.dumps(outer.document).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

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

"""The demo upstream itself (target/release/gatehouse-demo), on loopback without Envoy."""

import socket
import time


def read_response(sock: socket.socket) -> bytes:
    """One HTTP/1.1 response with a Content-Length body; b"" if the connection ended first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return b""
        body += chunk
    return head + b"\r\n\r\n" + body


def test_the_echo_keeps_the_connection_when_the_body_comes_after_the_headers(demo):
    """A POST whose body arrives after its headers (as a proxy may forward it): the echo reads the
    body, answers, and the keep-alive connection takes the next request. Answering without reading
    the body made the server close the connection after the response without `Connection: close`,
    and Envoy, reusing it meanwhile, answered the next request 503 "upstream connect error …
    connection termination" (the soak's upstream resets, docs/performance.md)."""
    with socket.create_connection(("127.0.0.1", demo.port), timeout=5) as sock:
        sock.sendall(b"POST /api/echo HTTP/1.1\r\nhost: demo\r\ncontent-length: 3\r\n\r\n")
        time.sleep(0.1)
        sock.sendall(b"abc")
        first = read_response(sock)
        assert first.startswith(b"HTTP/1.1 200"), first
        assert b"connection: close" not in first.lower()
        time.sleep(0.1)
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: demo\r\n\r\n")
            second = read_response(sock)
        except (BrokenPipeError, ConnectionResetError):
            second = b""
        assert second.startswith(b"HTTP/1.1 200"), "the demo closed the keep-alive connection after the POST"
    assert b'"body_bytes":3' in first, "the echo counts the body it read"

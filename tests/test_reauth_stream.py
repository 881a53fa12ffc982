"""In-band re-auth scanning in real Envoy, at the TCP level: the client's frames arrive in many
small segments, big frames pass through byte-exact, a re-auth frame cut across segments is still
taken out and applied, and a complete frame goes on at once even when the start of the next one
(a possible re-auth frame) is in the same segment. Frames are written by hand over a raw socket
so the test controls the segmentation (a WebSocket library would send each frame in one write)."""

from __future__ import annotations

import base64
import os
import random
import secrets
import socket
import struct
import threading
import time

import pytest

from tokens import jwt_auth_config

pytestmark = pytest.mark.usefixtures("require_envoy")

REAUTH = "gatehouse.reauth"
STAT = "wasmcustom.gatehouse.jwt_auth.ws.reauth"


@pytest.fixture(scope="module")
def gw(key, demo, envoy_factory):
    cfg = jwt_auth_config(key, session_claims=["sid", "sub"], reauth_type=REAUTH)
    return envoy_factory(demo, jwt_auth=cfg)


def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked client-to-server frame."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n <= 0xFFFF:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def reauth_frame(token: str, spaced: bool = False) -> bytes:
    text = (f'{{"type": "{REAUTH}", "token": "{token}"}}' if spaced
            else f'{{"type":"{REAUTH}","token":"{token}"}}')
    return client_frame(1, text.encode())


class RawSocket:
    """A WebSocket client over a plain TCP socket; a thread reads the server's frames."""

    def __init__(self, gw, token: str):
        self.sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        self.sock.sendall(
            (f"GET /ws/echo HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
             f"Sec-WebSocket-Protocol: sip, bearer.{token}\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            data = self.sock.recv(4096)
            assert data, f"closed during the handshake: {head!r}"
            head += data
        head, self.buf = head.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        self.frames: list[tuple[int, bytes]] = []
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _recv_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _read(self):
        try:
            while True:
                b0, b1 = self._recv_exact(2)
                n = b1 & 0x7F
                if n == 126:
                    (n,) = struct.unpack(">H", self._recv_exact(2))
                elif n == 127:
                    (n,) = struct.unpack(">Q", self._recv_exact(8))
                payload = self._recv_exact(n)
                with self.cond:
                    if b0 & 0x0F != 9:  # the demo's pings carry nothing to check
                        self.frames.append((b0 & 0x0F, payload))
                    self.cond.notify_all()
        except (EOFError, OSError, ValueError):
            with self.cond:
                self.frames.append((-1, b""))
                self.cond.notify_all()

    def wait_frames(self, count: int, timeout: float = 15) -> list[tuple[int, bytes]]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.frames) >= count, timeout)
            return list(self.frames)

    def send_in_segments(self, data: bytes, rng: random.Random, largest: int):
        """Send `data` in segments of 1..`largest` bytes, pausing so Envoy reads them apart."""
        at = 0
        while at < len(data):
            n = rng.randint(1, largest)
            self.sock.sendall(data[at:at + n])
            at += n
            time.sleep(0.0005)

    def close(self):
        try:
            self.sock.sendall(client_frame(8, struct.pack(">H", 1000)))
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def test_big_frames_in_small_segments_arrive_byte_exact_and_split_reauth_frames_are_taken_out(gw, key):
    rng = random.Random(13)
    before = gw.stats().get(STAT, 0)
    ws = RawSocket(gw, key.mint(ttl=60, sid="stream-1"))
    try:
        pad = "p" * (16 * 1024 - 80)
        sent = [
            (1, b"I" * (16 * 1024)),  # as long as a re-auth frame may be
            (1, ('{"type":"chat","text":"%s"}' % pad).encode()),
            (2, bytes(rng.getrandbits(8) for _ in range(70_000))),  # 64-bit length
            None,  # a re-auth frame, cut into tiny segments like everything else
            (1, ('{"type":"%s","pad":"%s"}' % (REAUTH, pad)).encode()),  # looks like one, is not
            (1, "héllo wörld ✓".encode()),
            None,
            (2, b"{" * 5000),
        ] + [(1, os.urandom(rng.randint(0, 3000)).hex().encode()) for _ in range(20)]
        stream = b"".join(
            reauth_frame(key.mint(ttl=60, sid="stream-1"), spaced=i % 2 == 0) if f is None else client_frame(*f)
            for i, f in enumerate(sent))
        expected = [f for f in sent if f is not None]
        ws.send_in_segments(stream, rng, 200)
        got = ws.wait_frames(len(expected))
        assert len(got) == len(expected), f"{len(got)} frames back of {len(expected)}: {got[-1:]!r}"
        for i, (g, e) in enumerate(zip(got, expected)):
            assert g == e, f"frame {i} differs (opcode {g[0]} vs {e[0]}, {len(g[1])} vs {len(e[1])} bytes)"
    finally:
        ws.close()
    assert gw.stats().get(STAT, 0) - before == 2, "both re-auth frames were taken out and applied"


def test_a_complete_frame_goes_on_at_once_while_a_reauth_frame_after_it_is_still_arriving(gw, key):
    before = gw.stats().get(STAT, 0)
    ws = RawSocket(gw, key.mint(ttl=3, sid="stream-2"))
    try:
        hello = client_frame(1, b"INVITE sip:bob")
        reauth = reauth_frame(key.mint(ttl=60, sid="stream-2"))
        # One segment: a whole frame and the first bytes of a re-auth frame. The whole frame must
        # reach the upstream now (its echo comes back) though the re-auth frame is held back.
        ws.sock.sendall(hello + reauth[:9])
        assert ws.wait_frames(1, 5) == [(1, b"INVITE sip:bob")]
        time.sleep(0.2)
        ws.sock.sendall(reauth[9:30])
        time.sleep(0.2)
        ws.sock.sendall(reauth[30:])
        # The connect token expires after 3 s: the re-auth frame carried the socket past it.
        time.sleep(3.5)
        ws.sock.sendall(client_frame(1, b"still here"))
        got = ws.wait_frames(2, 5)
        assert got == [(1, b"INVITE sip:bob"), (1, b"still here")], got
    finally:
        ws.close()
    assert gw.stats().get(STAT, 0) - before == 1

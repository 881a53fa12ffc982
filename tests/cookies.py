"""Token-handler cookies (Curity v1 format) made with Python `cryptography`'s AESGCM: an
implementation independent of gatehouse's Rust code, so the tests prove byte compatibility with
other OAuth Agents, not self-agreement.

value = base64url without padding of `0x01 (version) || 12-byte IV || ciphertext || 16-byte tag`,
AES-256-GCM, no additional authenticated data, key given as 64 hex characters.
"""

from __future__ import annotations

import base64
import os
import secrets

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = 1
IV_LEN = 12
TAG_LEN = 16


def new_key() -> str:
    """A fresh AES-256 key as 64 hex characters (what `openssl rand -hex 32` prints)."""
    return secrets.token_hex(32)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def seal(key_hex: str, plaintext: str, version: int = VERSION, iv: bytes | None = None) -> str:
    """Encrypt `plaintext` into a cookie value, as an OAuth Agent does."""
    iv = os.urandom(IV_LEN) if iv is None else iv
    sealed = AESGCM(bytes.fromhex(key_hex)).encrypt(iv, plaintext.encode(), None)  # ciphertext || tag
    return b64url(bytes([version]) + iv + sealed)


def unseal(key_hex: str, value: str) -> str:
    """Decrypt a cookie value (raises on anything but a valid v1 cookie under `key_hex`)."""
    raw = b64url_decode(value)
    if len(raw) < 1 + IV_LEN + 1 + TAG_LEN or raw[0] != VERSION:
        raise ValueError("not a v1 token-handler cookie")
    return AESGCM(bytes.fromhex(key_hex)).decrypt(raw[1:1 + IV_LEN], raw[1 + IV_LEN:], None).decode()


def raw(value: str) -> bytearray:
    """The bytes of a cookie value, to tamper with."""
    return bytearray(b64url_decode(value))

"""Keys and tokens for the e2e tests, made with PyJWT + cryptography: an implementation
independent of gatehouse's Rust code, so the tests prove interoperability, not self-agreement."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

ISSUER = "https://issuer.gatehouse.test"
AUDIENCE = "gatehouse-e2e"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Key:
    """A signing key with its public JWK."""

    alg: str
    kid: str
    private: object
    jwk: dict = field(default_factory=dict)

    @classmethod
    def generate(cls, alg: str = "EdDSA", kid: str | None = None) -> "Key":
        kid = kid or f"{alg.lower()}-{uuid.uuid4().hex[:8]}"
        if alg == "EdDSA":
            priv = ed25519.Ed25519PrivateKey.generate()
            jwk = json.loads(OKPAlgorithm.to_jwk(priv.public_key()))
        elif alg == "ES256":
            priv = ec.generate_private_key(ec.SECP256R1())
            jwk = json.loads(ECAlgorithm.to_jwk(priv.public_key()))
        elif alg in ("RS256", "PS256"):
            priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = json.loads(RSAAlgorithm.to_jwk(priv.public_key()))
        else:
            raise ValueError(alg)
        jwk.pop("key_ops", None)
        jwk.update({"kid": kid, "alg": alg, "use": "sig"})
        return cls(alg=alg, kid=kid, private=priv, jwk=jwk)

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def mint(self, ttl: int = 300, headers: dict | None = None, now: int | None = None, **claims) -> str:
        now = int(time.time()) if now is None else now
        body = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "alice",
            "iat": now,
            "exp": now + ttl,
            "jti": uuid.uuid4().hex,
            "scope": "phone:call",
        }
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, self.private, algorithm=self.alg, headers={"kid": self.kid, **(headers or {})})


def jwks(*keys: Key) -> dict:
    return {"keys": [k.jwk for k in keys]}


def unsigned(claims: dict, alg: str = "none") -> str:
    """A token with `alg: none` and an empty signature."""
    header = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims).encode())
    return f"{header}.{payload}."


def hs256_with(secret: bytes, claims: dict, kid: str | None = None) -> str:
    """An HS256 token MACed with `secret`: the key-confusion attack when `secret` is a public key."""
    head = {"alg": "HS256", "typ": "JWT"}
    if kid:
        head["kid"] = kid
    signing_input = f"{b64url(json.dumps(head).encode())}.{b64url(json.dumps(claims).encode())}"
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(sig)}"


def claims_of(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def jwt_auth_config(*keys: Key, **extra) -> dict:
    """A jwt-auth filter config with one provider and an inline JWKS of `keys`."""
    cfg = {
        "providers": [
            {"name": "test", "issuer": ISSUER, "audiences": [AUDIENCE], "jwks": {"inline": jwks(*keys)}}
        ],
        "clock_skew_seconds": 0,
    }
    cfg.update(extra)
    return cfg

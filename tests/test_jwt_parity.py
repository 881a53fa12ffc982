"""Parity with Envoy's native jwt_authn, in real Envoy: the algorithms it accepts beyond
RS256 / PS256 / ES256 / EdDSA (RS384, RS512, PS384, PS512, ES384). The key still fixes the
algorithm: a token signed with another algorithm than the one its key declares is refused."""

from __future__ import annotations

import json
import uuid

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tokens import Key, jwt_auth_config

pytestmark = pytest.mark.usefixtures("require_envoy")

NEW_ALGS = ["RS384", "RS512", "PS384", "PS512", "ES384"]


def generate(alg: str, rsa_key=None) -> Key:
    """A Key (tests/tokens.py) for `alg`; the RSA algorithms may share one RSA key."""
    kid = f"{alg.lower()}-{uuid.uuid4().hex[:8]}"
    if alg == "ES384":
        private = ec.generate_private_key(ec.SECP384R1())
        jwk = json.loads(ECAlgorithm.to_jwk(private.public_key()))
    else:
        private = rsa_key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(RSAAlgorithm.to_jwk(private.public_key()))
    jwk.pop("key_ops", None)
    jwk.update({"kid": kid, "alg": alg, "use": "sig"})
    return Key(alg=alg, kid=kid, private=private, jwk=jwk)


@pytest.fixture(scope="module")
def keys():
    shared = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {alg: generate(alg, shared) for alg in NEW_ALGS}


@pytest.fixture(scope="module")
def gw(keys, demo, envoy_factory):
    return envoy_factory(demo, jwt_auth=jwt_auth_config(*keys.values()))


def get(gw, token):
    return requests.get(gw.url + "/api/echo", headers={"authorization": f"Bearer {token}"}, timeout=10)


def counter(gw, name):
    return gw.stats().get(f"wasmcustom.gatehouse.jwt_auth.{name}", 0)


@pytest.mark.parametrize("alg", NEW_ALGS)
def test_a_token_of_each_algorithm_reaches_the_upstream(gw, keys, alg):
    r = get(gw, keys[alg].mint())
    assert r.status_code == 200, r.text
    assert "authorization" not in r.json()["headers"]


@pytest.mark.parametrize("signed,claimed", [("RS512", "RS384"), ("PS384", "RS384"), ("RS384", "PS512")])
def test_the_key_fixes_the_algorithm(gw, keys, signed, claimed):
    """A token signed by the RSA key as `signed` but naming `claimed`'s key: refused, since that
    key verifies only `claimed`, and the header's alg is not `claimed`'s."""
    before = counter(gw, "denied.algorithm")
    forged = Key(alg=signed, kid=keys[claimed].kid, private=keys[signed].private, jwk={})
    r = get(gw, forged.mint())
    assert r.status_code == 401, r.text
    assert counter(gw, "denied.algorithm") == before + 1


def test_a_changed_signature_is_refused(gw, keys):
    before = counter(gw, "denied.signature")
    token = keys["ES384"].mint()
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    assert get(gw, flipped).status_code == 401
    assert counter(gw, "denied.signature") == before + 1

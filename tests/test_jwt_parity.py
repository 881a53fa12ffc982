"""Parity with Envoy's native jwt_authn, in real Envoy:

- the algorithms it accepts beyond RS256 / PS256 / ES256 / EdDSA (RS384, RS512, PS384, PS512,
  ES384). The key still fixes the algorithm: a token signed with another algorithm than the one
  its key declares is refused;
- OpenID Connect discovery (`jwks.discovery`): the provider's openid-configuration, served by a
  local server behind an Envoy cluster, names the JWKS (`jwks_uri`), fetched on the same cluster
  and refreshed; a document of another issuer keeps the last good keys.
"""

from __future__ import annotations

import json
import uuid

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from conftest import wait_until
from pages import LocalServer
from tokens import AUDIENCE, ISSUER, Key, jwks, jwt_auth_config

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


class Idp(LocalServer):
    """An identity provider's two documents, by path; records (path, Host) of every GET."""

    def __init__(self):
        self.documents = {}
        self.requests = []

        def answer(method, path, host, body):
            self.requests.append((path, host))
            doc = self.documents.get(path)
            return (200 if doc is not None else 404), json.dumps(doc).encode()

        super().__init__(answer)


@pytest.fixture
def idp():
    srv = Idp()
    yield srv
    srv.stop()


def test_oidc_discovery_names_the_jwks_which_is_fetched_and_refreshed(demo, envoy_factory, idp):
    k1, k2 = Key.generate("ES256", kid="k1"), Key.generate("RS256", kid="k2")
    config_path = "/.well-known/openid-configuration"
    idp.documents = {
        config_path: {"issuer": ISSUER, "jwks_uri": "https://keys.idp.test/certs?v=1"},
        "/certs?v=1": jwks(k1),
    }
    cfg = {
        "providers": [{"name": "oidc", "issuer": ISSUER, "audiences": [AUDIENCE], "jwks": {"discovery": {
            "cluster": "idp", "path": config_path, "refresh_seconds": 2, "min_refetch_seconds": 0}}}],
        "clock_skew_seconds": 0,
    }
    gw = envoy_factory(demo, jwt_auth=cfg, extra_clusters={"idp": idp.port})
    stat = lambda name: gw.stats().get(f"wasmcustom.gatehouse.jwt_auth.{name}", 0)  # noqa: E731
    assert wait_until(lambda: stat("jwks.fetch_ok") >= 1), gw.log_text()[-3000:]
    # Each VM (the main thread's, every worker's) fetches its own: the counter can move before
    # the worker answering the request has loaded its keys.
    assert wait_until(lambda: get(gw, k1.mint()).status_code == 200, timeout=15), gw.log_text()[-3000:]
    # The JWKS came from the jwks_uri's path, with its host as :authority, on the same cluster.
    assert ("/certs?v=1", "keys.idp.test") in idp.requests
    assert "discovery document loaded, jwks_uri keys.idp.test/certs?v=1" in gw.log_text()

    # The IdP moves its keys: the next refresh reads the new jwks_uri.
    idp.documents[config_path] = {"issuer": ISSUER, "jwks_uri": "https://keys.idp.test/certs?v=2"}
    idp.documents["/certs?v=2"] = jwks(k1, k2)
    assert wait_until(lambda: ("/certs?v=2", "keys.idp.test") in idp.requests, timeout=15)
    assert wait_until(lambda: get(gw, k2.mint()).status_code == 200, timeout=15)

    # A document of another issuer is refused and counted; the keys in use stay.
    failed = stat("jwks.fetch_failed")
    idp.documents[config_path] = {"issuer": "https://evil.test", "jwks_uri": "https://evil.test/certs"}
    assert wait_until(lambda: stat("jwks.fetch_failed") > failed, timeout=15)
    assert "is not the provider's" in gw.log_text()
    assert get(gw, k1.mint()).status_code == 200
    assert not any(path == "/certs" for path, _ in idp.requests)

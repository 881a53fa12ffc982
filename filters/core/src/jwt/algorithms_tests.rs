//! RS384, RS512, PS384, PS512 and ES384 (with RS256 / PS256 from the same key for contrast):
//! tokens minted by PyJWT (an independent implementation) in `tests/data/jwt_algorithms.json`.
//! The key fixes the algorithm: an RSA key verifies only the `alg` it declares (RS256 when it
//! declares none), a P-384 key only ES384.

use super::{Alg, Jws, KeySet, TokenError, VerifyingKey};
use serde_json::{json, Value};

fn vectors() -> Value {
    serde_json::from_str(include_str!("../../tests/data/jwt_algorithms.json")).unwrap()
}

fn key(jwk: &Value, alg: Option<&str>) -> KeySet {
    let mut jwk = jwk.clone();
    if let Some(alg) = alg {
        jwk["alg"] = json!(alg);
    }
    KeySet::new(vec![VerifyingKey::from_jwk(&jwk).unwrap()])
}

fn verify(token: &str, keys: &KeySet) -> Result<(), TokenError> {
    Jws::parse(token, 8192)?.verify(keys).map(|_| ())
}

const RSA_ALGS: [&str; 6] = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"];

#[test]
fn every_rsa_algorithm_verifies_with_a_key_that_declares_it_and_only_it() {
    let v = vectors();
    for declared in RSA_ALGS {
        let keys = key(&v["rsa_jwk"], Some(declared));
        for alg in RSA_ALGS {
            let token = v["tokens"][alg].as_str().unwrap();
            let expected = if alg == declared {
                Ok(())
            } else {
                Err(TokenError::Algorithm)
            };
            assert_eq!(
                verify(token, &keys),
                expected,
                "{alg} token, {declared} key"
            );
        }
    }
}

#[test]
fn an_rsa_key_without_alg_is_rs256() {
    let v = vectors();
    let keys = key(&v["rsa_jwk"], None);
    assert_eq!(
        verify(v["tokens"]["RS256"].as_str().unwrap(), &keys),
        Ok(())
    );
    assert_eq!(
        verify(v["tokens"]["RS512"].as_str().unwrap(), &keys),
        Err(TokenError::Algorithm)
    );
}

#[test]
fn es384_verifies_with_a_p384_key() {
    let v = vectors();
    let token = v["tokens"]["ES384"].as_str().unwrap();
    for declared in [None, Some("ES384")] {
        let keys = key(&v["ec_p384_jwk"], declared);
        assert_eq!(keys.candidates(None).next().unwrap().alg, Alg::Es384);
        assert_eq!(verify(token, &keys), Ok(()));
    }
    // The RSA tokens do not verify with it, and it is not an ES256 key.
    let keys = key(&v["ec_p384_jwk"], None);
    assert_eq!(
        verify(v["tokens"]["RS384"].as_str().unwrap(), &keys),
        Err(TokenError::Algorithm)
    );
    let mut jwk = v["ec_p384_jwk"].clone();
    jwk["alg"] = json!("ES256");
    let err = VerifyingKey::from_jwk(&jwk).unwrap_err();
    assert_eq!(err.path, "alg", "{err}");
}

#[test]
fn a_changed_byte_breaks_each_new_algorithm() {
    let v = vectors();
    for (alg, jwk) in [
        ("RS384", "rsa_jwk"),
        ("RS512", "rsa_jwk"),
        ("PS384", "rsa_jwk"),
        ("PS512", "rsa_jwk"),
        ("ES384", "ec_p384_jwk"),
    ] {
        let keys = key(&v[jwk], Some(alg));
        let token = v["tokens"][alg].as_str().unwrap();
        // Another payload under the same signature.
        let parts: Vec<&str> = token.split('.').collect();
        let other = crate::b64url(br#"{"iss":"https://idp.test","sub":"mallory"}"#);
        let forged = format!("{}.{other}.{}", parts[0], parts[2]);
        assert_eq!(verify(&forged, &keys), Err(TokenError::Signature), "{alg}");
        // A truncated signature.
        let short = &token[..token.len() - 4];
        assert!(verify(short, &keys).is_err(), "{alg}");
    }
}

#[test]
fn p384_keys_are_checked_like_p256_ones() {
    let v = vectors();
    let mut jwk = v["ec_p384_jwk"].clone();
    // A P-256-sized coordinate on a P-384 key.
    jwk["x"] = json!(crate::b64url(&[7u8; 32]));
    assert_eq!(VerifyingKey::from_jwk(&jwk).unwrap_err().path, "x");
    // A point that is not on the curve.
    let mut jwk = v["ec_p384_jwk"].clone();
    jwk["y"] = json!(crate::b64url(&[7u8; 48]));
    assert_eq!(VerifyingKey::from_jwk(&jwk).unwrap_err().path, "x");
    let mut jwk = v["ec_p384_jwk"].clone();
    jwk["crv"] = json!("P-521");
    assert_eq!(VerifyingKey::from_jwk(&jwk).unwrap_err().path, "crv");
}

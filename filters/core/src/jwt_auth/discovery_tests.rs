//! `jwks.discovery`: the OpenID configuration names the JWKS, which is then fetched on the same
//! cluster; a document of another issuer, or an unusable one, changes nothing.

use super::*;
use serde_json::{json, Value};

const ISSUER: &str = "https://idp.test";

fn auth() -> JwtAuth {
    let config = json!({"providers": [{"name": "idp", "issuer": ISSUER, "jwks": {"discovery": {
        "cluster": "idp", "authority": "idp.test", "path": "/.well-known/openid-configuration"}}}]});
    JwtAuth::new(JwtAuthConfig::compile(config.to_string().as_bytes()).unwrap())
}

fn discovery(issuer: &str, jwks_uri: &str) -> Vec<u8> {
    json!({"issuer": issuer, "jwks_uri": jwks_uri, "id_token_signing_alg_values_supported": ["RS256"]})
        .to_string()
        .into_bytes()
}

fn jwks() -> Vec<u8> {
    let v: Value =
        serde_json::from_str(include_str!("../../tests/data/jwt_algorithms.json")).unwrap();
    json!({"keys": [v["ec_p384_jwk"]]}).to_string().into_bytes()
}

#[test]
fn the_discovery_document_names_the_jwks_fetched_next_on_the_same_cluster() {
    let mut a = auth();
    let first = a.scheduled_fetch(0).unwrap();
    assert_eq!(
        (first.cluster, first.authority, first.path, first.doc),
        (
            "idp",
            "idp.test",
            "/.well-known/openid-configuration",
            Doc::Discovery
        )
    );
    // No JWKS to fetch before the document named one (an unknown kid cannot trigger a fetch).
    assert!(a.jwks_fetch(0).is_none());
    let body = discovery(ISSUER, "https://keys.idp.test/oauth2/v3/certs?v=2");
    assert_eq!(
        a.apply_fetch(0, Doc::Discovery, 200, &body),
        Fetched::Discovered {
            jwks_uri: "keys.idp.test/oauth2/v3/certs?v=2".into()
        }
    );
    let next = a.jwks_fetch(0).unwrap();
    assert_eq!(
        (next.cluster, next.authority, next.path, next.doc),
        ("idp", "keys.idp.test", "/oauth2/v3/certs?v=2", Doc::Jwks)
    );
    assert_eq!(
        a.apply_fetch(0, Doc::Jwks, 200, &jwks()),
        Fetched::Keys {
            count: 1,
            skipped: 0
        }
    );
    assert!(a.has_remote_keys(0));
    // The next refresh starts with the discovery document again.
    assert_eq!(a.scheduled_fetch(0).unwrap().doc, Doc::Discovery);
}

#[test]
fn a_document_of_another_issuer_or_an_unusable_one_changes_nothing() {
    let mut a = auth();
    let good = discovery(ISSUER, "https://idp.test/jwks");
    assert!(matches!(
        a.apply_fetch(0, Doc::Discovery, 200, &good),
        Fetched::Discovered { .. }
    ));
    for (status, body) in [
        (
            200,
            discovery("https://evil.test", "https://evil.test/jwks"),
        ),
        (
            200,
            discovery(&format!("{ISSUER}/"), "https://idp.test/other"),
        ),
        (
            200,
            json!({"jwks_uri": "https://idp.test/other"})
                .to_string()
                .into_bytes(),
        ),
        (200, json!({"issuer": ISSUER}).to_string().into_bytes()),
        (200, discovery(ISSUER, "ftp://idp.test/jwks")),
        (200, discovery(ISSUER, "https://user@idp.test/jwks")),
        (200, b"<html>".to_vec()),
        (503, good.clone()),
    ] {
        assert!(
            matches!(
                a.apply_fetch(0, Doc::Discovery, status, &body),
                Fetched::Failed(_)
            ),
            "{status} {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(
            a.jwks_fetch(0).unwrap().path,
            "/jwks",
            "the last good jwks_uri stays"
        );
    }
}

#[test]
fn jwks_uri_forms() {
    assert_eq!(
        parse_discovery(&discovery(ISSUER, "https://idp.test:8443"), ISSUER),
        Ok(("idp.test:8443".into(), "/".into()))
    );
    assert_eq!(
        parse_discovery(&discovery(ISSUER, "http://127.0.0.1:9000/keys"), ISSUER),
        Ok(("127.0.0.1:9000".into(), "/keys".into()))
    );
    assert!(parse_discovery(&discovery(ISSUER, "https://?x"), ISSUER).is_err());
    assert!(parse_discovery(&discovery(ISSUER, "https://idp.test?x=1"), ISSUER).is_err());
}

#[test]
fn discovery_config_errors_name_the_field() {
    for (jwks, field) in [
        (
            json!({"discovery": {"cluster": "", "path": "/x"}}),
            "providers[0].jwks.discovery.cluster",
        ),
        (
            json!({"discovery": {"cluster": "c", "path": "x"}}),
            "providers[0].jwks.discovery.path",
        ),
        (
            json!({"discovery": {"cluster": "c", "path": "/x", "timeout_ms": 0}}),
            "providers[0].jwks.discovery.timeout_ms",
        ),
        (
            json!({"discovery": {"cluster": "c", "path": "/x", "jwks_uri": "/y"}}),
            "providers[0].jwks.discovery",
        ),
    ] {
        let config = json!({"providers": [{"name": "p", "issuer": ISSUER, "jwks": jwks}]});
        let err = JwtAuthConfig::compile(config.to_string().as_bytes()).unwrap_err();
        assert!(err.path.starts_with(field), "{field}: {err}");
    }
}

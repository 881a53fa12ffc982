//! Decision tests with real signatures: EdDSA and HS256 minted here, RS256/PS256/ES256 vectors
//! minted by PyJWT (an independent implementation) in `tests/data/pyjwt_vectors.json`.

use super::*;
use crate::jwt::{KeySet, TokenError, VerifyingKey};
use crate::reply::Refusal;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{json, Value};
use std::sync::Arc;

pub(super) const NOW: u64 = 1_700_000_100;
pub(super) const ISS: &str = "https://issuer.test";

pub(super) fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

pub(super) fn keypair() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[7; 32])
}

pub(super) fn ed_jwk(kid: &str) -> Value {
    json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(keypair().verifying_key().as_bytes())})
}

pub(super) fn sign_ed(header: Value, claims: Value) -> String {
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = ed25519_dalek::Signer::sign(&keypair(), input.as_bytes());
    format!("{input}.{}", b64(&sig.to_bytes()))
}

fn sign_hs(secret: &[u8], header: Value, claims: Value) -> String {
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret).unwrap();
    mac.update(input.as_bytes());
    format!("{input}.{}", b64(&mac.finalize().into_bytes()))
}

pub(super) fn claims() -> Value {
    json!({"iss": ISS, "aud": "api", "sub": "alice", "iat": NOW - 100, "exp": NOW + 200, "scope": "phone:call read"})
}

pub(super) fn token() -> String {
    sign_ed(
        json!({"alg": "EdDSA", "kid": "ed1", "typ": "JWT"}),
        claims(),
    )
}

pub(super) fn config(extra: Value) -> JwtAuth {
    let mut base = json!({
        "providers": [{"name": "main", "issuer": ISS, "audiences": ["api"], "jwks": {"inline": {"keys": [ed_jwk("ed1")]}}}],
        "clock_skew_seconds": 0,
    });
    if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    JwtAuth::new(JwtAuthConfig::compile(base.to_string().as_bytes()).unwrap())
}

pub(super) fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

pub(super) fn http<'a>(auth: Option<&'a str>) -> Request<'a> {
    Request {
        path: "/api/echo",
        host: "gw.test",
        authorization: auth,
        ..Default::default()
    }
}

fn denial(d: Decision) -> Denial {
    match d {
        Decision::Deny { denial, .. } => denial,
        other => panic!("expected a denial, got {other:?}"),
    }
}

fn allowed(d: Decision) -> (Vec<HeaderEdit>, Option<Arc<Verified>>, Option<u64>, bool) {
    match d {
        Decision::Allow {
            edits,
            token,
            deadline,
            cache_hit,
            ..
        } => (edits, token, deadline, cache_hit),
        other => panic!("expected allow, got {other:?}"),
    }
}

#[test]
fn valid_bearer_is_allowed_and_stripped() {
    let mut f = config(json!({}));
    let auth = bearer(&token());
    let (edits, tok, deadline, hit) = allowed(f.decide(&http(Some(&auth)), NOW, true));
    assert!(edits.contains(&HeaderEdit::Remove("authorization".into())));
    let tok = tok.unwrap();
    assert_eq!(tok.claims["sub"], "alice");
    assert_eq!(
        serde_json::from_slice::<Value>(&tok.payload).unwrap(),
        claims()
    );
    assert_eq!(deadline, Some(NOW + 200));
    assert!(!hit);
    let (_, _, _, hit) = allowed(f.decide(&http(Some(&auth)), NOW, true));
    assert!(hit, "second decision comes from the cache");
}

#[test]
fn refusals_each_with_their_reason() {
    let mut f = config(json!({"max_token_bytes": 4096}));
    let t = |c: Value| sign_ed(json!({"alg": "EdDSA", "kid": "ed1"}), c);
    let mut c = claims();
    c["exp"] = json!(NOW - 1);
    let expired = t(c);
    let mut c = claims();
    c["iss"] = json!("https://evil.test");
    let wrong_iss = t(c);
    let mut c = claims();
    c["aud"] = json!("other");
    let wrong_aud = t(c);
    let mut c = claims();
    c["nbf"] = json!(NOW + 60);
    let future = t(c);
    let good = token();
    let mut bad_sig = good.clone();
    bad_sig.pop();
    bad_sig.push(if good.ends_with('A') { 'B' } else { 'A' });
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none"}"#),
        b64(claims().to_string().as_bytes())
    );
    let none_sig = format!("{none}c2ln");
    let unknown_kid = sign_ed(json!({"alg": "EdDSA", "kid": "nope"}), claims());
    let crit = sign_ed(
        json!({"alg": "EdDSA", "kid": "ed1", "crit": ["exp"]}),
        claims(),
    );
    let huge = "a".repeat(5000);
    let mut c = claims();
    c.as_object_mut().unwrap().remove("exp");
    let no_exp = t(c);
    let cases: Vec<(String, Denial)> = vec![
        (expired, Denial::Token(TokenError::Expired)),
        (wrong_iss, Denial::Token(TokenError::Issuer)),
        (wrong_aud, Denial::Token(TokenError::Audience)),
        (future, Denial::Token(TokenError::NotYetValid)),
        (bad_sig, Denial::Token(TokenError::Signature)),
        (none, Denial::Token(TokenError::Algorithm)),
        (none_sig, Denial::Token(TokenError::Algorithm)),
        (unknown_kid, Denial::Token(TokenError::UnknownKey)),
        (crit, Denial::Token(TokenError::Malformed)),
        (huge, Denial::Token(TokenError::TooLarge)),
        ("garbage".into(), Denial::Token(TokenError::Malformed)),
        ("a.b.c.d".into(), Denial::Token(TokenError::Malformed)),
        (no_exp, Denial::Token(TokenError::MissingClaim)),
    ];
    for (tok, want) in cases {
        let auth = bearer(&tok);
        let d = f.decide(&http(Some(&auth)), NOW, true);
        let Decision::Deny { denial, reply } = d else {
            panic!("{want:?} was allowed")
        };
        assert_eq!(denial, want, "token {tok}");
        assert_eq!(reply.status, 401);
        assert!(
            !String::from_utf8_lossy(&reply.body).contains(&tok[..tok.len().min(40)]),
            "body echoes the token"
        );
    }
    assert_eq!(denial(f.decide(&http(None), NOW, true)), Denial::Missing);
}

#[test]
fn key_confusion_hs256_with_public_key_bytes_is_refused() {
    let mut f = config(json!({}));
    // The attacker HMACs with the public key (as bytes and as its JWK text).
    for secret in [
        keypair().verifying_key().as_bytes().to_vec(),
        ed_jwk("ed1").to_string().into_bytes(),
    ] {
        let tok = sign_hs(&secret, json!({"alg": "HS256", "kid": "ed1"}), claims());
        let auth = bearer(&tok);
        assert_eq!(
            denial(f.decide(&http(Some(&auth)), NOW, true)),
            Denial::Token(TokenError::Algorithm)
        );
    }
}

#[test]
fn hs256_only_with_configured_secret() {
    let secret = [42u8; 32];
    let mut f = JwtAuth::new(
        JwtAuthConfig::compile(
            json!({"providers": [{"name": "h", "issuer": ISS, "hs256_secrets": [{"kid": "h1", "secret_base64url": b64(&secret)}]}]})
                .to_string()
                .as_bytes(),
        )
        .unwrap(),
    );
    let tok = sign_hs(&secret, json!({"alg": "HS256", "kid": "h1"}), claims());
    let auth = bearer(&tok);
    allowed(f.decide(&http(Some(&auth)), NOW, true));
    let err = JwtAuthConfig::compile(
        json!({"providers": [{"name": "h", "issuer": ISS, "hs256_secrets": [{"secret_base64url": b64(&[1; 16])}]}]})
            .to_string()
            .as_bytes(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("providers[0].hs256_secrets[0]"),
        "{err}"
    );
    let err = JwtAuthConfig::compile(
        json!({"providers": [{"name": "h", "issuer": ISS, "jwks": {"inline": {"keys": [{"kty": "oct", "k": b64(&secret)}]}}}]})
            .to_string()
            .as_bytes(),
    )
    .unwrap_err();
    assert_eq!(err.path, "providers[0].jwks.inline.keys[0].kty");
}

#[test]
fn pyjwt_vectors_verify() {
    let v: Value =
        serde_json::from_str(include_str!("../../tests/data/pyjwt_vectors.json")).unwrap();
    let mut rsa_jwk = v["jwk"].clone();
    rsa_jwk["kid"] = json!("rsa1");
    let mut ps_jwk = rsa_jwk.clone();
    ps_jwk["kid"] = json!("rsa1");
    ps_jwk["alg"] = json!("PS256");
    let mut ec_jwk = v["ec_jwk"].clone();
    ec_jwk["kid"] = json!("ec1");
    for (jwk, tok) in [
        (rsa_jwk.clone(), "rs256"),
        (ps_jwk, "ps256"),
        (ec_jwk, "es256"),
    ] {
        let mut f = JwtAuth::new(
            JwtAuthConfig::compile(
                json!({"providers": [{"name": "p", "issuer": ISS, "audiences": ["api"], "jwks": {"inline": {"keys": [jwk]}}}]})
                    .to_string()
                    .as_bytes(),
            )
            .unwrap(),
        );
        let auth = bearer(v[tok].as_str().unwrap());
        let (_, t, _, _) = allowed(f.decide(&http(Some(&auth)), NOW, true));
        assert_eq!(t.unwrap().claims["sub"], "alice", "{tok}");
    }
    // A PS256 token does not verify with the RS256 key, and vice versa: the key fixes the alg.
    let mut f = JwtAuth::new(
        JwtAuthConfig::compile(
            json!({"providers": [{"name": "p", "issuer": ISS, "jwks": {"inline": {"keys": [rsa_jwk]}}}]})
                .to_string()
                .as_bytes(),
        )
        .unwrap(),
    );
    let auth = bearer(v["ps256"].as_str().unwrap());
    assert_eq!(
        denial(f.decide(&http(Some(&auth)), NOW, true)),
        Denial::Token(TokenError::Algorithm)
    );
    // An RS256 signature that is too short, or not below the modulus (all 0xff).
    let rs = v["rs256"].as_str().unwrap();
    let (input, sig) = rs.rsplit_once('.').unwrap();
    let sig = crate::b64url_decode(sig).unwrap();
    for bad in [sig[..sig.len() - 1].to_vec(), vec![0xff; sig.len()]] {
        let auth = bearer(&format!("{input}.{}", b64(&bad)));
        assert_eq!(
            denial(f.decide(&http(Some(&auth)), NOW, true)),
            Denial::Token(TokenError::Signature)
        );
    }
    // A flipped byte in an RS256 signature.
    let mut t = v["rs256"].as_str().unwrap().to_string();
    let last = t.pop().unwrap();
    t.push(if last == 'A' { 'B' } else { 'A' });
    let auth = bearer(&t);
    assert_eq!(
        denial(f.decide(&http(Some(&auth)), NOW, true)),
        Denial::Token(TokenError::Signature)
    );
}

#[test]
fn websocket_protocol_token() {
    let mut f = config(json!({}));
    let proto = format!("sip, bearer.{}", token());
    let req = Request {
        websocket: true,
        ws_key: Some("dGhlIHNhbXBsZSBub25jZQ=="),
        ws_protocols: Some(&proto),
        ..http(None)
    };
    let (edits, tok, _, _) = allowed(f.decide(&req, NOW, true));
    assert!(tok.is_some());
    assert!(edits.contains(&HeaderEdit::Set(
        "sec-websocket-protocol".into(),
        "sip".into()
    )));

    // Only the token offered: 4400, and the handshake selects what was offered.
    let only = format!("bearer.{}", token());
    let req = Request {
        ws_protocols: Some(&only),
        ..req.clone()
    };
    let Decision::Deny { denial, reply } = f.decide(&req, NOW, true) else {
        panic!()
    };
    assert_eq!(denial, Denial::WsProtocol);
    assert_eq!(reply.status, 101);
    assert_eq!(&reply.body[2..4], &4400u16.to_be_bytes());

    // A bad token: 101 + close 4401, accept key per RFC 6455, `sip` selected.
    let bad = "sip, bearer.garbage".to_string();
    let req = Request {
        ws_protocols: Some(&bad),
        ..req
    };
    let Decision::Deny { reply, .. } = f.decide(&req, NOW, true) else {
        panic!()
    };
    assert_eq!(reply.status, 101);
    assert!(reply.headers.contains(&(
        "sec-websocket-accept".into(),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".into()
    )));
    assert!(reply
        .headers
        .contains(&("sec-websocket-protocol".into(), "sip".into())));
    assert_eq!(&reply.body[2..4], &4401u16.to_be_bytes());

    // An upgrade without a key cannot be answered with a handshake.
    let req = Request {
        ws_key: None,
        ..req
    };
    let Decision::Deny { reply, .. } = f.decide(&req, NOW, true) else {
        panic!()
    };
    assert_eq!(reply.status, 400);
}

#[test]
fn query_string_tokens_are_refused() {
    let mut f = config(json!({}));
    for path in [
        "/api/echo?access_token=x",
        "/api/echo?a=1&Token=x",
        "/api/echo?jwt",
    ] {
        let req = Request { path, ..http(None) };
        let Decision::Deny { denial, reply } = f.decide(&req, NOW, true) else {
            panic!()
        };
        assert_eq!(denial, Denial::QueryToken, "{path}");
        assert_eq!(reply.status, 400);
    }
    let req = Request {
        path: "/api/echo?tokens_total=1",
        ..http(None)
    };
    assert_eq!(denial(f.decide(&req, NOW, true)), Denial::Missing);
}

#[test]
fn cookie_source_and_forwarded_claims() {
    let mut f = config(json!({
        "sources": [{"cookie": {"name": "gh_jwt"}}],
        "trusted_web_origins": ["https://app.test"],
        "forward_claims": {"sub": "X-Gatehouse-Sub"},
    }));
    let cookie = format!("a=1; gh_jwt={}; b=2", token());
    let req = Request {
        cookie: Some(&cookie),
        ..http(None)
    };
    let (edits, _, _, _) = allowed(f.decide(&req, NOW, true));
    assert_eq!(
        edits,
        vec![
            HeaderEdit::Remove("x-gatehouse-sub".into()),
            HeaderEdit::Set("cookie".into(), "a=1; b=2".into()),
            HeaderEdit::Set("x-gatehouse-sub".into(), "alice".into()),
        ]
    );
    // Authorization is not a source here.
    let auth = bearer(&token());
    assert_eq!(
        denial(f.decide(&http(Some(&auth)), NOW, true)),
        Denial::Missing
    );
}

#[test]
fn rules_require_claims_and_allow_missing() {
    let mut f = config(json!({
        "rules": [
            {"match": {"prefix": "/ws/"}, "require": [{"claim": "scope", "contains": "phone:call"}], "max_age_seconds": 60},
            {"match": {"prefix": "/admin"}, "require": [{"claim": "scope", "contains": "admin"}]},
            {"match": {"route": "public"}, "allow_missing": true},
            {"match": {"host": "tenant.test"}, "require": [{"claim": "tenant", "equals": "acme"}]},
        ]
    }));
    let auth = bearer(&token());
    let req = |path: &'static str| Request {
        path,
        authorization: Some(&auth),
        ..http(None)
    };
    assert_eq!(
        denial(f.decide(&req("/admin/x"), NOW, true)),
        Denial::Forbidden
    );
    let Decision::Deny { reply, .. } = f.decide(&req("/admin/x"), NOW, true) else {
        panic!()
    };
    assert_eq!(reply.status, 403);
    // /ws/ needs the scope (present) and an iat within 60 s (it is 100 s old).
    assert_eq!(
        denial(f.decide(&req("/ws/x"), NOW, true)),
        Denial::Token(TokenError::TooOld)
    );
    allowed(f.decide(&req("/ws/x"), NOW - 50, true));
    let public = Request {
        route_name: Some("public"),
        ..http(None)
    };
    let (_, tok, _, _) = allowed(f.decide(&public, NOW, true));
    assert!(tok.is_none());
    let tenant = Request {
        host: "Tenant.test:8080",
        ..req("/x")
    };
    assert_eq!(denial(f.decide(&tenant, NOW, true)), Denial::Forbidden);
}

#[test]
fn cache_never_changes_a_decision() {
    let mut f = config(json!({"rules": [{"match": {"prefix": "/strict"}, "max_age_seconds": 10}]}));
    let auth = bearer(&token());
    allowed(f.decide(&http(Some(&auth)), NOW, true));
    // Cached now, but a stricter route still applies its own age limit.
    let strict = Request {
        path: "/strict",
        ..http(Some(&auth))
    };
    assert_eq!(
        denial(f.decide(&strict, NOW, true)),
        Denial::Token(TokenError::TooOld)
    );
    // And expiry is checked on a hit.
    assert_eq!(
        denial(f.decide(&http(Some(&auth)), NOW + 200, true)),
        Denial::Token(TokenError::Expired)
    );
}

#[test]
fn remote_jwks_unknown_kid_asks_for_a_rate_limited_fetch() {
    let mut f = JwtAuth::new(
        JwtAuthConfig::compile(
            json!({"providers": [{"name": "r", "issuer": ISS, "jwks": {"remote": {"cluster": "idp", "path": "/jwks", "min_refetch_seconds": 30}}}]})
                .to_string()
                .as_bytes(),
        )
        .unwrap(),
    );
    let auth = bearer(&token());
    assert!(matches!(
        f.decide(&http(Some(&auth)), NOW, true),
        Decision::FetchJwks { provider: 0 }
    ));
    f.note_fetch(0, NOW);
    // Within the rate limit, before the JWKS ever loaded (the first fetch under way, or
    // failed): the token cannot be checked yet, which says nothing against it — 503, not 401.
    let d = denial(f.decide(&http(Some(&auth)), NOW + 5, true));
    assert_eq!(d, Denial::KeysNotLoaded);
    assert_eq!(
        (d.reason(), d.refusal()),
        ("jwks_unavailable", Refusal::Unavailable)
    );
    let (keys, _) = KeySet::from_jwks(&json!({"keys": [ed_jwk("ed1")]}), false).unwrap();
    f.set_remote_keys(0, keys);
    allowed(f.decide(&http(Some(&auth)), NOW + 5, false));
    // Once loaded, a kid the JWKS does not have is the token's problem: 401, without a fetch
    // within the rate limit.
    let stranger = bearer(&sign_ed(json!({"alg": "EdDSA", "kid": "nope"}), claims()));
    assert_eq!(
        denial(f.decide(&http(Some(&stranger)), NOW + 6, true)),
        Denial::Token(TokenError::UnknownKey)
    );
}

#[test]
fn config_errors_name_the_field() {
    let cases = [
        (json!({"providers": []}), "providers"),
        (
            json!({"providers": [{"name": "a", "issuer": "i"}]}),
            "providers[0].jwks",
        ),
        (
            json!({"providers": [{"name": "a", "issuer": "i", "jwks": {"inline": {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "!!"}]}}}]}),
            "providers[0].jwks.inline.keys[0].x",
        ),
        (
            json!({"providers": [{"name": "a", "issuer": "i", "jwks": {"remote": {"cluster": "c", "path": "jwks"}}}]}),
            "providers[0].jwks.remote.path",
        ),
        (
            json!({"providers": [{"name": "a", "issuer": "i", "jwks": {"remote": {"cluster": "c", "path": "/j", "bogus": 1}}}]}),
            "providers[0].jwks.remote.bogus",
        ),
        (
            json!({"providers": [{"name": "a", "issuer": "i", "jwks": {"remote": {"cluster": "c", "path": "/j"}}}], "rules": [{"match": {"prefix": "/x"}, "providers": ["b"]}]}),
            "rules[0].providers[0]",
        ),
        (
            json!({"providers": [{"name": "a", "issuer": "i", "jwks": {"remote": {"cluster": "c", "path": "/j"}}}], "typo": 1}),
            "typo",
        ),
        (
            json!({"providers": [{"name": "a", "issuer": "i", "jwks": {"remote": {"cluster": "c", "path": "/j"}}}], "forward_claims": {"sub": "bad header"}}),
            "forward_claims.sub",
        ),
        (
            json!({"providers": [{"name": "a", "issuer": "i", "jwks": {"remote": {"cluster": "c", "path": "/j"}}}], "sources": [{"query": {}}]}),
            "sources[0]",
        ),
    ];
    for (cfg, path) in cases {
        let err = JwtAuthConfig::compile(cfg.to_string().as_bytes()).unwrap_err();
        assert_eq!(err.path, path, "{cfg} -> {err}");
    }
    let err = JwtAuthConfig::compile(b"{not json").unwrap_err();
    assert!(err.to_string().starts_with("config error"), "{err}");
}

#[test]
fn wss_only_routes_refuse_plain_upgrades_with_4400() {
    let proto = format!("sip, bearer.{}", token());
    let ws = |tls: bool, xfp: Option<&'static str>| {
        let proto: &'static str = Box::leak(proto.clone().into_boxed_str());
        Request {
            path: "/ws/echo",
            websocket: true,
            ws_key: Some("dGhlIHNhbXBsZSBub25jZQ=="),
            ws_protocols: Some(proto),
            tls,
            forwarded_proto: xfp,
            ..http(None)
        }
    };
    let mut f = config(json!({"rules": [{"match": {"prefix": "/ws/"}, "wss_only": true}]}));
    let d = f.decide(&ws(false, Some("https")), NOW, true);
    let Decision::Deny { denial: why, reply } = d else {
        panic!("a plain upgrade was allowed")
    };
    assert_eq!(why, Denial::InsecureTransport);
    assert_eq!(reply.status, 101, "the browser must read a close code");
    assert!(reply.body.starts_with(&[0x88]) && reply.body[2..4] == 4400u16.to_be_bytes());
    allowed(f.decide(&ws(true, None), NOW, true));
    // x-forwarded-proto counts only from a trusted hop.
    let mut f = config(json!({"trust_forwarded_proto": true,
        "rules": [{"match": {"prefix": "/ws/"}, "wss_only": true}]}));
    allowed(f.decide(&ws(false, Some("https")), NOW, true));
    assert_eq!(
        denial(f.decide(&ws(false, Some("http")), NOW, true)),
        Denial::InsecureTransport
    );
}

#[test]
fn socket_terms_name_the_session_by_hash_and_bound_the_lifetime() {
    let mut f = config(json!({"session_claims": ["sid", "sub"], "max_socket_seconds": 3600}));
    let terms = |f: &mut JwtAuth, claims: Value| {
        let t = sign_ed(json!({"alg": "EdDSA", "kid": "ed1"}), claims);
        let auth = bearer(&t);
        match f.decide(&http(Some(&auth)), NOW, true) {
            Decision::Allow { socket, .. } => socket.unwrap(),
            other => panic!("{other:?}"),
        }
    };
    let mut c = claims();
    c["sid"] = json!("session-1");
    let a = terms(&mut f, c.clone());
    c["jti"] = json!("another token, same session");
    let b = terms(&mut f, c.clone());
    assert_eq!(a.session, b.session);
    assert_eq!(a.until, Some(NOW + 3600));
    let key = a.session.unwrap();
    assert!(
        !key.contains("session-1"),
        "shared memory holds a hash, not the id"
    );
    c["sid"] = json!("session-2");
    assert_ne!(terms(&mut f, c).session.unwrap(), key);
    // Without `sid`, the fallback claim (`sub`) names the session.
    assert!(terms(&mut f, claims()).session.is_some());
    // Without `session_claims`, sockets follow only their own token.
    let mut plain = config(json!({}));
    assert_eq!(terms(&mut plain, claims()).session, None);
    let zero = json!({"providers": [{"name": "p", "issuer": ISS, "jwks": {"inline": {"keys": [ed_jwk("ed1")]}}}],
        "rules": [{"match": {"prefix": "/"}, "max_socket_seconds": 0}]});
    let err = JwtAuthConfig::compile(zero.to_string().as_bytes()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "config error at rules[0].max_socket_seconds: must be at least 1"
    );
}

pub(super) fn ws<'a>(protocols: &'a str) -> Request<'a> {
    Request {
        websocket: true,
        ws_key: Some("dGhlIHNhbXBsZSBub25jZQ=="),
        ws_protocols: Some(protocols),
        ..http(None)
    }
}

fn sets(edits: &[HeaderEdit], name: &str) -> Option<String> {
    edits.iter().rev().find_map(|e| match e {
        HeaderEdit::Set(n, v) if n == name => Some(v.clone()),
        _ => None,
    })
}

fn removes(edits: &[HeaderEdit], name: &str) -> bool {
    edits
        .iter()
        .any(|e| matches!(e, HeaderEdit::Remove(n) if n == name))
}

#[test]
fn forward_sends_only_the_verified_token_as_bearer() {
    // Global `forward`, token from a cookie: the upstream gets it as Authorization.
    let mut f = config(json!({
        "sources": [{"cookie": {"name": "at"}}, {"authorization": {}}],
        "trusted_web_origins": ["https://app.test"],
        "forward": true,
    }));
    let t = token();
    let cookie = format!("at={t}; theme=dark");
    let req = Request {
        cookie: Some(&cookie),
        ..http(None)
    };
    let (edits, tok, _, _) = allowed(f.decide(&req, NOW, true));
    assert!(tok.is_some());
    assert_eq!(sets(&edits, "authorization"), Some(format!("Bearer {t}")));
    assert!(!removes(&edits, "authorization"), "set, not removed after");
    assert_eq!(sets(&edits, "cookie").as_deref(), Some("theme=dark"));
    // From Authorization (any whitespace): forwarded normalised.
    let auth = format!("bearer\t {t}");
    let (edits, _, _, _) = allowed(f.decide(&http(Some(&auth)), NOW, true));
    assert_eq!(sets(&edits, "authorization"), Some(format!("Bearer {t}")));
    // Never an unverified one: a bad token is refused, nothing is forwarded.
    let bad = format!("at={}x", t);
    let req = Request {
        cookie: Some(&bad),
        ..http(None)
    };
    assert!(matches!(f.decide(&req, NOW, true), Decision::Deny { .. }));

    // Per rule: off globally, on for /api/.
    let mut f = config(json!({
        "rules": [{"match": {"prefix": "/api/"}, "forward": true}],
    }));
    let auth = bearer(&t);
    let (edits, _, _, _) = allowed(f.decide(&http(Some(&auth)), NOW, true));
    assert_eq!(sets(&edits, "authorization"), Some(format!("Bearer {t}")));
    let req = Request {
        path: "/other",
        ..http(Some(&auth))
    };
    let (edits, _, _, _) = allowed(f.decide(&req, NOW, true));
    assert!(removes(&edits, "authorization"));
    assert_eq!(sets(&edits, "authorization"), None, "default: stripped");
    // A subprotocol token is stripped by default, forwarded only when asked.
    let proto = format!("sip, bearer.{t}");
    let (edits, _, _, _) = allowed(f.decide(
        &Request {
            path: "/ws",
            ..ws(&proto)
        },
        NOW,
        true,
    ));
    assert_eq!(sets(&edits, "authorization"), None);
    assert_eq!(
        sets(&edits, "sec-websocket-protocol").as_deref(),
        Some("sip")
    );
}

#[test]
fn every_credential_location_is_stripped_on_every_decision() {
    let t = token();
    let forged = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJtYWxsb3J5In0.";
    let mut f = config(json!({
        "rules": [{"match": {"prefix": "/public/"}, "allow_missing": true}],
    }));
    // A valid subprotocol token plus a forged Authorization: two different tokens, 400.
    let proto = format!("sip, bearer.{t}");
    let auth = bearer(forged);
    let req = Request {
        authorization: Some(&auth),
        ..ws(&proto)
    };
    let Decision::Deny { denial, reply } = f.decide(&req, NOW, true) else {
        panic!()
    };
    assert_eq!(denial, Denial::MultipleTokens);
    assert_eq!(&reply.body[2..4], &4400u16.to_be_bytes());
    // The same token twice is one credential; both copies are stripped.
    let same = bearer(&t);
    let req = Request {
        authorization: Some(&same),
        ..ws(&proto)
    };
    let (edits, _, _, _) = allowed(f.decide(&req, NOW, true));
    assert!(removes(&edits, "authorization"));
    // Authorization that is not a Bearer token is still removed when it is a source.
    let basic = "Basic YTpi".to_string();
    let req = Request {
        authorization: Some(&basic),
        ..ws(&proto)
    };
    let (edits, _, _, _) = allowed(f.decide(&req, NOW, true));
    assert!(removes(&edits, "authorization"));
    // allow_missing: `Bearer\t<jwt>`, and two headers (Envoy joins them with `,`), stripped.
    for value in [
        format!("Bearer\t{forged}"),
        format!("Basic YTpi, Bearer {forged}"),
    ] {
        let req = Request {
            path: "/public/x",
            ..http(Some(&value))
        };
        let d = f.decide(&req, NOW, true);
        match d {
            Decision::Allow { edits, token, .. } => {
                assert!(token.is_none());
                panic!("a present token is verified, not waved through: {edits:?}");
            }
            Decision::Deny { denial, .. } => {
                assert_eq!(denial, Denial::Token(TokenError::Algorithm), "{value}")
            }
            other => panic!("{other:?}"),
        }
    }
    let two = format!("Bearer {t}, Bearer {forged}");
    let req = Request {
        path: "/public/x",
        ..http(Some(&two))
    };
    assert_eq!(
        super::tests::denial(f.decide(&req, NOW, true)),
        Denial::MultipleTokens
    );
    // No token at all but a non-bearer credential on an allow_missing route: stripped.
    let req = Request {
        path: "/public/x",
        ..http(Some(&basic))
    };
    let (edits, tok, _, _) = allowed(f.decide(&req, NOW, true));
    assert!(tok.is_none());
    assert!(removes(&edits, "authorization"));

    // Only the subprotocol is a source: a Bearer Authorization header still never passes.
    let mut f = config(json!({"sources": [{"websocket_protocol": {}}]}));
    let req = Request {
        authorization: Some(&auth),
        ..ws(&proto)
    };
    let (edits, _, _, _) = allowed(f.decide(&req, NOW, true));
    assert!(removes(&edits, "authorization"));
    // Cookie sources of other rules are stripped too.
    let mut f = config(json!({
        "trusted_web_origins": ["https://app.test"],
        "rules": [{"match": {"prefix": "/c/"}, "sources": [{"cookie": {"name": "at"}}]}],
    }));
    let cookie = format!("at={forged}; x=1");
    let req = Request {
        cookie: Some(&cookie),
        ..http(Some(&same))
    };
    let (edits, _, _, _) = allowed(f.decide(&req, NOW, true));
    assert_eq!(sets(&edits, "cookie").as_deref(), Some("x=1"));
    assert!(f.config.needs.cookie);
}

#[test]
fn only_the_token_subprotocol_is_refused_without_echoing_it() {
    let mut f = config(json!({}));
    let only = format!("bearer.{}", token());
    let Decision::Deny { denial, reply } = f.decide(&ws(&only), NOW, true) else {
        panic!()
    };
    assert_eq!(denial, Denial::WsProtocol);
    assert_eq!(reply.status, 101);
    assert!(
        !reply
            .headers
            .iter()
            .any(|(k, _)| k == "sec-websocket-protocol"),
        "the token is never echoed in the 101"
    );
}

#[test]
fn published_key_id_is_the_verifying_keys() {
    // Two keys; the token has no kid and verifies with the second, published as `k2`.
    let other = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let other_jwk = json!({"kty": "OKP", "crv": "Ed25519", "kid": "k1", "x": b64(other.verifying_key().as_bytes())});
    let mut f = config(json!({
        "providers": [{"name": "main", "issuer": ISS, "audiences": ["api"],
            "jwks": {"inline": {"keys": [other_jwk, ed_jwk("k2")]}}}],
    }));
    let kidless = sign_ed(json!({"alg": "EdDSA"}), claims());
    let auth = bearer(&kidless);
    let (_, tok, _, _) = allowed(f.decide(&http(Some(&auth)), NOW, true));
    let tok = tok.unwrap();
    assert_eq!(tok.kid, None);
    assert_eq!(tok.key_id, "k2");
    // A key without kid is named by its RFC 7638 thumbprint.
    let x = b64(keypair().verifying_key().as_bytes());
    let mut f = config(json!({
        "providers": [{"name": "main", "issuer": ISS, "audiences": ["api"],
            "jwks": {"inline": {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x}]}}}],
    }));
    let (_, tok, _, _) = allowed(f.decide(&http(Some(&auth)), NOW, true));
    let want = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
    assert_eq!(
        tok.unwrap().key_id,
        crate::b64url(&crate::sha256(want.as_bytes()))
    );
}

#[test]
fn rfc7638_thumbprint_example() {
    // RFC 7638 section 3.1.
    let jwk = json!({"kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB", "alg": "RS256", "kid": "2011-04-29"});
    let key = VerifyingKey::from_jwk(&jwk).unwrap();
    assert_eq!(
        key.thumbprint,
        "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    );
    assert_eq!(key.id(), "2011-04-29");
}

#[test]
fn cookie_tokens_need_a_trusted_origin_for_writes_and_upgrades() {
    let mut f = config(json!({
        "trusted_web_origins": ["https://app.test"],
        "rules": [
            {"match": {"prefix": "/ws/"}, "sources": [{"websocket_protocol": {}}]},
            {"match": {"prefix": "/api/"}, "sources": [{"cookie": {"name": "at"}}]},
        ],
    }));
    let t = token();
    let cookie = format!("at={t}");
    let base = Request {
        cookie: Some(&cookie),
        ..http(None)
    };
    // A GET from anywhere is fine (CORS keeps the response from a foreign page).
    let get = Request {
        method: Some("GET"),
        origin: Some("https://evil.test"),
        ..base.clone()
    };
    assert!(matches!(f.decide(&get, NOW, true), Decision::Allow { .. }));
    for (method, origin, site, ok) in [
        ("POST", Some("https://app.test"), None, true),
        ("post", Some("https://APP.test"), None, true),
        ("DELETE", Some("https://evil.test"), None, false),
        ("PUT", None, None, false),
        ("PATCH", None, Some("same-origin"), true),
        ("POST", None, Some("same-site"), false),
    ] {
        let req = Request {
            method: Some(method),
            origin,
            sec_fetch_site: site,
            ..base.clone()
        };
        let d = f.decide(&req, NOW, true);
        if ok {
            assert!(matches!(d, Decision::Allow { .. }), "{method} {origin:?}");
        } else {
            let Decision::Deny { denial, reply } = d else {
                panic!("{method} {origin:?}")
            };
            assert_eq!((denial, reply.status), (Denial::Origin, 403));
            assert_eq!(denial.reason(), "origin");
        }
    }
    // An upgrade with a cookie token: even a GET, and no Origin is refused (close 4403).
    let mut f2 = config(json!({
        "sources": [{"cookie": {"name": "at"}}],
        "trusted_web_origins": ["https://app.test"],
    }));
    let up = Request {
        cookie: Some(&cookie),
        method: Some("GET"),
        ..ws("sip")
    };
    let Decision::Deny { denial, reply } = f2.decide(&up, NOW, true) else {
        panic!()
    };
    assert_eq!(denial, Denial::Origin);
    assert_eq!(&reply.body[2..4], &4403u16.to_be_bytes());
    let up_ok = Request {
        origin: Some("https://app.test"),
        ..up.clone()
    };
    assert!(matches!(
        f2.decide(&up_ok, NOW, true),
        Decision::Allow { .. }
    ));
    // The subprotocol route takes no cookie at all: the cookie is stripped, the token missing.
    let req = Request {
        path: "/ws/x",
        cookie: Some(&cookie),
        ..ws("sip")
    };
    assert_eq!(
        super::tests::denial(f.decide(&req, NOW, true)),
        Denial::Missing
    );
    // A cookie source without trusted origins does not load.
    for (cfg, field) in [
        (
            json!({"sources": [{"cookie": {"name": "at"}}]}),
            "trusted_web_origins",
        ),
        (
            json!({"rules": [{"match": {"prefix": "/a"}, "sources": [{"cookie": {"name": "at"}}]}]}),
            "rules[0].trusted_web_origins",
        ),
        (
            json!({"trusted_web_origins": ["app.test"]}),
            "trusted_web_origins[0]",
        ),
    ] {
        let mut base = json!({
            "providers": [{"name": "main", "issuer": ISS, "jwks": {"inline": {"keys": [ed_jwk("ed1")]}}}],
        });
        for (k, v) in cfg.as_object().unwrap() {
            base[k] = v.clone();
        }
        let err = JwtAuthConfig::compile(base.to_string().as_bytes())
            .err()
            .unwrap();
        assert_eq!(err.path, field);
    }
}

#[test]
fn dot_segments_never_reach_rule_matching() {
    let mut f = config(json!({
        "rules": [{"match": {"prefix": "/public/"}, "allow_missing": true}],
    }));
    let ok = Request {
        path: "/public/x",
        ..http(None)
    };
    assert!(matches!(
        f.decide(&ok, NOW, true),
        Decision::Allow { token: None, .. }
    ));
    for (path, reason) in [
        ("/public/../api/x", "path_dot_segment"),
        ("/public/%2e%2e/api/x", "path_dot_segment"),
        ("/public/.%2E/api", "path_dot_segment"),
        ("/public/..%2fapi/x", "path_separator"),
        ("/public/a%5c..", "path_separator"),
    ] {
        let req = Request { path, ..http(None) };
        let Decision::Deny { denial, reply } = f.decide(&req, NOW, true) else {
            panic!("{path}")
        };
        assert_eq!((denial.reason(), reply.status), (reason, 400), "{path}");
    }
    let req = Request {
        path: "/public/../api",
        ..ws("sip")
    };
    let Decision::Deny { reply, .. } = f.decide(&req, NOW, true) else {
        panic!()
    };
    assert_eq!(&reply.body[2..4], &4400u16.to_be_bytes());
}

#[test]
fn no_clock_fails_closed() {
    let mut f = config(json!({
        "rules": [{"match": {"prefix": "/public/"}, "allow_missing": true}],
    }));
    let auth = bearer(&token());
    let Decision::Deny { denial, reply } = f.decide_at(&http(Some(&auth)), None, true) else {
        panic!()
    };
    assert_eq!((denial.reason(), reply.status), ("clock", 503));
    let proto = format!("sip, bearer.{}", token());
    let Decision::Deny { reply, .. } = f.decide_at(&ws(&proto), None, true) else {
        panic!()
    };
    assert_eq!(&reply.body[2..4], &1013u16.to_be_bytes());
    // What needs no time still works: an allowed missing token.
    let req = Request {
        path: "/public/x",
        ..http(None)
    };
    assert!(matches!(
        f.decide_at(&req, None, true),
        Decision::Allow { token: None, .. }
    ));
}

#[test]
fn required_typ_is_compared_case_insensitively_with_or_without_application() {
    let mut f = config(json!({"required_typ": ["at+jwt", "JWT"]}));
    for (typ, ok) in [
        (Some("at+jwt"), true),
        (Some("AT+JWT"), true),
        (Some("application/at+jwt"), true),
        (Some("jwt"), true),
        (Some("logout+jwt"), false),
        (Some("id_token+jwt"), false),
        (None, false),
    ] {
        let mut header = json!({"alg": "EdDSA", "kid": "ed1"});
        if let Some(t) = typ {
            header["typ"] = json!(t);
        }
        let auth = bearer(&sign_ed(header, claims()));
        let d = f.decide(&http(Some(&auth)), NOW, true);
        if ok {
            allowed(d);
        } else {
            let d = denial(d);
            assert_eq!(
                (d, d.reason()),
                (Denial::Token(TokenError::Type), "typ"),
                "{typ:?}"
            );
        }
    }
    // Per provider: overrides the global list.
    let mut f = config(json!({
        "required_typ": ["at+jwt"],
        "providers": [{"name": "main", "issuer": ISS, "audiences": ["api"], "required_typ": ["JWT"],
            "jwks": {"inline": {"keys": [ed_jwk("ed1")]}}}],
    }));
    allowed(f.decide(&http(Some(&bearer(&token()))), NOW, true));
    // Off by default.
    let mut f = config(json!({}));
    let untyped = bearer(&sign_ed(json!({"alg": "EdDSA", "kid": "ed1"}), claims()));
    allowed(f.decide(&http(Some(&untyped)), NOW, true));
    let err = JwtAuthConfig::compile(
        json!({"providers": [{"name": "p", "issuer": ISS, "jwks": {"inline": {"keys": [ed_jwk("ed1")]}}}],
            "required_typ": []})
        .to_string()
        .as_bytes(),
    )
    .unwrap_err();
    assert_eq!(err.path, "required_typ");
}

#[test]
fn any_crit_header_is_refused_even_null() {
    let mut f = config(json!({}));
    for crit in [json!(null), json!([]), json!(["exp"]), json!("b64")] {
        let t = sign_ed(
            json!({"alg": "EdDSA", "kid": "ed1", "crit": crit}),
            claims(),
        );
        assert_eq!(
            denial(f.decide(&http(Some(&bearer(&t))), NOW, true)),
            Denial::Token(TokenError::Malformed),
            "{crit}"
        );
    }
}

#[test]
fn weak_or_non_verifying_keys_are_refused_inline_and_skipped_fetched() {
    let small_rsa = json!({"kty": "RSA", "kid": "r1", "e": "AQAB",
        "n": b64(&[&[0xc5u8][..], &[0x5a; 126][..], &[0x01][..]].concat())});
    let sign_only = {
        let mut k = ed_jwk("s1");
        k["key_ops"] = json!(["sign"]);
        k
    };
    let enc = {
        let mut k = ed_jwk("e1");
        k["use"] = json!("enc");
        k
    };
    for (key, field, says) in [
        (
            small_rsa.clone(),
            "providers[0].jwks.inline.keys[0].n",
            "2048",
        ),
        (
            sign_only.clone(),
            "providers[0].jwks.inline.keys[0].key_ops",
            "verify",
        ),
        (
            enc.clone(),
            "providers[0].jwks.inline.keys[0].use",
            "signatures",
        ),
    ] {
        let cfg = json!({"providers": [{"name": "p", "issuer": ISS, "jwks": {"inline": {"keys": [key]}}}]});
        let err = JwtAuthConfig::compile(cfg.to_string().as_bytes()).unwrap_err();
        assert_eq!(err.path, field);
        assert!(err.message.contains(says), "{err}");
    }
    let mut verify_ok = ed_jwk("v1");
    verify_ok["key_ops"] = json!(["verify"]);
    assert!(VerifyingKey::from_jwk(&verify_ok).is_ok());
    // A fetched JWKS skips (and counts) them, keeping the good key.
    let (keys, skipped) = KeySet::from_jwks(
        &json!({"keys": [small_rsa, sign_only, enc, ed_jwk("ed1")]}),
        false,
    )
    .unwrap();
    assert_eq!((keys.len(), skipped), (1, 3));
}

#[test]
fn a_jwks_refresh_keeps_cached_tokens_whose_key_is_still_published() {
    let mut f = JwtAuth::new(
        JwtAuthConfig::compile(
            json!({"providers": [{"name": "r", "issuer": ISS, "jwks": {"remote": {"cluster": "idp", "path": "/jwks"}}}]})
                .to_string()
                .as_bytes(),
        )
        .unwrap(),
    );
    let other = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let other_jwk = json!({"kty": "OKP", "crv": "Ed25519", "kid": "k9", "x": b64(other.verifying_key().as_bytes())});
    let set = |keys: Value| {
        KeySet::from_jwks(&json!({ "keys": keys }), false)
            .unwrap()
            .0
    };
    f.set_remote_keys(0, set(json!([ed_jwk("ed1")])));
    let auth = bearer(&token());
    let (_, _, _, hit) = allowed(f.decide(&http(Some(&auth)), NOW, true));
    assert!(!hit);
    // A refetch (say, for someone's unknown kid) that still publishes ed1: still a hit.
    f.set_remote_keys(0, set(json!([ed_jwk("ed1"), other_jwk.clone()])));
    let (_, _, _, hit) = allowed(f.decide(&http(Some(&auth)), NOW, true));
    assert!(hit, "the cache survives a refresh that keeps the key");
    // The same kid with other material is another key: dropped.
    let swapped = json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed1", "x": b64(other.verifying_key().as_bytes())});
    f.set_remote_keys(0, set(json!([swapped])));
    assert_eq!(
        denial(f.decide(&http(Some(&auth)), NOW, false)),
        Denial::Token(TokenError::Signature),
        "never served from the cache once its key is gone"
    );
    // Withdrawn altogether: refused.
    f.set_remote_keys(0, set(json!([ed_jwk("ed1")])));
    allowed(f.decide(&http(Some(&auth)), NOW, true));
    f.set_remote_keys(0, set(json!([other_jwk])));
    assert_eq!(
        denial(f.decide(&http(Some(&auth)), NOW, false)),
        Denial::Token(TokenError::UnknownKey)
    );
}

#[test]
fn session_keys_are_tagged_with_their_subject() {
    let mut f = config(json!({"session_claims": ["sid"]}));
    let key = |f: &mut JwtAuth, sub: &str, sid: &str| {
        let mut c = claims();
        c["sub"] = json!(sub);
        c["sid"] = json!(sid);
        let auth = bearer(&sign_ed(json!({"alg": "EdDSA", "kid": "ed1"}), c));
        match f.decide(&http(Some(&auth)), NOW, true) {
            Decision::Allow { socket, .. } => socket.unwrap().session.unwrap(),
            other => panic!("{other:?}"),
        }
    };
    let a1 = key(&mut f, "alice", "s1");
    let a2 = key(&mut f, "alice", "s2");
    let b1 = key(&mut f, "bob", "s1");
    assert_eq!(crate::sessions::subject(&a1), crate::sessions::subject(&a2));
    assert_ne!(crate::sessions::subject(&a1), crate::sessions::subject(&b1));
    assert_ne!(a1, b1, "the same sid of another subject is another session");
    assert!(!a1.contains("alice") && !a1.contains("s1"));
    assert_eq!(
        f.config.sessions_per_subject,
        crate::sessions::DEFAULT_PER_SUBJECT
    );
    let zero = json!({"providers": [{"name": "p", "issuer": ISS, "jwks": {"inline": {"keys": [ed_jwk("ed1")]}}}],
        "max_sessions_per_subject": 0});
    assert_eq!(
        JwtAuthConfig::compile(zero.to_string().as_bytes())
            .unwrap_err()
            .path,
        "max_sessions_per_subject"
    );
}

#[test]
fn require_kid_refuses_kidless_tokens_only_when_several_keys_fit() {
    let other = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let other_jwk = json!({"kty": "OKP", "crv": "Ed25519", "kid": "k1", "x": b64(other.verifying_key().as_bytes())});
    let kidless = bearer(&sign_ed(json!({"alg": "EdDSA"}), claims()));
    let two = |require: bool| {
        config(
            json!({"providers": [{"name": "main", "issuer": ISS, "audiences": ["api"], "require_kid": require,
            "jwks": {"inline": {"keys": [other_jwk.clone(), ed_jwk("ed1")]}}}]}),
        )
    };
    allowed(two(false).decide(&http(Some(&kidless)), NOW, true));
    assert_eq!(
        denial(two(true).decide(&http(Some(&kidless)), NOW, true)),
        Denial::Token(TokenError::UnknownKey)
    );
    allowed(two(true).decide(&http(Some(&bearer(&token()))), NOW, true));
    // One key of the algorithm: nothing is ambiguous.
    let mut one = config(
        json!({"providers": [{"name": "main", "issuer": ISS, "audiences": ["api"], "require_kid": true,
        "jwks": {"inline": {"keys": [ed_jwk("ed1")]}}}]}),
    );
    allowed(one.decide(&http(Some(&kidless)), NOW, true));
}

//! jwt-auth's decision on arbitrary request facts. The input is split at NUL bytes into the
//! path, `Authorization`, `Cookie` and `Sec-WebSocket-Protocol` values; its first byte picks
//! the upgrade and transport flags. Never a panic, and never an allowed token that is not the
//! one signed here (a fuzzer cannot forge an Ed25519 signature).
#![no_main]

use base64::Engine;
use gatehouse_core::jwt_auth::{Decision, JwtAuth, JwtAuthConfig, Request};
use libfuzzer_sys::fuzz_target;
use std::sync::{Mutex, OnceLock};

const NOW: u64 = 1_700_000_100;

fn b64(d: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d)
}

fn auth() -> &'static Mutex<JwtAuth> {
    static AUTH: OnceLock<Mutex<JwtAuth>> = OnceLock::new();
    AUTH.get_or_init(|| {
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let config = serde_json::json!({
            "providers": [{"name": "p", "issuer": "iss", "jwks": {"inline": {"keys": [
                {"kty": "OKP", "crv": "Ed25519", "kid": "k", "x": b64(key.verifying_key().as_bytes())}]}}}],
            "sources": [{"websocket_protocol": {}}, {"authorization": {}}, {"cookie": {"name": "t"}}],
            "trusted_web_origins": ["https://a.test"],
            "forward_claims": {"sub": "x-sub"},
            "rules": [{"match": {"prefix": "/open"}, "allow_missing": true},
                      {"match": {"prefix": "/admin"}, "require": [{"claim": "scope", "contains": "admin"}]}]
        });
        let mut auth = JwtAuth::new(JwtAuthConfig::compile(config.to_string().as_bytes()).expect("config"));
        // Warm the cache with the one valid token, so cache hits are fuzzed too.
        let input = format!(
            "{}.{}",
            b64(br#"{"alg":"EdDSA","kid":"k"}"#),
            b64(br#"{"iss":"iss","exp":1700000200,"sub":"a","scope":"phone:call"}"#)
        );
        let sig = ed25519_dalek::Signer::sign(&key, input.as_bytes());
        let bearer = format!("Bearer {input}.{}", b64(&sig.to_bytes()));
        let warm = Request { path: "/", authorization: Some(&bearer), ..Default::default() };
        assert!(matches!(auth.decide(&warm, NOW, true), Decision::Allow { token: Some(_), .. }));
        Mutex::new(auth)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let mut parts = text.split('\0');
    let path = parts.next().unwrap_or("/");
    let authorization = parts.next();
    let cookie = parts.next();
    let ws_protocols = parts.next();
    let req = Request {
        path,
        host: "gw",
        route_name: None,
        websocket: flags & 1 != 0,
        ws_key: (flags & 2 != 0).then_some("dGhlIHNhbXBsZSBub25jZQ=="),
        ws_protocols,
        authorization,
        cookie,
        tls: flags & 4 != 0,
        forwarded_proto: (flags & 8 != 0).then_some("https"),
        method: (flags & 32 != 0).then_some("POST"),
        origin: cookie,
        sec_fetch_site: (flags & 64 != 0).then_some("same-origin"),
    };
    let mut auth = auth().lock().expect("lock");
    match auth.decide(&req, NOW + u64::from(flags >> 4), flags & 16 != 0) {
        Decision::Allow { token: Some(t), .. } => assert_eq!(t.claims["sub"], "a"),
        Decision::Deny { reply, .. } => assert!(
            matches!(reply.status, 101 | 400 | 401 | 403),
            "status {}",
            reply.status
        ),
        _ => {}
    }
});

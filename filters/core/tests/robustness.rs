//! Robustness: hostile input never panics and never gets through. Mutations of a valid token
//! (flipped, cut, spliced bytes), random header soup and random configs all run through the same
//! entry points the filter uses. Deterministic (seeded), so a failure reproduces.

#![allow(clippy::unwrap_used, clippy::panic)] // test code

use gatehouse_core::jwt_auth::{Decision, JwtAuth, JwtAuthConfig, Request};
use serde_json::json;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const NOW: u64 = 1_700_000_100;

fn b64(d: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d)
}

fn setup() -> (JwtAuth, String) {
    let kp = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let cfg = json!({"providers": [{"name": "p", "issuer": "iss", "jwks": {"inline": {"keys": [
        {"kty": "OKP", "crv": "Ed25519", "kid": "k", "x": b64(kp.verifying_key().as_bytes())}]}}}],
        "sources": [{"websocket_protocol": {}}, {"authorization": {}}, {"cookie": {"name": "t"}}]});
    let auth = JwtAuth::new(JwtAuthConfig::compile(cfg.to_string().as_bytes()).unwrap());
    let input = format!(
        "{}.{}",
        b64(br#"{"alg":"EdDSA","kid":"k"}"#),
        b64(json!({"iss": "iss", "exp": NOW + 100, "sub": "a"})
            .to_string()
            .as_bytes())
    );
    let sig = ed25519_dalek::Signer::sign(&kp, input.as_bytes());
    (auth, format!("{input}.{}", b64(&sig.to_bytes())))
}

fn mutate(rng: &mut Rng, s: &str) -> String {
    let mut b = s.as_bytes().to_vec();
    for _ in 0..=rng.below(3) {
        match rng.below(4) {
            0 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 if !b.is_empty() => b.truncate(rng.below(b.len())),
            2 => {
                let i = rng.below(b.len() + 1);
                const BYTES: &[u8] = b"._-=A\x00\xff{}\" ,;";
                b.insert(i, BYTES[rng.below(BYTES.len())]);
            }
            _ => {
                let i = rng.below(b.len() + 1);
                let j = rng.below(b.len() + 1);
                let (lo, hi) = (i.min(j), i.max(j));
                let piece = b[lo..hi].to_vec();
                b.extend_from_slice(&piece);
            }
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

#[test]
fn mutated_tokens_never_panic_and_never_pass() {
    let (mut auth, token) = setup();
    let good = format!("Bearer {token}");
    assert!(matches!(
        auth.decide(
            &Request {
                path: "/",
                authorization: Some(&good),
                ..Default::default()
            },
            NOW,
            true
        ),
        Decision::Allow { .. }
    ));
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut refused = 0;
    for _ in 0..20_000 {
        let bad = mutate(&mut rng, &token);
        if bad == token {
            continue;
        }
        let auth_header = format!("Bearer {bad}");
        let d = auth.decide(
            &Request {
                path: "/",
                authorization: Some(&auth_header),
                ..Default::default()
            },
            NOW,
            true,
        );
        match d {
            Decision::Deny { .. } => refused += 1,
            // Base64 has slack bits: a flipped low bit in the last char can decode to the same
            // bytes. Then the token is, byte for byte, the signed one.
            Decision::Allow { token: Some(t), .. } => {
                assert_eq!(t.claims["sub"], "a", "{bad}");
            }
            other => panic!("unexpected {other:?} for {bad}"),
        }
    }
    assert!(refused > 19_000, "refused only {refused}");
}

#[test]
fn header_soup_never_panics() {
    let (mut auth, token) = setup();
    let mut rng = Rng(42);
    let pieces = [
        "bearer.", "sip", ",", " ", "t=", ";", "Bearer ", "=", "\"", &token, "é", "\u{0}",
        "?token=1", "#", "%",
    ];
    let soup = |rng: &mut Rng| -> String {
        (0..rng.below(8))
            .map(|_| pieces[rng.below(pieces.len())])
            .collect()
    };
    for _ in 0..20_000 {
        let (p, a, c, w) = (
            soup(&mut rng),
            soup(&mut rng),
            soup(&mut rng),
            soup(&mut rng),
        );
        let path = format!("/{p}");
        let req = Request {
            path: &path,
            host: "h",
            websocket: rng.below(2) == 0,
            ws_key: if rng.below(4) == 0 {
                None
            } else {
                Some("dGhlIHNhbXBsZSBub25jZQ==")
            },
            ws_protocols: Some(&w),
            authorization: Some(&a),
            cookie: Some(&c),
            route_name: None,
            tls: rng.below(2) == 0,
            forwarded_proto: Some(&a),
        };
        let _ = auth.decide(&req, NOW, true);
    }
}

#[test]
fn random_configs_never_panic() {
    let mut rng = Rng(7);
    let fragments = [
        r#"{"providers":[{"name":"a","issuer":"i","jwks":{"remote":{"cluster":"c","path":"/j"}}}]"#,
        r#","rules":[{"match":{"prefix":"/x"},"providers":["a"]}]"#,
        r#","sources":[{"cookie":{"name":""}}]"#,
        r#","forward_claims":{"sub":"x-sub"}"#,
        r#","max_token_bytes":0"#,
        r#"}"#,
        r#"{"#,
        r#"[]"#,
        r#"null"#,
        r#","require":[{"claim":"s","contains":"a","equals":"b"}]"#,
    ];
    for _ in 0..5_000 {
        let text: String = (0..1 + rng.below(5))
            .map(|_| fragments[rng.below(fragments.len())])
            .collect();
        let text = if rng.below(2) == 0 {
            mutate(&mut rng, &text)
        } else {
            text
        };
        if let Err(e) = JwtAuthConfig::compile(text.as_bytes()) {
            assert!(e.to_string().starts_with("config error"));
        }
    }
}

#[test]
fn websocket_byte_streams_never_panic_and_keep_non_reauth_bytes() {
    use gatehouse_core::reauth::{ClientFrames, Scan};
    let mut rng = Rng(0xfeed_5eed);
    for _ in 0..3000 {
        let len = rng.below(300);
        let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let mut frames = ClientFrames::default();
        // Fed whole, then in random chunks: never a panic; output never grows.
        if let Scan::Done {
            forward: Some(out), ..
        } = frames.scan(&data, "gatehouse.reauth")
        {
            assert!(out.len() <= data.len());
        }
        let mut frames = ClientFrames::default();
        let mut at = 0;
        while at < data.len() {
            let end = (at + 1 + rng.below(64)).min(data.len());
            let _ = frames.scan(&data[at..end], "gatehouse.reauth");
            at = end;
        }
    }
}

#[test]
fn session_buckets_and_turn_requests_survive_garbage() {
    use gatehouse_core::sessions::{lookup, record};
    use gatehouse_core::turn::{TurnConfig, TurnDecision, TurnRequest};
    let mut rng = Rng(0xabad_cafe);
    let turn = TurnConfig::compile(
        json!({"urls": ["turn:h"], "allowed_origins": ["https://a"], "secret": {"value": "0123456789abcdef"}})
            .to_string()
            .as_bytes(),
        &|_| None,
    )
    .unwrap();
    for _ in 0..3000 {
        let len = rng.below(200);
        let junk: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let _ = lookup(&junk, "s");
        if let Some(next) = record(&junk, "s", NOW + 10, NOW) {
            assert_eq!(lookup(&next, "s"), Some(NOW + 10));
        }
        let text = String::from_utf8_lossy(&junk).into_owned();
        let req = TurnRequest {
            method: "POST",
            path: "/turn-credentials",
            origin: Some("https://a"),
            claims: Some(&junk),
        };
        if let TurnDecision::Minted { user, .. } = turn.decide(&req, NOW) {
            assert!(!user.contains(':') && !user.chars().any(char::is_control));
        }
        // Claims that parse, with a random user: minted only for a usable user name.
        let claims = serde_json::to_vec(&json!({ "sub": text })).unwrap();
        let req = TurnRequest {
            claims: Some(&claims),
            ..req
        };
        match turn.decide(&req, NOW) {
            TurnDecision::Minted { user, .. } => assert_eq!(user, text),
            TurnDecision::Refused { .. } => {
                assert!(text.is_empty() || text.contains(':') || text.chars().any(char::is_control))
            }
            TurnDecision::Pass => panic!("the credentials path never passes"),
        }
    }
}

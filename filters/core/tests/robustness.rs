//! Robustness: hostile input never panics and never gets through. Mutations of a valid token
//! (flipped, cut, spliced bytes), random header soup and random configs all run through the same
//! entry points the filters use — jwt-auth, session-binding (configs, claims, cookies, revocation
//! documents, garbage in shared-data buckets), page-guard (configs, CSP reports, responses) and
//! turn-credentials. Deterministic (seeded), so a failure reproduces.

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
        "sources": [{"websocket_protocol": {}}, {"authorization": {}}, {"cookie": {"name": "t"}}],
        "trusted_web_origins": ["https://a.test"]});
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
            method: Some(&a),
            origin: Some(&c),
            sec_fetch_site: Some(&w),
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
    use gatehouse_core::reauth::ClientFrames;
    let mut rng = Rng(0xfeed_5eed);
    for _ in 0..3000 {
        let len = rng.below(300);
        let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        // Fed whole, then in random chunks: never a panic; output never grows, and what comes
        // out (plus what is still held back) is the same however the bytes were cut.
        let mut frames = ClientFrames::default();
        let fed = frames.feed(&data, "gatehouse.reauth");
        let whole = fed.forward.unwrap_or_else(|| data.clone());
        assert!(whole.len() <= data.len());
        let whole_held = frames.held();
        let mut frames = ClientFrames::default();
        let mut out = Vec::new();
        let mut at = 0;
        while at < data.len() {
            let end = (at + 1 + rng.below(64)).min(data.len());
            let chunk = &data[at..end];
            let fed = frames.feed(chunk, "gatehouse.reauth");
            out.extend_from_slice(fed.forward.as_deref().unwrap_or(chunk));
            at = end;
        }
        assert_eq!((out, frames.held()), (whole, whole_held));
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
        if let Some(next) = record(&junk, "t.s", NOW + 10, NOW, 2) {
            assert_eq!(lookup(&next, "t.s"), Some(NOW + 10));
        }
        let text = String::from_utf8_lossy(&junk).into_owned();
        let req = TurnRequest {
            method: "POST",
            path: "/turn-credentials",
            origin: Some("https://a"),
            claims: Some(&junk),
        };
        if let TurnDecision::Minted { user, .. } = turn.decide(&req, Some(NOW)) {
            assert!(!user.contains(':') && !user.chars().any(char::is_control));
        }
        // Claims that parse, with a random user: minted only for a usable user name.
        let claims = serde_json::to_vec(&json!({ "sub": text })).unwrap();
        let req = TurnRequest {
            claims: Some(&claims),
            ..req
        };
        match turn.decide(&req, Some(NOW)) {
            TurnDecision::Minted { user, .. } => assert_eq!(user, text),
            TurnDecision::Refused { .. } => {
                assert!(text.is_empty() || text.contains(':') || text.chars().any(char::is_control))
            }
            TurnDecision::Pass => panic!("the credentials path never passes"),
        }
    }
}

/// A mutated copy of one of `seeds`, or the seed itself.
fn pick(rng: &mut Rng, seeds: &[&str]) -> String {
    let s = seeds[rng.below(seeds.len())];
    if rng.below(3) == 0 {
        s.to_string()
    } else {
        mutate(rng, s)
    }
}

#[test]
fn session_binding_survives_random_configs_claims_cookies_feeds_and_buckets() {
    use gatehouse_core::session_binding::revocation::{RevocationList, RevocationState};
    use gatehouse_core::session_binding::store::{JtiLimits, Kv, KvStore, MemoryKv, SlotLimits};
    use gatehouse_core::session_binding::{
        BindDecision, BindRequest, SessionBinding, SessionBindingConfig,
    };
    let mut rng = Rng(0x5e55_1011);
    let configs = [
        r#"{"rules":[{"match":{"prefix":"/ws/rooms/"},"session":{"cookie":"sid"},"scope":[{"template":"/ws/rooms/{room}"}],"single_use":true,"max_sockets":{"limit":2,"per_claim":"sub"},"fingerprint":"required"}],"revocation":{"cluster":"c","path":"/r","refresh_seconds":1,"max_stale_seconds":5,"when_stale":"closed"}}"#,
        r#"{"scope":[{"template":"/t/{tenant}/...","claims":{"tenant":"tenant_id"}}],"allow_missing":true}"#,
        r#"{"claims_from":[{"jwt_authn":{"payload_key":"p"}}],"jti":{"max_entries":4,"buckets":2,"when_full":"evict"}}"#,
        r#"{"rules":[{"match":{"host":""}}]}"#,
    ];
    for _ in 0..2000 {
        let text = pick(&mut rng, &configs);
        if let Err(e) = SessionBindingConfig::compile(text.as_bytes()) {
            assert!(e.to_string().starts_with("config error"), "{e}");
        }
    }
    let config = SessionBindingConfig::compile(configs[0].as_bytes()).unwrap();
    let binding = SessionBinding::new(config);
    // Garbage in some buckets (another writer, an old format) reads as no entries, never a panic.
    let mut kv = MemoryKv::default();
    for b in 0..4 {
        if b % 2 == 0 {
            let junk: Vec<u8> = (0..rng.below(200)).map(|_| rng.next() as u8).collect();
            kv.set(&format!("gatehouse.session_binding.jti.{b}"), &junk, None);
            kv.set(&format!("gatehouse.session_binding.slots.{b}"), &junk, None);
        }
    }
    let mut store = KvStore::new(
        kv,
        JtiLimits {
            buckets: 4,
            per_bucket: 8,
            evict: false,
        },
        SlotLimits {
            buckets: 4,
            per_bucket: 8,
        },
    );
    store.create_buckets();
    let feeds = [
        r#"{"revoked":[{"jti":"j"},{"sid":"s"},{"sub":"a","issued_before":5},{"kid":"k"}]}"#,
        r#"[{"sub":"a"}]"#,
        r#"{"revoked":{}}"#,
    ];
    let claim_docs = [
        r#"{"sub":"alice","sid":"s-1","room":"r1","jti":"j-1","exp":2000000000,"cfp":"x"}"#,
        r#"{"sub":["a"],"room":["r1","r2"],"jti":7,"exp":-1}"#,
        r#"{"sub":null,"sid":{},"room":""}"#,
    ];
    let paths = [
        "/ws/rooms/r1",
        "/ws/rooms/%72%31",
        "/ws/rooms/",
        "/ws/rooms/r1/x?a=b",
        "/other",
    ];
    let (mut allowed, mut denied) = (0, 0);
    for i in 0..5000 {
        let mut state = RevocationState::new(NOW);
        if let Ok(list) = RevocationList::parse(pick(&mut rng, &feeds).as_bytes()) {
            state.loaded(list, NOW);
        }
        let claims: Option<serde_json::Map<String, serde_json::Value>> =
            serde_json::from_str(&pick(&mut rng, &claim_docs)).ok();
        let path = pick(&mut rng, &paths);
        let cookie = pick(&mut rng, &["sid=s-1", "a=b; sid=s-1", "sid=", ""]);
        let ua = pick(&mut rng, &["Mozilla/5.0", ""]);
        let slot = format!("slot-{i}");
        let req = BindRequest {
            path: &path,
            host: "gw",
            websocket: rng.below(2) == 0,
            ws_key: Some("dGhlIHNhbXBsZSBub25jZQ=="),
            ws_protocols: Some("sip"),
            cookie: Some(&cookie),
            user_agent: Some(&ua),
            client_ip: "192.0.2.7".parse().ok(),
            claims: claims.as_ref(),
            kid: Some("k"),
            slot_id: &slot,
            ..Default::default()
        };
        let now = NOW + rng.below(20) as u64;
        match binding.decide(&req, now, Some(&state), &mut store) {
            // A token the feed revoked, or a stale list (fail-closed), never passes.
            BindDecision::Allow { .. } => {
                allowed += 1;
                assert!(
                    !state.is_stale(now, 5),
                    "a stale list refuses (fail-closed)"
                )
            }
            BindDecision::Deny { reply, .. } => {
                denied += 1;
                assert!(
                    matches!(reply.status, 101 | 400 | 401 | 403 | 429 | 503),
                    "{}",
                    reply.status
                )
            }
            BindDecision::Pass => {}
        }
    }
    assert!(
        allowed > 0 && denied > 0,
        "both outcomes are exercised: {allowed} / {denied}"
    );
}

#[test]
fn page_guard_survives_random_configs_reports_and_responses() {
    use gatehouse_core::page_guard::{
        parse_reports, PageGuardConfig, PageRequest, PageResponse, RequestDecision,
    };
    let mut rng = Rng(0x9a9e_6a4d);
    let configs = [
        r#"{"csp":{"default-src":["'self'"],"script-src":["'strict-dynamic'"]},"nonce":{"placeholder":"GH_NONCE_PLACEHOLDER_0123"},"sri":{"manifest":{"/a.js":"sha384-11LCxR+6DimqGQVwqdQlPkQHegWNMpf6OlYw1b0BJiL5fCisrtMTtcg7uZDKp9qF"},"integrity_policy":"report_only"},"permissions_policy":{"camera":["self"]},"reports":{"path":"/r"},"rules":[{"match":{"prefix":"/off"},"disabled":true}]}"#,
        r#"{"headers":{"referrer-policy":"no-referrer"},"hsts":{"max_age_seconds":0},"upstream_headers":"merge"}"#,
        r#"{"nonce":{"placeholder":{"env":"X"}},"max_body_bytes":0}"#,
    ];
    for _ in 0..3000 {
        let text = pick(&mut rng, &configs);
        if let Err(e) = PageGuardConfig::compile(text.as_bytes(), &|_| None) {
            assert!(e.to_string().starts_with("config error"), "{e}");
        }
    }
    let config = PageGuardConfig::compile(configs[0].as_bytes(), &|_| None).unwrap();
    let reports = [
        r#"[{"type":"csp-violation","body":{"effectiveDirective":"script-src-elem","blockedURL":"inline"}}]"#,
        r#"{"csp-report":{"violated-directive":"script-src","blocked-uri":"https://evil"}}"#,
    ];
    let types = [
        "application/reports+json",
        "application/csp-report",
        "text/html",
        "",
    ];
    for _ in 0..3000 {
        let body = pick(&mut rng, &reports);
        let ct = types[rng.below(types.len())];
        let _ = parse_reports(Some(ct), body.as_bytes(), 64 * 1024);
        let path = pick(&mut rng, &["/", "/r", "/off/x", "/page?x=1"]);
        let method = ["GET", "POST", "HEAD", "OPTIONS"][rng.below(4)];
        let decision = config.on_request(&PageRequest {
            method,
            path: &path,
            host: "gw",
            route_name: None,
        });
        if let RequestDecision::Guard { policy, .. } = decision {
            let content_type = pick(
                &mut rng,
                &["text/html; charset=utf-8", "TEXT/HTML", "text/plain", ""],
            );
            let encoding = pick(&mut rng, &["gzip", "identity", ""]);
            let plan = config.on_response(
                config.policy(policy),
                &PageResponse {
                    status: [200, 204, 304, 500][rng.below(4)],
                    content_type: Some(&content_type),
                    content_encoding: Some(&encoding),
                    content_length: Some(rng.below(10)),
                    head: method == "HEAD",
                    tls: rng.below(2) == 0,
                    forwarded_proto: None,
                    has_header: &|name| name == "content-security-policy",
                },
                Some([7; 32]),
            );
            // A nonce promised in the CSP is only ever this response's.
            for edit in &plan.edits {
                let text = format!("{edit:?}");
                assert!(
                    !text.contains("GH_NONCE_PLACEHOLDER_0123"),
                    "the placeholder never goes into a header"
                );
            }
        }
    }
}

use super::revocation::{RevocationState, Revoked, TokenId};
use super::store::{BindingStore, JtiLimits, SlotLimits};
use super::store::{KvStore, MemoryKv};
use super::*;
use crate::jwt::Claims;
use crate::session_binding::revocation::RevocationList;
use crate::stats::SessionBindingStat;
use serde_json::json;
use serde_json::Value;
use std::net::IpAddr;

fn config(v: Value) -> SessionBinding {
    SessionBinding::new(SessionBindingConfig::compile(v.to_string().as_bytes()).unwrap())
}

fn store() -> KvStore<MemoryKv> {
    let mut s = KvStore::new(
        MemoryKv::default(),
        JtiLimits {
            buckets: 4,
            per_bucket: 16,
            evict: false,
        },
        SlotLimits {
            buckets: 4,
            per_bucket: 16,
        },
    );
    s.create_buckets();
    s
}

fn claims(v: Value) -> Claims {
    match v {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

fn ws<'a>(path: &'a str, c: &'a Claims, cookie: Option<&'a str>) -> BindRequest<'a> {
    BindRequest {
        path,
        host: "gw",
        websocket: true,
        ws_key: Some("dGhlIHNhbXBsZSBub25jZQ=="),
        ws_protocols: Some("sip"),
        cookie,
        claims: Some(c),
        slot_id: "slot-1",
        ..Default::default()
    }
}

fn denial(d: BindDecision) -> (BindDenial, u32, Option<u16>) {
    match d {
        BindDecision::Deny { denial, reply } => {
            let code =
                (reply.status == 101).then(|| u16::from_be_bytes([reply.body[2], reply.body[3]]));
            (denial, reply.status, code)
        }
        other => panic!("expected a denial, got {other:?}"),
    }
}

fn allowed(d: &BindDecision) -> bool {
    matches!(d, BindDecision::Allow { .. })
}

fn terms(token: TokenId) -> LiveTerms {
    LiveTerms {
        token,
        slot: None,
        single_use: false,
        reauth: None,
    }
}

#[test]
fn session_binding_needs_the_cookie_whose_hash_the_token_carries() {
    let b = config(json!({"session": {"cookie": "__Host-gh_sid"}}));
    assert_eq!(
        b.config.default_binding.session,
        Some(SessionRule {
            claim: "sid_hash".into(),
            cookie: "__Host-gh_sid".into(),
            mode: SessionMode::Sha256,
            key: None,
        }),
        "the default: the claim `sid_hash` carries the cookie's SHA-256"
    );
    let secret = "k3Yb8w1QmZ0pVJt6xLr2aA";
    assert_eq!(
        session_hash(secret),
        crate::b64url(&crate::sha256(secret.as_bytes()))
    );
    let c = claims(json!({"sub": "alice", "sid": "s-123", "sid_hash": session_hash(secret)}));
    let mut st = store();
    let cookie = format!("a=1; __Host-gh_sid={secret}");
    assert!(allowed(&b.decide(
        &ws("/ws/echo", &c, Some(&cookie)),
        0,
        None,
        &mut st
    )));
    // A leaked token is useless without the cookie: what the token reveals does not open it.
    for forged in [
        "__Host-gh_sid=s-123".to_string(),
        format!("__Host-gh_sid={}", session_hash(secret)),
        "__Host-gh_sid=".to_string(),
        "__Host-gh_sid=other".to_string(),
    ] {
        let (d, status, code) =
            denial(b.decide(&ws("/ws/echo", &c, Some(&forged)), 0, None, &mut st));
        assert!(
            matches!(d, BindDenial::SessionMismatch | BindDenial::NoSessionCookie),
            "{forged}: {d:?}"
        );
        assert_eq!((status, code), (101, Some(4401)), "{forged}");
    }
    assert_eq!(
        denial(b.decide(&ws("/ws/echo", &c, None), 0, None, &mut st)),
        (BindDenial::NoSessionCookie, 101, Some(4401))
    );
    // A token without the hash claim (only a `sid`) is refused.
    let no_hash = claims(json!({"sub": "alice", "sid": secret}));
    assert_eq!(
        denial(b.decide(&ws("/ws/echo", &no_hash, Some(&cookie)), 0, None, &mut st)).0,
        BindDenial::NoSessionClaim
    );
    // Plain HTTP: 401 problem+json.
    let mut http = ws("/api/x", &c, Some("__Host-gh_sid=nope"));
    http.websocket = false;
    assert_eq!(denial(b.decide(&http, 0, None, &mut st)).1, 401);
    // A custom claim name.
    let b = config(json!({"session": {"claim": "cookie_hash", "cookie": "s"}}));
    let c = claims(json!({"cookie_hash": session_hash("42")}));
    assert!(allowed(&b.decide(
        &ws("/", &c, Some("s=42")),
        0,
        None,
        &mut st
    )));
}

#[test]
fn the_weak_plain_mode_compares_the_claim_with_the_cookie_only_when_configured() {
    let b = config(json!({"session": {"mode": "plain", "cookie": "gh-sid"}}));
    let s = b.config.default_binding.session.as_ref().unwrap();
    assert_eq!((s.claim.as_str(), s.mode), ("sid", SessionMode::Plain));
    let c = claims(json!({"sid": "s-123"}));
    let mut st = store();
    assert!(allowed(&b.decide(
        &ws("/ws", &c, Some("gh-sid=s-123")),
        0,
        None,
        &mut st
    )));
    assert_eq!(
        denial(b.decide(&ws("/ws", &c, Some("gh-sid=s-999")), 0, None, &mut st)).0,
        BindDenial::SessionMismatch
    );
    // Numbers compare as text.
    let b = config(json!({"session": {"mode": "plain", "claim": "session_id", "cookie": "s"}}));
    let c = claims(json!({"session_id": 42}));
    assert!(allowed(&b.decide(
        &ws("/", &c, Some("s=42")),
        0,
        None,
        &mut st
    )));
    let err = SessionBindingConfig::compile(br#"{"session":{"cookie":"s","mode":"md5"}}"#)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("config error at session.mode"), "{err}");
}

#[test]
fn host_prefixed_cookie_names_are_accepted() {
    for name in ["__Host-gh_sid", "__Host-gh-sid", "__Secure-sid"] {
        let b = config(json!({"session": {"cookie": name}}));
        let c = claims(json!({"sid_hash": session_hash("v")}));
        let mut st = store();
        let cookie = format!("{name}=v");
        assert!(allowed(&b.decide(
            &ws("/", &c, Some(&cookie)),
            0,
            None,
            &mut st
        )));
        // The unprefixed name (a cookie a sibling subdomain could toss) is another cookie.
        let tossed = format!(
            "{}=v",
            name.trim_start_matches("__Host-")
                .trim_start_matches("__Secure-")
        );
        assert_eq!(
            denial(b.decide(&ws("/", &c, Some(&tossed)), 0, None, &mut st)).0,
            BindDenial::NoSessionCookie
        );
    }
}

#[test]
fn no_claims_is_401_unless_allowed_and_off_rules_pass() {
    let b = config(json!({"rules": [
        {"match": {"prefix": "/public/"}, "disabled": true},
        {"match": {"prefix": "/maybe/"}, "allow_missing": true}
    ]}));
    let mut st = store();
    let mut r = BindRequest {
        path: "/ws/x",
        ..Default::default()
    };
    assert_eq!(denial(b.decide(&r, 0, None, &mut st)).1, 401);
    r.path = "/public/x";
    assert_eq!(b.decide(&r, 0, None, &mut st), BindDecision::Pass);
    r.path = "/maybe/x";
    assert_eq!(b.decide(&r, 0, None, &mut st), BindDecision::Pass);
}

#[test]
fn scope_templates_bind_path_segments_to_claims() {
    let b = config(json!({"scope": [
        {"template": "/ws/rooms/{room}"},
        {"template": "/tenants/{tenant}/agents/{agent}/...", "claims": {"tenant": "tenant_id", "agent": "agent_id"}}
    ]}));
    let mut st = store();
    let c = claims(json!({"room": "lobby", "tenant_id": "t1", "agent_id": ["a1", "a2"]}));
    let ok =
        |p: &str, st: &mut KvStore<MemoryKv>| allowed(&b.decide(&ws(p, &c, None), 0, None, st));
    assert!(ok("/ws/rooms/lobby", &mut st));
    assert!(ok("/ws/rooms/lobby?x=1", &mut st));
    assert!(ok("/ws/rooms/lob%62y", &mut st), "percent-decoded");
    assert!(
        ok("/tenants/t1/agents/a2/calls/7", &mut st),
        "list claims contain the segment"
    );
    assert!(ok("/tenants/t1/agents/a1", &mut st), "`...` may be empty");
    for (path, want) in [
        ("/ws/rooms/kitchen", BindDenial::ScopeMismatch),
        ("/tenants/t2/agents/a1/x", BindDenial::ScopeMismatch),
        ("/tenants/t1/agents/a3", BindDenial::ScopeMismatch),
        ("/ws/rooms/", BindDenial::ScopeMismatch),
        // Shapes no template has are refused: a route with templates never passes unchecked.
        ("/ws/rooms/lobby/extra", BindDenial::ScopeUnknown),
        ("/ws/other", BindDenial::ScopeUnknown),
    ] {
        let (d, status, code) = denial(b.decide(&ws(path, &c, None), 0, None, &mut st));
        assert_eq!((d, status, code), (want, 101, Some(4403)), "{path}");
    }
}

#[test]
fn template_config_errors_name_the_field() {
    let err = |v: Value| {
        SessionBindingConfig::compile(v.to_string().as_bytes())
            .unwrap_err()
            .to_string()
    };
    assert!(err(json!({"scope": [{"template": "ws/{a}"}]}))
        .starts_with("config error at scope[0].template"));
    assert!(err(json!({"scope": [{"template": "/ws/x"}]})).contains("no `{variable}`"));
    assert!(err(json!({"scope": [{"template": "/{a}/{a}"}]})).contains("twice"));
    assert!(err(json!({"scope": [{"template": "/.../{a}"}]})).contains("last segment"));
    assert!(err(json!({"scope": [{"template": "/r-{a}"}]})).contains("whole segment"));
    assert!(
        err(json!({"scope": [{"template": "/{a}", "claims": {"b": "c"}}]}))
            .starts_with("config error at scope[0].claims.b")
    );
    assert!(
        err(json!({"rules": [{"match": {"prefix": "/x"}, "scope": [{"template": "x"}]}]}))
            .starts_with("config error at rules[0].scope[0].template")
    );
    assert!(err(json!({"rules": [{"match": {"prefix": "x"}}]}))
        .starts_with("config error at rules[0].match.prefix"));
    assert!(err(
        json!({"rules": [{"match": {"prefix": "/x"}, "disabled": true, "single_use": true}]})
    )
    .contains("rules[0].disabled"));
    assert!(
        err(json!({"session": {"cookie": "a b"}})).starts_with("config error at session.cookie")
    );
    assert!(err(json!({"fingerprint": "maybe"})).starts_with("config error at fingerprint"));
    assert!(
        err(json!({"max_sockets": {"limit": 0}})).starts_with("config error at max_sockets.limit")
    );
    assert!(
        err(json!({"jti": {"when_full": "panic"}})).starts_with("config error at jti.when_full")
    );
    assert!(err(json!({"jti": {"buckets": 0}})).starts_with("config error at jti.buckets"));
    assert!(err(json!({"sockets": {"slot_ttl_seconds": 1}}))
        .starts_with("config error at sockets.slot_ttl_seconds"));
    assert!(err(json!({"revocation": {"cluster": "c", "path": "x"}}))
        .starts_with("config error at revocation.path"));
    assert!(
        err(json!({"revocation": {"cluster": "c", "path": "/x", "when_stale": "maybe"}}))
            .starts_with("config error at revocation.when_stale")
    );
    assert!(err(json!({"claims_from": []})).starts_with("config error at claims_from"));
    assert!(err(json!({"bogus": 1})).contains("bogus"));
}

#[test]
fn single_use_tokens_are_refused_on_replay() {
    let b = config(json!({"single_use": true}));
    let mut st = store();
    let c = claims(json!({"iss": "i", "jti": "j-1", "exp": 1000}));
    assert!(allowed(&b.decide(&ws("/ws", &c, None), 100, None, &mut st)));
    assert_eq!(
        denial(b.decide(&ws("/ws", &c, None), 101, None, &mut st)),
        (BindDenial::Replay, 101, Some(4401))
    );
    // The same jti from another issuer is another token.
    let other = claims(json!({"iss": "i2", "jti": "j-1", "exp": 1000}));
    assert!(allowed(&b.decide(
        &ws("/ws", &other, None),
        101,
        None,
        &mut st
    )));
    let no_jti = claims(json!({"iss": "i"}));
    assert_eq!(
        denial(b.decide(&ws("/ws", &no_jti, None), 0, None, &mut st)).0,
        BindDenial::NoJti
    );
    // Remembered until exp + skew (30 s), then forgotten (the token itself is expired then).
    assert_eq!(
        denial(b.decide(&ws("/ws", &c, None), 1029, None, &mut st)).0,
        BindDenial::Replay
    );
    assert!(allowed(&b.decide(
        &ws("/ws", &c, None),
        1031,
        None,
        &mut st
    )));
}

#[test]
fn a_full_jti_store_refuses_with_429_or_evicts() {
    let b = config(json!({"single_use": true, "jti": {"max_entries": 2, "buckets": 1}}));
    let mut st = KvStore::new(
        MemoryKv::default(),
        b.config.jti.limits,
        b.config.sockets.limits,
    );
    st.create_buckets();
    for j in ["a", "b"] {
        let c = claims(json!({"jti": j, "exp": 1000}));
        assert!(allowed(&b.decide(&ws("/ws", &c, None), 0, None, &mut st)));
    }
    let c = claims(json!({"jti": "c", "exp": 1000}));
    assert_eq!(
        denial(b.decide(&ws("/ws", &c, None), 0, None, &mut st)),
        (BindDenial::JtiStoreFull, 101, Some(4429))
    );
    let b = config(
        json!({"single_use": true, "jti": {"max_entries": 1, "buckets": 1, "when_full": "evict"}}),
    );
    let mut st = KvStore::new(
        MemoryKv::default(),
        b.config.jti.limits,
        b.config.sockets.limits,
    );
    st.create_buckets();
    let a = claims(json!({"jti": "a", "exp": 1000}));
    assert!(allowed(&b.decide(&ws("/ws", &a, None), 0, None, &mut st)));
    match b.decide(&ws("/ws", &c, None), 0, None, &mut st) {
        BindDecision::Allow { notes, .. } => {
            assert_eq!(notes, vec![SessionBindingStat::JtiEvicted])
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_socket_cap_counts_upgrades_per_claim() {
    let b = config(json!({"max_sockets": {"limit": 2}}));
    let mut st = store();
    let c = claims(json!({"sub": "alice"}));
    let mut slots = Vec::new();
    for id in ["s1", "s2"] {
        let mut r = ws("/ws", &c, None);
        r.slot_id = id;
        match b.decide(&r, 0, None, &mut st) {
            BindDecision::Allow { live: Some(l), .. } => slots.push(l.slot.unwrap()),
            other => panic!("{other:?}"),
        }
    }
    let mut r = ws("/ws", &c, None);
    r.slot_id = "s3";
    assert_eq!(
        denial(b.decide(&r, 0, None, &mut st)),
        (BindDenial::TooManySockets, 101, Some(4429))
    );
    // Plain requests are not sockets.
    let mut http = r.clone();
    http.websocket = false;
    assert!(allowed(&b.decide(&http, 0, None, &mut st)));
    // Another user has their own slots.
    let bob = claims(json!({"sub": "bob"}));
    let mut r2 = ws("/ws", &bob, None);
    r2.slot_id = "s4";
    assert!(allowed(&b.decide(&r2, 0, None, &mut st)));
    // Closing one frees a slot.
    let (owner, slot) = &slots[0];
    st.release_slot(owner, slot, 1);
    assert!(allowed(&b.decide(&r, 1, None, &mut st)));
    let none = claims(json!({"sid": "x"}));
    assert_eq!(
        denial(b.decide(&ws("/ws", &none, None), 0, None, &mut st)).0,
        BindDenial::NoCapClaim
    );
}

#[test]
fn a_refused_request_uses_neither_its_jti_nor_a_slot() {
    let b = config(json!({"single_use": true, "max_sockets": {"limit": 1},
                          "session": {"cookie": "sid"}}));
    let mut st = store();
    let c = claims(json!({"sub": "a", "sid_hash": session_hash("s"), "jti": "j", "exp": 100}));
    assert!(!allowed(&b.decide(
        &ws("/ws", &c, Some("sid=wrong")),
        0,
        None,
        &mut st
    )));
    assert!(allowed(&b.decide(
        &ws("/ws", &c, Some("sid=s")),
        0,
        None,
        &mut st
    )));
}

#[test]
fn fingerprints_bind_the_user_agent_and_network() {
    let ip: IpAddr = "203.0.113.77".parse().unwrap();
    assert_eq!(ip_prefix(ip), "203.0.113.0/24");
    assert_eq!(
        ip_prefix("::ffff:203.0.113.9".parse().unwrap()),
        "203.0.113.0/24"
    );
    assert_eq!(
        ip_prefix("2001:db8:1:2:3:4:5:6".parse().unwrap()),
        "2001:db8:1:2::/64"
    );
    let cfp = fingerprint("UA/1", ip);
    assert_eq!(cfp, crate::b64url(&crate::sha256(b"UA/1|203.0.113.0/24")));
    assert_eq!(parse_address("203.0.113.77:5555"), Some(ip));
    assert_eq!(
        parse_address("[2001:db8::1]:443"),
        Some("2001:db8::1".parse().unwrap())
    );
    assert_eq!(parse_address("nonsense"), None);

    let b = config(json!({}));
    let mut st = store();
    let c = claims(json!({"cfp": cfp}));
    let mut r = ws("/ws", &c, None);
    r.user_agent = Some("UA/1");
    r.client_ip = Some("203.0.113.200".parse().unwrap());
    assert!(allowed(&b.decide(&r, 0, None, &mut st)), "same /24");
    r.client_ip = Some("203.0.114.1".parse().unwrap());
    assert_eq!(
        denial(b.decide(&r, 0, None, &mut st)),
        (BindDenial::FingerprintMismatch, 101, Some(4401))
    );
    r.client_ip = Some(ip);
    r.user_agent = Some("curl/8");
    assert_eq!(
        denial(b.decide(&r, 0, None, &mut st)).0,
        BindDenial::FingerprintMismatch
    );
    // Without cfp: fine by default, refused when required.
    let none = claims(json!({}));
    assert!(allowed(&b.decide(
        &ws("/ws", &none, None),
        0,
        None,
        &mut st
    )));
    let req = config(json!({"fingerprint": "required"}));
    assert_eq!(
        denial(req.decide(&ws("/ws", &none, None), 0, None, &mut st)).0,
        BindDenial::NoFingerprint
    );
    let off = config(json!({"fingerprint": "off"}));
    let mut r = ws("/ws", &c, None);
    r.client_ip = Some("10.0.0.1".parse().unwrap());
    assert!(allowed(&off.decide(&r, 0, None, &mut st)));
}

fn feed(when_stale: &str) -> Value {
    json!({"cluster": "rev", "path": "/revoked.json", "refresh_seconds": 5, "max_stale_seconds": 30,
           "when_stale": when_stale})
}

#[test]
fn revoked_tokens_are_refused_and_live_sockets_closed() {
    let b = config(json!({"revocation": feed("open")}));
    let mut st = store();
    let mut state = RevocationState::new(0);
    state.loaded(
        RevocationList::parse(br#"[{"jti":"bad"},{"kid":"old"},{"sub":"eve","issued_before":50}]"#)
            .unwrap(),
        10,
    );
    let ok = claims(json!({"sub": "alice", "jti": "good", "iat": 5}));
    let mut r = ws("/ws", &ok, None);
    r.kid = Some("current");
    assert!(allowed(&b.decide(&r, 20, Some(&state), &mut st)));
    r.kid = Some("old");
    assert_eq!(
        denial(b.decide(&r, 20, Some(&state), &mut st)),
        (BindDenial::Revoked(Revoked::Kid), 101, Some(4401))
    );
    let bad = claims(json!({"sub": "alice", "jti": "bad"}));
    assert_eq!(
        denial(b.decide(&ws("/ws", &bad, None), 20, Some(&state), &mut st)).0,
        BindDenial::Revoked(Revoked::Jti)
    );
    let eve_old = claims(json!({"sub": "eve", "iat": 49}));
    assert_eq!(
        denial(b.decide(&ws("/ws", &eve_old, None), 20, Some(&state), &mut st)).0,
        BindDenial::Revoked(Revoked::Sub)
    );
    let eve_new = claims(json!({"sub": "eve", "iat": 50}));
    assert!(allowed(&b.decide(
        &ws("/ws", &eve_new, None),
        20,
        Some(&state),
        &mut st
    )));

    // A live socket: fine until its token is revoked.
    let live = terms(token_id(&ok, Some("current")));
    assert_eq!(b.check_live(&live, Some(&state), Some(20)), None);
    state.loaded(RevocationList::parse(br#"[{"jti":"good"}]"#).unwrap(), 21);
    assert_eq!(
        b.check_live(&live, Some(&state), Some(21)),
        Some((4401, "token revoked", BindDenial::Revoked(Revoked::Jti)))
    );
}

#[test]
fn a_stale_list_serves_or_refuses_as_configured() {
    let mut st = store();
    let mut state = RevocationState::new(0);
    state.loaded(RevocationList::parse(br#"[{"jti":"bad"}]"#).unwrap(), 10);
    let c = claims(json!({"jti": "good"}));
    let bad = claims(json!({"jti": "bad"}));
    let open = config(json!({"revocation": feed("open")}));
    // Stale (last good at 10, 30 s allowed): fail-open keeps serving with the last good list.
    match open.decide(&ws("/ws", &c, None), 100, Some(&state), &mut st) {
        BindDecision::Allow { notes, .. } => {
            assert_eq!(notes, vec![SessionBindingStat::RevocationStaleServed])
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        denial(open.decide(&ws("/ws", &bad, None), 100, Some(&state), &mut st)).0,
        BindDenial::Revoked(Revoked::Jti)
    );
    assert_eq!(
        open.check_live(&terms(token_id(&c, None)), Some(&state), Some(100)),
        None
    );
    let closed = config(json!({"revocation": feed("closed")}));
    assert!(allowed(&closed.decide(
        &ws("/ws", &c, None),
        40,
        Some(&state),
        &mut st
    )));
    assert_eq!(
        denial(closed.decide(&ws("/ws", &c, None), 41, Some(&state), &mut st)),
        (BindDenial::RevocationStale, 101, Some(1013))
    );
    let mut http = ws("/api", &c, None);
    http.websocket = false;
    assert_eq!(
        denial(closed.decide(&http, 41, Some(&state), &mut st)).1,
        503
    );
    assert_eq!(
        closed.check_live(&terms(token_id(&c, None)), Some(&state), Some(41)),
        Some((1013, "revocation list stale", BindDenial::RevocationStale))
    );
}

#[test]
fn rules_pick_the_binding_and_are_complete() {
    let b = config(json!({
        "session": {"cookie": "sid"},
        "rules": [{"match": {"route": "rooms"}, "scope": [{"template": "/ws/rooms/{room}"}]}]
    }));
    let mut st = store();
    let c = claims(json!({"room": "r1"}));
    let mut r = ws("/ws/rooms/r1", &c, None);
    r.route_name = Some("rooms");
    // The rule binds the room only: no session cookie needed there.
    assert!(allowed(&b.decide(&r, 0, None, &mut st)));
    r.route_name = Some("other");
    assert_eq!(
        denial(b.decide(&r, 0, None, &mut st)).0,
        BindDenial::NoSessionClaim
    );
}

#[test]
fn dot_segments_and_hidden_separators_are_refused_before_rules_and_templates() {
    let b = config(json!({
        "rules": [
            {"match": {"prefix": "/public/"}, "disabled": true},
            {"match": {"prefix": "/tenants/"},
             "scope": [{"template": "/tenants/{tenant}/...", "claims": {"tenant": "tenant_id"}}]}
        ]
    }));
    let mut st = store();
    let c = claims(json!({"tenant_id": "t1"}));
    assert!(allowed(&b.decide(
        &ws("/tenants/t1/calls", &c, None),
        0,
        None,
        &mut st
    )));
    for (path, reason) in [
        ("/tenants/t1/../t2/calls", "path_dot_segment"),
        ("/tenants/t1/%2e%2e/t2/calls", "path_dot_segment"),
        ("/tenants/t1/.%2E/t2", "path_dot_segment"),
        ("/tenants/t1/./calls", "path_dot_segment"),
        ("/tenants/t1/..%2ft2/calls", "path_separator"),
        ("/tenants/t1%2Ft2/calls", "path_separator"),
        ("/tenants/t1\\..\\t2", "path_separator"),
        // A disabled rule's prefix does not let a walking path through either.
        ("/public/../tenants/t2/calls", "path_dot_segment"),
    ] {
        let (d, status, code) = denial(b.decide(&ws(path, &c, None), 0, None, &mut st));
        assert_eq!(
            (d.reason(), status, code),
            (reason, 101, Some(4400)),
            "{path}"
        );
        let mut http = ws(path, &c, None);
        http.websocket = false;
        assert_eq!(denial(b.decide(&http, 0, None, &mut st)).1, 400, "{path}");
    }
    // The query string is not the path.
    assert!(allowed(&b.decide(
        &ws("/tenants/t1/calls?next=../x", &c, None),
        0,
        None,
        &mut st
    )));
}

#[test]
fn single_use_refuses_tokens_that_outlive_the_stores_memory() {
    // max_ttl 600 s, skew 30 s: a token must end (exp + skew) by now + 600.
    let b = config(json!({"single_use": true, "jti": {"max_ttl_seconds": 600}}));
    let mut st = store();
    let now = 1000;
    let ok = claims(json!({"jti": "a", "exp": now + 570}));
    assert!(allowed(&b.decide(
        &ws("/ws", &ok, None),
        now,
        None,
        &mut st
    )));
    let long = claims(json!({"jti": "b", "exp": now + 571}));
    assert_eq!(
        denial(b.decide(&ws("/ws", &long, None), now, None, &mut st)),
        (BindDenial::JtiUnbounded, 101, Some(4401))
    );
    let no_exp = claims(json!({"jti": "c"}));
    assert_eq!(
        denial(b.decide(&ws("/ws", &no_exp, None), now, None, &mut st)).0,
        BindDenial::JtiUnbounded
    );
    assert_eq!(BindDenial::JtiUnbounded.reason(), "jti_unbounded");
    // The accepted one is remembered for as long as it is valid: a replay just before its end.
    assert_eq!(
        denial(b.decide(&ws("/ws", &ok, None), now + 599, None, &mut st)).0,
        BindDenial::Replay
    );
}

#[test]
fn one_subject_cannot_fill_the_jti_store_or_push_out_others() {
    let b = config(json!({"single_use": true,
                          "jti": {"max_entries": 8, "buckets": 1, "when_full": "evict",
                                  "max_per_subject": 3}}));
    assert_eq!(b.config.jti.per_subject, 3);
    let mut st = KvStore::new(
        MemoryKv::default(),
        b.config.jti.limits,
        b.config.sockets.limits,
    );
    st.create_buckets();
    let tok =
        |sub: &str, jti: &str| claims(json!({"iss": "i", "sub": sub, "jti": jti, "exp": 500}));
    let bob = tok("bob", "bob-1");
    assert!(allowed(&b.decide(&ws("/ws", &bob, None), 0, None, &mut st)));
    for n in 0..3 {
        let c = tok("mallory", &format!("m-{n}"));
        assert!(allowed(&b.decide(&ws("/ws", &c, None), 0, None, &mut st)));
    }
    for n in 3..20 {
        let c = tok("mallory", &format!("m-{n}"));
        assert_eq!(
            denial(b.decide(&ws("/ws", &c, None), 0, None, &mut st)),
            (BindDenial::JtiSubjectFull, 101, Some(4429))
        );
    }
    // Bob's entry was never pushed out: his replay is still caught, and he has room.
    assert_eq!(
        denial(b.decide(&ws("/ws", &bob, None), 1, None, &mut st)).0,
        BindDenial::Replay
    );
    assert!(allowed(&b.decide(
        &ws("/ws", &tok("bob", "bob-2"), None),
        1,
        None,
        &mut st
    )));
    // A replay of one of mallory's is a replay, not "full".
    assert_eq!(
        denial(b.decide(&ws("/ws", &tok("mallory", "m-0"), None), 1, None, &mut st)).0,
        BindDenial::Replay
    );
    // Expired entries give the subject its room back.
    let later = claims(json!({"iss": "i", "sub": "mallory", "jti": "m-late", "exp": 1000}));
    assert!(allowed(&b.decide(
        &ws("/ws", &later, None),
        531,
        None,
        &mut st
    )));
    // The cap is at most half a bucket, so one subject never fills one; and at least 1.
    let small = config(json!({"jti": {"max_entries": 6, "buckets": 2}}));
    assert_eq!(small.config.jti.per_subject, 1);
    let default = config(json!({}));
    assert_eq!(default.config.jti.per_subject, 64);
    let err = SessionBindingConfig::compile(br#"{"jti":{"max_per_subject":0}}"#)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("config error at jti.max_per_subject"),
        "{err}"
    );
}

#[test]
fn a_list_never_loaded_is_stale_open_serves_and_counts_closed_refuses() {
    let mut st = store();
    let state = RevocationState::new(0);
    let c = claims(json!({"jti": "x"}));
    let closed = config(json!({"revocation": feed("closed")}));
    assert_eq!(
        denial(closed.decide(&ws("/ws", &c, None), 1, Some(&state), &mut st)),
        (BindDenial::RevocationStale, 101, Some(1013))
    );
    let open = config(json!({"revocation": feed("open")}));
    match open.decide(&ws("/ws", &c, None), 1, Some(&state), &mut st) {
        BindDecision::Allow { notes, .. } => {
            assert_eq!(notes, vec![SessionBindingStat::RevocationStaleServed])
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn without_a_clock_what_needs_the_time_fails_closed() {
    let mut st = store();
    let c = claims(json!({"sub": "a", "jti": "j", "exp": 100}));
    let once = config(json!({"single_use": true}));
    assert_eq!(
        denial(once.decide_at(&ws("/ws", &c, None), None, None, &mut st)),
        (BindDenial::Clock, 101, Some(1013))
    );
    let mut http = ws("/api", &c, None);
    http.websocket = false;
    let (d, status, _) = denial(once.decide_at(&http, None, None, &mut st));
    assert_eq!((d.reason(), status), ("clock", 503));
    let cap = config(json!({"max_sockets": {"limit": 1}}));
    assert_eq!(
        denial(cap.decide_at(&ws("/ws", &c, None), None, None, &mut st)).0,
        BindDenial::Clock
    );
    let mut state = RevocationState::new(0);
    state.loaded(RevocationList::default(), 0);
    let closed = config(json!({"revocation": feed("closed")}));
    assert_eq!(
        denial(closed.decide_at(&ws("/ws", &c, None), None, Some(&state), &mut st)).0,
        BindDenial::Clock
    );
    assert_eq!(
        closed.check_live(&terms(token_id(&c, None)), Some(&state), None),
        Some((1013, "clock unavailable", BindDenial::Clock))
    );
    // Checks that need no time still decide: fail-open revocation, sessions, scopes.
    let open = config(json!({"revocation": feed("open"), "scope": [{"template": "/ws/{room}"}]}));
    let r = claims(json!({"room": "r1"}));
    assert!(allowed(&open.decide_at(
        &ws("/ws/r1", &r, None),
        None,
        Some(&state),
        &mut st
    )));
    // The nothing-checked binding passes without a clock too.
    assert!(allowed(&config(json!({})).decide_at(
        &ws("/ws", &c, None),
        None,
        None,
        &mut st
    )));
}

#[test]
fn reauth_tokens_are_checked_against_the_feed_and_used_once() {
    let b = config(json!({"single_use": true, "revocation": feed("open")}));
    let mut st = store();
    let mut state = RevocationState::new(0);
    state.loaded(
        RevocationList::parse(
            br#"[{"jti":"revoked"},{"sid":"gone"},{"kid":"old"},{"sub":"eve","issued_before":50}]"#,
        )
        .unwrap(),
        10,
    );
    let connect = claims(json!({"iss": "i", "sub": "alice", "sid": "s1", "jti": "c1", "exp": 100}));
    let mut live = match b.decide(&ws("/ws", &connect, None), 20, Some(&state), &mut st) {
        BindDecision::Allow { live: Some(l), .. } => l,
        other => panic!("{other:?}"),
    };
    assert!(live.single_use && live.checks_reauth(&b));
    let tok = |jti: &str| {
        claims(json!({"iss": "i", "sub": "alice", "sid": "s1", "jti": jti, "exp": 100}))
    };
    // A fresh re-auth token is fine, and is claimed: the same token again is a reuse.
    assert_eq!(
        b.check_reauth(
            &mut live,
            &tok("r1"),
            Some("k"),
            Some(21),
            Some(&state),
            &mut st
        ),
        Ok(vec![])
    );
    assert_eq!(
        live.reauth.as_ref().and_then(|t| t.jti.as_deref()),
        Some("r1")
    );
    let mut other_socket = live.clone();
    assert_eq!(
        b.check_reauth(
            &mut other_socket,
            &tok("r1"),
            Some("k"),
            Some(22),
            Some(&state),
            &mut st
        ),
        Err((4401, "token reused", BindDenial::Replay))
    );
    // The connect token as a re-auth token: used already.
    assert_eq!(
        b.check_reauth(
            &mut live,
            &connect,
            Some("k"),
            Some(22),
            Some(&state),
            &mut st
        ),
        Err((4401, "token reused", BindDenial::Replay))
    );
    // Revoked by jti, sid, kid, sub + issued_before.
    assert_eq!(
        b.check_reauth(
            &mut live,
            &tok("revoked"),
            Some("k"),
            Some(22),
            Some(&state),
            &mut st
        ),
        Err((4401, "token revoked", BindDenial::Revoked(Revoked::Jti)))
    );
    let gone = claims(json!({"iss": "i", "sub": "alice", "sid": "gone", "jti": "g1", "exp": 100}));
    assert_eq!(
        b.check_reauth(&mut live, &gone, None, Some(22), Some(&state), &mut st),
        Err((4401, "token revoked", BindDenial::Revoked(Revoked::Sid)))
    );
    assert_eq!(
        b.check_reauth(
            &mut live,
            &tok("k1"),
            Some("old"),
            Some(22),
            Some(&state),
            &mut st
        ),
        Err((4401, "token revoked", BindDenial::Revoked(Revoked::Kid)))
    );
    let eve = claims(json!({"iss": "i", "sub": "eve", "iat": 49, "jti": "e1", "exp": 100}));
    assert_eq!(
        b.check_reauth(&mut live, &eve, None, Some(22), Some(&state), &mut st),
        Err((4401, "token revoked", BindDenial::Revoked(Revoked::Sub)))
    );
    // Single use rules apply as for a connect token: a jti, a bounded exp, a clock.
    let no_jti = claims(json!({"iss": "i", "sub": "alice", "exp": 100}));
    assert_eq!(
        b.check_reauth(&mut live, &no_jti, None, Some(22), Some(&state), &mut st),
        Err((4401, "re-auth refused", BindDenial::NoJti))
    );
    assert_eq!(
        b.check_reauth(&mut live, &tok("r9"), None, None, Some(&state), &mut st),
        Err((1013, "clock unavailable", BindDenial::Clock))
    );
    // Once a re-auth token is accepted, its revocation closes the socket too.
    let mut live2 = live.clone();
    assert!(b
        .check_reauth(
            &mut live2,
            &tok("r2"),
            None,
            Some(23),
            Some(&state),
            &mut st
        )
        .is_ok());
    assert_eq!(b.check_live(&live2, Some(&state), Some(24)), None);
    state.loaded(RevocationList::parse(br#"[{"jti":"r2"}]"#).unwrap(), 25);
    assert_eq!(
        b.check_live(&live2, Some(&state), Some(26)),
        Some((4401, "token revoked", BindDenial::Revoked(Revoked::Jti)))
    );
    // A binding that is neither single-use nor fed checks nothing: the shell skips the read.
    let plain = config(json!({}));
    let l = match plain.decide(&ws("/ws", &connect, None), 20, None, &mut st) {
        BindDecision::Allow { live: Some(l), .. } => l,
        other => panic!("{other:?}"),
    };
    assert!(!l.checks_reauth(&plain));
    // Revocation only (no single use): the re-auth token's jti is not claimed.
    let fed = config(json!({"revocation": feed("open")}));
    let mut l = match fed.decide(&ws("/ws", &connect, None), 20, Some(&state), &mut st) {
        BindDecision::Allow { live: Some(l), .. } => l,
        other => panic!("{other:?}"),
    };
    assert!(l.checks_reauth(&fed));
    for _ in 0..2 {
        assert!(fed
            .check_reauth(&mut l, &tok("r5"), None, Some(27), Some(&state), &mut st)
            .is_ok());
    }
}

#[test]
fn the_hmac_mode_binds_to_the_cookie_with_a_gateway_key() {
    let key = "k".repeat(32);
    let env = |name: &str| (name == "GATEHOUSE_SESSION_KEY").then(|| "k".repeat(32));
    let b = SessionBinding::new(
        SessionBindingConfig::compile_with_env(
            br#"{"session":{"cookie":"__Host-s","mode":"hmac_sha256","key":{"env":"GATEHOUSE_SESSION_KEY"}}}"#,
            &env,
        )
        .unwrap(),
    );
    let s = b.config.default_binding.session.as_ref().unwrap();
    assert_eq!(
        (s.claim.as_str(), s.mode),
        ("sid_hash", SessionMode::HmacSha256)
    );
    assert!(
        !format!("{s:?}").contains(&key),
        "the key never shows in Debug"
    );
    let mac = session_hmac(key.as_bytes(), "secret").unwrap();
    assert_ne!(mac, session_hash("secret"));
    let mut st = store();
    let c = claims(json!({"sid_hash": mac}));
    assert!(allowed(&b.decide(
        &ws("/", &c, Some("__Host-s=secret")),
        0,
        None,
        &mut st
    )));
    // The plain hash of the cookie (what an attacker without the key could compute) fails.
    let h = claims(json!({"sid_hash": session_hash("secret")}));
    assert_eq!(
        denial(b.decide(&ws("/", &h, Some("__Host-s=secret")), 0, None, &mut st)).0,
        BindDenial::SessionMismatch
    );
    let err = |v: &[u8]| {
        SessionBindingConfig::compile_with_env(v, &env)
            .unwrap_err()
            .to_string()
    };
    assert!(err(br#"{"session":{"cookie":"s","mode":"hmac_sha256"}}"#)
        .starts_with("config error at session.key"));
    assert!(
        err(br#"{"session":{"cookie":"s","mode":"hmac_sha256","key":{"env":"NOPE"}}}"#)
            .starts_with("config error at session.key.env")
    );
    assert!(
        err(br#"{"session":{"cookie":"s","mode":"hmac_sha256","key":{"value":"short"}}}"#)
            .contains("at least 32 bytes")
    );
    assert!(err(
        br#"{"rules":[{"match":{"prefix":"/"},"session":{"cookie":"s","key":{"value":"x"}}}]}"#
    )
    .starts_with("config error at rules[0].session.key"));
}

#[test]
fn a_binding_says_which_facts_it_needs_and_an_unbound_route_needs_none() {
    let b = config(json!({
        "session": {"cookie": "sid"},
        "max_sockets": {"limit": 2},
        "rules": [
            {"match": {"prefix": "/open/"}, "disabled": true},
            {"match": {"prefix": "/fp/"}, "fingerprint": "required"},
            {"match": {"prefix": "/off/"}, "fingerprint": "off"}
        ]
    }));
    let facts = |path: &str, c: Option<&Claims>, ws: bool| {
        SessionBinding::facts_needed(&b.config.binding_for(None, path, "h"), c, ws)
    };
    let with_cfp = claims(json!({"sub": "a", "cfp": "x"}));
    let plain = claims(json!({"sub": "a"}));
    assert_eq!(facts("/open/x", Some(&with_cfp), true), None);
    let all = facts("/ws", Some(&with_cfp), true).unwrap();
    assert_eq!(
        all,
        FactsNeeded {
            cookie: true,
            client: true,
            slot: true
        }
    );
    // A fingerprint is read only when the token carries one (if_present) or it is required.
    assert!(!facts("/ws", Some(&plain), true).unwrap().client);
    assert!(facts("/fp/x", Some(&plain), false).unwrap().client);
    assert!(!facts("/off/x", Some(&with_cfp), false).unwrap().client);
    // A socket slot only for an upgrade.
    assert!(!facts("/ws", Some(&plain), false).unwrap().slot);
    // A walking path is refused before anything is read.
    assert_eq!(
        facts("/open/../ws", Some(&plain), true),
        Some(FactsNeeded::default())
    );
}

use super::store::{KvStore, MemoryKv};
use super::*;
use crate::session_binding::revocation::RevocationList;
use serde_json::json;

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

#[test]
fn session_binding_needs_the_cookie_that_matches_the_sid_claim() {
    let b = config(json!({"session": {"cookie": "__Host-gh_sid"}}));
    let c = claims(json!({"sub": "alice", "sid": "s-123"}));
    let mut st = store();
    assert!(allowed(&b.decide(
        &ws("/ws/echo", &c, Some("a=1; __Host-gh_sid=s-123")),
        0,
        None,
        &mut st
    )));
    assert_eq!(
        denial(b.decide(
            &ws("/ws/echo", &c, Some("__Host-gh_sid=s-999")),
            0,
            None,
            &mut st
        )),
        (BindDenial::SessionMismatch, 101, Some(4401))
    );
    assert_eq!(
        denial(b.decide(&ws("/ws/echo", &c, None), 0, None, &mut st)),
        (BindDenial::NoSessionCookie, 101, Some(4401))
    );
    let no_sid = claims(json!({"sub": "alice"}));
    assert_eq!(
        denial(b.decide(
            &ws("/ws/echo", &no_sid, Some("__Host-gh_sid=s-123")),
            0,
            None,
            &mut st
        ))
        .0,
        BindDenial::NoSessionClaim
    );
    // Plain HTTP: 401 problem+json.
    let mut http = ws("/api/x", &c, Some("__Host-gh_sid=nope"));
    http.websocket = false;
    assert_eq!(denial(b.decide(&http, 0, None, &mut st)).1, 401);
    // A custom claim, numeric.
    let b = config(json!({"session": {"claim": "session_id", "cookie": "s"}}));
    let c = claims(json!({"session_id": 42}));
    assert!(allowed(&b.decide(
        &ws("/", &c, Some("s=42")),
        0,
        None,
        &mut st
    )));
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
        BindDecision::Allow { notes, .. } => assert_eq!(notes, vec!["jti.evicted"]),
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
    let c = claims(json!({"sub": "a", "sid": "s", "jti": "j", "exp": 100}));
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
    let live = token_id(&ok, Some("current"));
    assert_eq!(b.check_live(&live, Some(&state), 20), None);
    state.loaded(RevocationList::parse(br#"[{"jti":"good"}]"#).unwrap(), 21);
    assert_eq!(
        b.check_live(&live, Some(&state), 21),
        Some((4401, "token revoked", "revoked_jti"))
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
        BindDecision::Allow { notes, .. } => assert_eq!(notes, vec!["revocation.stale_served"]),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        denial(open.decide(&ws("/ws", &bad, None), 100, Some(&state), &mut st)).0,
        BindDenial::Revoked(Revoked::Jti)
    );
    assert_eq!(
        open.check_live(&token_id(&c, None), Some(&state), 100),
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
        closed.check_live(&token_id(&c, None), Some(&state), 41),
        Some((1013, "revocation list stale", "revocation_stale"))
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

use super::*;
use crate::session_binding::store::{JtiLimits, KvStore, MemoryKv, SlotLimits};
use crate::session_binding::{
    BindDecision, BindDenial, BindRequest, FleetDecision, SessionBinding, SessionBindingConfig,
};
use crate::stats::StoreStat;
use serde_json::json;

const HEADER: &str =
    r#""header":{"cluster_id":"1","member_id":"2","revision":"3","raft_term":"2"}"#;

fn config() -> StoreConfig {
    StoreConfig {
        cluster: "etcd".into(),
        authority: "etcd".into(),
        prefix: "gh/".into(),
        timeout_ms: 250,
        when_unavailable: WhenUnavailable::Closed,
    }
}

fn body(call: &Call) -> Value {
    serde_json::from_slice(&call.body).unwrap()
}

fn unb64(v: &Value) -> String {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap())
        .unwrap();
    String::from_utf8(bytes).unwrap()
}

fn connect(jti: bool, limit: Option<u32>) -> Connect {
    Connect {
        jti: jti.then(|| JtiClaim {
            id: "hashed-id".into(),
            owner: None,
            until: 1_030,
        }),
        slot: limit.map(|limit| SlotClaim {
            owner: "owner-hash".into(),
            slot: "slot-a".into(),
            limit,
            ttl: 9,
        }),
        now: 1_000,
    }
}

#[test]
fn config_is_checked_and_names_the_field() {
    let compile = |v: Value| {
        SessionBindingConfig::compile(v.to_string().as_bytes())
            .map(|c| c.store)
            .map_err(|e| e.to_string())
    };
    let c = compile(json!({"store": {"etcd": {"cluster": "etcd"}}}))
        .unwrap()
        .unwrap();
    assert_eq!(
        (c.prefix.as_str(), c.timeout_ms, c.when_unavailable),
        ("gatehouse/", 250, WhenUnavailable::Closed)
    );
    assert_eq!(compile(json!({})).unwrap(), None, "no store: shared data");
    let local = compile(json!({"store": {"etcd": {"cluster": "e"}, "when_unavailable": "local"}}));
    assert_eq!(
        local.unwrap().unwrap().when_unavailable,
        WhenUnavailable::Local
    );
    for (bad, field) in [
        (
            json!({"store": {"etcd": {"cluster": "e", "ttl": 1}}}),
            "ttl",
        ),
        (json!({"store": {"redis": {}}}), "redis"),
        (
            json!({"store": {"etcd": {"cluster": ""}}}),
            "store.etcd.cluster",
        ),
        (
            json!({"store": {"etcd": {"cluster": "e", "timeout_ms": 0}}}),
            "store.etcd.timeout_ms",
        ),
        (
            json!({"store": {"etcd": {"cluster": "e", "prefix": ""}}}),
            "store.etcd.prefix",
        ),
        (
            json!({"store": {"etcd": {"cluster": "e"}, "when_unavailable": "open"}}),
            "store.when_unavailable",
        ),
        (
            json!({"store": {"etcd": {"cluster": "e"}}, "max_sockets": {"limit": 17, "per_claim": "sub"}}),
            "max_sockets.limit",
        ),
        (
            json!({"store": {"etcd": {"cluster": "e"}}, "rules": [{"match": {"prefix": "/a"}, "max_sockets": {"limit": 99, "per_claim": "sub"}}]}),
            "rules[0].max_sockets.limit",
        ),
    ] {
        let e = compile(bad).unwrap_err();
        assert!(e.contains(field), "{e} should name {field}");
    }
}

#[test]
fn one_transaction_claims_the_token_id_and_the_lowest_free_slot() {
    let call = connect(true, Some(3)).txn("gh/", 42);
    assert_eq!(call.path, "/v3/kv/txn");
    let v = body(&call);
    assert_eq!(unb64(&v["compare"][0]["key"]), "gh/jti/hashed-id");
    assert_eq!(v["compare"][0]["target"], "CREATE");
    assert_eq!(v["compare"][0]["create_revision"], "0");
    let (jti_lease, _) = jti_lease("gh/", 1_030, 1_000);
    assert_eq!(
        v["success"][0]["request_put"]["lease"],
        jti_lease.to_string()
    );
    // The chain: slot 0 absent → put, else slot 1 …, each on the worker's lease.
    let mut level = &v["success"][1]["request_txn"];
    for n in 0..3 {
        assert_eq!(
            unb64(&level["compare"][0]["key"]),
            format!("gh/sock/owner-hash/{n}")
        );
        assert_eq!(level["success"][0]["request_put"]["lease"], "42");
        assert_eq!(
            unb64(&level["success"][0]["request_put"]["value"]),
            "slot-a"
        );
        if n < 2 {
            level = &level["failure"][0]["request_txn"];
        } else {
            assert_eq!(level["failure"], json!([]));
        }
    }
    // Only hashes and the random slot id go to etcd.
    let text = String::from_utf8(call.body).unwrap();
    assert!(
        !text.contains("hashed-id") && !text.contains("owner-hash"),
        "keys are base64"
    );
}

#[test]
fn tokens_ending_close_together_share_a_lease() {
    let (a, ttl_a) = jti_lease("gh/", 1_030, 1_000);
    let (b, _) = jti_lease("gh/", 1_079, 1_010);
    let (c, _) = jti_lease("gh/", 1_081, 1_000);
    assert_eq!(a, b, "same step");
    assert_ne!(a, c, "next step");
    assert_ne!(a, jti_lease("other/", 1_030, 1_000).0, "per prefix");
    assert!(a > 0);
    // It lasts at least until the token id's end.
    assert!(1_000 + ttl_a >= 1_030 && ttl_a <= 1_080 - 1_000 + 1);
}

fn done(step: Step<Claimed>) -> Result<Claimed, StoreError> {
    match step {
        Step::Done(r) => r,
        Step::Send(c, _) => panic!("expected an end, got a call to {}", c.path),
    }
}

fn flow(c: Connect) -> ConnectFlow {
    ConnectFlow::start(c, &config(), 42, 9, 10_000).0
}

#[test]
fn answers_are_read_as_claims_replays_and_caps() {
    // Captured from etcd 3.4: the jti was new, slot 0 was taken, slot 1 was free.
    let fresh_slot1 = format!(
        r#"{{{HEADER},"succeeded":true,"responses":[{{"response_put":{{"header":{{"revision":"3"}}}}}},{{"response_txn":{{"header":{{}},"responses":[{{"response_txn":{{"header":{{}},"succeeded":true,"responses":[{{"response_put":{{"header":{{"revision":"3"}}}}}}]}}}}]}}}}]}}"#
    );
    let mut f = flow(connect(true, Some(3)));
    assert_eq!(
        done(f.answer(200, fresh_slot1.as_bytes(), 10_001)),
        Ok(Claimed::Fresh { slot: Some(1) })
    );
    // A lost claim's answer has no `succeeded` at all (proto3 JSON omits false).
    let lost = format!(r#"{{{HEADER}}}"#);
    let mut f = flow(connect(true, Some(3)));
    assert_eq!(
        done(f.answer(200, lost.as_bytes(), 10_001)),
        Ok(Claimed::Replay)
    );
    // Only a cap: every slot of the chain taken.
    let full = format!(
        r#"{{{HEADER},"responses":[{{"response_txn":{{"header":{{}},"responses":[{{"response_txn":{{"header":{{}}}}}}]}}}}]}}"#
    );
    let mut f = flow(connect(false, Some(3)));
    assert_eq!(
        done(f.answer(200, full.as_bytes(), 10_001)),
        Ok(Claimed::OverCap)
    );
    let mut f = flow(connect(false, Some(1)));
    assert_eq!(
        done(f.answer(200, lost.as_bytes(), 10_001)),
        Ok(Claimed::OverCap)
    );
    let won = format!(r#"{{{HEADER},"succeeded":true}}"#);
    let mut f = flow(connect(true, None));
    assert_eq!(
        done(f.answer(200, won.as_bytes(), 10_001)),
        Ok(Claimed::Fresh { slot: None })
    );
}

#[test]
fn bad_answers_are_typed_errors() {
    let cases: Vec<(u32, Vec<u8>, StoreError)> = vec![
        (0, vec![], StoreError::Unavailable),
        // Envoy's own answers when etcd is down or slow.
        (
            503,
            b"no healthy upstream".to_vec(),
            StoreError::Unavailable,
        ),
        (
            504,
            b"upstream request timeout".to_vec(),
            StoreError::Unavailable,
        ),
        (500, b"oops".to_vec(), StoreError::Status),
        (200, b"{not json".to_vec(), StoreError::Malformed),
        (200, b"[1,2]".to_vec(), StoreError::WrongType),
        // Not etcd: no header. Must not read as "claim lost".
        (200, b"{}".to_vec(), StoreError::WrongType),
        (
            200,
            format!(r#"{{{HEADER},"succeeded":"yes"}}"#).into_bytes(),
            StoreError::WrongType,
        ),
        (
            200,
            format!(r#"{{{HEADER},"succeeded":true,"responses":7}}"#).into_bytes(),
            StoreError::WrongType,
        ),
        (
            500,
            br#"{"error":"etcdserver: too many requests","code":14}"#.to_vec(),
            StoreError::Status,
        ),
        (200, vec![b' '; MAX_ANSWER + 1], StoreError::TooLarge),
    ];
    for (status, body, want) in cases {
        let mut f = flow(connect(true, Some(2)));
        assert_eq!(done(f.answer(status, &body, 10_001)), Err(want), "{status}");
    }
    // Deeply nested garbage is an error, never a stack overflow.
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let mut f = flow(connect(true, Some(2)));
    assert_eq!(
        done(f.answer(200, deep.as_bytes(), 10_001)),
        Err(StoreError::Malformed)
    );
}

#[test]
fn a_missing_lease_is_granted_then_the_transaction_retried_once_within_the_budget() {
    let not_found =
        br#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#;
    let exists =
        br#"{"error":"etcdserver: lease already exists","message":"etcdserver: lease already exists","code":9}"#;
    let granted = format!(r#"{{{HEADER},"ID":"42","TTL":"9"}}"#);
    let won = format!(
        r#"{{{HEADER},"succeeded":true,"responses":[{{}},{{"response_txn":{{"header":{{}},"succeeded":true}}}}]}}"#
    );
    let mut f = flow(connect(true, Some(2)));
    let Step::Send(grant1, left) = f.answer(404, not_found, 10_050) else {
        panic!()
    };
    assert_eq!((grant1.path, left), ("/v3/lease/grant", 200));
    let (jti, _) = jti_lease("gh/", 1_030, 1_000);
    assert_eq!(body(&grant1)["ID"], jti.to_string());
    // Another replica granted it first: fine.
    let Step::Send(grant2, _) = f.answer(409, exists, 10_060) else {
        panic!()
    };
    assert_eq!(body(&grant2)["ID"], "42");
    assert_eq!(body(&grant2)["TTL"], "9");
    let Step::Send(retry, _) = f.answer(200, granted.as_bytes(), 10_070) else {
        panic!()
    };
    assert_eq!(retry, connect(true, Some(2)).txn("gh/", 42));
    assert_eq!(
        done(f.answer(200, won.as_bytes(), 10_080)),
        Ok(Claimed::Fresh { slot: Some(0) })
    );
    // Still missing after the grant: an error, no loop.
    let mut f = flow(connect(true, None));
    assert!(matches!(f.answer(404, not_found, 10_010), Step::Send(..)));
    assert!(matches!(
        f.answer(200, granted.as_bytes(), 10_020),
        Step::Send(..)
    ));
    assert_eq!(
        done(f.answer(404, not_found, 10_030)),
        Err(StoreError::LeaseMissing)
    );
    // The budget is one timeout_ms for the whole flow.
    let mut f = flow(connect(true, None));
    assert_eq!(
        done(f.answer(404, not_found, 10_250)),
        Err(StoreError::Unavailable)
    );
}

#[test]
fn the_socket_lease_is_kept_alive_and_closed_slots_freed_in_one_call() {
    let mut s = Sockets::new(42, 9);
    assert!(s.due("gh/", 100).is_empty(), "no live socket: no call");
    s.held("slot-a", "owner", 0);
    s.held("slot-b", "owner", 1);
    let calls = s.due("gh/", 100);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].0, RootCall::Keepalive);
    assert_eq!(body(&calls[0].1), json!({"ID": "42"}));
    s.sent(7, RootCall::Keepalive);
    assert!(s.due("gh/", 101).is_empty(), "every third of the TTL");
    let alive = br#"{"result":{"header":{},"ID":"42","TTL":"9"}}"#;
    assert_eq!(
        s.answer("gh/", 7, 200, alive),
        Some((StoreStat::KeepaliveOk, None))
    );
    assert_eq!(s.answer("gh/", 7, 200, alive), None, "not ours any more");
    s.closed("slot-a");
    s.closed("unknown");
    let calls = s.due("gh/", 103);
    assert_eq!(calls.len(), 2);
    let RootCall::Release(freed) = &calls[0].0 else {
        panic!()
    };
    assert_eq!(freed, &vec![("owner".to_string(), 0, "slot-a".to_string())]);
    let op = &body(&calls[0].1)["success"][0]["request_txn"];
    assert_eq!(op["compare"][0]["target"], "VALUE", "only if still ours");
    assert_eq!(unb64(&op["compare"][0]["value"]), "slot-a");
    assert_eq!(s.live_count(), 1);
    // A failed release is tried again; a lost lease is granted again and the slots put back.
    s.sent(8, calls[0].0.clone());
    s.sent(9, RootCall::Keepalive);
    assert_eq!(
        s.answer("gh/", 8, 0, b""),
        Some((StoreStat::ReleaseFailed, None))
    );
    let gone = br#"{"result":{"header":{},"ID":"42"}}"#;
    let Some((StoreStat::LeaseRestored, Some((RootCall::Grant, grant)))) =
        s.answer("gh/", 9, 200, gone)
    else {
        panic!()
    };
    assert_eq!(body(&grant), json!({"ID": "42", "TTL": "9"}));
    s.sent(10, RootCall::Grant);
    let granted = format!(r#"{{{HEADER},"ID":"42","TTL":"9"}}"#);
    let Some((_, Some((RootCall::Restore, restore)))) =
        s.answer("gh/", 10, 200, granted.as_bytes())
    else {
        panic!()
    };
    let op = &body(&restore)["success"][0]["request_txn"];
    assert_eq!(unb64(&op["compare"][0]["key"]), "gh/sock/owner/1");
    assert_eq!(op["success"][0]["request_put"]["lease"], "42");
    assert!(matches!(s.due("gh/", 200)[0].0, RootCall::Release(_)));
    assert_eq!(read_keepalive(200, b"{}"), Err(StoreError::WrongType));
    assert_eq!(read_keepalive(0, b""), Err(StoreError::Unavailable));
}

fn ws_request<'a>(c: &'a crate::jwt::Claims) -> BindRequest<'a> {
    BindRequest {
        path: "/ws",
        host: "gw",
        websocket: true,
        ws_key: Some("dGhlIHNhbXBsZSBub25jZQ=="),
        claims: Some(c),
        slot_id: "slot-1",
        ..Default::default()
    }
}

fn local() -> KvStore<MemoryKv> {
    let mut s = KvStore::new(
        MemoryKv::default(),
        JtiLimits {
            buckets: 1,
            per_bucket: 16,
            evict: false,
        },
        SlotLimits {
            buckets: 1,
            per_bucket: 16,
        },
    );
    s.create_buckets();
    s
}

fn pending(when: &str) -> (SessionBinding, crate::jwt::Claims) {
    let b = SessionBinding::new(
        SessionBindingConfig::compile(
            json!({"single_use": true, "max_sockets": {"limit": 2, "per_claim": "sub"},
                   "store": {"etcd": {"cluster": "etcd"}, "when_unavailable": when}})
            .to_string()
            .as_bytes(),
        )
        .unwrap(),
    );
    let c = match json!({"iss": "i", "sub": "alice", "jti": "j-1", "exp": 1_000}) {
        Value::Object(m) => m,
        _ => unreachable!(),
    };
    (b, c)
}

fn ask(b: &SessionBinding, c: &crate::jwt::Claims) -> Box<crate::session_binding::Pending> {
    let selected = b.config.binding_for(None, "/ws", "gw");
    match b.decide_fleet(selected, &ws_request(c), Some(900), None) {
        FleetDecision::Ask(p) => p,
        FleetDecision::Now(d) => panic!("expected a store call, got {d:?}"),
    }
}

#[test]
fn the_decision_waits_for_the_store_and_follows_when_unavailable() {
    let (b, c) = pending("closed");
    let p = ask(&b, &c);
    let j = p.connect.jti.clone().unwrap();
    assert_ne!(j.id, "j-1", "the token id is hashed");
    assert_eq!(j.until, 1_030);
    assert_eq!(p.connect.slot.as_ref().map(|s| s.limit), Some(2));
    let f = p.finish(
        Ok(Claimed::Fresh { slot: Some(1) }),
        WhenUnavailable::Closed,
        &mut local(),
    );
    assert_eq!(f.etcd_slot, Some(1));
    let BindDecision::Allow {
        live: Some(live), ..
    } = f.decision
    else {
        panic!()
    };
    assert_eq!(live.slot.map(|s| s.1), Some("slot-1".to_string()));
    let deny = |r: Result<Claimed, StoreError>, when| match ask(&b, &c)
        .finish(r, when, &mut local())
        .decision
    {
        BindDecision::Deny { denial, reply } => (
            denial,
            reply.status,
            reply
                .body
                .get(2..4)
                .map(|b| u16::from_be_bytes([b[0], b[1]])),
        ),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        deny(Ok(Claimed::Replay), WhenUnavailable::Closed),
        (BindDenial::Replay, 101, Some(4401))
    );
    assert_eq!(
        deny(Ok(Claimed::OverCap), WhenUnavailable::Closed),
        (BindDenial::TooManySockets, 101, Some(4429))
    );
    // Closed: refused with close 1013, never let through.
    assert_eq!(
        deny(Err(StoreError::Unavailable), WhenUnavailable::Closed),
        (BindDenial::StoreUnavailable, 101, Some(1013))
    );
    // Local: this Envoy's own state decides, and a replay is still caught locally.
    let mut mine = local();
    let f = ask(&b, &c).finish(
        Err(StoreError::Malformed),
        WhenUnavailable::Local,
        &mut mine,
    );
    assert!(f.fallback && f.etcd_slot.is_none());
    assert!(matches!(f.decision, BindDecision::Allow { .. }));
    let f = ask(&b, &c).finish(
        Err(StoreError::Unavailable),
        WhenUnavailable::Local,
        &mut mine,
    );
    assert!(matches!(
        f.decision,
        BindDecision::Deny {
            denial: BindDenial::Replay,
            ..
        }
    ));
}

#[test]
fn a_request_refused_before_the_claims_or_without_any_makes_no_store_call() {
    let (b, _) = pending("closed");
    let no_jti = match json!({"iss": "i", "sub": "alice", "exp": 1_000}) {
        Value::Object(m) => m,
        _ => unreachable!(),
    };
    let selected = b.config.binding_for(None, "/ws", "gw");
    assert!(matches!(
        b.decide_fleet(selected, &ws_request(&no_jti), Some(900), None),
        FleetDecision::Now(BindDecision::Deny {
            denial: BindDenial::NoJti,
            ..
        })
    ));
    // Plain HTTP on a binding without single use or a cap: nothing to claim.
    let plain = SessionBinding::new(
        SessionBindingConfig::compile(
            br#"{"max_sockets": {"limit": 2, "per_claim": "sub"}, "store": {"etcd": {"cluster": "etcd"}}}"#,
        )
        .unwrap(),
    );
    let c = match json!({"sub": "alice"}) {
        Value::Object(m) => m,
        _ => unreachable!(),
    };
    let mut req = ws_request(&c);
    req.websocket = false;
    let selected = plain.config.binding_for(None, "/ws", "gw");
    assert!(matches!(
        plain.decide_fleet(selected, &req, Some(900), None),
        FleetDecision::Now(BindDecision::Allow { .. })
    ));
}

#[test]
fn a_connect_abandoned_while_waiting_frees_whichever_slot_it_took() {
    let mut s = Sockets::new(42, 9);
    let claim = connect(false, Some(3)).slot.unwrap();
    s.abandoned(&claim);
    let calls = s.due("gh/", 0);
    let RootCall::Release(freed) = &calls[0].0 else {
        panic!()
    };
    assert_eq!(freed.len(), 3);
    let ops = body(&calls[0].1)["success"].as_array().unwrap().clone();
    for (n, op) in ops.iter().enumerate() {
        let t = &op["request_txn"];
        assert_eq!(
            unb64(&t["compare"][0]["key"]),
            format!("gh/sock/owner-hash/{n}")
        );
        assert_eq!(
            unb64(&t["compare"][0]["value"]),
            "slot-a",
            "only this socket's"
        );
    }
}

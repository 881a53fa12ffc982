use super::*;
use crate::pipeline::Handover;
use crate::session_binding::store::MemoryKv;
use crate::ws::Dir;
use serde_json::json;

const OK_TXN: &[u8] = br#"{"header":{"revision":"3"},"succeeded":true}"#;
const USED_TXN: &[u8] = br#"{"header":{"revision":"3"}}"#;

fn binding(v: serde_json::Value) -> SessionBinding {
    SessionBinding::new(SessionBindingConfig::compile(v.to_string().as_bytes()).unwrap())
}

/// Request facts as a test sets them; records the host reads.
#[derive(Default)]
struct Fake {
    claims: Option<Claims>,
    /// jwt-auth's published re-auth payload (read once).
    reauth: Option<Vec<u8>>,
    reads: Vec<String>,
}

impl RequestFacts for Fake {
    fn header(&mut self, name: &str) -> Option<String> {
        self.reads.push(name.to_string());
        (name == "sec-websocket-key").then(|| "dGhlIHNhbXBsZSBub25jZQ==".to_string())
    }
    fn peer(&mut self) -> Option<String> {
        self.reads.push("peer".into());
        None
    }
    fn random_id(&mut self) -> String {
        "slot-1".into()
    }
    fn now(&mut self) -> Option<u64> {
        Some(20)
    }
    fn now_ms(&mut self) -> u64 {
        20_000
    }
    fn filter_state(&mut self, name: &str) -> Option<Vec<u8>> {
        self.reads.push(name.to_string());
        if name == crate::jwt_auth::CLAIMS_PROPERTY {
            return self.claims.as_ref().map(|c| serde_json::to_vec(c).unwrap());
        }
        if name == REAUTH_CLAIMS_PROPERTY {
            return self.reauth.take();
        }
        None
    }
    fn metadata(&mut self, _key: &str) -> Option<Claims> {
        None
    }
}

fn token(jti: &str) -> Claims {
    match json!({"iss": "i", "sub": "alice", "jti": jti, "exp": 100}) {
        serde_json::Value::Object(m) => m,
        _ => unreachable!(),
    }
}

fn connect(
    b: &SessionBinding,
    w: &mut WorkerState<MemoryKv>,
    s: &mut StreamState,
    jti: &str,
) -> ConnectStep {
    let mut facts = Fake {
        claims: Some(token(jti)),
        ..Fake::default()
    };
    s.request(
        b,
        w,
        ("/ws", "gw", None),
        true,
        &Handover::default(),
        &mut facts,
    )
}

fn stat(w: &WorkerState<MemoryKv>, s: S) -> u64 {
    w.out
        .stats
        .iter()
        .filter(|(x, _)| *x == s)
        .map(|(_, n)| n)
        .sum()
}

/// A socket connected through the fleet store and upgraded.
fn live_socket(b: &SessionBinding, w: &mut WorkerState<MemoryKv>) -> StreamState {
    let mut s = w.stream();
    assert!(matches!(connect(b, w, &mut s, "c1"), ConnectStep::Ask(..)));
    assert_eq!(s.sent(b, w, Some(7), 20_000), ConnectStep::Wait);
    let step = s.answered(b, w, 7, 20_010, |_| (200, OK_TXN.to_vec()));
    assert_eq!(step, ConnectStep::Next);
    assert!(s.response(w, || true, 20));
    s
}

/// A client chunk after jwt-auth published re-auth token `jti` as filter state.
fn reauth(
    b: &SessionBinding,
    w: &mut WorkerState<MemoryKv>,
    s: &mut StreamState,
    jti: &str,
) -> Option<(u16, &'static str)> {
    let mut facts = Fake {
        reauth: Some(serde_json::to_vec(&token(jti)).unwrap()),
        ..Fake::default()
    };
    s.live_chunk(b, w, Dir::ToUpstream, &mut Handover::default(), &mut facts)
}

/// A chunk towards the client.
fn chunk(
    b: &SessionBinding,
    w: &mut WorkerState<MemoryKv>,
    s: &mut StreamState,
) -> Option<(u16, &'static str)> {
    s.live_chunk(
        b,
        w,
        Dir::ToClient,
        &mut Handover::default(),
        &mut Fake::default(),
    )
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
}

/// Send the tick's re-auth claims with `token` (`None`: they cannot start).
fn send_claims(b: &SessionBinding, w: &mut WorkerState<MemoryKv>, token: Option<u32>) -> usize {
    let claims: Vec<Outgoing> = w
        .tick(b, 21, 21_000)
        .into_iter()
        .filter(|c| matches!(c.what, Sent::Reauth(_)))
        .collect();
    let n = claims.len();
    for c in claims {
        w.sent(b, c.what, token, 21);
    }
    n
}

#[test]
fn an_unbound_route_reads_nothing_and_passes() {
    let b = binding(json!({"rules": [{"match": {"prefix": "/api/"}, "disabled": true}]}));
    let mut w = WorkerState::new(&b.config, MemoryKv::default(), 0, 0);
    let mut s = w.stream();
    let mut facts = Fake::default();
    let target = ("/api/x", "gw", None);
    let step = s.request(&b, &mut w, target, false, &Handover::default(), &mut facts);
    assert_eq!(step, ConnectStep::Next);
    assert!(facts.reads.is_empty(), "{:?}", facts.reads);
    assert_eq!(stat(&w, S::Passed), 1);
}

#[test]
fn a_local_connect_is_decided_at_once_and_its_replay_refused() {
    let b = binding(json!({"single_use": true}));
    let mut w = WorkerState::new(&b.config, MemoryKv::default(), 0, 0);
    let mut s = w.stream();
    assert_eq!(connect(&b, &mut w, &mut s, "c1"), ConnectStep::Next);
    let mut again = w.stream();
    match connect(&b, &mut w, &mut again, "c1") {
        ConnectStep::Deny { denial, .. } => assert_eq!(denial, BindDenial::Replay),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_fleet_connect_waits_for_etcd_and_a_failed_send_refuses_when_closed() {
    let b = binding(json!({"single_use": true, "store": {"etcd": {"cluster": "etcd"}}}));
    let mut w = WorkerState::new(&b.config, MemoryKv::default(), 5, 0);
    let mut s = w.stream();
    assert!(matches!(
        connect(&b, &mut w, &mut s, "c1"),
        ConnectStep::Ask(..)
    ));
    match s.sent(&b, &mut w, None, 20_000) {
        ConnectStep::Deny { denial, .. } => assert_eq!(denial, BindDenial::StoreUnavailable),
        other => panic!("{other:?}"),
    }
    let unavailable = S::Store(StoreStat::Error(StoreError::Unavailable));
    assert_eq!(stat(&w, unavailable), 1);
    // No latency when no call went out.
    assert_eq!(stat(&w, S::Store(StoreStat::LatencyMs)), 0);
    let mut s = w.stream();
    connect(&b, &mut w, &mut s, "c2");
    s.sent(&b, &mut w, Some(3), 20_000);
    let other = s.answered(&b, &mut w, 4, 20_001, |_| unreachable!());
    assert_eq!(other, ConnectStep::Wait);
    match s.answered(&b, &mut w, 3, 20_005, |_| (200, USED_TXN.to_vec())) {
        ConnectStep::Deny { denial, .. } => assert_eq!(denial, BindDenial::Replay),
        other => panic!("{other:?}"),
    }
    assert_eq!(stat(&w, S::Store(StoreStat::LatencyMs)), 5);
}

#[test]
fn a_reauth_token_is_claimed_on_etcd_and_a_used_one_closes_the_socket() {
    let b = binding(json!({"single_use": true, "store": {"etcd": {"cluster": "etcd"}}}));
    let mut w = WorkerState::new(&b.config, MemoryKv::default(), 5, 0);
    let mut s = live_socket(&b, &mut w);
    // Accepted at once; the claim goes out from the root on the tick.
    let close = reauth(&b, &mut w, &mut s, "r1");
    assert_eq!(close, None);
    let calls = w.tick(&b, 21, 21_000);
    let claim = calls
        .iter()
        .find(|c| matches!(c.what, Sent::Reauth(_)))
        .expect("a re-auth claim");
    match &claim.request {
        Request::Store(call, timeout) => {
            assert_eq!(call.path, "/v3/kv/txn");
            // The connect tokens' key: a token is single use whichever way it came.
            let key = crate::store::jti_key("gatehouse/", &crate::short_hash("i\0r1"));
            assert!(String::from_utf8_lossy(&call.body).contains(&b64(&key)));
            assert_eq!(*timeout, 250);
        }
        other => panic!("{other:?}"),
    }
    w.sent(&b, claim.what.clone(), Some(9), 21);
    // Sent once only.
    assert_eq!(send_claims(&b, &mut w, Some(99)), 0);
    // Nothing closes before etcd answers.
    assert_eq!(chunk(&b, &mut w, &mut s), None);
    let follow_ups = w.root_answered(&b, 9, 21, 21_010, |_| (200, USED_TXN.to_vec()));
    assert!(follow_ups.is_empty());
    assert_eq!(stat(&w, S::ReauthStoreReplay), 1);
    assert_eq!(chunk(&b, &mut w, &mut s), Some((4401, "token reused")));
    let closed = S::WsClosed(WsClose::Denied(BindDenial::Replay));
    assert_eq!(stat(&w, closed), 1);
}

#[test]
fn a_fresh_reauth_token_keeps_the_socket() {
    let b = binding(json!({"single_use": true, "store": {"etcd": {"cluster": "etcd"}}}));
    let mut w = WorkerState::new(&b.config, MemoryKv::default(), 5, 0);
    let mut s = live_socket(&b, &mut w);
    reauth(&b, &mut w, &mut s, "r2");
    assert_eq!(send_claims(&b, &mut w, Some(11)), 1);
    w.root_answered(&b, 11, 21, 21_010, |_| (200, OK_TXN.to_vec()));
    assert_eq!(stat(&w, S::ReauthStoreClaimed), 1);
    assert_eq!(chunk(&b, &mut w, &mut s), None);
}

#[test]
fn etcd_down_never_closes_a_live_socket_and_local_checks_this_envoy() {
    for when in ["closed", "local"] {
        let b = binding(json!({"single_use": true,
            "store": {"etcd": {"cluster": "etcd"}, "when_unavailable": when}}));
        let mut w = WorkerState::new(&b.config, MemoryKv::default(), 5, 0);
        let mut s = live_socket(&b, &mut w);
        // Used before on this Envoy (its per-process store).
        let owner = crate::short_hash("i\0sub\0alice");
        let id = crate::short_hash("i\0r3");
        w.local.use_once(&id, Some((&owner, 8)), 160, 20);
        reauth(&b, &mut w, &mut s, "r3");
        assert_eq!(send_claims(&b, &mut w, Some(12)), 1);
        w.root_answered(&b, 12, 21, 21_300, |_| {
            (503, b"no healthy upstream".to_vec())
        });
        assert_eq!(stat(&w, S::ReauthStoreFailed), 1, "{when}");
        let unavailable = S::Store(StoreStat::Error(StoreError::Unavailable));
        assert_eq!(stat(&w, unavailable), 1);
        let close = chunk(&b, &mut w, &mut s);
        if when == "closed" {
            assert_eq!(close, None);
        } else {
            assert_eq!(close, Some((4401, "token reused")));
            assert_eq!(stat(&w, S::Store(StoreStat::LocalFallback)), 1);
        }
    }
}

#[test]
fn a_claim_that_cannot_start_is_a_failure_and_a_gone_stream_is_forgotten() {
    let b = binding(json!({"single_use": true, "store": {"etcd": {"cluster": "etcd"}}}));
    let mut w = WorkerState::new(&b.config, MemoryKv::default(), 5, 0);
    let mut s = live_socket(&b, &mut w);
    reauth(&b, &mut w, &mut s, "r4");
    assert_eq!(send_claims(&b, &mut w, None), 1);
    assert_eq!(stat(&w, S::ReauthStoreFailed), 1);
    assert_eq!(chunk(&b, &mut w, &mut s), None);
    reauth(&b, &mut w, &mut s, "r5");
    s.done(&mut w, 22);
    assert_eq!(send_claims(&b, &mut w, Some(13)), 0);
}

#[test]
fn the_feed_answer_is_parsed_counted_and_logged() {
    let b = binding(json!({"revocation": {"cluster": "feed", "path": "/revoked"}}));
    let mut w = WorkerState::new(&b.config, MemoryKv::default(), 0, 0);
    let calls = w.tick(&b, 0, 0);
    assert_eq!(calls.len(), 1);
    w.sent(&b, calls[0].what.clone(), Some(1), 0);
    w.root_answered(&b, 1, 1, 1_000, |cap| {
        assert_eq!(cap, None);
        (200, br#"[{"jti":"x"},{"bogus":1}]"#.to_vec())
    });
    assert_eq!(stat(&w, S::RevocationFetchOk), 1);
    assert_eq!(stat(&w, S::RevocationEntrySkipped), 1);
    let lines = &w.out.lines;
    assert!(matches!(&lines[..], [Line::Warn(l)] if l.contains("1 entries, 1 malformed")));
    assert!(w.revocations.as_ref().is_some_and(|r| r.ever_loaded));
}

#[test]
fn past_the_claims_a_worker_keeps_a_reauth_claim_is_a_store_failure() {
    let b = binding(json!({"single_use": true, "store": {"etcd": {"cluster": "etcd"}}}));
    let mut w = WorkerState::new(&b.config, MemoryKv::default(), 5, 0);
    let mut s = live_socket(&b, &mut w);
    for i in 0..MAX_REAUTH_CLAIMS + 1 {
        assert_eq!(reauth(&b, &mut w, &mut s, &format!("t{i}")), None);
    }
    assert_eq!(stat(&w, S::ReauthStoreFailed), 1);
    assert_eq!(send_claims(&b, &mut w, Some(1)), MAX_REAUTH_CLAIMS);
}

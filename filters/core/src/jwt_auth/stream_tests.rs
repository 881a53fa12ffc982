//! What the shell applies, callback by callback: which facts a request reads, the decision with
//! its stats and what it leaves for later (a JWKS fetch to wait for, the session deadline, the
//! live socket), the root's fetches, and each chunk on a live socket (re-auth, deadlines).

use super::tests::{bearer, claims, config, ed_jwk, http, sign_ed, token, ws, ISS, NOW};
use super::*;
use crate::kv::MemoryKv;
use crate::pipeline::Flow;
use crate::sessions;
use crate::stats::JwtAuthStat::{self, *};
use crate::ws::{Dir, LiveSocket};
use serde_json::json;

fn no_fetch(_: &FetchRequest<'_>) -> Option<u32> {
    panic!("no fetch expected")
}

fn no_read() -> Vec<u8> {
    panic!("no bytes read expected")
}

/// The stats noted since the last call (each once, whatever its count).
fn stats(auth: &mut JwtAuth) -> Vec<JwtAuthStat> {
    auth.notes.stats.drain(..).map(|(s, _)| s).collect()
}

fn lines(auth: &mut JwtAuth) -> Vec<Line> {
    std::mem::take(&mut auth.notes.lines)
}

fn info(s: &str) -> Line {
    Line::Info(s.into())
}

fn jwks() -> Vec<u8> {
    json!({"keys": [ed_jwk("ed1")]}).to_string().into_bytes()
}

fn remote() -> JwtAuth {
    config(
        json!({"providers": [{"name": "r", "issuer": ISS, "jwks": {"remote": {
        "cluster": "idp", "path": "/jwks", "min_refetch_seconds": 30}}}]}),
    )
}

fn sid_token(sid: &str, exp: u64) -> String {
    let mut c = claims();
    c["sid"] = json!(sid);
    c["exp"] = json!(exp);
    sign_ed(json!({"alg": "EdDSA", "kid": "ed1"}), c)
}

/// The response facts of an upgrade the upstream accepted.
fn upstream_101(fact: Fact) -> Option<String> {
    Some(match fact {
        Fact::Property(_) => "via_upstream".into(),
        Fact::Header(_) => "101".into(),
    })
}

/// A masked client-to-server text frame.
fn client_text(payload: &[u8]) -> Vec<u8> {
    let mask = [1, 2, 3, 4];
    let mut f = vec![0x81];
    match u16::try_from(payload.len()) {
        Ok(n) if n < 126 => f.push(0x80 | n as u8),
        Ok(n) => {
            f.push(0x80 | 126);
            f.extend(n.to_be_bytes());
        }
        Err(_) => panic!("too long for a test frame"),
    }
    f.extend(mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// `type` first, as the scanner wants it (`json!` would sort the keys).
fn reauth_frame(token: &str) -> Vec<u8> {
    client_text(format!(r#"{{"type":"gatehouse.reauth","token":"{token}"}}"#).as_bytes())
}

/// An upgrade of session `s1` (token valid until NOW + 200) let through and answered 101: its
/// stream and the pass's live socket. The notes so far are dropped.
fn live_upgrade(auth: &mut JwtAuth, kv: &mut MemoryKv) -> (AuthStream, Option<LiveSocket>) {
    let t = bearer(&sid_token("s1", NOW + 200));
    let req = Request {
        authorization: Some(&t),
        ..ws("app")
    };
    let mut s = AuthStream::default();
    let admit = s.request(auth, &req, Some(NOW), None, no_fetch);
    assert!(matches!(admit, Admit::Allow { token: Some(_), .. }));
    let mut live = None;
    s.response(auth, kv, &mut live, || Some(NOW), upstream_101);
    auth.notes = Notes::default();
    (s, live)
}

fn chunk(
    s: &mut AuthStream,
    auth: &mut JwtAuth,
    kv: &MemoryKv,
    live: &mut Option<LiveSocket>,
    (dir, at, data): (Dir, Option<u64>, &[u8]),
) -> ChunkStep {
    s.chunk(auth, kv, live, (dir, data.len()), || at, || data.to_vec())
}

#[test]
fn only_the_facts_the_config_and_the_request_need_are_read() {
    let read = |auth: &JwtAuth, websocket| {
        let mut asked = Vec::new();
        let target = ("/p".to_string(), String::new(), None);
        let facts = RequestFacts::read(&auth.config, target, websocket, |f| {
            asked.push(f);
            Some("v".to_string())
        });
        (facts, asked)
    };
    let plain = config(json!({}));
    let (facts, asked) = read(&plain, false);
    assert_eq!(asked, [Fact::Header("authorization")]);
    let req = facts.request();
    assert_eq!(
        (req.path, req.authorization, req.tls),
        ("/p", Some("v"), false)
    );
    let (facts, asked) = read(&plain, true);
    assert_eq!(
        asked,
        [
            Fact::Header("sec-websocket-key"),
            Fact::Header("sec-websocket-protocol"),
            Fact::Header("authorization"),
            Fact::Property(&["connection", "tls_version"]),
            Fact::Header("x-forwarded-proto"),
        ]
    );
    assert!(facts.websocket && facts.tls);
    let cookies = config(json!({"sources": [{"cookie": {"name": "gh_jwt"}}],
        "trusted_web_origins": ["https://app.test"]}));
    let (facts, asked) = read(&cookies, false);
    assert_eq!(
        asked,
        [
            Fact::Header("authorization"),
            Fact::Header("cookie"),
            Fact::Header(":method"),
            Fact::Header("origin"),
            Fact::Header("sec-fetch-site"),
        ]
    );
    assert_eq!(facts.request().sec_fetch_site, Some("v"));
}

#[test]
fn refusals_and_allowed_missing_tokens_are_counted_and_leave_nothing_for_later() {
    let mut auth = config(json!({}));
    assert_eq!(lines(&mut auth), [info("configured: 1 providers, 0 rules")]);
    let mut s = AuthStream::default();
    match s.request(&mut auth, &http(None), Some(NOW), None, no_fetch) {
        Admit::Refuse { denial, reply } => {
            assert_eq!((denial, reply.status), (Denial::Missing, 401));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(stats(&mut auth), [Denied(Denial::Missing)]);
    let mut open = config(json!({"rules": [{"match": {"prefix": "/"}, "allow_missing": true}]}));
    let mut s = AuthStream::default();
    let admit = s.request(&mut open, &ws("app"), Some(NOW), None, no_fetch);
    assert!(matches!(admit, Admit::Allow { token: None, .. }));
    assert_eq!(stats(&mut open), [AllowedMissing]);
    // No token, no socket to follow and no session to record: nothing is read.
    let (mut kv, mut live) = (MemoryKv::default(), None);
    s.response(
        &mut open,
        &mut kv,
        &mut live,
        || panic!("no clock"),
        |_| panic!("no read"),
    );
    assert!(live.is_none());
    let step = chunk(
        &mut s,
        &mut open,
        &kv,
        &mut live,
        (Dir::ToUpstream, None, b"x"),
    );
    assert_eq!((step.size, step.replace), (1, None));
}

#[test]
fn an_upgrade_records_its_session_only_when_the_upstream_answered() {
    let mut auth = config(json!({"session_claims": ["sid"], "reauth_type": "gatehouse.reauth"}));
    let t = bearer(&sid_token("s1", NOW + 200));
    let req = Request {
        authorization: Some(&t),
        ..ws("app")
    };
    let mut s = AuthStream::default();
    let Admit::Allow { edits, token } = s.request(&mut auth, &req, Some(NOW), None, no_fetch)
    else {
        panic!("allowed")
    };
    // Re-auth frames must be readable: no permessage-deflate.
    assert!(edits.contains(&HeaderEdit::Remove("sec-websocket-extensions".into())));
    let session = token.and_then(|t| t.session.clone()).unwrap();
    assert_eq!(stats(&mut auth), [CacheMiss, Allowed]);
    // A later filter answered (a local reply): nothing recorded, no live socket.
    let (mut kv, mut live) = (MemoryKv::default(), None);
    let local = |f| match f {
        Fact::Property(_) => Some("local_reply".to_string()),
        Fact::Header(_) => Some("403".to_string()),
    };
    s.response(&mut auth, &mut kv, &mut live, || Some(NOW), local);
    assert_eq!(sessions::deadline(&kv, &session), None);
    assert!(live.is_none());
    // Not live: a chunk reads nothing, not even the clock.
    s.chunk(
        &mut auth,
        &kv,
        &mut live,
        (Dir::ToUpstream, 3),
        || panic!("no clock"),
        no_read,
    );
    // The same again, answered 101 by the upstream.
    let mut s = AuthStream::default();
    s.request(&mut auth, &req, Some(NOW), None, no_fetch);
    assert_eq!(stats(&mut auth), [CacheHit, Allowed]);
    s.response(&mut auth, &mut kv, &mut live, || Some(NOW), upstream_101);
    assert_eq!(sessions::deadline(&kv, &session), Some(NOW + 200));
    let l = live.as_ref().unwrap();
    assert_eq!(
        (l.deadline(), l.session()),
        (NOW + 200, Some(session.as_str()))
    );
}

#[test]
fn an_unknown_key_waits_for_one_jwks_fetch_then_decides_on_its_answer() {
    let mut auth = remote();
    let t = bearer(&token());
    let mut s = AuthStream::default();
    let mut asked = Vec::new();
    let admit = s.request(&mut auth, &http(Some(&t)), Some(NOW), None, |r| {
        asked.push((r.cluster.to_string(), r.path.to_string()));
        Some(7)
    });
    assert!(matches!(admit, Admit::Wait));
    assert_eq!(asked, [("idp".to_string(), "/jwks".to_string())]);
    assert_eq!(s.other_call(8), Some(Flow::Wait), "another call's answer");
    assert_eq!(s.other_call(7), None, "its own");
    lines(&mut auth);
    let answer = Some((200, jwks()));
    let admit = s.request(&mut auth, &http(Some(&t)), Some(NOW), answer, no_fetch);
    assert!(matches!(admit, Admit::Allow { token: Some(_), .. }));
    assert_eq!(
        stats(&mut auth),
        [JwksFetchOk, JwksKeySkipped, CacheMiss, Allowed]
    );
    assert_eq!(
        lines(&mut auth),
        [info("provider r: JWKS loaded, 1 keys (0 skipped)")]
    );
    assert_eq!(
        s.other_call(7),
        Some(Flow::Next),
        "it waits for nothing now"
    );

    // A fetch that cannot start is counted and the request decided without it, once.
    let mut auth = remote();
    let mut s = AuthStream::default();
    let mut tries = 0;
    let admit = s.request(&mut auth, &http(Some(&t)), Some(NOW), None, |_| {
        tries += 1;
        None
    });
    assert!(matches!(
        admit,
        Admit::Refuse {
            denial: Denial::KeysNotLoaded,
            ..
        }
    ));
    assert_eq!(tries, 1);
    assert_eq!(
        stats(&mut auth),
        [JwksFetchFailed, Denied(Denial::KeysNotLoaded)]
    );
}

#[test]
fn the_root_fetches_a_discovery_document_then_the_jwks_it_names() {
    let mut a = config(
        json!({"providers": [{"name": "idp", "issuer": ISS, "jwks": {"discovery": {
        "cluster": "idp", "authority": "idp.test", "path": "/.well-known/openid-configuration"}}}]}),
    );
    assert!(a.fetches_keys() && !config(json!({})).fetches_keys());
    let mut started = Vec::new();
    a.tick(NOW, |r| {
        started.push(format!("{}{}", r.authority, r.path));
        Some(1)
    });
    assert_eq!(started, ["idp.test/.well-known/openid-configuration"]);
    a.tick(NOW + 1, no_fetch); // one fetch in flight at a time
    a.fetch_answered(99, NOW, || panic!("not a fetch of the root's"), no_fetch);
    let doc = json!({"issuer": ISS, "jwks_uri": "https://keys.test/certs"});
    let read = || (200, doc.to_string().into_bytes());
    a.fetch_answered(1, NOW, read, |r| {
        started.push(format!("{}{}", r.authority, r.path));
        Some(2)
    });
    assert_eq!(started[1], "keys.test/certs");
    a.tick(NOW + 1, no_fetch); // the JWKS is the same scheduled fetch
    a.fetch_answered(2, NOW, || (200, jwks()), no_fetch);
    assert!(a.has_remote_keys(0));
    assert_eq!(
        lines(&mut a),
        [
            info("configured: 1 providers, 0 rules"),
            info("provider idp: discovery document loaded, jwks_uri keys.test/certs"),
            info("provider idp: JWKS loaded, 1 keys (0 skipped)"),
        ]
    );
    assert_eq!(stats(&mut a), [JwksFetchOk, JwksKeySkipped]);
    a.tick(NOW + 1, no_fetch); // loaded: nothing due before the refresh
}

#[test]
fn a_scheduled_fetch_that_cannot_start_or_fails_is_logged_counted_and_retried() {
    let mut a = remote();
    lines(&mut a);
    a.tick(NOW, |_| None);
    assert_eq!(stats(&mut a), [JwksFetchFailed]);
    assert_eq!(
        lines(&mut a),
        [Line::Warn(
            "cannot call cluster `idp` for the JWKS; retrying".into()
        )]
    );
    a.tick(NOW + 1, no_fetch);
    let mut again = 0;
    a.tick(NOW + crate::fetch::RETRY_SECONDS, |_| {
        again += 1;
        Some(3)
    });
    assert_eq!(again, 1);
    a.fetch_answered(3, NOW + 5, || (503, Vec::new()), no_fetch);
    assert_eq!(stats(&mut a), [JwksFetchFailed]);
    assert_eq!(
        lines(&mut a),
        [Line::Warn(
            "provider r: JWKS fetch failed (HTTP status 503); keeping the last good keys".into()
        )]
    );
    assert!(!a.has_remote_keys(0));
}

#[test]
fn a_reauth_frame_is_taken_out_and_extends_only_its_own_socket() {
    let mut auth = config(json!({"session_claims": ["sid"], "reauth_type": "gatehouse.reauth"}));
    let mut kv = MemoryKv::default();
    let (mut s, mut live) = live_upgrade(&mut auth, &mut kv);
    let session = live.as_ref().and_then(|l| l.session()).unwrap().to_string();
    let other = client_text(b"hi");
    let data = [reauth_frame(&sid_token("s1", NOW + 900)), other.clone()].concat();
    let at = (Dir::ToUpstream, Some(NOW + 10), &data[..]);
    let step = chunk(&mut s, &mut auth, &kv, &mut live, at);
    assert_eq!(step.replace.as_deref(), Some(&other[..]));
    assert_eq!(step.size, other.len());
    assert!(step.reauth.is_some_and(|v| v.claims["sid"] == "s1"));
    assert_eq!(live.as_ref().map(LiveSocket::deadline), Some(NOW + 900));
    assert_eq!(stats(&mut auth), [WsReauth]);
    // The shared session deadline is written by requests the whole chain allowed only.
    assert_eq!(sessions::deadline(&kv, &session), Some(NOW + 200));
    // Server-to-client bytes are never read.
    let step = s.chunk(
        &mut auth,
        &kv,
        &mut live,
        (Dir::ToClient, 5),
        || Some(NOW),
        no_read,
    );
    assert_eq!((step.size, step.replace.is_none()), (5, true));
    // A token of another session: refused, 4401, with a denial line.
    let data = reauth_frame(&sid_token("s2", NOW + 900));
    let at = (Dir::ToUpstream, Some(NOW + 20), &data[..]);
    let step = chunk(&mut s, &mut auth, &kv, &mut live, at);
    assert!(step.reauth.is_none());
    let l = live.as_ref().unwrap();
    assert_eq!(
        (l.close_code(), l.close_reason()),
        (Some(4401), "other session")
    );
    assert_eq!(stats(&mut auth), [Denied(Denial::OtherSession)]);
    assert_eq!(
        lines(&mut auth),
        [Line::Denial(
            "live websocket: re-auth refused (other_session), closing with 4401".into()
        )]
    );
    // Closing: nothing more is scanned, checked or counted.
    let at = (Dir::ToUpstream, Some(NOW + 9_999), &data[..]);
    chunk(&mut s, &mut auth, &kv, &mut live, at);
    assert_eq!(auth.notes, Notes::default());
}

#[test]
fn a_live_socket_closes_at_its_deadline_unless_its_session_was_extended() {
    let mut auth = config(json!({"session_claims": ["sid"]}));
    let mut kv = MemoryKv::default();
    let (mut s, mut live) = live_upgrade(&mut auth, &mut kv);
    let session = live.as_ref().and_then(|l| l.session()).unwrap().to_string();
    let at = |t: u64| (Dir::ToClient, Some(t), &b"data"[..]);
    chunk(&mut s, &mut auth, &kv, &mut live, at(NOW + 199));
    assert!(!live.as_ref().unwrap().is_closing());
    // Another request of the session (on any worker) extended it: the socket follows.
    sessions::extend(&mut kv, &session, NOW + 500, NOW + 100, 4);
    chunk(&mut s, &mut auth, &kv, &mut live, at(NOW + 200));
    assert_eq!(live.as_ref().map(LiveSocket::deadline), Some(NOW + 500));
    assert_eq!(auth.notes, Notes::default());
    chunk(&mut s, &mut auth, &kv, &mut live, at(NOW + 500));
    let l = live.as_ref().unwrap();
    assert_eq!(
        (l.close_code(), l.close_reason()),
        (Some(4401), "session expired")
    );
    assert_eq!(stats(&mut auth), [WsExpiredClose]);
    assert_eq!(
        lines(&mut auth),
        [info("live websocket: session expired, closing with 4401")]
    );
}

#[test]
fn without_a_clock_a_live_socket_closes_with_1013() {
    for reauth in [false, true] {
        let extra = if reauth {
            json!({"session_claims": ["sid"], "reauth_type": "gatehouse.reauth"})
        } else {
            json!({"session_claims": ["sid"]})
        };
        let mut auth = config(extra);
        let mut kv = MemoryKv::default();
        let (mut s, mut live) = live_upgrade(&mut auth, &mut kv);
        // A re-auth frame cannot be checked either.
        let data = reauth_frame(&sid_token("s1", NOW + 900));
        let step = chunk(
            &mut s,
            &mut auth,
            &kv,
            &mut live,
            (Dir::ToUpstream, None, &data),
        );
        assert!(step.reauth.is_none());
        assert_eq!(live.as_ref().and_then(LiveSocket::close_code), Some(1013));
        assert_eq!(stats(&mut auth), [Denied(Denial::Clock)]);
        let denial_lines = usize::from(!reauth);
        assert_eq!(lines(&mut auth).len(), denial_lines, "reauth {reauth}");
    }
}

#[test]
fn with_the_fleet_store_a_socket_at_its_local_deadline_asks_every_replica() {
    let mut auth =
        config(json!({"session_claims": ["sid"], "store": {"etcd": {"cluster": "etcd"}}}));
    let mut kv = MemoryKv::default();
    let (mut s, mut live) = live_upgrade(&mut auth, &mut kv);
    // The deadline the upgrade earned goes to the store on the next tick.
    let deadlines = auth.deadlines.as_mut().unwrap();
    let due = deadlines.due("gatehouse/", NOW);
    assert!(matches!(&due[..], [(sessions::DeadlineCall::Write(w), _)] if w[0].1 == NOW + 200));
    // At its local deadline it waits (a second at a time) for the store's answer.
    chunk(
        &mut s,
        &mut auth,
        &kv,
        &mut live,
        (Dir::ToClient, Some(NOW + 200), b"x"),
    );
    let l = live.as_ref().unwrap();
    assert_eq!((l.is_closing(), l.deadline()), (false, NOW + 201));
    assert_eq!(stats(&mut auth), [Store(sessions::DeadlineStat::Held)]);
}

#[test]
fn the_root_tick_sends_the_store_calls_and_notes_what_etcd_answers() {
    use crate::store::StoreError;
    let mut auth =
        config(json!({"session_claims": ["sid"], "store": {"etcd": {"cluster": "etcd"}}}));
    let mut kv = MemoryKv::default();
    let _socket = live_upgrade(&mut auth, &mut kv);
    stats(&mut auth);
    lines(&mut auth);
    // Envoy cannot start the write: counted and logged, and it waits for the next tick.
    auth.store_tick(NOW, |_, _, _| None);
    let unavailable = Store(sessions::DeadlineStat::Error(StoreError::Unavailable));
    assert_eq!(stats(&mut auth), [unavailable]);
    assert!(matches!(&lines(&mut auth)[..], [Line::Warn(w)] if w.contains("unavailable")));
    // Sent with the store's timeout; an answer to another call is not the store's.
    let mut sent = Vec::new();
    auth.store_tick(NOW + sessions::WRITE_EVERY, |store, call, timeout| {
        sent.push((store.cluster.clone(), call.path, timeout));
        Some(5)
    });
    assert_eq!(sent, [("etcd".to_string(), "/v3/kv/txn", 250)]);
    assert!(!auth.store_answered(6, NOW, |_| unreachable!("not read")));
    let ok = br#"{"header":{"revision":"5"},"succeeded":true}"#.to_vec();
    assert!(auth.store_answered(5, NOW, |cap| {
        assert_eq!(cap, Some(crate::store::MAX_ANSWER));
        (200, ok)
    }));
    assert_eq!(stats(&mut auth), [Store(sessions::DeadlineStat::Written)]);
    assert!(lines(&mut auth).is_empty());
}

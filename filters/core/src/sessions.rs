//! Session deadlines shared by every worker, for live sockets that follow their session.
//!
//! Envoy's shared data (one key/value store per Envoy process, visible to every worker's VM) has
//! no delete and no key listing, so keys must not grow with the number of sessions: session
//! keys are spread over [`BUCKETS`] fixed keys, and each bucket's value is a short text of
//! `<session key> <deadline>` lines, pruned of expired entries and capped on every write. A
//! session pushed out of a full bucket only loses its extension: its sockets close at their own
//! deadline, never later.
//!
//! One user must not be able to fill the buckets (minting sessions to push everyone else's
//! extensions out): a session key starts with a short tag of its subject (`<tag>.<hash>`), and a
//! bucket keeps at most `per_subject` entries of one tag, the subject's oldest dropped first. So
//! filling a bucket takes `PER_BUCKET / per_subject` different subjects, and the check is a scan
//! of the one bucket already read (no index, no extra keys).

use crate::buckets::{self, entries};
use crate::kv::{self, Kv};

/// Number of shared-data keys used.
pub const BUCKETS: u32 = 256;
/// Entries kept per bucket (the latest deadlines win).
pub const PER_BUCKET: usize = 64;
/// Entries of one subject kept per bucket, by default (`max_sessions_per_subject`).
pub const DEFAULT_PER_SUBJECT: usize = 4;

/// The subject tag of a session key (`<tag>.<hash>`), if it has one.
pub fn subject(session: &str) -> Option<&str> {
    session.split_once('.').map(|(tag, _)| tag)
}

/// The shared-data key holding `session`'s deadline.
pub fn bucket_key(session: &str) -> String {
    format!(
        "gatehouse.jwt_auth.sessions.{}",
        buckets::index(session, BUCKETS)
    )
}

/// `session`'s deadline in a bucket value.
pub fn lookup(bucket: &[u8], session: &str) -> Option<u64> {
    entries(bucket).find(|(k, _)| *k == session).map(|(_, d)| d)
}

/// The bucket value after recording `deadline` for `session` at `now`, keeping at most
/// `per_subject` entries of its subject, or `None` when the bucket already has this deadline or
/// a later one (nothing to write).
pub fn record(
    bucket: &[u8],
    session: &str,
    deadline: u64,
    now: u64,
    per_subject: usize,
) -> Option<Vec<u8>> {
    if deadline <= now || lookup(bucket, session).is_some_and(|d| d >= deadline) {
        return None;
    }
    let mut kept: Vec<(&str, u64)> = entries(bucket)
        .filter(|(k, d)| *k != session && *d > now)
        .collect();
    if let Some(tag) = subject(session) {
        let mut same: Vec<(&str, u64)> = kept
            .iter()
            .copied()
            .filter(|(k, _)| subject(k) == Some(tag))
            .collect();
        let room = per_subject.max(1).saturating_sub(1);
        if same.len() > room {
            // The subject's latest deadlines stay; its oldest go.
            same.sort_by_key(|e| std::cmp::Reverse(e.1));
            let dropped: Vec<&str> = same.iter().skip(room).map(|(k, _)| *k).collect();
            kept.retain(|(k, _)| !dropped.contains(k));
        }
    }
    kept.push((session, deadline));
    buckets::keep_latest(&mut kept, PER_BUCKET);
    Some(buckets::write(&kept))
}

/// Record a fresh `deadline` for `session` at `now` where every worker's live sockets look for
/// it (Envoy's shared data), with at most `per_subject` records of its subject per bucket.
pub fn extend(kv: &mut impl Kv, session: &str, deadline: u64, now: u64, per_subject: usize) {
    // Compare-and-swap: another worker may write the same bucket at the same moment.
    kv::update(kv, &bucket_key(session), (), |bucket| {
        (record(bucket, session, deadline, now, per_subject), ())
    });
}

/// The latest deadline any worker recorded for `session`.
pub fn deadline(kv: &impl Kv, session: &str) -> Option<u64> {
    let (value, _) = kv.get(&bucket_key(session));
    lookup(&value?, session)
}

// ---------------------------------------------------------------------------------------------
// Across replicas: session deadlines in the fleet store (`store`, docs/fleet.md). A worker keeps
// what it must write and what it must ask; the root tick sends both in batches.

use crate::store::{self, Call, StoreError, WhenUnavailable};
use std::collections::BTreeMap;

/// A session's deadline is written to the store at most once per this many seconds (a later
/// one waits, merged, for the next write).
pub const WRITE_EVERY: u64 = 2;
/// Seconds a socket at its local deadline waits for the store: it closes only on an answer
/// read at least this long after it first asked (so a write that waited [`WRITE_EVERY`] is seen).
pub const GRACE: u64 = 3;
/// Sessions per store call.
pub const BATCH: usize = 64;
/// Sessions a worker tracks at most (to write, and asked); past it, a socket at its deadline is
/// decided on this Envoy's own state.
pub const MAX_TRACKED: usize = 4096;

/// The store's outcomes for session deadlines (`store.deadline.*`, `store.error.*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadlineStat {
    /// A session's deadline written to the store.
    Written,
    /// A session's deadline read from the store.
    Read,
    /// A live socket took a later deadline from the store.
    Adopted,
    /// The store knows no later deadline: the socket closes (4401).
    Expired,
    /// A live socket kept past its local deadline while the store has not answered.
    Held,
    /// `when_unavailable: local`: closed at its local deadline while the store is away.
    LocalFallback,
    /// A store call failed (then the call is tried again on a later tick).
    Error(StoreError),
}

pub const DEADLINE_STATS: [DeadlineStat; 6] = [
    DeadlineStat::Written,
    DeadlineStat::Read,
    DeadlineStat::Adopted,
    DeadlineStat::Expired,
    DeadlineStat::Held,
    DeadlineStat::LocalFallback,
];

impl DeadlineStat {
    pub fn name(self) -> String {
        let name = match self {
            DeadlineStat::Written => "deadline.written",
            DeadlineStat::Read => "deadline.read",
            DeadlineStat::Adopted => "deadline.adopted",
            DeadlineStat::Expired => "deadline.expired",
            DeadlineStat::Held => "deadline.held",
            DeadlineStat::LocalFallback => "local_fallback",
            DeadlineStat::Error(e) => return format!("store.error.{}", e.reason()),
        };
        format!("store.{name}")
    }

    /// The warning a store outcome is logged with: every error but a missing lease, which is
    /// routine (the first write of each minute grants it).
    pub fn warning(self) -> Option<String> {
        match self {
            DeadlineStat::Error(StoreError::LeaseMissing) => None,
            DeadlineStat::Error(e) => Some(format!(
                "store: session deadlines: no usable answer ({}); live sockets stay open",
                e.reason()
            )),
            _ => None,
        }
    }
}

/// What a live socket at its local deadline does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The store has a later deadline: take it.
    Later(u64),
    /// Wait for the store (check again in a second).
    Hold,
    /// The store, asked after the grace, knows nothing later: close.
    Expired,
    /// Closed on this Envoy's own state (the store is away and `when_unavailable: local`, or
    /// too many sessions are tracked).
    Local,
}

impl Check {
    /// The socket's new deadline (`None`: close), for [`crate::ws::LiveSocket::expire`].
    pub fn deadline(self, now: u64) -> Option<u64> {
        match self {
            Check::Later(d) => Some(d),
            Check::Hold => Some(now + 1),
            Check::Expired | Check::Local => None,
        }
    }

    pub fn stat(self) -> DeadlineStat {
        match self {
            Check::Later(_) => DeadlineStat::Adopted,
            Check::Hold => DeadlineStat::Held,
            Check::Expired => DeadlineStat::Expired,
            Check::Local => DeadlineStat::LocalFallback,
        }
    }
}

/// What a root call was for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadlineCall {
    Write(Vec<(String, u64)>),
    Read(Vec<String>),
    Grant,
}

#[derive(Debug, Clone, Copy)]
struct Asked {
    /// When a socket of this worker first came to its deadline and asked.
    since: u64,
    /// The store's answer (its deadline, if any) and when it was read.
    answer: Option<(Option<u64>, u64)>,
}

/// One worker's session deadlines in the store (the root context keeps it).
#[derive(Debug)]
pub struct FleetDeadlines {
    pub when_unavailable: WhenUnavailable,
    to_write: BTreeMap<String, u64>,
    /// When each session was last written (for [`WRITE_EVERY`]).
    written: BTreeMap<String, u64>,
    /// The deadline etcd is known to hold for each session (a write it took): a request that
    /// earns no later one writes nothing, so a cached token's warm path makes no store call.
    stored: BTreeMap<String, u64>,
    asked: BTreeMap<String, Asked>,
    /// Leases to grant before writing again.
    grants: Vec<(i64, u64)>,
    /// The last read failed: the store is away.
    away: bool,
    in_flight: Vec<(u32, DeadlineCall)>,
}

impl FleetDeadlines {
    pub fn new(when_unavailable: WhenUnavailable) -> Self {
        Self {
            when_unavailable,
            to_write: BTreeMap::new(),
            written: BTreeMap::new(),
            stored: BTreeMap::new(),
            asked: BTreeMap::new(),
            grants: Vec::new(),
            away: false,
            in_flight: Vec::new(),
        }
    }

    /// A request the whole chain allowed earned `session` `deadline`: write it on a tick.
    pub fn extend(&mut self, session: &str, deadline: u64) {
        if self.stored.get(session).is_some_and(|d| *d >= deadline) {
            return;
        }
        if let Some(d) = self.to_write.get_mut(session) {
            *d = (*d).max(deadline);
        } else if self.to_write.len() < MAX_TRACKED {
            self.to_write.insert(session.to_string(), deadline);
        }
    }

    /// A live socket of `session` is at its local deadline at `now` (this Envoy knows nothing
    /// later).
    pub fn check(&mut self, session: &str, now: u64) -> Check {
        if !self.asked.contains_key(session) && self.asked.len() >= MAX_TRACKED {
            return Check::Local;
        }
        let asked = self.asked.entry(session.to_string()).or_insert(Asked {
            since: now,
            answer: None,
        });
        match asked.answer {
            Some((Some(d), _)) if d > now => {
                // Taken: the next time the socket comes to a deadline it asks afresh.
                self.asked.remove(session);
                Check::Later(d)
            }
            Some((_, at)) if at >= asked.since + GRACE => Check::Expired,
            _ if self.away
                && self.when_unavailable == WhenUnavailable::Local
                && now >= asked.since + GRACE =>
            {
                Check::Local
            }
            _ => Check::Hold,
        }
    }

    fn busy(&self, what: fn(&DeadlineCall) -> bool) -> bool {
        self.in_flight.iter().any(|(_, c)| what(c))
    }

    /// The calls due at `now`: lease grants, one batch of writes, one batch of reads.
    pub fn due(&mut self, prefix: &str, now: u64) -> Vec<(DeadlineCall, Call)> {
        let mut calls = Vec::new();
        self.written.retain(|_, at| *at + WRITE_EVERY > now);
        self.stored.retain(|_, d| *d > now);
        let stored = &self.stored;
        self.to_write
            .retain(|s, d| stored.get(s).is_none_or(|known| *known < *d));
        self.asked
            .retain(|_, a| a.answer.is_none() || a.since + GRACE + 30 > now);
        let granting = self.busy(|c| matches!(c, DeadlineCall::Grant));
        for (lease, ttl) in std::mem::take(&mut self.grants) {
            calls.push((DeadlineCall::Grant, store::grant(lease, ttl)));
        }
        if !granting && calls.is_empty() && !self.busy(|c| matches!(c, DeadlineCall::Write(_))) {
            let ready: Vec<(String, u64)> = self
                .to_write
                .iter()
                .filter(|(s, _)| !self.written.contains_key(*s))
                .take(BATCH)
                .map(|(s, d)| (s.clone(), *d))
                .collect();
            for (s, _) in &ready {
                self.to_write.remove(s);
                self.written.insert(s.clone(), now);
            }
            if !ready.is_empty() {
                let call = store::write_deadlines(prefix, &ready, now);
                calls.push((DeadlineCall::Write(ready), call));
            }
        }
        if !self.busy(|c| matches!(c, DeadlineCall::Read(_))) {
            // Unresolved sessions: no answer yet, or one read before the grace ended.
            let ask: Vec<String> = self
                .asked
                .iter()
                .filter(|(_, a)| a.answer.is_none_or(|(_, at)| at < a.since + GRACE))
                .take(BATCH)
                .map(|(s, _)| s.clone())
                .collect();
            if !ask.is_empty() {
                let call = store::read_deadlines(prefix, &ask);
                calls.push((DeadlineCall::Read(ask), call));
            }
        }
        calls
    }

    /// Root call `token` is one of these (its answer goes to [`Self::answer`]).
    pub fn waits_for(&self, token: u32) -> bool {
        self.in_flight.iter().any(|(t, _)| *t == token)
    }

    pub fn sent(&mut self, token: u32, what: DeadlineCall) {
        self.in_flight.push((token, what));
    }

    /// A call could not be started: what it carried waits for the next tick.
    pub fn not_sent(&mut self, what: DeadlineCall) {
        if let DeadlineCall::Write(entries) = what {
            self.requeue(entries);
        }
    }

    fn requeue(&mut self, entries: Vec<(String, u64)>) {
        for (s, d) in entries {
            self.written.remove(&s);
            self.extend(&s, d);
        }
    }

    /// The answer to root call `token` at `now`: `None` when it is not ours, else what to count
    /// (with how many times).
    pub fn answer(
        &mut self,
        prefix: &str,
        token: u32,
        status: u32,
        body: &[u8],
        now: u64,
    ) -> Option<(DeadlineStat, u64)> {
        let at = self.in_flight.iter().position(|(t, _)| *t == token)?;
        let (_, what) = self.in_flight.swap_remove(at);
        Some(match what {
            DeadlineCall::Write(entries) => match store::read_write_answer(status, body) {
                Ok(true) => {
                    for (s, d) in &entries {
                        if self.stored.len() < MAX_TRACKED || self.stored.contains_key(s) {
                            let known = self.stored.entry(s.clone()).or_insert(*d);
                            *known = (*known).max(*d);
                        }
                    }
                    (DeadlineStat::Written, entries.len() as u64)
                }
                Ok(false) => {
                    let mut grants: Vec<(i64, u64)> = entries
                        .iter()
                        .map(|(_, d)| store::session_lease(prefix, *d, now))
                        .collect();
                    grants.sort_unstable();
                    grants.dedup_by_key(|g| g.0);
                    self.grants = grants;
                    self.requeue(entries);
                    (DeadlineStat::Error(StoreError::LeaseMissing), 1)
                }
                Err(e) => {
                    self.requeue(entries);
                    (DeadlineStat::Error(e), 1)
                }
            },
            DeadlineCall::Read(sessions) => {
                match store::read_deadlines_answer(status, body, sessions.len()) {
                    Ok(deadlines) => {
                        self.away = false;
                        for (s, d) in sessions.iter().zip(deadlines) {
                            if let Some(a) = self.asked.get_mut(s) {
                                a.answer = Some((d, now));
                            }
                        }
                        (DeadlineStat::Read, sessions.len() as u64)
                    }
                    Err(e) => {
                        self.away = true;
                        (DeadlineStat::Error(e), 1)
                    }
                }
            }
            DeadlineCall::Grant => match store::read_grant(status, body) {
                Ok(()) => (DeadlineStat::Written, 0),
                Err(e) => (DeadlineStat::Error(e), 1),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_extend_prune_and_stay_bounded() {
        let record = |b: &[u8], s: &str, d: u64, n: u64| record(b, s, d, n, PER_BUCKET);
        let b = record(b"", "s1", 100, 10).unwrap();
        assert_eq!(lookup(&b, "s1"), Some(100));
        assert_eq!(
            record(&b, "s1", 90, 10),
            None,
            "an older deadline never shortens"
        );
        let b = record(&b, "s1", 200, 10).unwrap();
        assert_eq!(lookup(&b, "s1"), Some(200));
        let b = record(&b, "s2", 150, 10).unwrap();
        // At 160 s1's extension is still there, s2's expired entry is pruned on the next write.
        let b = record(&b, "s3", 300, 160).unwrap();
        assert_eq!(lookup(&b, "s2"), None);
        assert_eq!((lookup(&b, "s1"), lookup(&b, "s3")), (Some(200), Some(300)));
        let mut big = Vec::new();
        for i in 0..200u64 {
            big = record(&big, &format!("k{i}"), 1_000 + i, 0).unwrap();
        }
        assert_eq!(entries(&big).count(), PER_BUCKET);
        assert_eq!(lookup(&big, "k199"), Some(1_199));
        assert_eq!(lookup(&big, "k0"), None);
        assert_eq!(lookup(b"garbage\xff\nno-number x", "garbage"), None);
        assert!(bucket_key("s1").starts_with("gatehouse.jwt_auth.sessions."));
    }

    #[test]
    fn deadlines_in_shared_data_only_grow_and_are_read_by_session() {
        let mut kv = crate::kv::MemoryKv::default();
        assert_eq!(deadline(&kv, "u.s1"), None);
        extend(&mut kv, "u.s1", 100, 10, 4);
        extend(&mut kv, "u.s1", 90, 10, 4);
        extend(&mut kv, "u.s2", 80, 10, 4);
        assert_eq!(
            deadline(&kv, "u.s1"),
            Some(100),
            "an older deadline never shortens"
        );
        assert_eq!(deadline(&kv, "u.s2"), Some(80));
        // Already past: nothing recorded.
        extend(&mut kv, "u.s3", 10, 10, 4);
        assert_eq!(deadline(&kv, "u.s3"), None);
    }

    #[test]
    fn store_errors_are_logged_except_a_missing_lease() {
        assert_eq!(
            DeadlineStat::Error(StoreError::LeaseMissing).warning(),
            None
        );
        assert_eq!(DeadlineStat::Written.warning(), None);
        let w = DeadlineStat::Error(StoreError::Unavailable)
            .warning()
            .unwrap();
        assert!(
            w.starts_with("store: session deadlines: no usable answer ("),
            "{w}"
        );
        assert!(w.ends_with("); live sockets stay open"), "{w}");
    }

    #[test]
    fn one_subject_cannot_fill_a_bucket() {
        let mut b = record(b"", "other.s0", 5_000, 0, 4).unwrap();
        for i in 0..100u64 {
            b = record(&b, &format!("mallory.s{i}"), 1_000 + i, 0, 4).unwrap();
        }
        let of = |b: &[u8], tag: &str| entries(b).filter(|(k, _)| subject(k) == Some(tag)).count();
        assert_eq!(of(&b, "mallory"), 4, "at most 4 of one subject");
        assert_eq!(
            lookup(&b, "other.s0"),
            Some(5_000),
            "someone else's session stays"
        );
        // Mallory's newest stay, the oldest went.
        assert_eq!(lookup(&b, "mallory.s99"), Some(1_099));
        assert_eq!(lookup(&b, "mallory.s96"), Some(1_096));
        assert_eq!(lookup(&b, "mallory.s95"), None);
        // Re-recording one of the kept sessions does not drop another of them.
        let b2 = record(&b, "mallory.s97", 2_000, 0, 4).unwrap();
        assert_eq!(of(&b2, "mallory"), 4);
        assert_eq!(lookup(&b2, "mallory.s96"), Some(1_096));
        // Untagged keys are not grouped; per_subject 1 keeps just the newest.
        let b3 = record(&b, "mallory.new", 3_000, 0, 1).unwrap();
        assert_eq!(of(&b3, "mallory"), 1);
        assert_eq!(subject("plainkey"), None);
    }

    mod fleet {
        use super::super::*;
        use serde_json::{json, Value};

        const P: &str = "gh/";

        fn body(call: &Call) -> Value {
            serde_json::from_slice(&call.body).unwrap()
        }
        fn range_answer(values: &[Option<u64>]) -> Vec<u8> {
            use base64::Engine;
            let responses: Vec<Value> = values
                .iter()
                .map(|v| match v {
                    Some(d) => json!({"response_range": {"header": {}, "count": "1", "kvs": [
                        {"key": "eA==", "value": base64::engine::general_purpose::STANDARD
                            .encode(format!("{d:020}"))}]}}),
                    None => json!({"response_range": {"header": {}}}),
                })
                .collect();
            json!({"header": {}, "succeeded": true, "responses": responses})
                .to_string()
                .into_bytes()
        }
        const OK: &[u8] = br#"{"header":{"revision":"5"},"succeeded":true}"#;

        #[test]
        fn a_fresh_deadline_is_written_in_batches_at_most_every_few_seconds() {
            let mut f = FleetDeadlines::new(WhenUnavailable::Closed);
            f.extend("u.s1", 100);
            f.extend("u.s1", 90); // never lowers
            f.extend("u.s2", 50);
            let calls = f.due(P, 10);
            assert_eq!(calls.len(), 1);
            let (what, call) = &calls[0];
            assert_eq!(
                what,
                &DeadlineCall::Write(vec![("u.s1".into(), 100), ("u.s2".into(), 50)])
            );
            let b = body(call);
            let ops = b["success"].as_array().unwrap();
            assert_eq!(ops.len(), 2);
            // Keys are hashes: no session in clear.
            assert!(!String::from_utf8_lossy(&call.body).contains("u.s1"));
            assert_eq!(ops[0]["request_txn"]["compare"][0]["target"], "CREATE");
            assert_eq!(
                ops[0]["request_txn"]["failure"][0]["request_txn"]["compare"][0]["result"],
                "LESS"
            );
            f.sent(1, what.clone());
            assert_eq!(
                f.answer(P, 1, 200, OK, 10),
                Some((DeadlineStat::Written, 2))
            );
            // A newer token a second later waits for WRITE_EVERY, merged, then goes.
            f.extend("u.s1", 130);
            assert!(f.due(P, 11).is_empty());
            let calls = f.due(P, 10 + WRITE_EVERY);
            assert_eq!(calls[0].0, DeadlineCall::Write(vec![("u.s1".into(), 130)]));
        }

        #[test]
        fn a_deadline_etcd_already_holds_is_not_written_again() {
            // A cached token on every request earns the same deadline: written once, then
            // never again (the warm path makes no store call), until a later one comes.
            let mut f = FleetDeadlines::new(WhenUnavailable::Closed);
            f.extend("u.s1", 100);
            let (what, _) = f.due(P, 10).remove(0);
            f.sent(1, what);
            f.extend("u.s1", 100); // while the write is in flight
            assert_eq!(
                f.answer(P, 1, 200, OK, 10),
                Some((DeadlineStat::Written, 1))
            );
            for t in 11..40 {
                f.extend("u.s1", 100);
                f.extend("u.s1", 90);
                assert!(f.due(P, t).is_empty(), "written again at {t}");
            }
            f.extend("u.s1", 160);
            let calls = f.due(P, 40);
            assert_eq!(calls[0].0, DeadlineCall::Write(vec![("u.s1".into(), 160)]));
            // Past its deadline the session is forgotten (bounded memory).
            f.sent(2, calls[0].0.clone());
            f.answer(P, 2, 200, OK, 40);
            assert!(f.due(P, 161).is_empty());
            assert!(f.stored.is_empty());
        }

        #[test]
        fn a_failed_write_leaves_nothing_known() {
            let mut f = FleetDeadlines::new(WhenUnavailable::Closed);
            f.extend("u.s1", 100);
            let (what, _) = f.due(P, 10).remove(0);
            f.sent(1, what);
            assert!(matches!(
                f.answer(P, 1, 503, b"", 10),
                Some((DeadlineStat::Error(_), 1))
            ));
            f.extend("u.s1", 100);
            let calls = f.due(P, 10 + WRITE_EVERY);
            assert_eq!(calls[0].0, DeadlineCall::Write(vec![("u.s1".into(), 100)]));
        }

        #[test]
        fn a_missing_lease_is_granted_then_the_batch_is_written_again() {
            let mut f = FleetDeadlines::new(WhenUnavailable::Closed);
            f.extend("u.s1", 100);
            let (what, _) = f.due(P, 10).remove(0);
            f.sent(7, what);
            let not_found = br#"{"error":"etcdserver: requested lease not found","code":5,"message":"etcdserver: requested lease not found"}"#;
            assert_eq!(
                f.answer(P, 7, 400, not_found, 10),
                Some((DeadlineStat::Error(StoreError::LeaseMissing), 1))
            );
            let calls = f.due(P, 10);
            assert_eq!(calls.len(), 1);
            assert_eq!(calls[0].0, DeadlineCall::Grant);
            let (lease, ttl) = store::session_lease(P, 100, 10);
            assert_eq!(body(&calls[0].1)["ID"], lease.to_string());
            assert!(
                ttl > 100 - 10 + GRACE,
                "the lease ends a bit past the deadline"
            );
            f.sent(8, DeadlineCall::Grant);
            // No write while the grant is on its way; then the batch again.
            assert!(f.due(P, 10).is_empty());
            f.answer(P, 8, 200, OK, 10);
            assert_eq!(
                f.due(P, 10)[0].0,
                DeadlineCall::Write(vec![("u.s1".into(), 100)])
            );
        }

        #[test]
        fn a_socket_at_its_deadline_adopts_a_later_one_or_closes_after_the_grace() {
            let mut f = FleetDeadlines::new(WhenUnavailable::Closed);
            assert_eq!(f.check("u.s1", 100), Check::Hold);
            assert_eq!(Check::Hold.deadline(100), Some(101));
            let (what, call) = f.due(P, 100).remove(0);
            assert_eq!(what, DeadlineCall::Read(vec!["u.s1".into()]));
            assert!(body(&call)["success"][0]["request_range"]["key"].is_string());
            f.sent(1, what);
            // No second read while one is in flight.
            assert!(f.due(P, 100).is_empty());
            assert_eq!(
                f.answer(P, 1, 200, &range_answer(&[Some(130)]), 100),
                Some((DeadlineStat::Read, 1))
            );
            assert_eq!(f.check("u.s1", 100), Check::Later(130));
            // At 130, nothing later yet: held and asked until the grace is over.
            assert_eq!(f.check("u.s1", 130), Check::Hold);
            let (what, _) = f.due(P, 130).remove(0);
            f.sent(2, what);
            f.answer(P, 2, 200, &range_answer(&[Some(130)]), 131);
            assert_eq!(f.check("u.s1", 131), Check::Hold, "within the grace");
            let (what, _) = f.due(P, 133).remove(0);
            f.sent(3, what);
            f.answer(P, 3, 200, &range_answer(&[None]), 130 + GRACE);
            assert_eq!(f.check("u.s1", 133), Check::Expired);
            // A later write seen within the grace is still adopted.
            f.check("u.s2", 200);
            let (what, _) = f.due(P, 200).remove(0);
            f.sent(4, what);
            f.answer(P, 4, 200, &range_answer(&[Some(205)]), 202);
            assert_eq!(f.check("u.s2", 202), Check::Later(205));
        }

        #[test]
        fn the_store_away_never_closes_a_socket_unless_local_says_so() {
            for (policy, after) in [
                (WhenUnavailable::Closed, Check::Hold),
                (WhenUnavailable::Local, Check::Local),
            ] {
                let mut f = FleetDeadlines::new(policy);
                assert_eq!(f.check("u.s1", 100), Check::Hold);
                for (i, (status, answer)) in [
                    (0, &b""[..]),
                    (503, b"upstream connect error"),
                    (200, b"not json"),
                    (200, br#"{"header":{},"responses":[{"response_range":{"kvs":[{"value":"!!"}]}}]}"#),
                    (200, br#"{"header":{},"responses":"x"}"#),
                ]
                .into_iter()
                .enumerate()
                {
                    let (what, _) = f.due(P, 100).remove(0);
                    f.sent(i as u32, what);
                    let (stat, _) = f.answer(P, i as u32, status, answer, 101).unwrap();
                    assert!(matches!(stat, DeadlineStat::Error(_)), "{stat:?}");
                }
                assert_eq!(f.check("u.s1", 101), Check::Hold, "within the grace");
                assert_eq!(f.check("u.s1", 100 + GRACE), after);
                // A huge answer is an error too.
                let (what, _) = f.due(P, 200).remove(0);
                f.sent(99, what);
                let huge = vec![b' '; store::MAX_ANSWER + 1];
                assert_eq!(
                    f.answer(P, 99, 200, &huge, 200),
                    Some((DeadlineStat::Error(StoreError::TooLarge), 1))
                );
                assert_eq!(f.answer(P, 12345, 200, OK, 200), None, "not ours");
            }
        }

        #[test]
        fn a_failed_write_is_tried_again() {
            let mut f = FleetDeadlines::new(WhenUnavailable::Closed);
            f.extend("u.s1", 100);
            let (what, _) = f.due(P, 10).remove(0);
            f.sent(1, what);
            assert_eq!(
                f.answer(P, 1, 0, b"", 10),
                Some((DeadlineStat::Error(StoreError::Unavailable), 1))
            );
            assert_eq!(
                f.due(P, 10)[0].0,
                DeadlineCall::Write(vec![("u.s1".into(), 100)])
            );
            let names: Vec<String> = DEADLINE_STATS.iter().map(|s| s.name()).collect();
            assert!(names.contains(&"store.deadline.adopted".to_string()));
        }
    }
}

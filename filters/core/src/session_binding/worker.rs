//! What session-binding does in each proxy-wasm callback, host-free: the shell reads the facts,
//! calls one of these, and applies what it returns ([`ConnectStep`], a close, the calls in
//! [`Outgoing`]) and what they leave in [`WorkerState::out`] (stats to count, lines to log).
//!
//! - [`WorkerState`]: per worker (the root context and every stream): the revocation list and
//!   its fetch schedule, this Envoy's store of used token ids and socket slots, the fleet
//!   store's socket lease and slots, and the in-band re-auth claims on their way to etcd.
//! - [`StreamState`] (`worker/stream.rs`): per stream: the request facts and claims the core
//!   reads, the connect waiting for etcd, the upgrade waiting for 101, the live socket's terms
//!   and its slot.

use super::revocation::{RevocationList, RevocationState};
use super::store::{BindingStore, Kv, KvStore, UseOnce};
use super::*;
use crate::fetch::FetchSchedule;
use crate::jwt::Claims;
use crate::jwt_auth::Verified;
use crate::stats::{SessionBindingStat as S, StoreStat, WsClose};
use crate::store::{
    Call, Claimed, Connect, ConnectFlow, RootCall, Sockets, Step, StoreError, WhenUnavailable,
    MAX_ANSWER,
};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

pub use crate::notes::Line;
/// What session-binding's callbacks leave for the shell: stats to count and lines to log.
pub type Out = crate::notes::Notes<S>;

/// The one line logged when the filter is configured.
pub fn configured_line(config: &SessionBindingConfig) -> String {
    let sources: Vec<&str> = config
        .sources
        .iter()
        .map(|s| match s {
            ClaimsSource::JwtAuth => "jwt_auth",
            ClaimsSource::JwtAuthn { .. } => "jwt_authn",
        })
        .collect();
    let feed = config.revocation.as_ref().map_or("off".to_string(), |f| {
        format!(
            "{}{} every {} s ({})",
            f.cluster,
            f.path,
            f.refresh_seconds,
            if f.fail_closed {
                "fail-closed"
            } else {
                "fail-open"
            }
        )
    });
    format!(
        "configured: {} rules, claims from {}, revocation feed {feed}",
        config.rules.len(),
        sources.join(", ")
    )
}

/// What a call the shell sends is for (it tells [`WorkerState::sent`] the call's token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// The revocation feed (a fetch source).
    Feed(usize),
    /// A socket-lease call; `count_failure`: count `store.keepalive_failed` when it cannot start.
    Root { call: RootCall, count_failure: bool },
    /// An in-band re-auth claim (its id).
    Reauth(u64),
}

/// A call for the shell to send from the root context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `GET` the revocation feed (its cluster, authority, path and timeout are the config's).
    Feed,
    /// `POST` to the store with this timeout (ms).
    Store(Call, u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub what: Sent,
    pub request: Request,
}

/// The most re-auth claims a worker keeps waiting for etcd; past that a claim is handled as a
/// store failure (`reauth.store_failed`, the socket stays open).
pub const MAX_REAUTH_CLAIMS: usize = 4096;

/// An in-band re-auth token's claim on etcd, sent from the root on the tick.
#[derive(Debug)]
struct ReauthClaim {
    id: u64,
    stream: u64,
    connect: Connect,
    flow: Option<(ConnectFlow, Option<u32>)>,
}

/// Per-worker state shared by the root context and every stream.
pub struct WorkerState<K: Kv> {
    pub revocations: Option<RevocationState>,
    /// This Envoy's used token ids and socket slots (shared data).
    pub local: KvStore<K>,
    /// The slots held by live sockets of this worker in `local`: slot → owner. Refreshed on the
    /// tick so only the slots of vanished streams expire.
    live_slots: HashMap<String, String>,
    /// Fleet store (`store`, docs/fleet.md): this worker's socket lease and etcd slots.
    pub sockets: Option<Sockets>,
    /// When to fetch the revocation feed (source 0).
    fetches: FetchSchedule,
    next_refresh: u64,
    /// Malformed entries the last good document had (logged when it changes).
    last_skipped: usize,
    /// Re-auth claims not answered yet, and the streams whose re-auth token etcd said was used.
    reauth: Vec<ReauthClaim>,
    replayed: BTreeSet<u64>,
    next_stream: u64,
    next_claim: u64,
    /// Stats and lines for the shell.
    pub out: Out,
}

impl<K: Kv> WorkerState<K> {
    /// At configure: `kv` is this Envoy's shared data (its buckets are created now), `lease`
    /// this worker's socket lease id (used with a fleet store).
    pub fn new(config: &SessionBindingConfig, kv: K, lease: i64, now: u64) -> Self {
        let mut local = KvStore::new(kv, config.jti.limits, config.sockets.limits);
        local.create_buckets();
        Self {
            revocations: config
                .revocation
                .as_ref()
                .map(|_| RevocationState::new(now)),
            local,
            live_slots: HashMap::new(),
            sockets: config
                .store
                .as_ref()
                .map(|_| Sockets::new(lease, config.sockets.slot_ttl)),
            fetches: FetchSchedule::new(config.revocation.as_ref().map(|f| (0, f.refresh_seconds))),
            next_refresh: now,
            last_skipped: 0,
            reauth: Vec::new(),
            replayed: BTreeSet::new(),
            next_stream: 0,
            next_claim: 0,
            out: Out::default(),
        }
    }

    /// A new stream's state.
    pub fn stream(&mut self) -> StreamState {
        self.next_stream += 1;
        StreamState::new(self.next_stream)
    }

    /// Free a socket's slot (its stream ended, or the upstream refused the upgrade).
    fn release(&mut self, owner: &str, slot: &str, now: u64) {
        // Fleet store: an etcd slot is freed on the next tick.
        if let Some(sockets) = self.sockets.as_mut() {
            if !self.live_slots.contains_key(slot) {
                sockets.closed(slot);
                self.out.count(S::SocketsReleased);
                return;
            }
        }
        self.live_slots.remove(slot);
        self.local.release_slot(owner, slot, now);
        self.out.count(S::SocketsReleased);
    }

    /// The root tick: the calls to send now (free closed sockets' etcd slots, keep the socket
    /// lease alive, claim re-auth tokens, fetch the feed); the live sockets' local slots are
    /// refreshed.
    pub fn tick(&mut self, b: &SessionBinding, now: u64, now_ms: u64) -> Vec<Outgoing> {
        let mut calls = Vec::new();
        if let (Some(config), Some(sockets)) = (&b.config.store, self.sockets.as_mut()) {
            for (call, body) in sockets.due(&config.prefix, now) {
                calls.push(Outgoing {
                    what: Sent::Root {
                        call,
                        count_failure: true,
                    },
                    request: Request::Store(body, config.timeout_ms),
                });
            }
            for claim in self.reauth.iter_mut().filter(|c| c.flow.is_none()) {
                let (flow, body, timeout) =
                    ConnectFlow::start(claim.connect.clone(), config, 0, 0, now_ms);
                claim.flow = Some((flow, None));
                calls.push(Outgoing {
                    what: Sent::Reauth(claim.id),
                    request: Request::Store(body, timeout),
                });
            }
        }
        if b.config.revocation.is_some() {
            for source in self.fetches.due(now) {
                calls.push(Outgoing {
                    what: Sent::Feed(source),
                    request: Request::Feed,
                });
            }
        }
        let ttl = b.config.sockets.slot_ttl;
        if now >= self.next_refresh {
            self.next_refresh = now + (ttl / 3).max(1);
            if !self.live_slots.is_empty() {
                let slots: Vec<(&str, &str)> = self
                    .live_slots
                    .iter()
                    .map(|(slot, owner)| (owner.as_str(), slot.as_str()))
                    .collect();
                self.local.refresh_slots(&slots, ttl, now);
            }
        }
        calls
    }

    /// The shell sent `what` (`token`), or could not (`None`).
    pub fn sent(&mut self, b: &SessionBinding, what: Sent, token: Option<u32>, now: u64) {
        match (what, token) {
            (Sent::Feed(source), Some(token)) => self.fetches.started(source, token),
            (Sent::Feed(source), None) => {
                let cluster = b
                    .config
                    .revocation
                    .as_ref()
                    .map_or("", |f| f.cluster.as_str());
                self.out.lines.push(Line::Warn(format!(
                    "cannot call cluster `{cluster}` for the revocation list; retrying"
                )));
                self.out.count(S::RevocationFetchFailed);
                self.fetches.not_started(source, now);
            }
            (Sent::Root { call, .. }, Some(token)) => {
                if let Some(s) = self.sockets.as_mut() {
                    s.sent(token, call)
                }
            }
            (
                Sent::Root {
                    call,
                    count_failure,
                },
                None,
            ) => {
                if count_failure {
                    self.out.count(S::Store(StoreStat::KeepaliveFailed));
                }
                if let Some(s) = self.sockets.as_mut() {
                    s.not_sent(call)
                }
            }
            (Sent::Reauth(id), Some(token)) => {
                if let Some((_, t)) = self
                    .reauth
                    .iter_mut()
                    .find(|c| c.id == id)
                    .and_then(|c| c.flow.as_mut())
                {
                    *t = Some(token);
                }
            }
            (Sent::Reauth(id), None) => {
                if let Some(at) = self.reauth.iter().position(|c| c.id == id) {
                    let claim = self.reauth.swap_remove(at);
                    self.reauth_claimed(b, claim, Err(StoreError::Unavailable));
                }
            }
        }
    }

    /// The answer to root call `token`; `read(cap)` reads it (an answer longer than `cap` is
    /// refused unread). The follow-up calls to send.
    pub fn root_answered(
        &mut self,
        b: &SessionBinding,
        token: u32,
        now: u64,
        now_ms: u64,
        read: impl FnOnce(Option<usize>) -> (u32, Vec<u8>),
    ) -> Vec<Outgoing> {
        if self.fetches.in_flight(token).is_some() {
            let (status, body) = read(None);
            self.feed_answered(token, status, &body, now);
            return Vec::new();
        }
        let Some(config) = &b.config.store else {
            return Vec::new();
        };
        let (status, body) = read(Some(MAX_ANSWER));
        if let Some(at) = self
            .reauth
            .iter()
            .position(|c| c.flow.as_ref().is_some_and(|(_, t)| *t == Some(token)))
        {
            let step = match self.reauth.get_mut(at).and_then(|c| c.flow.as_mut()) {
                Some((flow, _)) => flow.answer(status, &body, now_ms),
                None => return Vec::new(),
            };
            return match step {
                Step::Send(call, timeout) => vec![Outgoing {
                    what: Sent::Reauth(self.reauth.get(at).map_or(0, |c| c.id)),
                    request: Request::Store(call, timeout),
                }],
                Step::Done(result) => {
                    let claim = self.reauth.swap_remove(at);
                    self.reauth_claimed(b, claim, result);
                    Vec::new()
                }
            };
        }
        let Some(sockets) = self.sockets.as_mut() else {
            return Vec::new();
        };
        let Some((stat, next)) = sockets.answer(&config.prefix, token, status, &body) else {
            return Vec::new();
        };
        self.out.count(S::Store(stat));
        next.map(|(call, body)| Outgoing {
            what: Sent::Root {
                call,
                count_failure: false,
            },
            request: Request::Store(body, config.timeout_ms),
        })
        .into_iter()
        .collect()
    }

    /// etcd's verdict on an in-band re-auth token: a used one closes its socket (on its next
    /// chunk); a store failure never does (`when_unavailable: local` claims it in this Envoy's
    /// store instead).
    fn reauth_claimed(
        &mut self,
        b: &SessionBinding,
        claim: ReauthClaim,
        answer: Result<Claimed, StoreError>,
    ) {
        match answer {
            Ok(Claimed::Replay) => {
                self.out.count(S::ReauthStoreReplay);
                self.replayed.insert(claim.stream);
            }
            Ok(_) => self.out.count(S::ReauthStoreClaimed),
            Err(e) => {
                let when = b
                    .config
                    .store
                    .as_ref()
                    .map_or(WhenUnavailable::Closed, |c| c.when_unavailable);
                self.out.lines.push(Line::Warn(format!(
                    "store: no usable answer for an in-band re-auth token ({}); the socket stays open (when_unavailable: {})",
                    e.reason(),
                    when.name()
                )));
                self.out.count(S::Store(StoreStat::Error(e)));
                self.out.count(S::ReauthStoreFailed);
                if when == WhenUnavailable::Local {
                    self.out.count(S::Store(StoreStat::LocalFallback));
                    if let Err((UseOnce::Replay, _)) = claim.connect.claim_locally(&mut self.local)
                    {
                        self.replayed.insert(claim.stream);
                    }
                }
            }
        }
    }

    fn feed_answered(&mut self, token: u32, status: u32, body: &[u8], now: u64) {
        let parsed = if status == 200 {
            RevocationList::parse_counted(body)
        } else {
            Err(format!("HTTP status {status}"))
        };
        match parsed {
            Ok((list, skipped)) => {
                let entries = list.len();
                if let Some(state) = self.revocations.as_mut() {
                    let first = !state.ever_loaded;
                    let before = state.generation;
                    state.loaded(list, now);
                    if first || state.generation != before || skipped != self.last_skipped {
                        let line = format!(
                            "revocation list loaded: {entries} entries, {skipped} malformed entries skipped"
                        );
                        self.out.lines.push(if skipped > 0 {
                            Line::Warn(line)
                        } else {
                            Line::Info(line)
                        });
                    }
                }
                self.last_skipped = skipped;
                self.out.add(S::RevocationEntrySkipped, skipped as u64);
                self.out.count(S::RevocationFetchOk);
                self.fetches.finished(token, true, now);
            }
            Err(why) => {
                self.out.lines.push(Line::Warn(format!(
                    "revocation fetch failed ({why}); keeping the last good list"
                )));
                self.out.count(S::RevocationFetchFailed);
                self.fetches.finished(token, false, now);
            }
        }
    }
}

mod stream;
pub use stream::*;

#[cfg(test)]
mod tests;

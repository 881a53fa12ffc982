//! What session-binding does in each proxy-wasm callback, host-free: the shell reads the facts,
//! calls one of these, and applies what it returns ([`ConnectStep`], a close, the calls in
//! [`Outgoing`]) and what they leave in [`WorkerState::out`] (stats to count, lines to log).
//!
//! - [`WorkerState`]: per worker (the root context and every stream): the revocation list and
//!   its fetch schedule, this Envoy's store of used token ids and socket slots, the fleet
//!   store's socket lease and slots, and the in-band re-auth claims on their way to etcd.
//! - [`StreamState`]: per stream: the connect waiting for etcd, the upgrade waiting for 101,
//!   the live socket's terms and its slot.

use super::revocation::{RevocationList, RevocationState};
use super::store::{BindingStore, Kv, KvStore, UseOnce};
use super::*;
use crate::fetch::FetchSchedule;
use crate::jwt::Claims;
use crate::jwt_auth::Verified;
use crate::path::PathError;
use crate::pipeline::Handover;
use crate::reply::LocalReply;
use crate::stats::{SessionBindingStat as S, StoreStat, WsClose};
use crate::store::{
    Call, Claimed, Connect, ConnectFlow, RootCall, Sockets, Step, StoreError, WhenUnavailable,
    MAX_ANSWER,
};
use crate::ws::Dir;
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// A line for the shell to log under the filter's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    Info(String),
    Warn(String),
    /// A denial (logged through the bounded denial log).
    Denial(String),
}

/// What callbacks left for the shell: stats to count (`(stat, n)`) and lines to log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Out {
    pub stats: Vec<(S, u64)>,
    pub lines: Vec<Line>,
}

impl Out {
    fn count(&mut self, stat: S) {
        self.stats.push((stat, 1));
    }

    fn add(&mut self, stat: S, n: u64) {
        self.stats.push((stat, n));
    }
}

/// Verified claims: jwt-auth's in memory, or parsed from filter state or metadata.
#[derive(Debug, Clone)]
pub enum Found {
    Verified(Arc<Verified>),
    Parsed(Claims, Option<String>),
}

impl Found {
    pub fn claims(&self) -> &Claims {
        match self {
            Found::Verified(v) => &v.claims,
            Found::Parsed(c, _) => c,
        }
    }

    pub fn kid(&self) -> Option<&str> {
        match self {
            Found::Verified(v) => Some(&v.key_id),
            Found::Parsed(_, k) => k.as_deref(),
        }
    }
}

/// A published claims payload (jwt-auth's filter state) as claims: a JSON object, else `None`.
pub fn as_claims(bytes: &[u8]) -> Option<Claims> {
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    }
}

/// The `kid` of a `jwt_authn` header published in metadata.
pub fn header_kid(header: &Claims) -> Option<String> {
    header
        .get("kid")
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// The verified claims from the first configured source that has them. `in_memory`: a jwt-auth
/// stage ran in this pass, and this is what it let through (its filter state is then never
/// read); `read` reads any other source from the host.
pub fn first_claims(
    sources: &[ClaimsSource],
    in_memory: Option<Option<&Arc<Verified>>>,
    mut read: impl FnMut(&ClaimsSource) -> Option<Found>,
) -> Option<Found> {
    sources.iter().find_map(|source| match (source, in_memory) {
        (ClaimsSource::JwtAuth, Some(v)) => v.cloned().map(Found::Verified),
        _ => read(source),
    })
}

/// jwt-auth's published re-auth payload, read once per client chunk: `None` when it is the one
/// this stream checked last (`seen`); `Some(None)` when it is not the verified claims jwt-auth
/// publishes (the socket then closes).
pub fn reauth_payload(
    seen: &mut Option<Vec<u8>>,
    payload: Vec<u8>,
    kid: impl FnOnce() -> Option<String>,
) -> Option<Option<Found>> {
    if seen.as_deref() == Some(payload.as_slice()) {
        return None;
    }
    let found = as_claims(&payload).map(|claims| Found::Parsed(claims, kid()));
    *seen = Some(payload);
    Some(found)
}

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
        StreamState {
            id: self.next_stream,
            ..StreamState::default()
        }
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

/// How the core reads a request's facts from the host; each read is a host call (about a
/// microsecond inside V8), so it asks only for what the selected binding needs.
pub trait RequestFacts {
    fn header(&mut self, name: &str) -> Option<String>;
    /// The downstream peer's address (Envoy's `source.address`).
    fn peer(&mut self) -> Option<String>;
    /// A random id for the socket's slot.
    fn random_id(&mut self) -> String;
    /// Unix time in seconds (`None`: the host cannot tell).
    fn now(&mut self) -> Option<u64>;
    /// Unix time in milliseconds (the store's budget and latency).
    fn now_ms(&mut self) -> u64;
    /// A filter state value (jwt-auth's published claims and key ids).
    fn filter_state(&mut self, name: &str) -> Option<Vec<u8>>;
    /// `jwt_authn`'s dynamic metadata entry `key` as a JSON object.
    fn metadata(&mut self, key: &str) -> Option<Claims>;
}

fn text(bytes: Option<Vec<u8>>) -> Option<String> {
    bytes.and_then(|b| String::from_utf8(b).ok())
}

/// A claims source's verified claims, from filter state or `jwt_authn`'s metadata.
fn read_source(facts: &mut impl RequestFacts, source: &ClaimsSource) -> Option<Found> {
    Some(match source {
        ClaimsSource::JwtAuth => Found::Parsed(
            as_claims(&facts.filter_state(crate::jwt_auth::CLAIMS_PROPERTY)?)?,
            text(facts.filter_state(crate::jwt_auth::KID_PROPERTY)),
        ),
        ClaimsSource::JwtAuthn {
            payload_key,
            header_key,
        } => {
            let claims = facts.metadata(payload_key)?;
            let header = header_key.as_ref().and_then(|k| facts.metadata(k));
            Found::Parsed(claims, header.as_ref().and_then(header_kid))
        }
    })
}

/// What the shell does with a connect.
#[derive(Debug, PartialEq, Eq)]
pub enum ConnectStep {
    /// Let the request go on.
    Next,
    /// Send this call to the store (timeout ms) from the stream, then tell
    /// [`StreamState::sent`] its token.
    Ask(Call, u64),
    /// Wait for the store's answer.
    Wait,
    /// Refuse with `reply` (logged and counted as `denied.<reason>`).
    Deny {
        denial: BindDenial,
        reply: LocalReply,
        websocket: bool,
        path: String,
    },
}

/// A connect paused until the store answers.
#[derive(Debug)]
struct Asking {
    flow: ConnectFlow,
    /// The call in flight (`None` until the first one is sent).
    token: Option<u32>,
    pending: Box<Pending>,
    websocket: bool,
    path: String,
}

/// Per-stream state ([`WorkerState::stream`]).
#[derive(Debug, Default)]
pub struct StreamState {
    id: u64,
    /// What an allowed upgrade keeps until the upstream answers 101.
    pending: Option<LiveTerms>,
    /// The live socket's token, once the upstream answered 101.
    live: Option<LiveTerms>,
    /// The slot this stream holds, freed when it ends.
    slot: Option<(String, String)>,
    /// jwt-auth's last published re-auth payload this stream checked.
    reauth_seen: Option<Vec<u8>>,
    /// Fleet store: the connect waiting for etcd's answer.
    asking: Option<Asking>,
}

impl StreamState {
    /// Does this stream keep a live socket of its own (checked on every chunk)?
    pub fn is_live(&self) -> bool {
        self.live.is_some()
    }

    /// The request headers: select the binding of `target` (`(path, authority, route name)`),
    /// read the claims (in memory from a jwt-auth stage of this pass, see [`first_claims`]) and only the facts that binding needs, and decide.
    pub fn request<K: Kv>(
        &mut self,
        b: &SessionBinding,
        w: &mut WorkerState<K>,
        (path, authority, route): (&str, &str, Option<&str>),
        websocket: bool,
        handover: &Handover,
        facts: &mut impl RequestFacts,
    ) -> ConnectStep {
        let config = &b.config;
        let in_memory = handover.from_jwt_auth.then_some(handover.claims.as_ref());
        // A path that walks (`..`, `%2e%2e`, `%2f`) matches no rule: refused (400 / close
        // 4400) before any rule or template looks at it.
        let selected = config.binding_for(route, path, authority);
        let found = match &selected {
            Ok(None) => None,
            _ => first_claims(&config.sources, in_memory, |s| read_source(facts, s)),
        };
        let claims = found.as_ref().map(Found::claims);
        let Some(needed) = SessionBinding::facts_needed(&selected, claims, websocket) else {
            w.out.count(S::Passed);
            return ConnectStep::Next;
        };
        let mut header = |need: bool, name: &str| if need { facts.header(name) } else { None };
        let ws_key = header(websocket, "sec-websocket-key");
        let ws_protocols = header(websocket, "sec-websocket-protocol");
        let cookie = header(needed.cookie, "cookie");
        let user_agent = header(needed.client, "user-agent");
        let client_ip = match needed.client {
            true => facts.peer().and_then(|a| parse_address(&a)),
            false => None,
        };
        let slot_id = match needed.slot {
            true => facts.random_id(),
            false => String::new(),
        };
        let req = BindRequest {
            path,
            host: authority,
            route_name: route,
            websocket,
            ws_key: ws_key.as_deref(),
            ws_protocols: ws_protocols.as_deref(),
            cookie: cookie.as_deref(),
            user_agent: user_agent.as_deref(),
            client_ip,
            claims,
            kid: found.as_ref().and_then(Found::kid),
            slot_id: &slot_id,
        };
        // `None` when the host cannot tell the time: what needs it refuses (503 / close 1013).
        let now = facts.now();
        self.connect(b, w, selected, &req, now, || facts.now_ms())
    }

    /// Decide a bound request (the binding `selected` for it, its facts `req`): with a fleet
    /// store an allowed connect's claims go to etcd first (`now_ms` is read then).
    pub fn connect<K: Kv>(
        &mut self,
        b: &SessionBinding,
        w: &mut WorkerState<K>,
        selected: Result<Option<&Binding>, PathError>,
        req: &BindRequest<'_>,
        now: Option<u64>,
        now_ms: impl FnOnce() -> u64,
    ) -> ConnectStep {
        if let Some(config) = &b.config.store {
            match b.decide_fleet(selected, req, now, w.revocations.as_ref()) {
                FleetDecision::Now(decision) => {
                    return self.apply(w, decision, req.websocket, req.path, None)
                }
                FleetDecision::Ask(pending) => {
                    let (lease, ttl) = w.sockets.as_ref().map_or((0, 0), |s| (s.lease, s.ttl));
                    let connect = pending.connect.clone();
                    let (flow, call, timeout) =
                        ConnectFlow::start(connect, config, lease, ttl, now_ms());
                    self.asking = Some(Asking {
                        flow,
                        token: None,
                        pending,
                        websocket: req.websocket,
                        path: req.path.to_string(),
                    });
                    return ConnectStep::Ask(call, timeout);
                }
            }
        }
        let decision = b.decide_selected(selected, req, now, w.revocations.as_ref(), &mut w.local);
        self.apply(w, decision, req.websocket, req.path, None)
    }

    /// The store call of [`ConnectStep::Ask`] was sent (`token`), or could not be (`None`).
    pub fn sent<K: Kv>(
        &mut self,
        b: &SessionBinding,
        w: &mut WorkerState<K>,
        token: Option<u32>,
        now_ms: u64,
    ) -> ConnectStep {
        let Some(asking) = self.asking.as_mut() else {
            return ConnectStep::Next;
        };
        if token.is_some() {
            asking.token = token;
            return ConnectStep::Wait;
        }
        let Some(asking) = self.asking.take() else {
            return ConnectStep::Next;
        };
        // No latency when not even the first call went out.
        let started = if asking.token.is_some() {
            asking.flow.started_ms
        } else {
            0
        };
        self.stored(b, w, asking, Err(StoreError::Unavailable), started, now_ms)
    }

    /// The answer to call `token` of a waiting connect (`read` as in
    /// [`WorkerState::root_answered`]).
    pub fn answered<K: Kv>(
        &mut self,
        b: &SessionBinding,
        w: &mut WorkerState<K>,
        token: u32,
        now_ms: u64,
        read: impl FnOnce(Option<usize>) -> (u32, Vec<u8>),
    ) -> ConnectStep {
        let Some(asking) = self.asking.as_mut() else {
            return ConnectStep::Next;
        };
        if asking.token != Some(token) {
            return ConnectStep::Wait;
        }
        let (status, body) = read(Some(MAX_ANSWER));
        match asking.flow.answer(status, &body, now_ms) {
            Step::Send(call, timeout) => ConnectStep::Ask(call, timeout),
            Step::Done(answer) => match self.asking.take() {
                Some(asking) => {
                    let started = asking.flow.started_ms;
                    self.stored(b, w, asking, answer, started, now_ms)
                }
                None => ConnectStep::Next,
            },
        }
    }

    /// The store's verdict on the connect (or its error) → the decision, applied.
    fn stored<K: Kv>(
        &mut self,
        b: &SessionBinding,
        w: &mut WorkerState<K>,
        asking: Asking,
        answer: Result<Claimed, StoreError>,
        started_ms: u64,
        now_ms: u64,
    ) -> ConnectStep {
        let Some(config) = &b.config.store else {
            return ConnectStep::Next;
        };
        if started_ms > 0 {
            w.out.add(
                S::Store(StoreStat::LatencyMs),
                now_ms.saturating_sub(started_ms),
            );
        }
        let stat = match &answer {
            Ok(Claimed::Fresh { .. }) => StoreStat::Claimed,
            Ok(Claimed::Replay) => StoreStat::Replay,
            Ok(Claimed::OverCap) => StoreStat::OverCap,
            Err(e) => {
                w.out.lines.push(Line::Warn(format!(
                    "store `{}`: no usable answer ({}); when_unavailable: {}",
                    config.cluster,
                    e.reason(),
                    config.when_unavailable.name()
                )));
                StoreStat::Error(*e)
            }
        };
        w.out.count(S::Store(stat));
        let finished = asking
            .pending
            .finish(answer, config.when_unavailable, &mut w.local);
        if finished.fallback {
            w.out.count(S::Store(StoreStat::LocalFallback));
        }
        self.apply(
            w,
            finished.decision,
            asking.websocket,
            &asking.path,
            finished.etcd_slot,
        )
    }

    /// Apply a decision (`etcd_slot`: the etcd slot number an allowed socket holds).
    fn apply<K: Kv>(
        &mut self,
        w: &mut WorkerState<K>,
        decision: BindDecision,
        websocket: bool,
        path: &str,
        etcd_slot: Option<u32>,
    ) -> ConnectStep {
        match decision {
            BindDecision::Pass => {
                w.out.count(S::Passed);
                ConnectStep::Next
            }
            BindDecision::Allow { live, notes } => {
                w.out.count(S::Allowed);
                for note in notes {
                    w.out.count(note);
                }
                if let Some(terms) = live {
                    if let Some((owner, slot)) = &terms.slot {
                        match (etcd_slot, w.sockets.as_mut()) {
                            (Some(n), Some(sockets)) => sockets.held(slot, owner, n),
                            _ => {
                                w.live_slots.insert(slot.clone(), owner.clone());
                            }
                        }
                        w.out.count(S::SocketsAcquired);
                        self.slot = Some((owner.clone(), slot.clone()));
                    }
                    self.pending = Some(terms);
                }
                ConnectStep::Next
            }
            BindDecision::Deny { denial, reply } => {
                w.out.count(S::Denied(denial));
                ConnectStep::Deny {
                    denial,
                    reply,
                    websocket,
                    path: path.to_string(),
                }
            }
        }
    }

    /// The response headers of an allowed upgrade: `switched` reads whether the upstream
    /// answered 101 (only asked when an upgrade waits). True: the socket is live now (join it);
    /// a refused upgrade frees its slot.
    pub fn response<K: Kv>(
        &mut self,
        w: &mut WorkerState<K>,
        switched: impl FnOnce() -> bool,
        now: u64,
    ) -> bool {
        let Some(terms) = self.pending.take() else {
            return false;
        };
        if switched() {
            self.live = Some(terms);
            true
        } else {
            self.release(w, now);
            false
        }
    }

    /// A chunk of the live socket: must it close, and how (`(code, reason)`, counted and
    /// logged)? The revocation list, an in-band re-auth token etcd said was used, and the
    /// re-auth token jwt-auth just accepted (in memory from a jwt-auth stage of this pass, else
    /// its filter state, read only where the binding checks it, on client chunks: see
    /// [`reauth_payload`]).
    pub fn live_chunk<K: Kv>(
        &mut self,
        b: &SessionBinding,
        w: &mut WorkerState<K>,
        dir: Dir,
        handover: &mut Handover,
        facts: &mut impl RequestFacts,
    ) -> Option<(u16, &'static str)> {
        let terms = self.live.as_mut()?;
        let now = facts.now();
        let mut close = if w.replayed.remove(&self.id) {
            Some(BindDenial::Replay.live_close())
        } else {
            b.check_live(terms, w.revocations.as_ref(), now)
        }
        .map(|(code, reason, d)| (code, reason, WsClose::Denied(d)));
        // An in-band re-auth token jwt-auth accepted on this socket (before this stage sees
        // the chunk), only where the binding checks single use or revocation.
        if close.is_none() && dir == Dir::ToUpstream && terms.checks_reauth(b) {
            let found = match handover.from_jwt_auth {
                true => handover.reauth.take().map(|v| Some(Found::Verified(v))),
                false => facts.filter_state(REAUTH_CLAIMS_PROPERTY).and_then(|p| {
                    reauth_payload(&mut self.reauth_seen, p, || {
                        text(facts.filter_state(REAUTH_KID_PROPERTY))
                    })
                }),
            };
            if let Some(found) = found {
                w.out.count(S::ReauthChecked);
                close = match found {
                    Some(found) => {
                        let checked = if b.config.store.is_some() && terms.single_use {
                            // Fleet store: claimed on etcd from the root; the socket goes on
                            // meanwhile and closes if etcd says the token was used.
                            let mut connect = Connect::default();
                            let checked = b.check_reauth(
                                terms,
                                found.claims(),
                                found.kid(),
                                now,
                                w.revocations.as_ref(),
                                &mut connect,
                            );
                            if checked.is_ok() && connect.jti.is_some() {
                                w.next_claim += 1;
                                let claim = ReauthClaim {
                                    id: w.next_claim,
                                    stream: self.id,
                                    connect,
                                    flow: None,
                                };
                                if w.reauth.len() < MAX_REAUTH_CLAIMS {
                                    w.reauth.push(claim);
                                } else {
                                    // etcd too slow for this many: as if it were away.
                                    w.reauth_claimed(b, claim, Err(StoreError::Unavailable));
                                }
                            }
                            checked
                        } else {
                            b.check_reauth(
                                terms,
                                found.claims(),
                                found.kid(),
                                now,
                                w.revocations.as_ref(),
                                &mut w.local,
                            )
                        };
                        match checked {
                            Ok(notes) => {
                                for note in notes {
                                    w.out.count(note);
                                }
                                None
                            }
                            Err((code, reason, d)) => Some((code, reason, WsClose::Denied(d))),
                        }
                    }
                    // Not the verified payload jwt-auth publishes: fail closed.
                    None => Some((
                        crate::ws::CLOSE_UNAUTHORIZED,
                        "re-auth refused",
                        WsClose::ReauthUnreadable,
                    )),
                };
            }
        }
        let (code, reason, stat) = close?;
        w.out.count(S::WsClosed(stat));
        w.out.lines.push(Line::Denial(format!(
            "live websocket: {reason} ({}), closing with {code}",
            stat.reason()
        )));
        Some((code, reason))
    }

    fn release<K: Kv>(&mut self, w: &mut WorkerState<K>, now: u64) {
        if let Some((owner, slot)) = self.slot.take() {
            w.release(&owner, &slot, now);
        }
    }

    /// The stream ended: its slot is freed (a connect that was waiting for etcd may hold one
    /// anyway), and its re-auth claims are forgotten.
    pub fn done<K: Kv>(&mut self, w: &mut WorkerState<K>, now: u64) {
        if let Some(asking) = self.asking.take() {
            if let (Some(claim), Some(sockets)) = (&asking.pending.connect.slot, w.sockets.as_mut())
            {
                sockets.abandoned(claim);
            }
        }
        self.release(w, now);
        w.reauth.retain(|c| c.stream != self.id);
        w.replayed.remove(&self.id);
    }
}

#[cfg(test)]
mod tests;

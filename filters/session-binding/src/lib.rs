//! session-binding: the proxy-wasm shell over `gatehouse_core::session_binding`. It reads the
//! verified claims (jwt-auth filter state or `jwt_authn` dynamic metadata) and the request facts,
//! applies the core's decision, keeps used token ids and socket slots in Envoy shared data
//! (every worker of this Envoy), fetches the revocation list on a timer, and closes live sockets
//! whose token is revoked. See docs/session-binding.md.

mod metadata;

use gatehouse_core::fetch::FetchSchedule;
use gatehouse_core::jwt::Claims;
use gatehouse_core::jwt_auth::Verified;
use gatehouse_core::jwt_auth::{CLAIMS_PROPERTY, KID_PROPERTY};
use gatehouse_core::pipeline::{self, Flow};
use gatehouse_core::session_binding::revocation::{RevocationList, RevocationState};
use gatehouse_core::session_binding::store::{BindingStore, KvStore};
use gatehouse_core::session_binding::{
    parse_address, BindDecision, BindRequest, ClaimsSource, FleetDecision, LiveTerms, Pending,
    SessionBinding, SessionBindingConfig, JWT_AUTHN_NAMESPACE, REAUTH_CLAIMS_PROPERTY,
    REAUTH_KID_PROPERTY,
};
use gatehouse_core::stats::{SessionBindingStat, StoreStat, WsClose};
use gatehouse_core::store::{Claimed, Sockets, StoreError};
use gatehouse_core::ws::{Dir, LiveSocket};
use gatehouse_host::{self as host, Counters, PassState, Stage, StageRoot};
use proxy_wasm::types::LogLevel;
use serde_json::Value;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

const NAME: &str = "gatehouse.session_binding";

host::main!(NAME, Root::default());

/// Per-worker state shared by the root context and every stream.
struct Shared {
    binding: SessionBinding,
    counters: Counters<SessionBindingStat>,
    revocations: Option<RevocationState>,
    /// The slots held by live sockets of this worker: slot → owner. Refreshed on the tick so
    /// only the slots of vanished streams expire.
    live_slots: HashMap<String, String>,
    /// Fleet store (`store`, docs/fleet.md): this worker's socket lease and etcd slots.
    sockets: Option<Sockets>,
}

impl Shared {
    fn count(&self, stat: SessionBindingStat) {
        self.counters.inc(stat);
    }

    fn store(&self) -> KvStore<host::SharedData> {
        let c = &self.binding.config;
        KvStore::new(host::SharedData, c.jti.limits, c.sockets.limits)
    }

    fn release(&mut self, owner: &str, slot: &str) {
        // --- fleet store: an etcd slot is freed on the next tick.
        if let Some(sockets) = self.sockets.as_mut() {
            if !self.live_slots.contains_key(slot) {
                sockets.closed(slot);
                self.count(SessionBindingStat::SocketsReleased);
                return;
            }
        }
        // ---
        self.live_slots.remove(slot);
        self.store().release_slot(owner, slot, host::now_secs());
        self.count(SessionBindingStat::SocketsReleased);
    }
}

#[derive(Default)]
struct Root {
    shared: Option<Rc<RefCell<Shared>>>,
    /// When to fetch the revocation feed (source 0).
    fetches: FetchSchedule,
    next_refresh: u64,
    /// Malformed entries the last good document had (logged when it changes).
    last_skipped: usize,
}

impl StageRoot for Root {
    fn call_answered(&mut self, token: u32, body_size: usize) {
        let Some(shared) = &self.shared else { return };
        if self.fetches.in_flight(token).is_none() {
            // --- fleet store: keep-alives and slot releases.
            let mut guard = shared.borrow_mut();
            let shared = &mut *guard;
            if let (Some(config), Some(sockets)) =
                (&shared.binding.config.store, shared.sockets.as_mut())
            {
                let counters = &shared.counters;
                host::store::root_answer(config, sockets, token, body_size, |s| {
                    counters.inc(SessionBindingStat::Store(s))
                });
            }
            // ---
            return;
        }
        let (status, body) = host::http_call_response(body_size);
        let now = host::now_secs();
        let mut shared = shared.borrow_mut();
        let parsed = if status == 200 {
            RevocationList::parse_counted(&body)
        } else {
            Err(format!("HTTP status {status}"))
        };
        match parsed {
            Ok((list, skipped)) => {
                let entries = list.len();
                let first = shared.revocations.as_ref().is_some_and(|s| !s.ever_loaded);
                if let Some(state) = shared.revocations.as_mut() {
                    let before = state.generation;
                    state.loaded(list, now);
                    if first || state.generation != before || skipped != self.last_skipped {
                        host::log(
                            if skipped > 0 {
                                LogLevel::Warn
                            } else {
                                LogLevel::Info
                            },
                            NAME,
                            &format!(
                                "revocation list loaded: {entries} entries, {skipped} malformed entries skipped"
                            ),
                        );
                    }
                }
                self.last_skipped = skipped;
                shared
                    .counters
                    .add(SessionBindingStat::RevocationEntrySkipped, skipped as u64);
                shared.count(SessionBindingStat::RevocationFetchOk);
                self.fetches.finished(token, true, now);
            }
            Err(why) => {
                host::log(
                    LogLevel::Warn,
                    NAME,
                    &format!("revocation fetch failed ({why}); keeping the last good list"),
                );
                shared.count(SessionBindingStat::RevocationFetchFailed);
                self.fetches.finished(token, false, now);
            }
        }
    }

    fn configure(&mut self, bytes: &[u8], within: Option<&str>) -> bool {
        let Some(config) = host::configure(NAME, bytes, within, |bytes| {
            SessionBindingConfig::compile_with_env(bytes, &host::env_var)
        }) else {
            return false;
        };
        let now = host::now_secs();
        host::log(
            LogLevel::Info,
            NAME,
            &format!(
                "configured: {} rules, claims from {}, revocation feed {}",
                config.rules.len(),
                config
                    .sources
                    .iter()
                    .map(|s| match s {
                        ClaimsSource::JwtAuth => "jwt_auth",
                        ClaimsSource::JwtAuthn { .. } => "jwt_authn",
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                config
                    .revocation
                    .as_ref()
                    .map_or("off".to_string(), |f| format!(
                        "{}{} every {} s ({})",
                        f.cluster,
                        f.path,
                        f.refresh_seconds,
                        if f.fail_closed {
                            "fail-closed"
                        } else {
                            "fail-open"
                        }
                    ))
            ),
        );
        let revocations = config
            .revocation
            .as_ref()
            .map(|_| RevocationState::new(now));
        self.fetches =
            FetchSchedule::new(config.revocation.as_ref().map(|f| (0, f.refresh_seconds)));
        let mut store = KvStore::new(host::SharedData, config.jti.limits, config.sockets.limits);
        store.create_buckets();
        let has_store = config.store.is_some();
        let sockets = config
            .store
            .as_ref()
            .map(|_| Sockets::new(host::store::lease_id(), config.sockets.slot_ttl));
        self.shared = Some(Rc::new(RefCell::new(Shared {
            binding: SessionBinding::new(config),
            counters: Counters::new(NAME),
            revocations,
            live_slots: HashMap::new(),
            sockets,
        })));
        self.next_refresh = now;
        // --- fleet store: a faster tick frees closed sockets' etcd slots sooner.
        host::set_tick(if has_store {
            host::store::TICK
        } else {
            host::FETCH_TICK
        });
        // ---
        true
    }

    fn tick(&mut self) {
        let Some(shared) = &self.shared else { return };
        let now = host::now_secs();
        // --- fleet store: free closed sockets' slots, keep the socket lease alive.
        {
            let mut guard = shared.borrow_mut();
            let shared = &mut *guard;
            if let (Some(config), Some(sockets)) =
                (&shared.binding.config.store, shared.sockets.as_mut())
            {
                let counters = &shared.counters;
                host::store::tick(config, sockets, now, |s| {
                    counters.inc(SessionBindingStat::Store(s))
                });
            }
        }
        // ---
        let shared = shared.borrow();
        if let Some(feed) = &shared.binding.config.revocation {
            for source in self.fetches.due(now) {
                match host::http_get(&feed.cluster, &feed.authority, &feed.path, feed.timeout_ms) {
                    Some(token) => self.fetches.started(source, token),
                    None => {
                        host::log(
                            LogLevel::Warn,
                            NAME,
                            &format!(
                                "cannot call cluster `{}` for the revocation list; retrying",
                                feed.cluster
                            ),
                        );
                        shared.count(SessionBindingStat::RevocationFetchFailed);
                        self.fetches.not_started(source, now);
                    }
                }
            }
        }
        let ttl = shared.binding.config.sockets.slot_ttl;
        if now >= self.next_refresh {
            self.next_refresh = now + (ttl / 3).max(1);
            if !shared.live_slots.is_empty() {
                let slots: Vec<(&str, &str)> = shared
                    .live_slots
                    .iter()
                    .map(|(slot, owner)| (owner.as_str(), slot.as_str()))
                    .collect();
                shared.store().refresh_slots(&slots, ttl, now);
            }
        }
    }

    fn stage(&self) -> Option<Box<dyn Stage>> {
        let shared = self.shared.clone()?;
        Some(Box::new(Stream {
            shared,
            pending: None,
            live: None,
            slot: None,
            reauth_seen: None,
            asking: None,
        }))
    }
}

struct Stream {
    shared: Rc<RefCell<Shared>>,
    /// What an allowed upgrade keeps until the upstream answers 101.
    pending: Option<LiveTerms>,
    /// The live socket's token, once the upstream answered 101 (the socket is the pass's).
    live: Option<LiveTerms>,
    /// The slot this stream holds, freed when it ends.
    slot: Option<(String, String)>,
    /// jwt-auth's last published re-auth payload this stream checked.
    reauth_seen: Option<Vec<u8>>,
    /// Fleet store: the connect waiting for etcd's answer (the pass waits).
    asking: Option<Asking>,
}

/// A connect paused until the store answers.
struct Asking {
    call: host::store::Asking,
    pending: Box<Pending>,
    websocket: bool,
    path: String,
}

fn as_claims(bytes: &[u8]) -> Option<Claims> {
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    }
}

/// Verified claims: jwt-auth's in memory, or parsed from filter state or metadata.
enum Found {
    Verified(Arc<Verified>),
    Parsed(Claims, Option<String>),
}

impl Found {
    fn claims(&self) -> &Claims {
        match self {
            Found::Verified(v) => &v.claims,
            Found::Parsed(c, _) => c,
        }
    }

    fn kid(&self) -> Option<&str> {
        match self {
            Found::Verified(v) => Some(&v.key_id),
            Found::Parsed(_, k) => k.as_deref(),
        }
    }
}

/// The verified claims and `kid`, from the first configured source that has them: jwt-auth's
/// from a jwt-auth stage of this pass in memory, else its filter state.
fn read_claims(pass: &PassState, sources: &[ClaimsSource]) -> Option<Found> {
    for source in sources {
        match source {
            ClaimsSource::JwtAuth if pass.handover.from_jwt_auth => match &pass.handover.claims {
                Some(v) => return Some(Found::Verified(Arc::clone(v))),
                None => continue,
            },
            ClaimsSource::JwtAuth => {
                let Some(claims) =
                    host::property_bytes(vec![CLAIMS_PROPERTY]).and_then(|b| as_claims(&b))
                else {
                    continue;
                };
                return Some(Found::Parsed(
                    claims,
                    host::property_text(vec![KID_PROPERTY]),
                ));
            }
            ClaimsSource::JwtAuthn {
                payload_key,
                header_key,
            } => {
                let Some(claims) = metadata::jwt_authn(JWT_AUTHN_NAMESPACE, payload_key) else {
                    continue;
                };
                let kid = header_key
                    .as_ref()
                    .and_then(|k| metadata::jwt_authn(JWT_AUTHN_NAMESPACE, k))
                    .and_then(|h| h.get("kid").and_then(Value::as_str).map(str::to_string));
                return Some(Found::Parsed(claims, kid));
            }
        }
    }
    None
}

/// The in-band re-auth token jwt-auth accepted on this chunk: in memory from a jwt-auth stage
/// of this pass, else its filter state when it changed since `seen` (one property read per
/// client chunk). `Some(None)`: a payload that is not the verified claims jwt-auth publishes.
fn read_reauth(pass: &mut PassState, seen: &mut Option<Vec<u8>>) -> Option<Option<Found>> {
    if pass.handover.from_jwt_auth {
        return pass
            .handover
            .reauth
            .take()
            .map(|v| Some(Found::Verified(v)));
    }
    let payload = host::property_bytes(vec![REAUTH_CLAIMS_PROPERTY])?;
    if seen.as_deref() == Some(payload.as_slice()) {
        return None;
    }
    let found = as_claims(&payload)
        .map(|claims| Found::Parsed(claims, host::property_text(vec![REAUTH_KID_PROPERTY])));
    *seen = Some(payload);
    Some(found)
}

impl Stream {
    fn decide(&mut self, pass: &mut PassState) -> Flow {
        // Every host call costs about a microsecond inside V8: read only what the binding of
        // this request needs, and nothing at all for a route it does not bind.
        let needs = self.shared.borrow().binding.config.needs;
        let (path, authority, route) = pass.facts.rule_target(&needs);
        let shared = self.shared.borrow();
        // A path that walks (`..`, `%2e%2e`, `%2f`) matches no rule: the core refuses it
        // (400 / close 4400) before any rule or template looks at it.
        let config = &shared.binding.config;
        let selected = config.binding_for(route.as_deref(), &path, &authority);
        let websocket = pass.facts.is_websocket();
        let found = match &selected {
            Ok(None) => None,
            _ => read_claims(pass, &config.sources),
        };
        let Some(facts) =
            SessionBinding::facts_needed(&selected, found.as_ref().map(Found::claims), websocket)
        else {
            shared.count(SessionBindingStat::Passed);
            return Flow::Next;
        };
        let f = &mut pass.facts;
        let ws_key = f.header_if(websocket, "sec-websocket-key");
        let ws_protocols = f.header_if(websocket, "sec-websocket-protocol");
        let cookie = f.header_if(facts.cookie, "cookie");
        let user_agent = f.header_if(facts.client, "user-agent");
        let client_ip = if facts.client {
            f.property(&["source", "address"])
                .and_then(|a| parse_address(&a))
        } else {
            None
        };
        let slot_id = if facts.slot {
            host::random_id()
        } else {
            String::new()
        };
        // `None` when the host cannot tell the time: what needs it refuses (503 / close 1013).
        let now = f.now();
        let req = BindRequest {
            path: &path,
            host: &authority,
            route_name: route.as_deref(),
            websocket,
            ws_key: ws_key.as_deref(),
            ws_protocols: ws_protocols.as_deref(),
            cookie: cookie.as_deref(),
            user_agent: user_agent.as_deref(),
            client_ip,
            claims: found.as_ref().map(Found::claims),
            kid: found.as_ref().and_then(Found::kid),
            slot_id: &slot_id,
        };
        // --- fleet store: an allowed connect's claims go to etcd; the pass waits.
        if let Some(config) = &shared.binding.config.store {
            match shared
                .binding
                .decide_fleet(selected, &req, now, shared.revocations.as_ref())
            {
                FleetDecision::Now(decision) => {
                    drop(shared);
                    return self.apply(decision, websocket, &path, None);
                }
                FleetDecision::Ask(pending) => {
                    let lease = shared.sockets.as_ref().map_or((0, 0), |s| (s.lease, s.ttl));
                    match host::store::ask(config, pending.connect.clone(), lease) {
                        Ok(call) => {
                            self.asking = Some(Asking {
                                call,
                                pending,
                                websocket,
                                path,
                            });
                            return Flow::Wait;
                        }
                        Err(e) => {
                            drop(shared);
                            return self.stored(pending, Err(e), websocket, &path, 0);
                        }
                    }
                }
            }
        }
        // ---
        let mut store = shared.store();
        let decision = shared.binding.decide_selected(
            selected,
            &req,
            now,
            shared.revocations.as_ref(),
            &mut store,
        );
        drop(shared);
        self.apply(decision, websocket, &path, None)
    }

    /// Fleet store: the connect's verdict from etcd (or its error) → the decision, applied.
    fn stored(
        &mut self,
        pending: Box<Pending>,
        answer: Result<Claimed, StoreError>,
        websocket: bool,
        path: &str,
        started_ms: u64,
    ) -> Flow {
        let shared = self.shared.borrow();
        let Some(config) = shared.binding.config.store.clone() else {
            return Flow::Next;
        };
        if started_ms > 0 {
            let took = host::store::now_ms().saturating_sub(started_ms);
            shared
                .counters
                .add(SessionBindingStat::Store(StoreStat::LatencyMs), took);
        }
        let stat = match &answer {
            Ok(Claimed::Fresh { .. }) => StoreStat::Claimed,
            Ok(Claimed::Replay) => StoreStat::Replay,
            Ok(Claimed::OverCap) => StoreStat::OverCap,
            Err(e) => {
                host::log(
                    LogLevel::Warn,
                    NAME,
                    &format!(
                        "store `{}`: no usable answer ({}); when_unavailable: {}",
                        config.cluster,
                        e.reason(),
                        config.when_unavailable.name()
                    ),
                );
                StoreStat::Error(*e)
            }
        };
        shared.count(SessionBindingStat::Store(stat));
        let mut local = shared.store();
        let finished = pending.finish(answer, config.when_unavailable, &mut local);
        if finished.fallback {
            shared.count(SessionBindingStat::Store(StoreStat::LocalFallback));
        }
        drop(shared);
        self.apply(finished.decision, websocket, path, finished.etcd_slot)
    }

    /// Apply a decision (`etcd_slot`: the etcd slot number an allowed socket holds).
    fn apply(
        &mut self,
        decision: BindDecision,
        websocket: bool,
        path: &str,
        etcd_slot: Option<u32>,
    ) -> Flow {
        let mut shared = self.shared.borrow_mut();
        match decision {
            BindDecision::Pass => {
                shared.count(SessionBindingStat::Passed);
                Flow::Next
            }
            BindDecision::Allow { live, notes } => {
                shared.count(SessionBindingStat::Allowed);
                for note in notes {
                    shared.count(note);
                }
                if let Some(terms) = live {
                    if let Some((owner, slot)) = &terms.slot {
                        match (etcd_slot, shared.sockets.as_mut()) {
                            (Some(n), Some(sockets)) => sockets.held(slot, owner, n),
                            _ => {
                                shared.live_slots.insert(slot.clone(), owner.clone());
                            }
                        }
                        shared.count(SessionBindingStat::SocketsAcquired);
                        self.slot = Some((owner.clone(), slot.clone()));
                    }
                    self.pending = Some(terms);
                }
                Flow::Next
            }
            BindDecision::Deny { denial, reply } => {
                shared.count(SessionBindingStat::Denied(denial));
                host::refuse(
                    NAME,
                    denial.reason(),
                    denial.refusal(),
                    websocket,
                    path,
                    &reply,
                );
                Flow::Stop
            }
        }
    }

    fn release_slot(&mut self) {
        if let Some((owner, slot)) = self.slot.take() {
            self.shared.borrow_mut().release(&owner, &slot);
        }
    }
}

impl Stage for Stream {
    fn request_headers(&mut self, pass: &mut PassState, _end_of_stream: bool) -> Flow {
        self.decide(pass)
    }

    // --- fleet store: etcd's answer to a waiting connect.
    fn call_answered(&mut self, _pass: &mut PassState, token: u32, body_size: usize) -> Flow {
        let Some(mut asking) = self.asking.take() else {
            return Flow::Next;
        };
        let Some(config) = self.shared.borrow().binding.config.store.clone() else {
            return Flow::Next;
        };
        match host::store::answered(&config, &mut asking.call, token, body_size) {
            None => {
                self.asking = Some(asking);
                Flow::Wait
            }
            Some(answer) => {
                let started = asking.call.flow.started_ms;
                self.stored(
                    asking.pending,
                    answer,
                    asking.websocket,
                    &asking.path,
                    started,
                )
            }
        }
    }
    // ---

    fn response_headers(&mut self, pass: &mut PassState, _end_of_stream: bool) -> Flow {
        if let Some(terms) = self.pending.take() {
            if host::response_header(":status").as_deref() == Some("101") {
                // Session-binding does not expire sockets (jwt-auth does): no deadline.
                pipeline::join(&mut pass.live, LiveSocket::new(u64::MAX));
                self.live = Some(terms);
            } else {
                // The upstream refused the upgrade: no socket, no slot.
                self.release_slot();
            }
        }
        Flow::Next
    }

    /// The revocation list, and the in-band re-auth tokens jwt-auth accepted.
    fn live_chunk(&mut self, pass: &mut PassState, dir: Dir, size: usize) -> usize {
        let Some(terms) = self.live.as_mut() else {
            return size;
        };
        if pass.live.as_ref().is_none_or(LiveSocket::is_closing) {
            return size;
        }
        let now = pass.facts.now();
        let shared = self.shared.borrow();
        let mut close = shared
            .binding
            .check_live(terms, shared.revocations.as_ref(), now)
            .map(|(code, reason, d)| (code, reason, WsClose::Denied(d)));
        // An in-band re-auth token jwt-auth accepted on this socket (before this stage sees
        // the chunk), only where the binding checks single use or revocation.
        if close.is_none() && dir == Dir::ToUpstream && terms.checks_reauth(&shared.binding) {
            if let Some(found) = read_reauth(pass, &mut self.reauth_seen) {
                shared.count(SessionBindingStat::ReauthChecked);
                close = match found {
                    Some(found) => {
                        let mut store = shared.store();
                        match shared.binding.check_reauth(
                            terms,
                            found.claims(),
                            found.kid(),
                            now,
                            shared.revocations.as_ref(),
                            &mut store,
                        ) {
                            Ok(notes) => {
                                for note in notes {
                                    shared.count(note);
                                }
                                None
                            }
                            Err((code, reason, d)) => Some((code, reason, WsClose::Denied(d))),
                        }
                    }
                    // Not the verified payload jwt-auth publishes: fail closed.
                    None => Some((
                        gatehouse_core::ws::CLOSE_UNAUTHORIZED,
                        "re-auth refused",
                        WsClose::ReauthUnreadable,
                    )),
                };
            }
        }
        if let (Some((code, reason, stat)), Some(live)) = (close, pass.live.as_mut()) {
            live.close_with(code, reason);
            shared.count(SessionBindingStat::WsClosed(stat));
            host::log_denial(
                NAME,
                &format!(
                    "live websocket: {reason} ({}), closing with {code}",
                    stat.reason()
                ),
            );
        }
        size
    }

    fn done(&mut self, _pass: &mut PassState) {
        // --- fleet store: gone while etcd was answering; the slot may be taken anyway.
        if let Some(asking) = self.asking.take() {
            if let (Some(claim), Some(sockets)) = (
                &asking.pending.connect.slot,
                self.shared.borrow_mut().sockets.as_mut(),
            ) {
                sockets.abandoned(claim);
            }
        }
        // ---
        self.release_slot();
    }
}

//! session-binding: the proxy-wasm shell over `gatehouse_core::session_binding`. It reads the
//! verified claims (jwt-auth filter state or `jwt_authn` dynamic metadata) and the request facts,
//! applies the core's decision, keeps used token ids and socket slots in Envoy shared data
//! (every worker of this Envoy), fetches the revocation list on a timer, and closes live sockets
//! whose token is revoked. See docs/session-binding.md.

mod metadata;

use gatehouse_core::fetch::FetchSchedule;
use gatehouse_core::jwt::Claims;
use gatehouse_core::jwt_auth::{CLAIMS_PROPERTY, KID_PROPERTY};
use gatehouse_core::session_binding::revocation::{RevocationList, RevocationState};
use gatehouse_core::session_binding::store::{BindingStore, KvStore};
use gatehouse_core::session_binding::{
    parse_address, BindDecision, BindRequest, ClaimsSource, FleetDecision, LiveTerms, Pending,
    SessionBinding, SessionBindingConfig, JWT_AUTHN_NAMESPACE, REAUTH_CLAIMS_PROPERTY,
    REAUTH_KID_PROPERTY,
};
use gatehouse_core::stats::{SessionBindingStat, StoreStat, WsClose};
use gatehouse_core::store::Sockets;
use gatehouse_core::ws::{Dir, LiveSocket};
use gatehouse_host::{self as host, Counters};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde_json::Value;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

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

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
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
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(config) = host::configure(NAME, |bytes| {
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
        if has_store {
            host::store::set_tick();
        } else {
            host::set_tick(1);
        }
        // ---
        true
    }

    fn on_tick(&mut self) {
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

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
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

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    shared: Rc<RefCell<Shared>>,
    /// What an allowed upgrade keeps until the upstream answers 101.
    pending: Option<LiveTerms>,
    /// The live socket and its token, once the upstream answered 101.
    live: Option<(LiveSocket, LiveTerms)>,
    /// The slot this stream holds, freed when it ends.
    slot: Option<(String, String)>,
    /// jwt-auth's last published re-auth payload this stream checked.
    reauth_seen: Option<Vec<u8>>,
    /// Fleet store: the connect waiting for etcd's answer (the request is paused).
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

/// The verified claims and `kid`, from the first configured source that has them.
fn read_claims(sources: &[ClaimsSource]) -> Option<(Claims, Option<String>)> {
    for source in sources {
        match source {
            ClaimsSource::JwtAuth => {
                let Some(claims) =
                    host::property_bytes(vec![CLAIMS_PROPERTY]).and_then(|b| as_claims(&b))
                else {
                    continue;
                };
                return Some((claims, host::property_text(vec![KID_PROPERTY])));
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
                return Some((claims, kid));
            }
        }
    }
    None
}

impl Stream {
    fn decide(&mut self) -> Action {
        // Every host call costs about a microsecond inside V8: read only what the binding of
        // this request needs, and nothing at all for a route it does not bind.
        let needs = self.shared.borrow().binding.config.needs;
        let (path, authority, route) = host::rule_target(&needs);
        let shared = self.shared.borrow();
        // A path that walks (`..`, `%2e%2e`, `%2f`) matches no rule: the core refuses it
        // (400 / close 4400) before any rule or template looks at it.
        let config = &shared.binding.config;
        let selected = config.binding_for(route.as_deref(), &path, &authority);
        let websocket = host::is_websocket_upgrade();
        let found = match &selected {
            Ok(None) => None,
            _ => read_claims(&config.sources),
        };
        let Some(facts) =
            SessionBinding::facts_needed(&selected, found.as_ref().map(|(c, _)| c), websocket)
        else {
            shared.count(SessionBindingStat::Passed);
            return Action::Continue;
        };
        let ws_key = host::request_header_if(websocket, "sec-websocket-key");
        let ws_protocols = host::request_header_if(websocket, "sec-websocket-protocol");
        let cookie = host::request_header_if(facts.cookie, "cookie");
        let user_agent = host::request_header_if(facts.client, "user-agent");
        let client_ip = if facts.client {
            host::property_text(vec!["source", "address"]).and_then(|a| parse_address(&a))
        } else {
            None
        };
        let slot_id = if facts.slot {
            host::random_id()
        } else {
            String::new()
        };
        // `None` when the host cannot tell the time: what needs it refuses (503 / close 1013).
        let now = host::now();
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
            claims: found.as_ref().map(|(c, _)| c),
            kid: found.as_ref().and_then(|(_, k)| k.as_deref()),
            slot_id: &slot_id,
        };
        // --- fleet store: an allowed connect's claims go to etcd; the request waits.
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
                            return Action::Pause;
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
        answer: Result<gatehouse_core::store::Claimed, gatehouse_core::store::StoreError>,
        websocket: bool,
        path: &str,
        started_ms: u64,
    ) -> Action {
        let shared = self.shared.borrow();
        let Some(config) = shared.binding.config.store.clone() else {
            return Action::Continue;
        };
        if started_ms > 0 {
            let took = host::store::now_ms().saturating_sub(started_ms);
            shared
                .counters
                .add(SessionBindingStat::Store(StoreStat::LatencyMs), took);
        }
        let stat = match &answer {
            Ok(gatehouse_core::store::Claimed::Fresh { .. }) => StoreStat::Claimed,
            Ok(gatehouse_core::store::Claimed::Replay) => StoreStat::Replay,
            Ok(gatehouse_core::store::Claimed::OverCap) => StoreStat::OverCap,
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
    ) -> Action {
        let mut shared = self.shared.borrow_mut();
        match decision {
            BindDecision::Pass => {
                shared.count(SessionBindingStat::Passed);
                Action::Continue
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
                Action::Continue
            }
            BindDecision::Deny { denial, reply } => {
                shared.count(SessionBindingStat::Denied(denial));
                drop(shared);
                host::refuse(
                    NAME,
                    denial.reason(),
                    denial.refusal(),
                    websocket,
                    path,
                    &reply,
                )
            }
        }
    }

    fn release_slot(&mut self) {
        if let Some((owner, slot)) = self.slot.take() {
            self.shared.borrow_mut().release(&owner, &slot);
        }
    }

    fn on_chunk(&mut self, dir: Dir, size: usize) {
        let Some((live, terms)) = self.live.as_mut() else {
            return;
        };
        let now = host::now();
        if !live.is_closing() {
            let shared = self.shared.borrow();
            let mut close = shared
                .binding
                .check_live(terms, shared.revocations.as_ref(), now)
                .map(|(code, reason, d)| (code, reason, WsClose::Denied(d)));
            // An in-band re-auth token jwt-auth accepted on this socket (published as filter
            // state before this filter sees the chunk): one property read per client chunk,
            // only where the binding checks single use or revocation.
            if close.is_none() && dir == Dir::ToUpstream && terms.checks_reauth(&shared.binding) {
                if let Some(payload) = host::property_bytes(vec![REAUTH_CLAIMS_PROPERTY]) {
                    if self.reauth_seen.as_deref() != Some(payload.as_slice()) {
                        shared.count(SessionBindingStat::ReauthChecked);
                        let kid = host::property_text(vec![REAUTH_KID_PROPERTY]);
                        close = match as_claims(&payload) {
                            Some(claims) => {
                                let mut store = shared.store();
                                match shared.binding.check_reauth(
                                    terms,
                                    &claims,
                                    kid.as_deref(),
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
                                    Err((code, reason, d)) => {
                                        Some((code, reason, WsClose::Denied(d)))
                                    }
                                }
                            }
                            // Not the verified payload jwt-auth publishes: fail closed.
                            None => Some((
                                gatehouse_core::ws::CLOSE_UNAUTHORIZED,
                                "re-auth refused",
                                WsClose::ReauthUnreadable,
                            )),
                        };
                        self.reauth_seen = Some(payload);
                    }
                }
            }
            if let Some((code, reason, stat)) = close {
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
        }
        // The socket has no deadline: only the checks above close it, and logged that. The
        // deadline is `u64::MAX`, so an unknown time (0 here) closes nothing by itself.
        host::live_chunk(live, dir, size, now.unwrap_or(0), |_| None);
    }
}

impl Context for Stream {
    // --- fleet store: etcd's answer to a paused connect.
    fn on_http_call_response(&mut self, token: u32, _: usize, body_size: usize, _: usize) {
        let Some(mut asking) = self.asking.take() else {
            return;
        };
        let Some(config) = self.shared.borrow().binding.config.store.clone() else {
            return;
        };
        match host::store::answered(&config, &mut asking.call, token, body_size) {
            None => self.asking = Some(asking),
            Some(answer) => {
                let started = asking.call.flow.started_ms;
                if self.stored(
                    asking.pending,
                    answer,
                    asking.websocket,
                    &asking.path,
                    started,
                ) == Action::Continue
                {
                    host::resume_request();
                }
            }
        }
    }
    // ---

    fn on_done(&mut self) -> bool {
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
        true
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        self.decide()
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        if let Some(terms) = self.pending.take() {
            if host::response_header(":status").as_deref() == Some("101") {
                // Session-binding does not expire sockets (jwt-auth does): no deadline.
                self.live = Some((LiveSocket::new(u64::MAX), terms));
            } else {
                // The upstream refused the upgrade: no socket, no slot.
                self.release_slot();
            }
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, size: usize, _end_of_stream: bool) -> Action {
        self.on_chunk(Dir::ToUpstream, size);
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, _end_of_stream: bool) -> Action {
        self.on_chunk(Dir::ToClient, size);
        Action::Continue
    }
}

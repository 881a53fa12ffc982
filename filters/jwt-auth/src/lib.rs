//! jwt-auth: the proxy-wasm shell over `gatehouse_core::jwt_auth`. It reads request facts,
//! applies the core's decision, fetches remote JWKS, and closes expired live sockets.
//! See docs/jwt-auth.md.

use gatehouse_core::fetch::FetchSchedule;
use gatehouse_core::jwt_auth::{
    Decision, Denial, Doc, FetchRequest, Fetched, JwtAuth, JwtAuthConfig, Request, CLAIMS_PROPERTY,
    KID_PROPERTY, REAUTH_CLAIMS_PROPERTY, REAUTH_KID_PROPERTY,
};
use gatehouse_core::pipeline::{self, Flow};
use gatehouse_core::reauth::ClientFrames;
use gatehouse_core::stats::JwtAuthStat;
use gatehouse_core::ws::{self, Dir, LiveSocket};
use gatehouse_core::{kv, sessions};
use gatehouse_host::{self as host, Body, Counters, PassState, Stage, StageRoot};
use proxy_wasm::types::LogLevel;
use std::cell::RefCell;
use std::rc::Rc;

const NAME: &str = "gatehouse.jwt_auth";

host::main!(NAME, Root::default());

/// Per-worker state shared by the root context and every stream.
struct Shared {
    auth: JwtAuth,
    counters: Counters<JwtAuthStat>,
    // --- fleet store: session deadlines shared by every replica (`store`, docs/fleet.md).
    fleet: Option<(gatehouse_core::store::StoreConfig, sessions::FleetDeadlines)>,
}

/// Count a fleet-store outcome `n` times; an error gets a log line too.
fn count_store(counters: &Counters<JwtAuthStat>, stat: sessions::DeadlineStat, n: u64) {
    // A missing lease is routine (the first write of each minute grants it).
    let routine = sessions::DeadlineStat::Error(gatehouse_core::store::StoreError::LeaseMissing);
    if let (sessions::DeadlineStat::Error(e), false) = (stat, stat == routine) {
        host::log(
            LogLevel::Warn,
            NAME,
            &format!(
                "store: session deadlines: no usable answer ({}); live sockets stay open",
                e.reason()
            ),
        );
    }
    counters.add(JwtAuthStat::Store(stat), n);
}

impl Shared {
    fn count(&self, stat: JwtAuthStat) {
        self.counters.inc(stat);
    }

    /// Apply a fetched document (`doc`) to `provider`, with its log line and stats. A failed
    /// fetch or an unusable document keeps the last good keys.
    fn apply(&mut self, provider: usize, doc: Doc, status: u32, body: &[u8]) -> Fetched {
        let name = self
            .auth
            .config
            .providers
            .get(provider)
            .map_or("?", |p| p.name.as_str())
            .to_string();
        let fetched = self.auth.apply_fetch(provider, doc, status, body);
        match &fetched {
            Fetched::Keys { count, skipped } => {
                host::log(
                    LogLevel::Info,
                    NAME,
                    &format!("provider {name}: JWKS loaded, {count} keys ({skipped} skipped)"),
                );
                self.count(JwtAuthStat::JwksFetchOk);
                // Keys refused for what they are (RSA under 2048 bits, `key_ops` without
                // `verify`, `use` other than `sig`, unsupported types): one count each.
                self.counters
                    .add(JwtAuthStat::JwksKeySkipped, *skipped as u64);
            }
            Fetched::Discovered { jwks_uri } => host::log(
                LogLevel::Info,
                NAME,
                &format!("provider {name}: discovery document loaded, jwks_uri {jwks_uri}"),
            ),
            Fetched::Failed(why) => {
                let what = match doc {
                    Doc::Jwks => "JWKS",
                    Doc::Discovery => "discovery document",
                };
                host::log(
                    LogLevel::Warn,
                    NAME,
                    &format!(
                        "provider {name}: {what} fetch failed ({why}); keeping the last good keys"
                    ),
                );
                self.count(JwtAuthStat::JwksFetchFailed);
            }
        }
        fetched
    }
}

/// Start the fetch `request`; a call that cannot start is logged and counted as a failed fetch.
fn start(shared: &Shared, request: Option<FetchRequest<'_>>) -> Option<u32> {
    let r = request?;
    let call = host::http_get(r.cluster, r.authority, r.path, r.timeout_ms);
    if call.is_none() {
        host::log(
            LogLevel::Warn,
            NAME,
            &format!("cannot call cluster `{}` for the JWKS; retrying", r.cluster),
        );
        shared.count(JwtAuthStat::JwksFetchFailed);
    }
    call
}

#[derive(Default)]
struct Root {
    shared: Option<Rc<RefCell<Shared>>>,
    /// When to fetch each provider's remote JWKS (or discovery document).
    fetches: FetchSchedule,
    /// The calls in flight that fetch a discovery document (the others fetch a JWKS).
    discovering: Vec<u32>,
}

impl StageRoot for Root {
    fn call_answered(&mut self, token: u32, body_size: usize) {
        let Some(shared) = &self.shared else { return };
        // --- fleet store: answers to the tick's deadline writes and reads.
        {
            let mut guard = shared.borrow_mut();
            let Shared {
                fleet, counters, ..
            } = &mut *guard;
            if let Some((config, deadlines)) = fleet.as_mut() {
                let now = host::now_secs();
                if host::store::deadlines_answer(
                    config,
                    deadlines,
                    token,
                    body_size,
                    now,
                    |s, n| count_store(counters, s, n),
                ) {
                    return;
                }
            }
        }
        let Some(provider) = self.fetches.in_flight(token) else {
            return;
        };
        let (status, body) = host::http_call_response(body_size);
        let doc = match self.discovering.iter().position(|&t| t == token) {
            Some(i) => {
                self.discovering.swap_remove(i);
                Doc::Discovery
            }
            None => Doc::Jwks,
        };
        let mut shared = shared.borrow_mut();
        let ok = match shared.apply(provider, doc, status, &body) {
            // The discovery document named the JWKS: fetch it now, as the same scheduled fetch.
            Fetched::Discovered { .. } => {
                if let Some(call) = start(&shared, shared.auth.jwks_fetch(provider)) {
                    self.fetches.started(provider, call);
                    return;
                }
                false
            }
            Fetched::Keys { .. } => true,
            Fetched::Failed(_) => false,
        };
        self.fetches.finished(token, ok, host::now_secs());
    }

    fn configure(&mut self, bytes: &[u8], within: Option<&str>) -> bool {
        let Some(config) = host::configure(NAME, bytes, within, JwtAuthConfig::compile) else {
            return false;
        };
        self.fetches = FetchSchedule::new(
            config
                .providers
                .iter()
                .enumerate()
                .filter_map(|(i, p)| Some((i, p.remote.as_ref()?.refresh_seconds))),
        );
        host::log(
            LogLevel::Info,
            NAME,
            &format!(
                "configured: {} providers, {} rules",
                config.providers.len(),
                config.rules.len()
            ),
        );
        let fleet = config.store.clone().map(|c| {
            let d = sessions::FleetDeadlines::new(c.when_unavailable);
            (c, d)
        });
        let has_store = fleet.is_some();
        self.shared = Some(Rc::new(RefCell::new(Shared {
            auth: JwtAuth::new(config),
            counters: Counters::new(NAME),
            fleet,
        })));
        if !self.fetches.is_empty() {
            host::set_tick(host::FETCH_TICK);
        }
        // --- fleet store: deadline writes and reads go out on a 250 ms tick.
        if has_store {
            host::set_tick(host::store::TICK);
        }
        true
    }

    fn tick(&mut self) {
        let Some(shared) = &self.shared else { return };
        let now = host::now_secs();
        let mut shared = shared.borrow_mut();
        // --- fleet store: write fresh session deadlines, ask for those of expiring sockets.
        {
            let Shared {
                fleet, counters, ..
            } = &mut *shared;
            if let Some((config, deadlines)) = fleet.as_mut() {
                host::store::deadlines_tick(config, deadlines, now, |s| {
                    count_store(counters, s, 1)
                });
            }
        }
        for provider in self.fetches.due(now) {
            shared.auth.note_fetch(provider, now);
            let request = shared.auth.scheduled_fetch(provider);
            let doc = request.as_ref().map(|r| r.doc);
            match start(&shared, request) {
                Some(token) => {
                    self.fetches.started(provider, token);
                    if doc == Some(Doc::Discovery) {
                        self.discovering.push(token);
                    }
                }
                None => self.fetches.not_started(provider, now),
            }
        }
    }

    fn stage(&self) -> Option<Box<dyn Stage>> {
        let shared = self.shared.clone()?;
        Some(Box::new(Stream {
            shared,
            pending_fetch: None,
            ws_socket: None,
            live: false,
            frames: None,
            at: (None, String::new(), String::new()),
            extend: None,
        }))
    }
}

struct Stream {
    shared: Rc<RefCell<Shared>>,
    /// A JWKS fetch this request waits for: (call token, provider).
    pending_fetch: Option<(u32, usize)>,
    /// The socket an allowed WebSocket upgrade becomes once the upstream answers 101.
    ws_socket: Option<LiveSocket>,
    /// Set once the upstream answered 101 and the pass's live socket carries this socket's
    /// deadline.
    live: bool,
    /// Client frames, scanned for in-band re-auth when that is configured.
    frames: Option<ClientFrames>,
    /// Route name, path and host of an upgrade: re-auth tokens follow the same rules.
    at: (Option<String>, String, String),
    /// The session deadline this request's token earns, written only once the whole chain
    /// allowed the request (the response came from the upstream).
    extend: Option<(String, u64)>,
}

/// Record a fresh deadline for `session` where every worker's live sockets look for it, with at
/// most `per_subject` records of its subject per bucket.
fn extend_session(session: &str, deadline: u64, now: u64, per_subject: usize) {
    let key = sessions::bucket_key(session);
    // Compare-and-swap: another worker may write the same bucket at the same moment.
    kv::update(&mut host::SharedData, &key, (), |bucket| {
        (
            sessions::record(bucket, session, deadline, now, per_subject),
            (),
        )
    });
}

/// The latest deadline any worker recorded for `session`.
fn session_deadline(session: &str) -> Option<u64> {
    let (value, _) = host::shared_data(&sessions::bucket_key(session));
    sessions::lookup(&value?, session)
}

impl Stream {
    /// Read the request, decide, apply. `may_fetch` is false once a JWKS fetch was made for
    /// this request.
    fn decide(&mut self, pass: &mut PassState, may_fetch: bool) -> Flow {
        // Claims go to the later stages of this pass in memory (and out as filter state).
        pass.handover.from_jwt_auth = true;
        let facts = &mut pass.facts;
        // Every host call costs about a microsecond inside V8: read only what the config and
        // the kind of request need.
        let needs = self.shared.borrow().auth.config.needs;
        let (path, authority, route) = facts.rule_target(&needs);
        let websocket = facts.is_websocket();
        let ws_key = facts.header_if(websocket, "sec-websocket-key");
        let ws_protocols = facts.header_if(websocket, "sec-websocket-protocol");
        let authorization = facts.header("authorization");
        let cookie = facts.header_if(needs.cookie, "cookie");
        // Transport facts matter only for upgrades (`wss_only`): no host calls otherwise.
        let tls = websocket && facts.property(&["connection", "tls_version"]).is_some();
        let forwarded_proto = facts.header_if(websocket, "x-forwarded-proto");
        // The origin check of cookie-sourced tokens: only when a cookie is a source.
        let method = facts.header_if(needs.cookie, ":method");
        let origin = facts.header_if(needs.cookie, "origin");
        let sec_fetch_site = facts.header_if(needs.cookie, "sec-fetch-site");
        let req = Request {
            path: &path,
            host: &authority,
            route_name: route.as_deref(),
            websocket,
            ws_key: ws_key.as_deref(),
            ws_protocols: ws_protocols.as_deref(),
            authorization: authorization.as_deref(),
            cookie: cookie.as_deref(),
            tls,
            forwarded_proto: forwarded_proto.as_deref(),
            method: method.as_deref(),
            origin: origin.as_deref(),
            sec_fetch_site: sec_fetch_site.as_deref(),
        };
        // No clock: the core refuses whatever needs the time (503 / close 1013, `clock`).
        let clock = facts.now();
        let now = clock.unwrap_or(0);
        let mut shared = self.shared.borrow_mut();
        match shared.auth.decide_at(&req, clock, may_fetch) {
            Decision::Allow {
                edits,
                token,
                deadline,
                cache_hit,
                socket,
            } => {
                facts.apply_edits(&edits);
                match token {
                    Some(t) => {
                        if !host::set_filter_state(CLAIMS_PROPERTY, &t.payload) {
                            host::log(
                                LogLevel::Warn,
                                NAME,
                                "could not publish claims as filter state",
                            );
                        }
                        // The key that verified the signature, never the header's claim.
                        host::set_filter_state(KID_PROPERTY, t.key_id.as_bytes());
                        shared.count(if cache_hit {
                            JwtAuthStat::CacheHit
                        } else {
                            JwtAuthStat::CacheMiss
                        });
                        shared.count(JwtAuthStat::Allowed);
                        let session = socket.as_ref().and_then(|s| s.session.clone());
                        if let (Some(session), Some(deadline)) = (&session, deadline) {
                            // Not yet: a later filter (session-binding) may still refuse.
                            self.extend = Some((session.clone(), deadline));
                        }
                        if websocket {
                            if session.is_some() && shared.auth.config.reauth.is_some() {
                                self.frames = Some(ClientFrames::default());
                                self.at = (route.clone(), path.clone(), authority.clone());
                            }
                            self.ws_socket = deadline.map(|d| {
                                LiveSocket::following(d, session, socket.and_then(|s| s.until))
                            });
                        }
                        pass.handover.claims = Some(t);
                    }
                    None => shared.count(JwtAuthStat::AllowedMissing),
                }
                Flow::Next
            }
            Decision::Deny { denial, reply } => {
                shared.count(JwtAuthStat::Denied(denial));
                host::refuse(
                    NAME,
                    denial.reason(),
                    denial.refusal(),
                    websocket,
                    &path,
                    &reply,
                );
                Flow::Stop
            }
            Decision::FetchJwks { provider } => {
                shared.auth.note_fetch(provider, now);
                let call = shared
                    .auth
                    .jwks_fetch(provider)
                    .and_then(|r| host::http_get(r.cluster, r.authority, r.path, r.timeout_ms));
                drop(shared);
                match call {
                    Some(token) => {
                        self.pending_fetch = Some((token, provider));
                        Flow::Wait
                    }
                    None => {
                        self.shared.borrow().count(JwtAuthStat::JwksFetchFailed);
                        self.decide(pass, false)
                    }
                }
            }
        }
    }

    /// In-band re-auth: take the re-auth frames out of the client's bytes and apply them.
    /// The chunk is replaced by what goes on now; the scanner keeps an incomplete possible
    /// re-auth frame (never the host's buffer: no Pause and rebuffer). Returns how many bytes
    /// go on now.
    fn take_reauth(&mut self, pass: &mut PassState, size: usize) -> usize {
        let Stream {
            shared, frames, at, ..
        } = self;
        let (Some(live), Some(frames)) = (pass.live.as_mut(), frames.as_mut()) else {
            return size;
        };
        let Some(session) = live.session().map(str::to_owned) else {
            return size;
        };
        if size == 0 || live.is_closing() {
            return size;
        }
        let mut shared = shared.borrow_mut();
        let Some(kind) = shared.auth.config.reauth.clone() else {
            return size;
        };
        let data = host::request_body(size);
        let fed = frames.feed(&data, &kind);
        let (forward, tokens) = (fed.forward, fed.tokens);
        let clock = pass.facts.now();
        for token in tokens {
            let Some(now) = clock else {
                // No clock: no re-auth can be checked; the socket closes with 1013.
                live.close_with(ws::CLOSE_TRY_AGAIN_LATER, "clock unavailable");
                shared.count(JwtAuthStat::Denied(Denial::Clock));
                break;
            };
            match shared
                .auth
                .reauth(&token, (at.0.as_deref(), &at.1, &at.2), &session, now)
            {
                Ok((deadline, verified)) => {
                    // Its own socket only: the shared session deadline is written by requests
                    // the whole chain allowed. session-binding checks these on this chunk.
                    live.extend(deadline);
                    host::set_filter_state(REAUTH_CLAIMS_PROPERTY, &verified.payload);
                    host::set_filter_state(REAUTH_KID_PROPERTY, verified.key_id.as_bytes());
                    pass.handover.reauth = Some(verified);
                    shared.count(JwtAuthStat::WsReauth);
                }
                Err(denial) => {
                    shared.count(JwtAuthStat::Denied(denial));
                    host::log_denial(
                        NAME,
                        &format!(
                            "live websocket: re-auth refused ({}), closing with 4401",
                            denial.reason()
                        ),
                    );
                    live.refuse(if denial == Denial::OtherSession {
                        "other session"
                    } else {
                        "re-auth refused"
                    });
                }
            }
        }
        match forward {
            Some(bytes) => {
                host::replace_body(Body::Request, size, &bytes);
                bytes.len()
            }
            None => size,
        }
    }
}

impl Stage for Stream {
    fn request_headers(&mut self, pass: &mut PassState, _end_of_stream: bool) -> Flow {
        self.decide(pass, true)
    }

    fn call_answered(&mut self, pass: &mut PassState, token: u32, body_size: usize) -> Flow {
        let Some((expected, provider)) = self.pending_fetch else {
            return Flow::Next;
        };
        if token != expected {
            return Flow::Wait;
        }
        self.pending_fetch = None;
        let (status, body) = host::http_call_response(body_size);
        self.shared
            .borrow_mut()
            .apply(provider, Doc::Jwks, status, &body);
        self.decide(pass, false)
    }

    fn response_headers(&mut self, pass: &mut PassState, _end_of_stream: bool) -> Flow {
        if let Some((session, deadline)) = self.extend.take() {
            // Only a response from the upstream means every filter allowed the request: a
            // later filter's local reply is not `via_upstream`.
            let via_upstream = host::property_text(vec!["response", "code_details"]).as_deref()
                == Some("via_upstream");
            if let (true, Some(now)) = (via_upstream, pass.facts.now()) {
                let mut shared = self.shared.borrow_mut();
                let per_subject = shared.auth.config.sessions_per_subject;
                extend_session(&session, deadline, now, per_subject);
                // --- fleet store: and for every replica, on the next tick.
                if let Some((_, deadlines)) = shared.fleet.as_mut() {
                    deadlines.extend(&session, deadline);
                }
            }
        }
        if let Some(socket) = self.ws_socket.take() {
            if host::response_header(":status").as_deref() == Some("101") {
                pipeline::join(&mut pass.live, socket);
                self.live = true;
            }
        }
        Flow::Next
    }

    /// The socket's deadline (the token's, or its session's) and in-band re-auth.
    fn live_chunk(&mut self, pass: &mut PassState, dir: Dir, size: usize) -> usize {
        if !self.live {
            return size;
        }
        let size = if dir == Dir::ToUpstream {
            self.take_reauth(pass, size)
        } else {
            size
        };
        let clock = pass.facts.now();
        let Some(live) = pass.live.as_mut() else {
            return size;
        };
        if live.is_closing() || (size == 0) {
            return size;
        }
        match clock {
            None => {
                // No clock, no deadline check: the socket closes with 1013 (try again later).
                live.close_with(ws::CLOSE_TRY_AGAIN_LATER, "clock unavailable");
                self.shared
                    .borrow()
                    .count(JwtAuthStat::Denied(Denial::Clock));
                host::log_denial(
                    NAME,
                    "live websocket: the host cannot tell the time, closing with 1013",
                );
            }
            Some(now) => {
                let mut guard = self.shared.borrow_mut();
                let Shared {
                    fleet, counters, ..
                } = &mut *guard;
                // This Envoy's record first; then (fleet store) every replica's, through etcd.
                let expired = live.expire(now, |session| {
                    let local = session_deadline(session).filter(|d| *d > now);
                    match (local, fleet.as_mut()) {
                        (Some(d), _) => Some(d),
                        (None, None) => None,
                        (None, Some((_, deadlines))) => {
                            let check = deadlines.check(session, now);
                            counters.inc(JwtAuthStat::Store(check.stat()));
                            check.deadline(now)
                        }
                    }
                });
                drop(guard);
                if expired {
                    self.shared.borrow().count(JwtAuthStat::WsExpiredClose);
                    host::log(
                        LogLevel::Info,
                        NAME,
                        &format!("live websocket: {}, closing with 4401", live.close_reason()),
                    );
                }
            }
        }
        size
    }
}

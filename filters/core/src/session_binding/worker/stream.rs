//! The per-stream half of [`super`]: how the core reads a request's facts and its claims, the
//! connect (local, or waiting for etcd), the upgrade, the live socket.

use super::*;
use crate::path::PathError;
use crate::pipeline::Handover;
use crate::reply::LocalReply;
use crate::ws::Dir;
use serde_json::Value;

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
    pub(super) fn new(id: u64) -> Self {
        Self {
            id,
            ..Self::default()
        }
    }

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

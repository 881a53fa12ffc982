//! One stream's jwt-auth, from its request headers to its socket's last chunk: which facts to
//! read, the decision and what it leaves for later (the JWKS fetch it waits for, the session
//! deadline to record once the upstream answered, the live socket and its re-auth frames), and
//! each chunk's checks. The shell reads the facts, makes one call per callback, applies what it
//! returns and drains [`JwtAuth::notes`].

use crate::kv::Kv;
use crate::pipeline::{self, Flow};
use crate::reauth::ClientFrames;
use crate::reply::LocalReply;
use crate::sessions;
use crate::stats::JwtAuthStat;
use crate::ws::{self, Dir, LiveSocket};
use std::sync::Arc;

use super::*;

/// A fact of the current callback the shell reads for the core: a header (the request's, or in
/// [`AuthStream::response`] the response's) or a property.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fact {
    Header(&'static str),
    Property(&'static [&'static str]),
}

/// The request facts a decision reads, owned (what [`Request`] borrows).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestFacts {
    pub path: String,
    pub host: String,
    pub route_name: Option<String>,
    pub websocket: bool,
    pub ws_key: Option<String>,
    pub ws_protocols: Option<String>,
    pub authorization: Option<String>,
    pub cookie: Option<String>,
    pub tls: bool,
    pub forwarded_proto: Option<String>,
    pub method: Option<String>,
    pub origin: Option<String>,
    pub sec_fetch_site: Option<String>,
}

impl RequestFacts {
    /// Read only what `config` and the kind of request need (every host read costs about a
    /// microsecond inside V8). `target`: what rules match by (`:path`, and the `:authority` and
    /// route name when `config.needs` says so); `websocket`: whether it asks for an upgrade.
    pub fn read(
        config: &JwtAuthConfig,
        target: (String, String, Option<String>),
        websocket: bool,
        mut read: impl FnMut(Fact) -> Option<String>,
    ) -> Self {
        let mut ask = |need: bool, fact: Fact| if need { read(fact) } else { None };
        let cookie_source = config.needs.cookie;
        let (path, host, route_name) = target;
        RequestFacts {
            ws_key: ask(websocket, Fact::Header("sec-websocket-key")),
            ws_protocols: ask(websocket, Fact::Header("sec-websocket-protocol")),
            authorization: ask(true, Fact::Header("authorization")),
            cookie: ask(cookie_source, Fact::Header("cookie")),
            // Transport facts matter only for upgrades (`wss_only`).
            tls: ask(websocket, Fact::Property(&["connection", "tls_version"])).is_some(),
            forwarded_proto: ask(websocket, Fact::Header("x-forwarded-proto")),
            // The origin check of cookie-sourced tokens: only when a cookie is a source.
            method: ask(cookie_source, Fact::Header(":method")),
            origin: ask(cookie_source, Fact::Header("origin")),
            sec_fetch_site: ask(cookie_source, Fact::Header("sec-fetch-site")),
            path,
            host,
            route_name,
            websocket,
        }
    }

    pub fn request(&self) -> Request<'_> {
        Request {
            path: &self.path,
            host: &self.host,
            route_name: self.route_name.as_deref(),
            websocket: self.websocket,
            ws_key: self.ws_key.as_deref(),
            ws_protocols: self.ws_protocols.as_deref(),
            authorization: self.authorization.as_deref(),
            cookie: self.cookie.as_deref(),
            tls: self.tls,
            forwarded_proto: self.forwarded_proto.as_deref(),
            method: self.method.as_deref(),
            origin: self.origin.as_deref(),
            sec_fetch_site: self.sec_fetch_site.as_deref(),
        }
    }
}

/// What a request's headers come to.
#[derive(Debug)]
pub enum Admit {
    /// Forward after applying `edits`. `token` (`None`: a missing token was allowed) is
    /// published as filter state ([`CLAIMS_PROPERTY`], [`KID_PROPERTY`]) and handed to the later
    /// stages of the pass.
    Allow {
        edits: Vec<HeaderEdit>,
        token: Option<Arc<Verified>>,
    },
    /// Refuse with `reply`, logged as a denial line.
    Refuse { denial: Denial, reply: LocalReply },
    /// Wait for the JWKS fetch this request started; then [`AuthStream::request`] again with
    /// its answer.
    Wait,
}

/// What one chunk on the live socket comes to.
#[derive(Debug, Default)]
pub struct ChunkStep {
    /// Replace the chunk with these bytes (re-auth frames taken out); `None`: it goes on as is.
    pub replace: Option<Vec<u8>>,
    /// The chunk's size after this stage.
    pub size: usize,
    /// The last re-auth token accepted on this chunk: published as filter state
    /// ([`REAUTH_CLAIMS_PROPERTY`], [`REAUTH_KID_PROPERTY`]) and handed to the later stages.
    pub reauth: Option<Arc<Verified>>,
}

/// The route name, path and host of an upgrade: re-auth tokens follow the same rules.
type At = (Option<String>, String, String);

/// One stream's jwt-auth state.
#[derive(Debug, Default)]
pub struct AuthStream {
    /// The JWKS fetch this request waits for: (call token, provider).
    waiting: Option<(u32, usize)>,
    /// The socket an allowed upgrade becomes once the upstream answers 101.
    socket: Option<LiveSocket>,
    /// The upstream answered 101 and the pass's live socket carries this socket's deadline.
    live: bool,
    /// Client frames, scanned for in-band re-auth when that is configured.
    reauth: Option<(ClientFrames, At)>,
    /// The session deadline this request's token earns, recorded only once the whole chain
    /// allowed the request (the response came from the upstream).
    extend: Option<(String, u64)>,
}

impl AuthStream {
    /// The request headers at `clock` (`None`: the host cannot tell the time, and whatever
    /// needs it fails closed). `answer`: the status and body of the JWKS fetch this request
    /// waited for (then no other fetch is made). `start` starts a JWKS fetch (as in
    /// [`JwtAuth::tick`]); one that cannot start is counted and the request decided without it.
    pub fn request(
        &mut self,
        auth: &mut JwtAuth,
        req: &Request<'_>,
        clock: Option<u64>,
        answer: Option<(u32, Vec<u8>)>,
        mut start: impl FnMut(&FetchRequest<'_>) -> Option<u32>,
    ) -> Admit {
        let mut may_fetch = answer.is_none();
        if let (Some((status, body)), Some((_, provider))) = (answer, self.waiting.take()) {
            auth.load(provider, Doc::Jwks, status, &body);
        }
        loop {
            match auth.decide_at(req, clock, may_fetch) {
                Decision::Allow {
                    edits,
                    token,
                    deadline,
                    cache_hit,
                    socket,
                } => {
                    if token.is_some() {
                        self.allowed(auth, req, deadline, cache_hit, socket);
                    } else {
                        auth.notes.count(JwtAuthStat::AllowedMissing);
                    }
                    return Admit::Allow { edits, token };
                }
                Decision::Deny { denial, reply } => {
                    auth.notes.count(JwtAuthStat::Denied(denial));
                    return Admit::Refuse { denial, reply };
                }
                Decision::FetchJwks { provider } => {
                    auth.note_fetch(provider, clock.unwrap_or(0));
                    match auth.jwks_fetch(provider).and_then(|r| start(&r)) {
                        Some(call) => {
                            self.waiting = Some((call, provider));
                            return Admit::Wait;
                        }
                        // Decided again without a fetch (which never asks for one).
                        None => {
                            auth.notes.count(JwtAuthStat::JwksFetchFailed);
                            may_fetch = false;
                        }
                    }
                }
            }
        }
    }

    /// A verified token let the request through: its stats, and what it means for later.
    fn allowed(
        &mut self,
        auth: &mut JwtAuth,
        req: &Request<'_>,
        deadline: Option<u64>,
        cache_hit: bool,
        socket: Option<SocketTerms>,
    ) {
        auth.notes.count(if cache_hit {
            JwtAuthStat::CacheHit
        } else {
            JwtAuthStat::CacheMiss
        });
        auth.notes.count(JwtAuthStat::Allowed);
        let session = socket.as_ref().and_then(|s| s.session.clone());
        if let (Some(session), Some(deadline)) = (&session, deadline) {
            // Not yet: a later filter (session-binding) may still refuse.
            self.extend = Some((session.clone(), deadline));
        }
        if req.websocket {
            if session.is_some() && auth.config.reauth.is_some() {
                let at = (
                    req.route_name.map(str::to_string),
                    req.path.to_string(),
                    req.host.to_string(),
                );
                self.reauth = Some((ClientFrames::default(), at));
            }
            self.socket =
                deadline.map(|d| LiveSocket::following(d, session, socket.and_then(|s| s.until)));
        }
    }

    /// What the stage answers to the answer of call `call` when it is not the JWKS fetch this
    /// request waits for: `Flow::Wait` (another call's) or `Flow::Next` (it waits for none).
    /// `None`: it is that fetch (read its answer, then [`Self::request`] again).
    pub fn other_call(&self, call: u32) -> Option<Flow> {
        match self.waiting {
            None => Some(Flow::Next),
            Some((c, _)) if c != call => Some(Flow::Wait),
            Some(_) => None,
        }
    }

    /// The response headers. The session deadline the token earned is recorded (for this
    /// Envoy's workers in `kv`, for every replica in the fleet store on the next tick) only
    /// when the response came from the upstream (`response.code_details` is `via_upstream`):
    /// a later filter's local reply is not. An upgrade the upstream accepted (`:status` 101)
    /// joins the pass's `live` socket. `read` reads the response facts, `now` the clock, each
    /// only when needed.
    pub fn response(
        &mut self,
        auth: &mut JwtAuth,
        kv: &mut impl Kv,
        live: &mut Option<LiveSocket>,
        now: impl FnOnce() -> Option<u64>,
        mut read: impl FnMut(Fact) -> Option<String>,
    ) {
        if let Some((session, deadline)) = self.extend.take() {
            let via_upstream = read(Fact::Property(&["response", "code_details"])).as_deref()
                == Some("via_upstream");
            if let (true, Some(now)) = (via_upstream, now()) {
                let per_subject = auth.config.sessions_per_subject;
                sessions::extend(kv, &session, deadline, now, per_subject);
                if let Some(deadlines) = auth.deadlines.as_mut() {
                    deadlines.extend(&session, deadline);
                }
            }
        }
        if let Some(socket) = self.socket.take() {
            if read(Fact::Header(":status")).as_deref() == Some("101") {
                pipeline::join(live, socket);
                self.live = true;
            }
        }
    }

    /// A chunk of `size` bytes going `dir` on the upgraded stream, at `now` (read once, only
    /// when this socket is live): in-band re-auth frames taken out of the client's bytes
    /// (`read` reads them, only when a re-auth may be among them), then the socket's deadline
    /// (the token's, or its session's: this Envoy's record in `kv` first, then every replica's
    /// through the fleet store). A close is asked for on `live`; the pass sends the frame.
    pub fn chunk(
        &mut self,
        auth: &mut JwtAuth,
        kv: &impl Kv,
        live: &mut Option<LiveSocket>,
        (dir, size): (Dir, usize),
        now: impl FnOnce() -> Option<u64>,
        read: impl FnOnce() -> Vec<u8>,
    ) -> ChunkStep {
        let mut step = ChunkStep {
            size,
            ..ChunkStep::default()
        };
        if !self.live {
            return step;
        }
        let clock = now();
        let Some(live) = live.as_mut() else {
            return step;
        };
        if dir == Dir::ToUpstream {
            self.take_reauth(auth, live, &mut step, clock, read);
        }
        if live.is_closing() || step.size == 0 {
            return step;
        }
        let Some(now) = clock else {
            // No clock, no deadline check: the socket closes with 1013 (try again later).
            live.close_with(ws::CLOSE_TRY_AGAIN_LATER, "clock unavailable");
            auth.notes.count(JwtAuthStat::Denied(Denial::Clock));
            auth.notes.line(Line::Denial(
                "live websocket: the host cannot tell the time, closing with 1013".into(),
            ));
            return step;
        };
        let (deadlines, notes) = (&mut auth.deadlines, &mut auth.notes);
        let expired = live.expire(now, |session| {
            let local = sessions::deadline(kv, session).filter(|d| *d > now);
            match (local, deadlines.as_mut()) {
                (Some(d), _) => Some(d),
                (None, None) => None,
                (None, Some(deadlines)) => {
                    let check = deadlines.check(session, now);
                    notes.count(JwtAuthStat::Store(check.stat()));
                    check.deadline(now)
                }
            }
        });
        if expired {
            notes.count(JwtAuthStat::WsExpiredClose);
            notes.line(Line::Info(format!(
                "live websocket: {}, closing with 4401",
                live.close_reason()
            )));
        }
        step
    }

    /// In-band re-auth: the re-auth frames taken out of the client's bytes and applied. The
    /// chunk is replaced by what goes on now; the scanner keeps an incomplete possible re-auth
    /// frame (never the host's buffer: no pause and rebuffer).
    fn take_reauth(
        &mut self,
        auth: &mut JwtAuth,
        live: &mut LiveSocket,
        step: &mut ChunkStep,
        clock: Option<u64>,
        read: impl FnOnce() -> Vec<u8>,
    ) {
        let Some((frames, at)) = self.reauth.as_mut() else {
            return;
        };
        if live.session().is_none() || step.size == 0 || live.is_closing() {
            return;
        }
        let Some(kind) = auth.config.reauth.as_deref() else {
            return;
        };
        let fed = frames.feed(&read(), kind);
        for token in fed.tokens {
            let Some(now) = clock else {
                // No clock: no re-auth can be checked; the socket closes with 1013.
                live.close_with(ws::CLOSE_TRY_AGAIN_LATER, "clock unavailable");
                auth.notes.count(JwtAuthStat::Denied(Denial::Clock));
                break;
            };
            let session = live.session().unwrap_or_default().to_string();
            match auth.reauth(&token, (at.0.as_deref(), &at.1, &at.2), &session, now) {
                Ok((deadline, verified)) => {
                    // Its own socket only: the shared session deadline is written by requests
                    // the whole chain allowed. session-binding checks these on this chunk.
                    live.extend(deadline);
                    step.reauth = Some(verified);
                    auth.notes.count(JwtAuthStat::WsReauth);
                }
                Err(denial) => {
                    auth.notes.count(JwtAuthStat::Denied(denial));
                    auth.notes.line(Line::Denial(format!(
                        "live websocket: re-auth refused ({}), closing with 4401",
                        denial.reason()
                    )));
                    live.refuse(if denial == Denial::OtherSession {
                        "other session"
                    } else {
                        "re-auth refused"
                    });
                }
            }
        }
        if let Some(bytes) = fed.forward {
            step.size = bytes.len();
            step.replace = Some(bytes);
        }
    }
}

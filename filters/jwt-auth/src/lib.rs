//! jwt-auth: the proxy-wasm shell over `gatehouse_core::jwt_auth`. It reads the facts core asks
//! for, makes one core call per callback, applies what it returns (header edits, filter state,
//! replies, calls) and writes the stats and log lines core noted. See docs/jwt-auth.md.

use gatehouse_core::jwt_auth::{
    Admit, AuthStream, Fact, FetchRequest, JwtAuth, JwtAuthConfig, RequestFacts, CLAIMS_PROPERTY,
    KID_PROPERTY, REAUTH_CLAIMS_PROPERTY, REAUTH_KID_PROPERTY,
};
use gatehouse_core::{pipeline::Flow, stats::JwtAuthStat, ws::Dir};
use gatehouse_host::{self as host, Body, Counters, PassState, Stage, StageRoot};
use proxy_wasm::types::LogLevel;
use std::{cell::RefCell, rc::Rc};

const NAME: &str = "gatehouse.jwt_auth";

host::main!(NAME, Root::default());

const UNPUBLISHED: &str = "could not publish claims as filter state";

/// Per-worker state shared by the root context and every stream.
struct Shared {
    auth: JwtAuth,
    counters: Counters<JwtAuthStat>,
}

impl Shared {
    /// Count and log what core noted (at the end of every callback that calls it).
    fn flush(&mut self) {
        self.counters.write(&mut self.auth.notes);
    }
}

/// Start a JWKS (or discovery document) fetch: its call token.
fn start(r: &FetchRequest<'_>) -> Option<u32> {
    host::http_get(r.cluster, r.authority, r.path, r.timeout_ms)
}

/// The root context: the worker's state once configured.
#[derive(Default)]
struct Root(Option<Rc<RefCell<Shared>>>);

impl StageRoot for Root {
    fn configure(&mut self, bytes: &[u8], within: Option<&str>) -> bool {
        let Some(config) = host::configure(NAME, bytes, within, JwtAuthConfig::compile) else {
            return false;
        };
        let auth = JwtAuth::new(config);
        // Fleet store deadline writes and reads go out on a 250 ms tick, fetches on any.
        if auth.deadlines.is_some() {
            host::set_tick(host::store::TICK);
        } else if auth.fetches_keys() {
            host::set_tick(host::FETCH_TICK);
        }
        let counters = Counters::new(NAME);
        let mut shared = Shared { auth, counters };
        shared.flush();
        self.0 = Some(Rc::new(RefCell::new(shared)));
        true
    }

    fn tick(&mut self) {
        let Some(shared) = &self.0 else { return };
        let mut shared = shared.borrow_mut();
        let now = host::now_secs();
        shared.auth.store_tick(now, host::store::send);
        shared.auth.tick(now, start);
        shared.flush();
    }

    fn call_answered(&mut self, token: u32, body_size: usize) {
        let Some(shared) = &self.0 else { return };
        let mut shared = shared.borrow_mut();
        let (auth, now) = (&mut shared.auth, host::now_secs());
        let store_read = |cap| host::store::response(body_size, cap);
        if !auth.store_answered(token, now, store_read) {
            let read = || host::http_call_response(body_size);
            auth.fetch_answered(token, now, read, start);
        }
        shared.flush();
    }

    fn stage(&self) -> Option<Box<dyn Stage>> {
        let (shared, stream) = (self.0.clone()?, AuthStream::default());
        Some(Box::new(Stream { shared, stream }))
    }
}

struct Stream {
    shared: Rc<RefCell<Shared>>,
    stream: AuthStream,
}

impl Stream {
    /// Read the request, decide, apply; `answer`: the JWKS fetch this request waited for.
    fn decide(&mut self, pass: &mut PassState, answer: Option<(u32, Vec<u8>)>) -> Flow {
        // Claims go to the later stages of this pass in memory (and out as filter state).
        pass.handover.from_jwt_auth = true;
        let (f, Stream { shared, stream }) = (&mut pass.facts, self);
        let mut shared = shared.borrow_mut();
        let (target, websocket) = (f.rule_target(&shared.auth.config.needs), f.is_websocket());
        let req = RequestFacts::read(&shared.auth.config, target, websocket, |fact| match fact {
            Fact::Header(name) => f.header(name),
            Fact::Property(path) => f.property(path),
        });
        let auth = &mut shared.auth;
        let flow = match stream.request(auth, &req.request(), f.now(), answer, start) {
            Admit::Allow { edits, token } => {
                f.apply_edits(&edits);
                if let Some(t) = token {
                    if !host::set_filter_state(CLAIMS_PROPERTY, &t.payload) {
                        host::log(LogLevel::Warn, NAME, UNPUBLISHED);
                    }
                    // The key that verified the signature, never the header's claim.
                    host::set_filter_state(KID_PROPERTY, t.key_id.as_bytes());
                    pass.handover.claims = Some(t);
                }
                Flow::Next
            }
            Admit::Refuse { denial, reply } => {
                let (reason, refusal) = (denial.reason(), denial.refusal());
                host::refuse(NAME, reason, refusal, websocket, &req.path, &reply);
                Flow::Stop
            }
            Admit::Wait => Flow::Wait,
        };
        shared.flush();
        flow
    }
}

impl Stage for Stream {
    fn request_headers(&mut self, pass: &mut PassState, _end_of_stream: bool) -> Flow {
        self.decide(pass, None)
    }

    fn call_answered(&mut self, pass: &mut PassState, token: u32, body_size: usize) -> Flow {
        match self.stream.other_call(token) {
            Some(flow) => flow,
            None => self.decide(pass, Some(host::http_call_response(body_size))),
        }
    }

    fn response_headers(&mut self, pass: &mut PassState, _end_of_stream: bool) -> Flow {
        let mut shared = self.shared.borrow_mut();
        let (facts, live) = (&mut pass.facts, &mut pass.live);
        let read = |fact| match fact {
            Fact::Header(name) => host::response_header(name),
            Fact::Property(path) => host::property_text(path.to_vec()),
        };
        let (auth, kv) = (&mut shared.auth, &mut host::SharedData);
        self.stream.response(auth, kv, live, || facts.now(), read);
        shared.flush();
        Flow::Next
    }

    /// The socket's deadline (the token's, or its session's) and in-band re-auth.
    fn live_chunk(&mut self, pass: &mut PassState, dir: Dir, size: usize) -> usize {
        let (f, Stream { shared, stream }) = (&mut pass.facts, &mut *self);
        let mut shared = shared.borrow_mut();
        let (auth, kv) = (&mut shared.auth, &host::SharedData);
        let read = || host::request_body(size);
        let step = stream.chunk(auth, kv, &mut pass.live, (dir, size), || f.now(), read);
        if let Some(bytes) = &step.replace {
            host::replace_body(Body::Request, size, bytes);
        }
        if let Some(verified) = step.reauth {
            host::set_filter_state(REAUTH_CLAIMS_PROPERTY, &verified.payload);
            host::set_filter_state(REAUTH_KID_PROPERTY, verified.key_id.as_bytes());
            pass.handover.reauth = Some(verified);
        }
        shared.flush();
        step.size
    }
}

//! session-binding: the proxy-wasm shell over `gatehouse_core::session_binding`. It reads the
//! verified claims (jwt-auth filter state or `jwt_authn` dynamic metadata) and the request facts,
//! calls `core::session_binding::worker` in each callback and applies what it returns: replies,
//! calls to the revocation feed and the fleet store, close frames, stats and log lines. See
//! docs/session-binding.md.

use gatehouse_core::pipeline::{self, Flow};
use gatehouse_core::session_binding::worker::{
    configured_line, ConnectStep, Outgoing, Request, StreamState, WorkerState,
};
use gatehouse_core::session_binding::{SessionBinding, SessionBindingConfig};
use gatehouse_core::stats::SessionBindingStat;
use gatehouse_core::ws::{Dir, LiveSocket};
use gatehouse_host::{self as host, Counters, PassState, Stage, StageRoot};
use proxy_wasm::types::LogLevel;
use std::cell::RefCell;
use std::rc::Rc;

const NAME: &str = "gatehouse.session_binding";

host::main!(NAME, Root::default());

type Worker = WorkerState<host::SharedData>;

/// Per worker: the compiled config, the core's state, the counters.
struct Shared {
    binding: SessionBinding,
    state: RefCell<Worker>,
    counters: Counters<SessionBindingStat>,
}

impl Shared {
    /// Count and log what the core left.
    fn flush(&self) {
        self.counters.write(&mut self.state.borrow_mut().out);
    }

    /// Run a root callback's core step, send the calls it asks for and tell the core their
    /// tokens.
    fn root(&self, step: impl FnOnce(&mut Worker, &SessionBinding, u64, u64) -> Vec<Outgoing>) {
        let (now, now_ms) = (host::now_secs(), host::store::now_ms());
        let calls = step(&mut self.state.borrow_mut(), &self.binding, now, now_ms);
        for out in calls {
            let token = self.send(&out.request);
            let mut state = self.state.borrow_mut();
            state.sent(&self.binding, out.what, token, now);
        }
        self.flush();
    }

    fn send(&self, request: &Request) -> Option<u32> {
        let config = &self.binding.config;
        match request {
            Request::Feed => {
                let f = config.revocation.as_ref()?;
                host::http_get(&f.cluster, &f.authority, &f.path, f.timeout_ms)
            }
            Request::Store(call, timeout) => {
                host::store::send(config.store.as_ref()?, call, *timeout)
            }
        }
    }
}

#[derive(Default)]
struct Root {
    shared: Option<Rc<Shared>>,
}

impl StageRoot for Root {
    fn call_answered(&mut self, token: u32, body_size: usize) {
        let read = |cap| host::store::response(body_size, cap);
        if let Some(shared) = &self.shared {
            shared.root(|w, b, now, now_ms| w.root_answered(b, token, now, now_ms, read));
        }
    }

    fn configure(&mut self, bytes: &[u8], within: Option<&str>) -> bool {
        let Some(config) = host::configure(NAME, bytes, within, |bytes| {
            SessionBindingConfig::compile_with_env(bytes, &host::env_var)
        }) else {
            return false;
        };
        host::log(LogLevel::Info, NAME, &configured_line(&config));
        let lease = config.store.as_ref().map_or(0, |_| host::store::lease_id());
        let state = WorkerState::new(&config, host::SharedData, lease, host::now_secs());
        // A fleet store's faster tick frees closed sockets' etcd slots sooner.
        host::set_tick(match config.store {
            Some(_) => host::store::TICK,
            None => host::FETCH_TICK,
        });
        self.shared = Some(Rc::new(Shared {
            binding: SessionBinding::new(config),
            state: RefCell::new(state),
            counters: Counters::new(NAME),
        }));
        true
    }

    fn tick(&mut self) {
        if let Some(shared) = &self.shared {
            shared.root(|w, b, now, now_ms| w.tick(b, now, now_ms));
        }
    }

    fn stage(&self) -> Option<Box<dyn Stage>> {
        let shared = Rc::clone(self.shared.as_ref()?);
        let s = shared.state.borrow_mut().stream();
        Some(Box::new(Stream { shared, s }))
    }
}

struct Stream {
    shared: Rc<Shared>,
    s: StreamState,
}

impl Stream {
    /// Call the core with this stream's and the worker's state, then count and log.
    fn core<T>(
        &mut self,
        f: impl FnOnce(&mut StreamState, &SessionBinding, &mut Worker) -> T,
    ) -> T {
        let shared = Rc::clone(&self.shared);
        let out = f(&mut self.s, &shared.binding, &mut shared.state.borrow_mut());
        shared.flush();
        out
    }

    /// Apply a connect step: a store call goes out from here (the pass waits for it).
    fn apply(&mut self, mut step: ConnectStep) -> Flow {
        loop {
            step = match step {
                ConnectStep::Next => return Flow::Next,
                ConnectStep::Wait => return Flow::Wait,
                ConnectStep::Deny {
                    denial: d,
                    reply,
                    websocket,
                    path,
                } => {
                    host::refuse(NAME, d.reason(), d.refusal(), websocket, &path, &reply);
                    return Flow::Stop;
                }
                ConnectStep::Ask(call, timeout) => {
                    let token = self.shared.send(&Request::Store(call, timeout));
                    self.core(|s, b, w| s.sent(b, w, token, host::store::now_ms()))
                }
            };
        }
    }
}

impl Stage for Stream {
    fn request_headers(&mut self, pass: &mut PassState, _end_of_stream: bool) -> Flow {
        let (path, authority, route) = pass.facts.rule_target(&self.shared.binding.config.needs);
        let websocket = pass.facts.is_websocket();
        let (h, facts) = (&pass.handover, &mut pass.facts);
        let target = (path.as_str(), authority.as_str(), route.as_deref());
        let step = self.core(|s, b, w| s.request(b, w, target, websocket, h, facts));
        self.apply(step)
    }

    /// Fleet store: etcd's answer to a waiting connect.
    fn call_answered(&mut self, _pass: &mut PassState, token: u32, body_size: usize) -> Flow {
        let read = |cap| host::store::response(body_size, cap);
        let step = self.core(|s, b, w| s.answered(b, w, token, host::store::now_ms(), read));
        self.apply(step)
    }

    fn response_headers(&mut self, pass: &mut PassState, _end_of_stream: bool) -> Flow {
        let switched = || host::response_header(":status").as_deref() == Some("101");
        if self.core(|s, _, w| s.response(w, switched, host::now_secs())) {
            // Session-binding does not expire sockets (jwt-auth does): no deadline.
            pipeline::join(&mut pass.live, LiveSocket::new(u64::MAX));
        }
        Flow::Next
    }

    /// The revocation list, and the in-band re-auth tokens jwt-auth accepted.
    fn live_chunk(&mut self, pass: &mut PassState, dir: Dir, size: usize) -> usize {
        if !self.s.is_live() || pass.live.as_ref().is_none_or(LiveSocket::is_closing) {
            return size;
        }
        let (h, facts) = (&mut pass.handover, &mut pass.facts);
        let close = self.core(|s, b, w| s.live_chunk(b, w, dir, h, facts));
        if let (Some((code, reason)), Some(live)) = (close, pass.live.as_mut()) {
            live.close_with(code, reason);
        }
        size
    }

    fn done(&mut self, _pass: &mut PassState) {
        self.core(|s, _, w| s.done(w, host::now_secs()));
    }
}

//! Stages and passes: every filter is a stage; a plugin runs a pass of stages in one stream
//! context. A separate filter (`root_id: jwt_auth` …) is a pass of one stage; the one-pass
//! filter (`root_id: gatehouse`) a pass of the stages its config names. The order, the stops,
//! the waits and the shared live socket are `gatehouse_core::pipeline`'s; this is only the
//! proxy-wasm side: callbacks in, the facts read once, the one close frame applied.

use crate::{log, plugin_config, random_mask, replace_body, Body};
use gatehouse_core::pipeline::{Flow, Handover, Off, Pass, Phase, StageKind, Step};
use gatehouse_core::reply::HeaderEdit;
use gatehouse_core::rules::Needs;
use gatehouse_core::ws::{ChunkAction, Dir, LiveSocket};
use gatehouse_core::ConfigError;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::rc::Rc;

/// The request facts of one stream, each read from the host at most once (every host call
/// costs about a microsecond inside V8) and kept in step with the edits stages make; and the
/// clock, read at most once per callback.
#[derive(Default)]
pub struct Facts {
    headers: Vec<(String, Option<String>)>,
    properties: Vec<(String, Option<String>)>,
    clock: Option<Option<u64>>,
}

/// session-binding's request facts, from the pass's facts (read once per pass).
impl gatehouse_core::session_binding::worker::RequestFacts for Facts {
    fn header(&mut self, name: &str) -> Option<String> {
        Facts::header(self, name)
    }
    fn peer(&mut self) -> Option<String> {
        self.property(&["source", "address"])
    }
    fn random_id(&mut self) -> String {
        crate::random_id()
    }
    fn now(&mut self) -> Option<u64> {
        Facts::now(self)
    }
    fn now_ms(&mut self) -> u64 {
        crate::store::now_ms()
    }
    fn filter_state(&mut self, name: &str) -> Option<Vec<u8>> {
        crate::property_bytes(vec![name])
    }
    /// `jwt_authn`'s dynamic metadata entry: proxy-wasm returns the `metadata` property as a
    /// serialized `envoy.config.core.v3.Metadata`; the core decodes it.
    fn metadata(&mut self, key: &str) -> Option<gatehouse_core::jwt::Claims> {
        let bytes = crate::property_bytes(vec!["metadata"])?;
        gatehouse_core::session_binding::metadata::claims(
            &bytes,
            gatehouse_core::session_binding::JWT_AUTHN_NAMESPACE,
            key,
        )
    }
}

impl Facts {
    /// A request header.
    pub fn header(&mut self, name: &str) -> Option<String> {
        if let Some((_, v)) = self
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
        {
            return v.clone();
        }
        let value = crate::request_header(name);
        self.headers
            .push((name.to_ascii_lowercase(), value.clone()));
        value
    }

    /// A request header, read only if `need`.
    pub fn header_if(&mut self, need: bool, name: &str) -> Option<String> {
        if need {
            self.header(name)
        } else {
            None
        }
    }

    fn remember(&mut self, name: &str, value: Option<String>) {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self.headers.push((name.to_ascii_lowercase(), value));
    }

    /// Set (`Some`) or remove (`None`) a request header; later stages see the new value.
    pub fn set_header(&mut self, name: &str, value: Option<&str>) {
        crate::set_request_header(name, value);
        self.remember(name, value.map(str::to_string));
    }

    /// Apply a decision's edits to the request headers; later stages see them.
    pub fn apply_edits(&mut self, edits: &[HeaderEdit]) {
        crate::apply_edits(true, edits);
        for edit in edits {
            match edit {
                HeaderEdit::Set(n, v) => self.remember(n, Some(v.clone())),
                HeaderEdit::Remove(n) => self.remember(n, None),
                // Several values now: read them again if asked.
                HeaderEdit::Add(n, _) => self.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(n)),
            }
        }
    }

    /// A property (`["xds", "route_name"]`, `["connection", "tls_version"]` …) as text.
    pub fn property(&mut self, path: &[&str]) -> Option<String> {
        let key = path.join("\0");
        if let Some((_, v)) = self.properties.iter().find(|(k, _)| *k == key) {
            return v.clone();
        }
        let value = crate::property_text(path.to_vec());
        self.properties.push((key, value.clone()));
        value
    }

    /// Whether the request asks for a WebSocket upgrade.
    pub fn is_websocket(&mut self) -> bool {
        self.header("upgrade").is_some_and(|u| {
            u.split(',')
                .any(|p| p.trim().eq_ignore_ascii_case("websocket"))
        })
    }

    /// What rules match a request by: its `:path`, plus its `:authority` and Envoy route name
    /// only when `needs` says a rule matches by them (empty / `None` otherwise).
    pub fn rule_target(&mut self, needs: &Needs) -> (String, String, Option<String>) {
        let path = self.header(":path").unwrap_or_default();
        let authority = self.header_if(needs.host, ":authority").unwrap_or_default();
        let route = if needs.route_name {
            self.property(&["xds", "route_name"])
        } else {
            None
        };
        (path, authority, route)
    }

    /// Unix time in seconds (see [`crate::now`]), read once per callback.
    pub fn now(&mut self) -> Option<u64> {
        *self.clock.get_or_insert_with(crate::now)
    }

    fn next_callback(&mut self) {
        self.clock = None;
    }
}

/// What the stages of one stream share.
#[derive(Default)]
pub struct PassState {
    pub facts: Facts,
    /// What jwt-auth hands session-binding and turn-credentials in memory.
    pub handover: Handover,
    /// The stream's one live socket, once the upstream answered 101 (see
    /// `gatehouse_core::pipeline::join`).
    pub live: Option<LiveSocket>,
}

/// A filter's per-stream part. Each callback answers with a [`Flow`]; the defaults let
/// everything through.
pub trait Stage {
    fn request_headers(&mut self, pass: &mut PassState, end_of_stream: bool) -> Flow;

    /// The answer to the call this stage waits for (it returned [`Flow::Wait`]): `token` may be
    /// another call's (then keep waiting).
    fn call_answered(&mut self, _pass: &mut PassState, _token: u32, _body_size: usize) -> Flow {
        Flow::Next
    }

    fn request_body(&mut self, _pass: &mut PassState, _size: usize, _end: bool) -> Flow {
        Flow::Next
    }

    fn response_headers(&mut self, _pass: &mut PassState, _end_of_stream: bool) -> Flow {
        Flow::Next
    }

    fn response_body(&mut self, _pass: &mut PassState, _size: usize, _end: bool) -> Flow {
        Flow::Next
    }

    fn response_trailers(&mut self, _pass: &mut PassState) -> Flow {
        Flow::Next
    }

    /// A chunk of `size` bytes going `dir` on the upgraded stream: the stage's checks of the
    /// live socket (a close is asked for on `pass.live`; the pass sends the one close frame).
    /// Returns the chunk's size after the stage (re-auth frames taken out).
    fn live_chunk(&mut self, _pass: &mut PassState, _dir: Dir, size: usize) -> usize {
        size
    }

    /// The stream ended.
    fn done(&mut self, _pass: &mut PassState) {}
}

/// A filter's per-plugin part: its compiled config, timers and calls; makes the stages.
pub trait StageRoot {
    /// Compile `config`; false once the reason is logged (see [`configure`]). `within`: the
    /// stage's key in a one-pass config, which names its errors.
    fn configure(&mut self, config: &[u8], within: Option<&str>) -> bool;

    /// The root's tick (a stage asks for it with [`crate::set_tick`] while it configures; the
    /// pass ticks at the shortest period its stages ask for).
    fn tick(&mut self) {}

    /// An answer to a call the root made; `token` may be another stage's (then ignore it).
    fn call_answered(&mut self, _token: u32, _body_size: usize) {}

    /// The stage of a new stream (`None` before a good configuration).
    fn stage(&self) -> Option<Box<dyn Stage>>;
}

/// The config compiled by `compile`, or `None` once the reason is logged at critical level
/// under the filter's name, its field named (under `within` in a one-pass config).
pub fn configure<T>(
    filter: &str,
    config: &[u8],
    within: Option<&str>,
    compile: impl FnOnce(&[u8]) -> Result<T, ConfigError>,
) -> Option<T> {
    match compile(config) {
        Ok(compiled) => Some(compiled),
        Err(e) => {
            let e = match within {
                Some(stage) => e.within(stage),
                None => e,
            };
            log(LogLevel::Critical, filter, &e.to_string());
            None
        }
    }
}

/// The stage root of a filter whose streams share only what its configuration compiles to (no
/// timers, no calls of its own): `compile` makes that state from the configuration bytes,
/// `stage` makes each stream's stage from it.
pub struct ConfiguredRoot<S> {
    filter: &'static str,
    compile: fn(&[u8]) -> Result<S, ConfigError>,
    stage: fn(Rc<S>) -> Box<dyn Stage>,
    shared: Option<Rc<S>>,
}

impl<S> ConfiguredRoot<S> {
    pub fn new(
        filter: &'static str,
        compile: fn(&[u8]) -> Result<S, ConfigError>,
        stage: fn(Rc<S>) -> Box<dyn Stage>,
    ) -> Self {
        Self {
            filter,
            compile,
            stage,
            shared: None,
        }
    }
}

impl<S> StageRoot for ConfiguredRoot<S> {
    fn configure(&mut self, config: &[u8], within: Option<&str>) -> bool {
        self.shared = configure(self.filter, config, within, self.compile).map(Rc::new);
        self.shared.is_some()
    }

    fn stage(&self) -> Option<Box<dyn Stage>> {
        Some((self.stage)(self.shared.clone()?))
    }
}

/// A stage root, its config, and its stage in a one-pass config (`None`: a separate filter).
pub type PlannedStage = (Box<dyn StageRoot>, Vec<u8>, Option<StageKind>);

/// What a plugin configuration asks for: the stage roots, each with its config and its stage
/// (whose key names its errors in a one-pass config), and which stages are off on which routes.
pub struct Plan {
    pub stages: Vec<PlannedStage>,
    pub off: Off,
}

/// Reads a plugin configuration into its [`Plan`].
type Planner = Box<dyn Fn(&[u8]) -> Result<Plan, ConfigError>>;

/// A plugin's root context: a pass of the stages its configuration names.
pub struct PassRoot {
    name: &'static str,
    plan: Planner,
    roots: Vec<(Box<dyn StageRoot>, Option<StageKind>)>,
    off: Rc<Off>,
}

impl PassRoot {
    /// `plan` reads the plugin configuration into stage roots.
    pub fn new(
        name: &'static str,
        plan: impl Fn(&[u8]) -> Result<Plan, ConfigError> + 'static,
    ) -> Self {
        Self {
            name,
            plan: Box::new(plan),
            roots: Vec::new(),
            off: Rc::default(),
        }
    }

    /// A separate filter: a pass of the one stage `make` makes, given the whole configuration.
    pub fn single(name: &'static str, make: fn() -> Box<dyn StageRoot>) -> Self {
        Self::new(name, move |bytes| {
            Ok(Plan {
                stages: vec![(make(), bytes.to_vec(), None)],
                off: Off::default(),
            })
        })
    }
}

impl Context for PassRoot {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body: usize, _t: usize) {
        for (root, _) in &mut self.roots {
            root.call_answered(token, body);
        }
    }
}

impl RootContext for PassRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let plan = match (self.plan)(&plugin_config()) {
            Ok(plan) => plan,
            Err(e) => {
                log(LogLevel::Critical, self.name, &e.to_string());
                return false;
            }
        };
        // One tick for the pass: the shortest period any stage asks for while it configures.
        let (roots, tick) = gatehouse_core::tick::collect(|| {
            let mut roots = Vec::with_capacity(plan.stages.len());
            for (mut root, config, stage) in plan.stages {
                if !root.configure(&config, stage.map(StageKind::key)) {
                    return None;
                }
                roots.push((root, stage));
            }
            Some(roots)
        });
        let Some(roots) = roots else { return false };
        if let Some(period) = tick {
            crate::apply_tick(period);
        }
        self.roots = roots;
        self.off = Rc::new(plan.off);
        true
    }

    fn on_tick(&mut self) {
        for (root, _) in &mut self.roots {
            root.tick();
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        let stages = self
            .roots
            .iter()
            .map(|(r, _)| r.stage())
            .collect::<Option<Vec<_>>>()?;
        Some(Box::new(PassStream {
            pass: Pass::new(stages.len()),
            stages,
            kinds: self.roots.iter().map(|(_, k)| *k).collect(),
            off: Rc::clone(&self.off),
            state: PassState::default(),
            headers_end: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct PassStream {
    stages: Vec<Box<dyn Stage>>,
    /// Each stage's kind (in a one-pass filter), for `off`.
    kinds: Vec<Option<StageKind>>,
    off: Rc<Off>,
    pass: Pass,
    state: PassState,
    /// Whether the request headers ended the request (for a stage resumed after a wait).
    headers_end: bool,
}

fn action(step: Step) -> Action {
    match step {
        Step::Continue => Action::Continue,
        Step::Pause => Action::Pause,
    }
}

impl PassStream {
    fn run(
        &mut self,
        phase: Phase,
        mut each: impl FnMut(&mut dyn Stage, &mut PassState) -> Flow,
    ) -> Action {
        self.state.facts.next_callback();
        let PassStream {
            stages,
            pass,
            state,
            ..
        } = self;
        action(pass.run(phase, |i| match stages.get_mut(i) {
            Some(stage) => each(stage.as_mut(), state),
            None => Flow::Next,
        }))
    }

    /// A chunk of the upgraded stream: every stage's live checks, then the one close frame.
    fn live(&mut self, dir: Dir, size: usize) -> Action {
        self.state.facts.next_callback();
        let phase = match dir {
            Dir::ToUpstream => Phase::RequestBody,
            Dir::ToClient => Phase::ResponseBody,
        };
        let mut size = size;
        for i in self.pass.order(phase) {
            if let Some(stage) = self.stages.get_mut(i) {
                size = stage.live_chunk(&mut self.state, dir, size);
            }
        }
        if let Some(live) = self.state.live.as_mut() {
            if size > 0 || live.is_closing() {
                let which = match dir {
                    Dir::ToUpstream => Body::Request,
                    Dir::ToClient => Body::Response,
                };
                match live.frame(dir, random_mask) {
                    ChunkAction::Pass => {}
                    ChunkAction::Replace(frame) => replace_body(which, size, &frame),
                    ChunkAction::Drop => replace_body(which, size, &[]),
                }
            }
        }
        Action::Continue
    }
}

impl Context for PassStream {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body: usize, _t: usize) {
        self.state.facts.next_callback();
        let end = self.headers_end;
        let PassStream {
            stages,
            pass,
            state,
            ..
        } = self;
        let Some((_, phase)) = pass.waiting() else {
            return;
        };
        let mut first = true;
        let Some((phase, step)) = pass.resume(|i| {
            let Some(stage) = stages.get_mut(i) else {
                return Flow::Next;
            };
            if std::mem::take(&mut first) {
                return stage.call_answered(state, token, body);
            }
            // The rest of the pass runs the callback the wait was in.
            match phase {
                Phase::RequestHeaders => stage.request_headers(state, end),
                Phase::ResponseHeaders => stage.response_headers(state, false),
                _ => Flow::Next,
            }
        }) else {
            return;
        };
        if step == Step::Continue {
            if phase.is_response() {
                crate::resume_response();
            } else {
                crate::resume_request();
            }
        }
    }

    fn on_done(&mut self) -> bool {
        for stage in &mut self.stages {
            stage.done(&mut self.state);
        }
        true
    }
}

impl HttpContext for PassStream {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        self.headers_end = end_of_stream;
        if let Some(needs) = self.off.needs() {
            let (path, host, route) = self.state.facts.rule_target(&needs);
            for kind in self.off.stages_off(route.as_deref(), &path, &host) {
                if let Some(i) = self.kinds.iter().position(|k| *k == Some(*kind)) {
                    self.pass.turn_off(i);
                }
            }
        }
        self.run(Phase::RequestHeaders, |s, p| {
            s.request_headers(p, end_of_stream)
        })
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if self.state.live.is_some() {
            return self.live(Dir::ToUpstream, size);
        }
        self.run(Phase::RequestBody, |s, p| {
            s.request_body(p, size, end_of_stream)
        })
    }

    fn on_http_response_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        self.run(Phase::ResponseHeaders, |s, p| {
            s.response_headers(p, end_of_stream)
        })
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if self.state.live.is_some() {
            return self.live(Dir::ToClient, size);
        }
        self.run(Phase::ResponseBody, |s, p| {
            s.response_body(p, size, end_of_stream)
        })
    }

    fn on_http_response_trailers(&mut self, _trailers: usize) -> Action {
        self.run(Phase::ResponseTrailers, |s, p| s.response_trailers(p))
    }
}

//! The one place gatehouse filters call proxy-wasm. Every call goes through the SDK's
//! `hostcalls`, which return `Result`s (the SDK's trait helpers `unwrap`, and a panic aborts
//! the VM, failing every request after it). A failed host call is logged and degrades to
//! "absent" / "not done", never to a panic.

use gatehouse_core::log_limit::LogLimiter;
use gatehouse_core::notes::{Line, Notes};
use gatehouse_core::reply::{HeaderEdit, LocalReply, Refusal};
use gatehouse_core::stats::Stat;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{Action, BufferType, LogLevel, MapType, MetricType};
use std::cell::RefCell;
use std::time::UNIX_EPOCH;

pub use proxy_wasm;

mod stage;
pub mod store;
pub use stage::{configure, ConfiguredRoot, Facts, PassRoot, PassState, Plan, Stage, StageRoot};

/// A host call that should not fail did: said at error level (never silently dropped).
fn failed(what: &str, detail: &str) {
    let _ = hostcalls::log(
        LogLevel::Error,
        &format!("gatehouse: the host refused to {what} ({detail})"),
    );
}

/// Log at `level`, prefixed with the filter name.
pub fn log(level: LogLevel, filter: &str, message: &str) {
    let _ = hostcalls::log(level, &format!("{filter}: {message}"));
}

/// Install a panic hook that logs the panic at critical level with the filter's name (release
/// builds abort on panic; this line is what the operator gets to see).
pub fn install_panic_hook(filter: &'static str) {
    proxy_wasm::set_log_level(LogLevel::Info);
    std::panic::set_hook(Box::new(move |info| {
        let _ = hostcalls::log(LogLevel::Critical, &format!("{filter}: panic: {info}"));
    }));
}

/// A filter's entry point. `stage_root` (an expression, evaluated per plugin) is the filter's
/// [`StageRoot`], also offered as `stage_root()` for the one-pass filter; `root_context()` is
/// the separate filter: a pass of that one stage (for a module that holds several filters,
/// `filters/gatehouse`). With the crate's `module` feature (on by default) the crate is a module
/// of its own: panics are logged with the filter's name (see [`install_panic_hook`]) and every
/// root context is `root_context()`. Without it the crate exports no entry point, so several
/// filters link into one module.
#[macro_export]
macro_rules! main {
    ($filter:expr, $stage_root:expr) => {
        /// This filter's stage root (one per plugin configuration).
        pub fn stage_root() -> Box<dyn $crate::StageRoot> {
            Box::new($stage_root)
        }

        /// This filter on its own: a pass of its one stage.
        pub fn root_context() -> Box<dyn $crate::proxy_wasm::traits::RootContext> {
            Box::new($crate::PassRoot::single($filter, stage_root))
        }

        #[cfg(feature = "module")]
        $crate::proxy_wasm::main! {{
            $crate::install_panic_hook($filter);
            $crate::proxy_wasm::set_root_context(|_| root_context());
        }}
    };
}

/// The `root_id` of the plugin whose root context is running (Envoy's `plugin_root_id`
/// property), or `None` when the host cannot tell.
pub fn plugin_root_id() -> Option<String> {
    property_text(vec!["plugin_root_id"])
}

/// Unix time in seconds, or `None` when the host cannot tell the time. A decision that needs
/// the time must then fail closed (`Refusal::Unavailable`: 503 / close 1013), never treat an
/// unknown time as 0 (which would make every expired token pass). Logged (bounded) when it
/// happens.
pub fn now() -> Option<u64> {
    let t = hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .filter(|&s| s > 0);
    if t.is_none() {
        // Bounded without a clock: the first failure and every 10,000th after it.
        CLOCK_FAILURES.with(|n| {
            let count = n.get();
            n.set(count.wrapping_add(1));
            if count % 10_000 == 0 {
                let _ = hostcalls::log(
                    LogLevel::Error,
                    &format!("gatehouse: the host cannot tell the time ({} times so far); refusing what needs it", count + 1),
                );
            }
        });
    }
    t
}

/// Unix time in seconds for bookkeeping that decides nothing (fetch schedules, log windows):
/// 0 when the host cannot tell. Decisions use [`now`].
pub fn now_secs() -> u64 {
    now().unwrap_or(0)
}

/// The plugin configuration bytes given in the Envoy config.
pub fn plugin_config() -> Vec<u8> {
    hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
        .ok()
        .flatten()
        .unwrap_or_default()
}

pub fn request_header(name: &str) -> Option<String> {
    hostcalls::get_map_value(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
}

pub fn response_header(name: &str) -> Option<String> {
    hostcalls::get_map_value(MapType::HttpResponseHeaders, name)
        .ok()
        .flatten()
}

/// Set (`Some`) or remove (`None`) a request header.
pub fn set_request_header(name: &str, value: Option<&str>) {
    if hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value).is_err() {
        failed("set request header", name);
    }
}

/// An Envoy environment variable the VM may read: only those listed in
/// `vm_config.environment_variables.host_env_keys` (or `key_values`) are visible, through WASI
/// `environ_get`. How secrets reach a filter without being written in its config.
pub fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// A property such as `["xds", "route_name"]`, or filter state another filter published.
pub fn property_bytes(path: Vec<&str>) -> Option<Vec<u8>> {
    hostcalls::get_property(path).ok().flatten()
}

/// A property such as `["xds", "route_name"]`, as text.
pub fn property_text(path: Vec<&str>) -> Option<String> {
    property_bytes(path).and_then(|b| String::from_utf8(b).ok())
}

/// A shared-data entry (visible to every worker of this Envoy) and its CAS token.
pub fn shared_data(key: &str) -> (Option<Vec<u8>>, Option<u32>) {
    hostcalls::get_shared_data(key).unwrap_or((None, None))
}

/// Write a shared-data entry if it is still at `cas` (`None`: unconditionally); false when
/// another worker wrote it first.
pub fn set_shared_data(key: &str, value: &[u8], cas: Option<u32>) -> bool {
    hostcalls::set_shared_data(key, Some(value), cas).is_ok()
}

/// Publish `value` as filter state under `name` (Envoy stores it as `wasm.<name>`); later
/// filters read it with `get_property`. Never a header a client could forge.
pub fn set_filter_state(name: &str, value: &[u8]) -> bool {
    hostcalls::set_property(vec![name], Some(value)).is_ok()
}

/// Send a local reply instead of forwarding the request.
pub fn send_reply(reply: &LocalReply) {
    let headers: Vec<(&str, &str)> = reply
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    if hostcalls::send_http_response(reply.status, headers, Some(&reply.body)).is_err() {
        failed("send a local reply", &reply.status.to_string());
    }
}

/// Denial lines logged at info level per minute and per VM; past that they are counted and
/// the next line that gets through says how many were left out. Stats stay exact, and every
/// denial is also logged at debug level.
pub const DENIAL_LINES_PER_MINUTE: u32 = 20;

thread_local! {
    static CLOCK_FAILURES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    static DENIAL_LINES: RefCell<LogLimiter> = RefCell::new(LogLimiter::default());
}

/// Log a denial line: always at debug, and at info within [`DENIAL_LINES_PER_MINUTE`].
pub fn log_denial(filter: &str, line: &str) {
    let allowed = DENIAL_LINES.with(|l| {
        l.try_borrow_mut()
            .ok()
            .and_then(|mut l| l.allow(now_secs(), DENIAL_LINES_PER_MINUTE))
    });
    match allowed {
        Some(0) => log(LogLevel::Info, filter, line),
        Some(left_out) => log(
            LogLevel::Info,
            filter,
            &format!("{line} ({left_out} more denial lines left out before this one; the stats count them all)"),
        ),
        None => log(LogLevel::Debug, filter, line),
    }
}

/// Refuse the request with `reply` and log it (see [`log_denial`]) as
/// `denied (<reason>) websocket|http <path without query> -> close <code>|<status>`.
/// Returns the action that ends the request's header callback.
pub fn refuse(
    filter: &str,
    reason: &str,
    refusal: Refusal,
    websocket: bool,
    path: &str,
    reply: &LocalReply,
) -> Action {
    let path_only = path.split('?').next().unwrap_or("");
    log_denial(
        filter,
        &format!(
            "denied ({reason}) {} {path_only} -> {}",
            if websocket { "websocket" } else { "http" },
            if reply.status == 101 {
                format!("close {}", refusal.close_code())
            } else {
                reply.status.to_string()
            }
        ),
    );
    send_reply(reply);
    Action::Pause
}

/// Which body a chunk callback is about.
#[derive(Clone, Copy)]
pub enum Body {
    Request,
    Response,
}

/// Replace the current body chunk (`size` bytes) with `bytes` (empty to drop it).
pub fn replace_body(which: Body, size: usize, bytes: &[u8]) {
    let t = match which {
        Body::Request => BufferType::HttpRequestBody,
        Body::Response => BufferType::HttpResponseBody,
    };
    if hostcalls::set_buffer(t, 0, size, bytes).is_err() {
        failed("replace a body chunk", &size.to_string());
    }
}

/// The first `size` bytes of the buffered request body (on an upgraded stream: what the client
/// sent and the filter has not let through yet).
pub fn request_body(size: usize) -> Vec<u8> {
    hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size)
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// The first `size` bytes of the response body buffered so far (or the current chunk, once
/// the body streams).
pub fn response_body(size: usize) -> Vec<u8> {
    hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size)
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// 16 random bytes from WASI `random_get` (a CSP nonce); `None` if the host has none.
pub fn random_16() -> Option<[u8; 16]> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).ok().map(|_| b)
}

/// Four random bytes (a WebSocket mask); a fixed mask only if the host has no randomness.
pub fn random_mask() -> [u8; 4] {
    let mut m = [0x5a, 0x3c, 0x96, 0xe1];
    let _ = getrandom::fill(&mut m);
    m
}

/// A random id (16 bytes as hex), unique across workers: names a socket's slot in shared data.
/// Falls back to time and a counter if the host has no randomness.
pub fn random_id() -> String {
    use std::fmt::Write as _;
    use std::sync::atomic::{AtomicU64, Ordering};
    static FALLBACK: AtomicU64 = AtomicU64::new(0);
    let b = random_16().unwrap_or_else(|| {
        let n = FALLBACK.fetch_add(1, Ordering::Relaxed);
        let t = hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64);
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&t.to_be_bytes());
        b[8..].copy_from_slice(&n.to_be_bytes());
        b
    });
    let mut out = String::with_capacity(32);
    for byte in b {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// `GET` `path` from an Envoy cluster; returns the call token.
pub fn http_get(cluster: &str, authority: &str, path: &str, timeout_ms: u64) -> Option<u32> {
    hostcalls::dispatch_http_call(
        cluster,
        vec![
            (":method", "GET"),
            (":path", path),
            (":authority", authority),
            ("accept", "application/json"),
        ],
        None,
        vec![],
        std::time::Duration::from_millis(timeout_ms),
    )
    .ok()
}

/// The status and body of the http call whose response is being delivered.
pub fn http_call_response(body_size: usize) -> (u32, Vec<u8>) {
    let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
        .ok()
        .flatten()
        .unwrap_or_default();
    (status, body)
}

pub fn resume_request() {
    if hostcalls::resume_http_request().is_err() {
        failed("resume the request", "");
    }
}

pub fn resume_response() {
    if hostcalls::resume_http_response().is_err() {
        failed("resume the response", "");
    }
}

/// A filter's Envoy counters, `<filter>.<name>` for each stat of its closed set `S` (Envoy
/// shows them as `wasmcustom.<filter>.<name>`), each defined on first use. Counting a known
/// counter allocates nothing and formats no name.
pub struct Counters<S> {
    filter: &'static str,
    ids: RefCell<Vec<(S, u32)>>,
}

impl<S: Stat> Counters<S> {
    pub fn new(filter: &'static str) -> Self {
        Self {
            filter,
            ids: RefCell::default(),
        }
    }

    pub fn inc(&self, stat: S) {
        self.add(stat, 1);
    }

    /// Count `stat` `n` times at once (a histogram: record the value `n`).
    pub fn add(&self, stat: S, n: u64) {
        if n == 0 && !stat.is_histogram() {
            return;
        }
        let id = {
            let mut ids = self.ids.borrow_mut();
            match ids.iter().find(|(s, _)| *s == stat) {
                Some((_, id)) => Some(*id),
                None => {
                    let name = format!("{}.{}", self.filter, stat.name());
                    let kind = if stat.is_histogram() {
                        MetricType::Histogram
                    } else {
                        MetricType::Counter
                    };
                    match hostcalls::define_metric(kind, &name) {
                        Ok(id) => {
                            ids.push((stat, id));
                            Some(id)
                        }
                        Err(_) => None,
                    }
                }
            }
        };
        if let Some(id) = id {
            let done = if stat.is_histogram() {
                hostcalls::record_metric(id, n)
            } else {
                hostcalls::increment_metric(id, n as i64)
            };
            if done.is_err() {
                failed("count a stat", &stat.name());
            }
        }
    }

    /// Count and log what a core step noted, in order, leaving `notes` empty (its buffers keep
    /// their capacity). Lines go out under the counters' filter name.
    pub fn write(&self, notes: &mut Notes<S>) {
        for (stat, n) in notes.stats.drain(..) {
            self.add(stat, n);
        }
        for line in notes.lines.drain(..) {
            match line {
                Line::Info(m) => log(LogLevel::Info, self.filter, &m),
                Line::Warn(m) => log(LogLevel::Warn, self.filter, &m),
                Line::Denial(m) => log_denial(self.filter, &m),
            }
        }
    }
}

/// Apply a decision's edits to the request headers (`request: true`) or the response headers.
pub fn apply_edits(request: bool, edits: &[HeaderEdit]) {
    let map = if request {
        MapType::HttpRequestHeaders
    } else {
        MapType::HttpResponseHeaders
    };
    for edit in edits {
        let (what, name, result) = match edit {
            HeaderEdit::Set(n, v) => ("set header", n, hostcalls::set_map_value(map, n, Some(v))),
            HeaderEdit::Add(n, v) => ("add header", n, hostcalls::add_map_value(map, n, v)),
            HeaderEdit::Remove(n) => ("remove header", n, hostcalls::set_map_value(map, n, None)),
        };
        if result.is_err() {
            failed(what, name);
        }
    }
}

/// All response headers, in order (several `set-cookie` stay separate).
pub fn response_headers() -> Vec<(String, String)> {
    hostcalls::get_map(MapType::HttpResponseHeaders).unwrap_or_default()
}

/// Set (`Some`) or remove (`None`) a response header.
pub fn set_response_header(name: &str, value: Option<&str>) {
    if hostcalls::set_map_value(MapType::HttpResponseHeaders, name, value).is_err() {
        failed("set response header", name);
    }
}

/// Add a response header value (keeps existing values of the same name).
pub fn add_response_header(name: &str, value: &str) {
    if hostcalls::add_map_value(MapType::HttpResponseHeaders, name, value).is_err() {
        failed("add response header", name);
    }
}

/// Envoy shared data (one store per Envoy process, seen by every worker's VM) as a
/// [`gatehouse_core::kv::Kv`].
pub struct SharedData;

impl gatehouse_core::kv::Kv for SharedData {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        shared_data(key)
    }

    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        set_shared_data(key, value, cas)
    }
}

/// The root tick of a filter that only schedules fetches (JWKS, revocation feed).
pub const FETCH_TICK: std::time::Duration = std::time::Duration::from_secs(1);

/// Ask for the root context's `on_tick` every `period`. A stage asks while it configures: its
/// pass then ticks at the shortest period any of its stages asked for
/// ([`gatehouse_core::tick`]); each plugin keeps its own.
pub fn set_tick(period: std::time::Duration) {
    if !gatehouse_core::tick::ask(period) {
        apply_tick(period);
    }
}

/// Set the root context's tick period (the only place that sets it).
fn apply_tick(period: std::time::Duration) {
    if hostcalls::set_tick_period(period).is_err() {
        failed("set the tick period", &format!("{period:?}"));
    }
}

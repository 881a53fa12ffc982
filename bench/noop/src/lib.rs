//! The benchmark's baseline wasm filters (`bench/run.py`; see docs/performance.md).
//!
//! With an empty plugin configuration it is the "empty wasm filter": what loading any proxy-wasm
//! filter costs Envoy per request (VM entry, context creation, header callbacks) with no work
//! inside. Its configuration can list host calls, one per line, to make on every request's
//! headers — and nothing else: no parsing, no decision. The bench uses that to measure what the
//! host calls of a warm token check cost by themselves (the "host-call floor"):
//!
//! ```text
//! read <request header>          e.g. `read authorization`, `read :path`
//! remove <request header>
//! publish <filter state name> <value>
//! count                          increments one counter (`gatehouse.bench.count`)
//! time                           reads the clock
//! ```

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

enum Call {
    Read(String),
    Remove(String),
    Publish(String, Vec<u8>),
    Count(u32),
    Time,
}

#[derive(Default)]
struct Root {
    calls: Rc<[Call]>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        let mut calls = Vec::new();
        for line in String::from_utf8_lossy(&config).lines() {
            let mut words = line.trim().splitn(3, ' ');
            let call = match (words.next(), words.next(), words.next()) {
                (None | Some(""), _, _) => continue,
                (Some("read"), Some(name), None) => Call::Read(name.to_string()),
                (Some("remove"), Some(name), None) => Call::Remove(name.to_string()),
                (Some("publish"), Some(name), Some(value)) => {
                    Call::Publish(name.to_string(), value.as_bytes().to_vec())
                }
                (Some("count"), None, None) => {
                    match hostcalls::define_metric(MetricType::Counter, "gatehouse.bench.count") {
                        Ok(id) => Call::Count(id),
                        Err(_) => return false,
                    }
                }
                (Some("time"), None, None) => Call::Time,
                _ => {
                    let _ = hostcalls::log(
                        LogLevel::Critical,
                        &format!("bench.noop: bad line {line:?}"),
                    );
                    return false;
                }
            };
            calls.push(call);
        }
        self.calls = calls.into();
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Noop(self.calls.clone())))
    }
}

struct Noop(Rc<[Call]>);

impl Context for Noop {}

impl HttpContext for Noop {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        for call in self.0.iter() {
            let _ = match call {
                Call::Read(name) => {
                    hostcalls::get_map_value(MapType::HttpRequestHeaders, name).map(drop)
                }
                Call::Remove(name) => {
                    hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None)
                }
                Call::Publish(name, value) => hostcalls::set_property(vec![name], Some(value)),
                Call::Count(id) => hostcalls::increment_metric(*id, 1),
                Call::Time => hostcalls::get_current_time().map(drop),
            };
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        Action::Continue
    }
}

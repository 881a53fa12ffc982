//! gatehouse: every filter in one module (`dist/gatehouse.wasm`). The plugin's `root_id` picks
//! the filter (the same root_ids as the filters' own modules), or `gatehouse`: the one-pass
//! filter, whose config names the stages (`gatehouse_core::pipeline`); plugins configured with
//! the same `vm_id` share one VM per worker. This crate decides nothing: its root context becomes
//! the root context its `root_id` names and forwards every callback to it. Wasm only (see
//! Cargo.toml).

#![cfg(target_arch = "wasm32")]

use gatehouse_core::pipeline::{self, StageKind};
use gatehouse_host::{self as host, PassRoot, Plan, StageRoot};
use proxy_wasm::traits::{Context, HttpContext, RootContext, StreamContext};
use proxy_wasm::types::{ContextType, LogLevel};

const NAME: &str = "gatehouse";

/// Makes a filter's root context.
type NewRoot = fn() -> Box<dyn RootContext>;

/// The filters of this module: (root_id, the filter's root context).
const FILTERS: [(&str, NewRoot); 6] = [
    ("gatehouse", one_pass),
    ("jwt_auth", gatehouse_jwt_auth::root_context),
    ("token_proxy", gatehouse_token_proxy::root_context),
    ("session_binding", gatehouse_session_binding::root_context),
    ("page_guard", gatehouse_page_guard::root_context),
    ("turn_credentials", gatehouse_turn_credentials::root_context),
];

/// A stage of the one-pass filter: the same stage root as the separate filter's.
fn stage_of(kind: StageKind) -> Box<dyn StageRoot> {
    match kind {
        StageKind::TokenProxy => gatehouse_token_proxy::stage_root(),
        StageKind::JwtAuth => gatehouse_jwt_auth::stage_root(),
        StageKind::SessionBinding => gatehouse_session_binding::stage_root(),
        StageKind::TurnCredentials => gatehouse_turn_credentials::stage_root(),
        StageKind::PageGuard => gatehouse_page_guard::stage_root(),
    }
}

/// The one-pass filter (`root_id: gatehouse`): the stages its config names, in one stream
/// context.
fn one_pass() -> Box<dyn RootContext> {
    Box::new(PassRoot::new(NAME, |bytes| {
        let one = pipeline::split(bytes)?;
        Ok(Plan {
            stages: one
                .stages
                .into_iter()
                .map(|(kind, config)| (stage_of(kind), config, Some(kind)))
                .collect(),
            off: one.off,
        })
    }))
}

// The module's entry point (not `host::main!`: the root here is not one filter's stage).
#[cfg(feature = "module")]
proxy_wasm::main! {{
    host::install_panic_hook(NAME);
    proxy_wasm::set_root_context(|_| Box::new(ByRootId::default()));
}}

/// A plugin's root context: the filter its `root_id` names, once the host has said which.
#[derive(Default)]
struct ByRootId {
    filter: Option<Box<dyn RootContext>>,
}

impl ByRootId {
    /// The filter's root context, made on first use (Envoy starts the VM, then configures it).
    fn filter(&mut self) -> Option<&mut Box<dyn RootContext>> {
        if self.filter.is_none() {
            let root_id = host::plugin_root_id()?;
            let (_, make) = FILTERS.iter().find(|(id, _)| *id == root_id)?;
            self.filter = Some(make());
        }
        self.filter.as_mut()
    }
}

impl Context for ByRootId {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body: usize, trailers: usize) {
        if let Some(f) = self.filter() {
            f.on_http_call_response(token, headers, body, trailers);
        }
    }

    fn on_grpc_stream_initial_metadata(&mut self, token: u32, elements: u32) {
        if let Some(f) = self.filter() {
            f.on_grpc_stream_initial_metadata(token, elements);
        }
    }

    fn on_grpc_call_response(&mut self, token: u32, status: u32, size: usize) {
        if let Some(f) = self.filter() {
            f.on_grpc_call_response(token, status, size);
        }
    }

    fn on_grpc_stream_message(&mut self, token: u32, size: usize) {
        if let Some(f) = self.filter() {
            f.on_grpc_stream_message(token, size);
        }
    }

    fn on_grpc_stream_trailing_metadata(&mut self, token: u32, elements: u32) {
        if let Some(f) = self.filter() {
            f.on_grpc_stream_trailing_metadata(token, elements);
        }
    }

    fn on_grpc_stream_close(&mut self, token: u32, status: u32) {
        if let Some(f) = self.filter() {
            f.on_grpc_stream_close(token, status);
        }
    }

    fn on_foreign_function(&mut self, function: u32, size: usize) {
        if let Some(f) = self.filter() {
            f.on_foreign_function(function, size);
        }
    }

    fn on_done(&mut self) -> bool {
        self.filter().is_none_or(|f| f.on_done())
    }
}

impl RootContext for ByRootId {
    fn on_vm_start(&mut self, size: usize) -> bool {
        // An unknown root_id is refused in `on_configure`, where Envoy reports the plugin.
        self.filter().is_none_or(|f| f.on_vm_start(size))
    }

    fn on_configure(&mut self, size: usize) -> bool {
        match self.filter() {
            Some(f) => f.on_configure(size),
            None => {
                let known: Vec<&str> = FILTERS.iter().map(|(id, _)| *id).collect();
                host::log(
                    LogLevel::Critical,
                    NAME,
                    &format!(
                        "root_id {} is not a filter of this module (known: {})",
                        host::plugin_root_id().map_or("(none)".to_string(), |id| format!("`{id}`")),
                        known.join(", ")
                    ),
                );
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if let Some(f) = self.filter() {
            f.on_tick();
        }
    }

    fn on_queue_ready(&mut self, queue: u32) {
        if let Some(f) = self.filter() {
            f.on_queue_ready(queue);
        }
    }

    fn on_log(&mut self) {
        if let Some(f) = self.filter() {
            f.on_log();
        }
    }

    fn create_http_context(&self, id: u32) -> Option<Box<dyn HttpContext>> {
        self.filter.as_ref()?.create_http_context(id)
    }

    fn create_stream_context(&self, id: u32) -> Option<Box<dyn StreamContext>> {
        self.filter.as_ref()?.create_stream_context(id)
    }

    fn get_type(&self) -> Option<ContextType> {
        self.filter.as_ref()?.get_type()
    }
}

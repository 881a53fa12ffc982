//! turn-credentials: the proxy-wasm shell over `gatehouse_core::turn`. See
//! docs/turn-credentials.md.

use gatehouse_core::jwt_auth::CLAIMS_PROPERTY;
use gatehouse_core::turn::{TurnConfig, TurnDecision, TurnRequest};
use gatehouse_host::{self as host, Counters};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::rc::Rc;

const NAME: &str = "gatehouse.turn_credentials";

proxy_wasm::main! {{
    host::install_panic_hook(NAME);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { shared: None }) });
}}

struct Shared {
    config: TurnConfig,
    counters: Counters,
}

impl Shared {
    fn count(&self, what: &str) {
        self.counters.inc(&format!("{NAME}.{what}"));
    }
}

struct Root {
    shared: Option<Rc<Shared>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        // Secrets given as `env` come from the VM's environment (Envoy's
        // `vm_config.environment_variables`), never from the config itself.
        match TurnConfig::compile(&host::plugin_config(), &host::env_var) {
            Ok(config) => {
                host::log(
                    LogLevel::Info,
                    NAME,
                    &format!(
                        "configured: {} answers for claim `{}`, ttl {} s, {} url(s)",
                        config.path,
                        config.user_claim,
                        config.ttl,
                        config.urls.len()
                    ),
                );
                self.shared = Some(Rc::new(Shared {
                    config,
                    counters: Counters::default(),
                }));
                true
            }
            Err(e) => {
                host::log(LogLevel::Critical, NAME, &e.to_string());
                false
            }
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            shared: self.shared.clone()?,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    shared: Rc<Shared>,
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let s = &self.shared;
        let path = host::request_header(":path").unwrap_or_default();
        if path.split('?').next() != Some(s.config.path.as_str()) {
            return Action::Continue;
        }
        let method = host::request_header(":method").unwrap_or_default();
        let origin = host::request_header("origin");
        // jwt-auth's verified claims: filter state, never a header a client could send.
        let claims = host::property_bytes(vec![CLAIMS_PROPERTY]);
        let decision = s.config.decide(
            &TurnRequest {
                method: &method,
                path: &path,
                origin: origin.as_deref(),
                claims: claims.as_deref(),
            },
            host::now_secs(),
        );
        match decision {
            TurnDecision::Pass => Action::Continue,
            TurnDecision::Minted { reply, .. } => {
                s.count("minted");
                host::send_reply(&reply);
                Action::Pause
            }
            TurnDecision::Refused { reply, denial } => {
                s.count(&format!("denied.{}", denial.reason()));
                host::log(
                    LogLevel::Info,
                    NAME,
                    &format!("denied ({}) {method} -> {}", denial.reason(), reply.status),
                );
                host::send_reply(&reply);
                Action::Pause
            }
        }
    }
}

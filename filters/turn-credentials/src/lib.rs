//! turn-credentials: the proxy-wasm shell over `gatehouse_core::turn`. See
//! docs/turn-credentials.md.

use gatehouse_core::jwt_auth::CLAIMS_PROPERTY;
use gatehouse_core::pipeline::Flow;
use gatehouse_core::stats::TurnStat;
use gatehouse_core::turn::{TurnConfig, TurnDecision, TurnRequest};
use gatehouse_core::ConfigError;
use gatehouse_host::{self as host, Counters, PassState, Stage};
use proxy_wasm::types::LogLevel;
use std::rc::Rc;

const NAME: &str = "gatehouse.turn_credentials";

host::main!(
    NAME,
    host::ConfiguredRoot::new(NAME, configure, |shared| Box::new(Stream { shared }))
);

struct Shared {
    config: TurnConfig,
    counters: Counters<TurnStat>,
}

impl Shared {
    fn count(&self, stat: TurnStat) {
        self.counters.inc(stat);
    }
}

/// Compile the configuration and say what it configured.
fn configure(bytes: &[u8]) -> Result<Shared, ConfigError> {
    // Secrets given as `env` come from the VM's environment (Envoy's
    // `vm_config.environment_variables`), never from the config itself.
    let config = TurnConfig::compile(bytes, &host::env_var)?;
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
    Ok(Shared {
        config,
        counters: Counters::new(NAME),
    })
}

struct Stream {
    shared: Rc<Shared>,
}

impl Stage for Stream {
    fn request_headers(&mut self, pass: &mut PassState, _end_of_stream: bool) -> Flow {
        let s = &self.shared;
        let facts = &mut pass.facts;
        let path = facts.header(":path").unwrap_or_default();
        if path.split('?').next() != Some(s.config.path.as_str()) {
            return Flow::Next;
        }
        let method = facts.header(":method").unwrap_or_default();
        let origin = facts.header("origin");
        // jwt-auth's verified claims: in memory from a jwt-auth stage of this pass, or its
        // filter state, never a header a client could send.
        let claims = if pass.handover.from_jwt_auth {
            pass.handover.claims.as_ref().map(|v| v.payload.clone())
        } else {
            host::property_bytes(vec![CLAIMS_PROPERTY])
        };
        let decision = s.config.decide(
            &TurnRequest {
                method: &method,
                path: &path,
                origin: origin.as_deref(),
                claims: claims.as_deref(),
            },
            // `None` when the host cannot tell the time: the core refuses (503, `clock`).
            facts.now(),
        );
        match decision {
            TurnDecision::Pass => Flow::Next,
            TurnDecision::Minted { reply, .. } => {
                s.count(TurnStat::Minted);
                host::send_reply(&reply);
                Flow::Stop
            }
            TurnDecision::Refused { reply, denial } => {
                s.count(TurnStat::Denied(denial));
                host::refuse(
                    NAME,
                    denial.reason(),
                    denial.refusal(),
                    false,
                    &path,
                    &reply,
                );
                Flow::Stop
            }
        }
    }
}

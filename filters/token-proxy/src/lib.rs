//! token-proxy: the proxy-wasm shell over `gatehouse_core::token_proxy`. See docs/token-proxy.md.

use gatehouse_core::pipeline::Flow;
use gatehouse_core::stats::TokenProxyStat;
use gatehouse_core::token_proxy::{ProxyDecision, ProxyRequest, TokenProxyConfig};
use gatehouse_core::ConfigError;
use gatehouse_host::{self as host, Counters, PassState, Stage};
use proxy_wasm::types::LogLevel;
use std::rc::Rc;

const NAME: &str = "gatehouse.token_proxy";

host::main!(
    NAME,
    host::ConfiguredRoot::new(NAME, configure, |shared| Box::new(Stream {
        shared,
        origin: None
    }))
);

struct Shared {
    config: TokenProxyConfig,
    counters: Counters<TokenProxyStat>,
}

impl Shared {
    fn count(&self, stat: TokenProxyStat) {
        self.counters.inc(stat);
    }
}

/// Compile the configuration and say what it configured.
fn configure(bytes: &[u8]) -> Result<Shared, ConfigError> {
    // `encryption_keys_env` reads the VM's environment: WASI `environ_get`, which Envoy
    // fills with the variables listed in `vm_config.environment_variables`.
    let config = TokenProxyConfig::compile(bytes, &host::env_var)?;
    host::log(
        LogLevel::Info,
        NAME,
        &format!(
            "configured: cookies {} / {}, {} key(s) {}",
            config.access_cookie,
            config.csrf_cookie,
            config.keys.len(),
            match &config.keys_env {
                Some(name) => format!("from environment variable {name}"),
                None => "inline".to_string(),
            }
        ),
    );
    Ok(Shared {
        config,
        counters: Counters::new(NAME),
    })
}

struct Stream {
    shared: Rc<Shared>,
    origin: Option<String>,
}

impl Stage for Stream {
    fn request_headers(&mut self, pass: &mut PassState, _end_of_stream: bool) -> Flow {
        let s = &self.shared;
        let facts = &mut pass.facts;
        let method = facts.header(":method").unwrap_or_default();
        let websocket = facts.is_websocket();
        let needs = s.config.needs(&method, websocket);
        let origin = facts.header_if(needs.origin, "origin");
        let sec_fetch_site = facts.header_if(needs.sec_fetch_site, "sec-fetch-site");
        let authorization = facts.header("authorization");
        let cookie = facts.header("cookie");
        let csrf = facts.header(&s.config.csrf_header);
        let preflight = facts.header_if(needs.preflight, "access-control-request-method");
        let ws_key = facts.header_if(websocket, "sec-websocket-key");
        let ws_protocols = facts.header_if(websocket, "sec-websocket-protocol");
        let decision = s.config.decide(&ProxyRequest {
            method: &method,
            origin: origin.as_deref(),
            authorization: authorization.as_deref(),
            cookie: cookie.as_deref(),
            csrf_header: csrf.as_deref(),
            preflight_method: preflight.as_deref(),
            sec_fetch_site: sec_fetch_site.as_deref(),
            websocket,
            ws_key: ws_key.as_deref(),
            ws_protocols: ws_protocols.as_deref(),
        });
        self.origin = origin;
        // The CSRF header has done its job here; the upstream never needs it.
        if csrf.is_some() {
            facts.set_header(&s.config.csrf_header, None);
        }
        match decision {
            ProxyDecision::Pass => {
                s.count(TokenProxyStat::Passed);
                Flow::Next
            }
            ProxyDecision::Forward {
                authorization,
                cookie,
            } => {
                facts.set_header("authorization", Some(&authorization));
                facts.set_header("cookie", cookie.as_deref());
                s.count(TokenProxyStat::Forwarded);
                Flow::Next
            }
            ProxyDecision::Reply { reply, denial } => {
                match denial {
                    Some(d) => {
                        s.count(TokenProxyStat::Denied(d));
                        let path = facts.header(":path").unwrap_or_default();
                        host::refuse(
                            NAME,
                            d.reason(),
                            d.refusal(websocket),
                            websocket,
                            &path,
                            &reply,
                        );
                    }
                    None => {
                        s.count(TokenProxyStat::Preflight);
                        host::send_reply(&reply);
                    }
                }
                Flow::Stop
            }
        }
    }

    fn response_headers(&mut self, _pass: &mut PassState, _end_of_stream: bool) -> Flow {
        let config = &self.shared.config;
        for (name, value) in config.cors_headers(self.origin.as_deref()) {
            if name == "vary" {
                host::add_response_header(&name, &value);
            } else {
                host::set_response_header(&name, Some(&value));
            }
        }
        // Most responses set no cookie: one lookup before reading every header.
        if !config.harden_names.is_empty() && host::response_header("set-cookie").is_some() {
            let cookies: Vec<String> = host::response_headers()
                .into_iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
                .map(|(_, v)| v)
                .collect();
            let hardened: Vec<String> = cookies
                .iter()
                .map(|c| config.harden_set_cookie(c).unwrap_or_else(|| c.clone()))
                .collect();
            if hardened != cookies {
                host::set_response_header("set-cookie", None);
                for c in &hardened {
                    host::add_response_header("set-cookie", c);
                }
                self.shared.count(TokenProxyStat::CookiesHardened);
            }
        }
        Flow::Next
    }
}

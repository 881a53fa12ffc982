//! page-guard: the proxy-wasm shell over `gatehouse_core::page_guard`. See docs/page-guard.md.

use gatehouse_core::page_guard::{
    guard_request_edits, BodyPlan, BodyStep, LogLimiter, Outcome, PageBody, PageGuardConfig,
    PageRequest, PageResponse, PolicyId, RequestDecision,
};
use gatehouse_core::pipeline::Flow;
use gatehouse_core::reply::Refusal;
use gatehouse_core::stats::PageGuardStat;
use gatehouse_core::ConfigError;
use gatehouse_host::{self as host, Body, Counters, Facts, PassState, Stage};
use proxy_wasm::types::LogLevel;
use std::cell::RefCell;
use std::rc::Rc;

const NAME: &str = "gatehouse.page_guard";

host::main!(
    NAME,
    host::ConfiguredRoot::new(NAME, configure, |shared| Box::new(Stream {
        shared,
        mode: Mode::Off,
        path: String::new(),
        head: false,
        forwarded_proto: None,
        body: PageBody::default(),
    }))
);

struct Shared {
    config: PageGuardConfig,
    counters: Counters<PageGuardStat>,
    report_log: RefCell<LogLimiter>,
}

impl Shared {
    fn count(&self, stat: PageGuardStat) {
        self.counters.inc(stat);
    }
}

/// Compile the configuration and say what it configured.
fn configure(bytes: &[u8]) -> Result<Shared, ConfigError> {
    // `nonce.placeholder_env` reads the VM's environment (WASI `environ_get`, filled from
    // `vm_config.environment_variables`).
    let config = PageGuardConfig::compile(bytes, &host::env_var)?;
    host::log(LogLevel::Info, NAME, &config.summary());
    Ok(Shared {
        config,
        counters: Counters::new(NAME),
        report_log: RefCell::new(LogLimiter::default()),
    })
}

enum Mode {
    Off,
    Report,
    Guard(PolicyId),
}

struct Stream {
    shared: Rc<Shared>,
    mode: Mode,
    path: String,
    head: bool,
    forwarded_proto: Option<String>,
    body: PageBody,
}

impl Stream {
    /// Answer the report endpoint once core says so.
    fn report_body(&self, facts: &mut Facts, size: usize, end: bool) -> Flow {
        let s = &self.shared;
        let content_type = facts.header("content-type");
        let answer = s.config.on_report_body(
            content_type.as_deref(),
            size,
            end,
            || host::request_body(size),
            host::now_secs(),
            &mut s.report_log.borrow_mut(),
        );
        if let Some(answer) = answer {
            for stat in answer.stats {
                s.count(stat);
            }
            for line in &answer.lines {
                host::log(LogLevel::Warn, NAME, line);
            }
            host::send_reply(&answer.reply);
        }
        Flow::Stop
    }

    /// Apply one body step: replace the bytes, fix `content-length`, count, log.
    fn apply(&self, step: BodyStep) -> Flow {
        if let Some((size, out)) = &step.replace {
            host::replace_body(Body::Response, *size, out);
        }
        if let Some(length) = step.content_length {
            host::set_response_header("content-length", length.map(|l| l.to_string()).as_deref());
        }
        for stat in step.stats {
            self.shared.count(stat);
        }
        if let Some(line) = &step.denial {
            host::log_denial(NAME, line);
        }
        if step.hold {
            Flow::Stop
        } else {
            Flow::Next
        }
    }
}

impl Stage for Stream {
    fn request_headers(&mut self, pass: &mut PassState, end_of_stream: bool) -> Flow {
        let s = Rc::clone(&self.shared);
        let facts = &mut pass.facts;
        let method = facts.header(":method").unwrap_or_default();
        let path = facts.header(":path").unwrap_or_default();
        let authority = facts.header(":authority").unwrap_or_default();
        let route = facts.property(&["xds", "route_name"]);
        let decision = s.config.on_request(&PageRequest {
            method: &method,
            path: &path,
            host: &authority,
            route_name: route.as_deref(),
        });
        match decision {
            RequestDecision::Refuse { reason, reply } => {
                s.count(PageGuardStat::Path(reason));
                host::refuse(
                    NAME,
                    reason.reason(),
                    Refusal::BadRequest,
                    false,
                    &path,
                    &reply,
                );
                Flow::Stop
            }
            RequestDecision::Report => {
                self.mode = Mode::Report;
                if end_of_stream {
                    return self.report_body(facts, 0, true);
                }
                Flow::Stop
            }
            RequestDecision::Reply(reply) => {
                s.count(PageGuardStat::ReportInvalidMethod);
                host::send_reply(&reply);
                Flow::Stop
            }
            RequestDecision::Guard {
                policy,
                identity,
                strip_range,
            } => {
                self.mode = Mode::Guard(policy);
                self.head = method.eq_ignore_ascii_case("HEAD");
                self.path = path;
                if s.config.trust_forwarded_proto {
                    self.forwarded_proto = facts.header("x-forwarded-proto");
                }
                for (name, value) in guard_request_edits(identity, strip_range) {
                    facts.set_header(name, value);
                }
                Flow::Next
            }
            RequestDecision::Off => {
                s.count(PageGuardStat::Off);
                Flow::Next
            }
        }
    }

    fn request_body(&mut self, pass: &mut PassState, size: usize, end_of_stream: bool) -> Flow {
        match self.mode {
            Mode::Report => self.report_body(&mut pass.facts, size, end_of_stream),
            _ => Flow::Next,
        }
    }

    fn response_headers(&mut self, pass: &mut PassState, end_of_stream: bool) -> Flow {
        let Mode::Guard(id) = self.mode else {
            return Flow::Next;
        };
        let s = Rc::clone(&self.shared);
        let status = host::response_header(":status")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let content_type = host::response_header("content-type");
        let content_encoding = host::response_header("content-encoding");
        let content_length = host::response_header("content-length").and_then(|v| v.parse().ok());
        let tls = s.config.hsts.is_some()
            && pass
                .facts
                .property(&["connection", "tls_version"])
                .is_some();
        let has_header = |name: &str| host::response_header(name).is_some();
        // Two nonces: the script one, then the style one.
        let nonce = if s.config.placeholder.is_empty() {
            None
        } else {
            host::random_16().zip(host::random_16()).map(|(a, b)| {
                let mut n = [0u8; 32];
                n[..16].copy_from_slice(&a);
                n[16..].copy_from_slice(&b);
                n
            })
        };
        let plan = s.config.on_response(
            s.config.policy(id),
            &PageResponse {
                status,
                content_type: content_type.as_deref(),
                content_encoding: content_encoding.as_deref(),
                content_length,
                head: self.head,
                tls,
                forwarded_proto: self.forwarded_proto.as_deref(),
                has_header: &has_header,
            },
            nonce,
        );
        if let (Some(reply), Outcome::Denied(why)) = (&plan.deny, plan.outcome) {
            // A body that may carry the placeholder and cannot be scrubbed: refused.
            s.count(PageGuardStat::Outcome(plan.outcome));
            self.mode = Mode::Off;
            host::refuse(
                NAME,
                why.reason(),
                Refusal::Unavailable,
                false,
                &self.path,
                reply,
            );
            return Flow::Stop;
        }
        host::apply_edits(false, &plan.edits);
        s.count(PageGuardStat::Outcome(plan.outcome));
        self.body = PageBody::new(&plan, &self.path);
        match plan.body {
            // Hold the headers until the whole body is read: Content-Length changes.
            BodyPlan::Buffer if !end_of_stream => Flow::Hold,
            _ => Flow::Next,
        }
    }

    fn response_body(&mut self, _pass: &mut PassState, size: usize, end_of_stream: bool) -> Flow {
        let step = self
            .body
            .chunk(&self.shared.config, size, end_of_stream, || {
                host::response_body(size)
            });
        self.apply(step)
    }

    /// A body that ends with trailers: core finishes it.
    fn response_trailers(&mut self, _pass: &mut PassState) -> Flow {
        let step = self
            .body
            .trailers(&self.shared.config, || host::response_body(ALL_BUFFERED));
        self.apply(step);
        Flow::Next
    }
}

/// "Everything buffered" for a body read: proxy-wasm reads at most what there is.
const ALL_BUFFERED: usize = i32::MAX as usize;

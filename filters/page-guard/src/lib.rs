//! page-guard: the proxy-wasm shell over `gatehouse_core::page_guard`. See docs/page-guard.md.

use gatehouse_core::page_guard::{
    parse_reports, report_reply, Blanker, BodyPlan, LogLimiter, NonceText, Outcome,
    PageGuardConfig, PageRequest, PageResponse, PolicyId, ReportError, RequestDecision, Rewriter,
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
        body: BodyPlan::Untouched,
        nonce: None,
        rewriter: None,
        blanker: None,
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
    host::log(
        LogLevel::Info,
        NAME,
        &format!(
            "configured: csp {}, nonce {}, sri manifest {} entries, {} rule(s), body cap {} bytes",
            if config.policy.csp.is_some() {
                "on"
            } else {
                "off"
            },
            match (&config.placeholder_env, config.placeholder.is_empty()) {
                (_, true) => "off".to_string(),
                (Some(var), false) => format!("placeholder from {var}"),
                (None, false) => "placeholder inline".to_string(),
            },
            config.sri.as_ref().map_or(0, |s| s.len()),
            config.rules.len(),
            config.max_body_bytes,
        ),
    );
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
    body: BodyPlan,
    nonce: Option<NonceText>,
    rewriter: Option<Rewriter>,
    blanker: Option<Blanker>,
}

impl Stream {
    fn answer_report(&self, facts: &mut Facts, body: &[u8]) {
        let s = &self.shared;
        let Some(reports) = &s.config.reports else {
            return;
        };
        let content_type = facts.header("content-type");
        match parse_reports(content_type.as_deref(), body, reports.max_body_bytes) {
            Ok(violations) => {
                let now = host::now_secs();
                for v in &violations {
                    s.count(PageGuardStat::Report(v.directive));
                    let allowed = s.report_log.borrow_mut().allow(now, reports.log_per_minute);
                    if let Some(suppressed) = allowed {
                        let more = if suppressed > 0 {
                            format!(" ({suppressed} earlier report lines suppressed)")
                        } else {
                            String::new()
                        };
                        host::log(
                            LogLevel::Warn,
                            NAME,
                            &format!(
                                "violation of {} ({}): blocked {:?} on {:?}{more}",
                                v.directive.name(),
                                v.disposition,
                                v.blocked,
                                v.document
                            ),
                        );
                    }
                }
            }
            Err(e) => s.count(PageGuardStat::ReportInvalid(e)),
        }
        host::send_reply(&report_reply());
    }

    /// Rewrite `data` (the whole buffered body, or one chunk when streaming).
    fn rewrite(&mut self, data: &[u8], end: bool) -> Vec<u8> {
        let s = &self.shared;
        let params = s.config.rewrite_params(self.nonce.as_ref(), &self.path);
        let rewriter = self.rewriter.get_or_insert_with(Rewriter::new);
        let mut out = Vec::with_capacity(data.len() + 256);
        rewriter.feed(&params, data, &mut out);
        if end {
            rewriter.finish(&params, &mut out);
            let stats = rewriter.stats();
            if stats.nonces > 0 {
                s.count(PageGuardStat::TagsNonce);
            }
            if stats.integrity > 0 {
                s.count(PageGuardStat::TagsIntegrity);
            }
            if stats.scrubbed > 0 {
                s.count(PageGuardStat::PlaceholderRemoved);
            }
            if stats.oversized_tags > 0 {
                s.count(PageGuardStat::OversizedTag);
            }
            if stats.nonce_refused > 0 {
                // A marked tag with a `<` in it or duplicate attributes: what markup injected
                // in front of it looks like. No nonce, the placeholder removed.
                s.count(PageGuardStat::TagsNonceRefused);
                let path = self.path.split('?').next().unwrap_or("");
                host::log_denial(
                    NAME,
                    &format!(
                        "refused the nonce to {} marked tag(s) on {path}: `<` or duplicate \
                         attributes in the tag (injected markup?)",
                        stats.nonce_refused
                    ),
                );
            }
        }
        out
    }

    /// Blank the placeholder in `data` (a chunk of a body that is not HTML); `None`: the chunk
    /// can pass as it is.
    fn blank(&mut self, data: &[u8], end: bool) -> Option<Vec<u8>> {
        let placeholder = &self.shared.config.placeholder;
        let blanker = self.blanker.get_or_insert_with(Blanker::new);
        let mut out = Vec::new();
        let mut changed = blanker.feed(placeholder, data, &mut out);
        if end {
            let before = out.len();
            blanker.finish(placeholder, &mut out);
            changed |= out.len() != before;
            if blanker.blanked() > 0 {
                self.shared.count(PageGuardStat::PlaceholderRemoved);
            }
        }
        changed.then_some(out)
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
                    self.answer_report(facts, b"");
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
                if identity {
                    facts.set_header("accept-encoding", Some("identity"));
                }
                if strip_range {
                    // The whole body, never a part that cuts the placeholder (`request-range`:
                    // the pre-HTTP/1.1 spelling that Apache httpd still honours).
                    for name in ["range", "request-range", "if-range"] {
                        facts.set_header(name, None);
                    }
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
        if !matches!(self.mode, Mode::Report) {
            return Flow::Next;
        }
        let max = self
            .shared
            .config
            .reports
            .as_ref()
            .map_or(0, |r| r.max_body_bytes);
        if size > max {
            // Too large to be a browser's report: answer without reading it.
            self.shared
                .count(PageGuardStat::ReportInvalid(ReportError::TooLarge));
            host::send_reply(&report_reply());
            return Flow::Stop;
        }
        if end_of_stream {
            let body = host::request_body(size);
            self.answer_report(&mut pass.facts, &body);
        }
        Flow::Stop
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
            self.body = BodyPlan::Untouched;
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
        self.nonce = plan.nonce;
        self.body = plan.body;
        match plan.body {
            // Hold the headers until the whole body is read: Content-Length changes.
            BodyPlan::Buffer if !end_of_stream => Flow::Hold,
            _ => Flow::Next,
        }
    }

    fn response_body(&mut self, _pass: &mut PassState, size: usize, end_of_stream: bool) -> Flow {
        match self.body {
            BodyPlan::Untouched => Flow::Next,
            BodyPlan::Buffer => {
                if end_of_stream {
                    let body = host::response_body(size);
                    let out = self.rewrite(&body, true);
                    host::replace_body(Body::Response, size, &out);
                    host::set_response_header("content-length", Some(&out.len().to_string()));
                    self.body = BodyPlan::Untouched;
                    Flow::Next
                } else if size > self.shared.config.max_body_bytes {
                    // Over the cap: what is buffered goes out rewritten, the rest streams.
                    self.shared.count(PageGuardStat::Outcome(Outcome::OverCap));
                    let body = host::response_body(size);
                    let out = self.rewrite(&body, false);
                    host::replace_body(Body::Response, size, &out);
                    host::set_response_header("content-length", None);
                    self.body = BodyPlan::Stream;
                    Flow::Next
                } else {
                    Flow::Stop
                }
            }
            BodyPlan::Stream => {
                let chunk = host::response_body(size);
                let out = self.rewrite(&chunk, end_of_stream);
                host::replace_body(Body::Response, size, &out);
                if end_of_stream {
                    self.body = BodyPlan::Untouched;
                }
                Flow::Next
            }
            BodyPlan::Blank => {
                let chunk = host::response_body(size);
                if let Some(out) = self.blank(&chunk, end_of_stream) {
                    host::replace_body(Body::Response, size, &out);
                }
                if end_of_stream {
                    self.body = BodyPlan::Untouched;
                }
                Flow::Next
            }
        }
    }

    /// A body that ends with trailers: its last chunk did not say `end_of_stream`, the trailers
    /// do. A buffered body is complete now and is rewritten here, never forwarded as it came.
    fn response_trailers(&mut self, _pass: &mut PassState) -> Flow {
        match self.body {
            BodyPlan::Untouched => {}
            BodyPlan::Buffer => {
                let body = host::response_body(ALL_BUFFERED);
                let out = self.rewrite(&body, true);
                host::replace_body(Body::Response, body.len(), &out);
                host::set_response_header("content-length", Some(&out.len().to_string()));
            }
            BodyPlan::Stream => {
                // The chunks went out as they came; no body can follow trailers. All the
                // rewriter still holds is an unfinished start tag (which a browser drops at the
                // end of a document too) or the start of a placeholder: it is dropped, counted.
                if !self.rewrite(&[], true).is_empty() {
                    self.shared.count(PageGuardStat::TrailersTailDropped);
                }
            }
            BodyPlan::Blank => {
                // All a blanker holds back is the start of a placeholder: dropped, counted.
                if self.blank(&[], true).is_some_and(|out| !out.is_empty()) {
                    self.shared.count(PageGuardStat::TrailersTailDropped);
                }
            }
        }
        self.body = BodyPlan::Untouched;
        Flow::Next
    }
}

/// "Everything buffered" for a body read: proxy-wasm reads at most what there is.
const ALL_BUFFERED: usize = i32::MAX as usize;

//! page-guard: the proxy-wasm shell over `gatehouse_core::page_guard`. See docs/page-guard.md.

use gatehouse_core::page_guard::{
    BodyStep, HeadersStep, LogLimiter, PageGuardConfig, PageRequest, PageStream, ResponseHeaders,
};
use gatehouse_core::pipeline::Flow;
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
        page: PageStream::default(),
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

struct Stream {
    shared: Rc<Shared>,
    page: PageStream,
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

    /// Apply a headers step: count, edit the request's headers (`facts`) or the response's,
    /// refuse (the denial line names `path`) or reply.
    fn apply_headers(&self, step: &HeadersStep, facts: Option<&mut Facts>, path: &str) -> Flow {
        if let Some(stat) = step.stat {
            self.shared.count(stat);
        }
        match facts {
            Some(facts) => facts.apply_edits(&step.edits),
            None => host::apply_edits(false, &step.edits),
        }
        if let Some((reason, refusal, reply)) = &step.refuse {
            host::refuse(NAME, reason, *refusal, false, path, reply);
        }
        if let Some(reply) = &step.reply {
            host::send_reply(reply);
        }
        step.flow
    }

    /// Apply one body step: replace the bytes, fix `content-length`, count, log.
    fn apply_body(&self, step: BodyStep) -> Flow {
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
        let request = PageRequest {
            method: &method,
            path: &path,
            host: &authority,
            route_name: route.as_deref(),
        };
        let step = self.page.request(&s.config, &request, end_of_stream, || {
            facts.header("x-forwarded-proto")
        });
        let flow = self.apply_headers(&step, Some(facts), &path);
        if step.report_now {
            return self.report_body(facts, 0, true);
        }
        flow
    }

    fn request_body(&mut self, pass: &mut PassState, size: usize, end_of_stream: bool) -> Flow {
        if self.page.reporting() {
            return self.report_body(&mut pass.facts, size, end_of_stream);
        }
        Flow::Next
    }

    fn response_headers(&mut self, pass: &mut PassState, end_of_stream: bool) -> Flow {
        if !self.page.guarding() {
            return Flow::Next;
        }
        let s = Rc::clone(&self.shared);
        let header = host::response_header;
        let (status, content_type) = (header(":status"), header("content-type"));
        let (encoding, length) = (header("content-encoding"), header("content-length"));
        let tls = s.config.hsts.is_some()
            && pass
                .facts
                .property(&["connection", "tls_version"])
                .is_some();
        let has_header = |name: &str| header(name).is_some();
        let facts = ResponseHeaders {
            status: status.as_deref(),
            content_type: content_type.as_deref(),
            content_encoding: encoding.as_deref(),
            content_length: length.as_deref(),
            tls,
            has_header: &has_header,
        };
        let step = self
            .page
            .response(&s.config, &facts, end_of_stream, host::random_16);
        self.apply_headers(&step, None, self.page.path())
    }

    fn response_body(&mut self, _pass: &mut PassState, size: usize, end_of_stream: bool) -> Flow {
        let config = &self.shared.config;
        let step = self
            .page
            .response_body(config, size, end_of_stream, || host::response_body(size));
        self.apply_body(step)
    }

    /// A body that ends with trailers: core finishes it.
    fn response_trailers(&mut self, _pass: &mut PassState) -> Flow {
        let config = &self.shared.config;
        let step = self
            .page
            .response_trailers(config, || host::response_body(ALL_BUFFERED));
        self.apply_body(step);
        Flow::Next
    }
}

/// "Everything buffered" for a body read: proxy-wasm reads at most what there is.
const ALL_BUFFERED: usize = i32::MAX as usize;

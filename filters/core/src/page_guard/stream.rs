//! One stream through page-guard: what its request and response headers decide (counted,
//! refused, answered, edited, held) and its body. The shell reads the facts, calls
//! [`PageStream::request`] / [`PageStream::response`] / the body steps, and applies the
//! [`HeadersStep`] / [`BodyStep`] it gets back.

use crate::pipeline::Flow;
use crate::reply::{HeaderEdit, LocalReply, Refusal};
use crate::stats::PageGuardStat;

use super::body::{BodyStep, PageBody};
use super::config::PageGuardConfig;
use super::plan::{
    guard_request_edits, BodyPlan, Outcome, PageRequest, PageResponse, PolicyId, RequestDecision,
};

/// One stream's page-guard state, from its request headers to its last body byte.
#[derive(Default)]
pub struct PageStream {
    mode: Mode,
    path: String,
    head: bool,
    forwarded_proto: Option<String>,
    body: PageBody,
}

#[derive(Default, Clone, Copy)]
enum Mode {
    #[default]
    Off,
    Report,
    Guard(PolicyId),
}

/// The response header facts page-guard reads, as the host gives them.
pub struct ResponseHeaders<'a> {
    pub status: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub content_encoding: Option<&'a str>,
    pub content_length: Option<&'a str>,
    /// The downstream connection is TLS (read only when [`PageGuardConfig::hsts`] is set).
    pub tls: bool,
    /// Does the upstream response have this header (lowercase name)?
    pub has_header: &'a dyn Fn(&str) -> bool,
}

/// What the shell does after a stream's request or response headers, in this order: count
/// `stat`, apply `edits` (to the request's headers after the request's, the response's after
/// the response's), send `refuse` as a refusal (the denial line names its reason and the path)
/// or `reply` as it is, then answer `flow`.
#[derive(Debug, PartialEq, Eq)]
pub struct HeadersStep {
    pub stat: Option<PageGuardStat>,
    pub edits: Vec<HeaderEdit>,
    pub refuse: Option<(&'static str, Refusal, LocalReply)>,
    pub reply: Option<LocalReply>,
    /// The request is the report endpoint and has no body: answer it now (a body of 0 bytes,
    /// ended).
    pub report_now: bool,
    pub flow: Flow,
}

impl HeadersStep {
    fn flow(flow: Flow) -> Self {
        HeadersStep {
            stat: None,
            edits: Vec::new(),
            refuse: None,
            reply: None,
            report_now: false,
            flow,
        }
    }
}

impl PageStream {
    /// The request headers (`end_of_stream`: no body follows). `forwarded_proto` reads
    /// `x-forwarded-proto`, only on a guarded route that trusts it.
    pub fn request(
        &mut self,
        config: &PageGuardConfig,
        req: &PageRequest<'_>,
        end_of_stream: bool,
        forwarded_proto: impl FnOnce() -> Option<String>,
    ) -> HeadersStep {
        match config.on_request(req) {
            RequestDecision::Refuse { reason, reply } => HeadersStep {
                stat: Some(PageGuardStat::Path(reason)),
                refuse: Some((reason.reason(), Refusal::BadRequest, reply)),
                ..HeadersStep::flow(Flow::Stop)
            },
            RequestDecision::Report => {
                self.mode = Mode::Report;
                HeadersStep {
                    report_now: end_of_stream,
                    ..HeadersStep::flow(Flow::Stop)
                }
            }
            RequestDecision::Reply(reply) => HeadersStep {
                stat: Some(PageGuardStat::ReportInvalidMethod),
                reply: Some(reply),
                ..HeadersStep::flow(Flow::Stop)
            },
            RequestDecision::Guard {
                policy,
                identity,
                strip_range,
            } => {
                self.mode = Mode::Guard(policy);
                self.head = req.method.eq_ignore_ascii_case("HEAD");
                self.path = req.path.to_string();
                if config.trust_forwarded_proto {
                    self.forwarded_proto = forwarded_proto();
                }
                let edits = guard_request_edits(identity, strip_range)
                    .into_iter()
                    .map(|(name, value)| match value {
                        Some(v) => HeaderEdit::Set(name.into(), v.into()),
                        None => HeaderEdit::Remove(name.into()),
                    })
                    .collect();
                HeadersStep {
                    edits,
                    ..HeadersStep::flow(Flow::Next)
                }
            }
            RequestDecision::Off => HeadersStep {
                stat: Some(PageGuardStat::Off),
                ..HeadersStep::flow(Flow::Next)
            },
        }
    }

    /// Whether the request is the report endpoint's (its body is a report).
    pub fn reporting(&self) -> bool {
        matches!(self.mode, Mode::Report)
    }

    /// Whether the response is guarded (read its headers and call [`Self::response`]).
    pub fn guarding(&self) -> bool {
        matches!(self.mode, Mode::Guard(_))
    }

    /// The guarded page's `:path`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The response headers of a guarded stream (`end_of_stream`: no body follows). `random`
    /// draws 16 random bytes (`None`: the host has none), twice — the script nonce, then the
    /// style nonce — and only when a placeholder is configured.
    pub fn response(
        &mut self,
        config: &PageGuardConfig,
        resp: &ResponseHeaders<'_>,
        end_of_stream: bool,
        mut random: impl FnMut() -> Option<[u8; 16]>,
    ) -> HeadersStep {
        let Mode::Guard(id) = self.mode else {
            return HeadersStep::flow(Flow::Next);
        };
        let nonce = if config.placeholder.is_empty() {
            None
        } else {
            random().zip(random()).map(|(a, b)| {
                let mut n = [0u8; 32];
                n[..16].copy_from_slice(&a);
                n[16..].copy_from_slice(&b);
                n
            })
        };
        let plan = config.on_response(
            config.policy(id),
            &PageResponse {
                status: resp.status.and_then(|v| v.parse().ok()).unwrap_or(0),
                content_type: resp.content_type,
                content_encoding: resp.content_encoding,
                content_length: resp.content_length.and_then(|v| v.parse().ok()),
                head: self.head,
                tls: resp.tls,
                forwarded_proto: self.forwarded_proto.as_deref(),
                has_header: resp.has_header,
            },
            nonce,
        );
        let stat = Some(PageGuardStat::Outcome(plan.outcome));
        if let (Some(reply), Outcome::Denied(why)) = (&plan.deny, plan.outcome) {
            // A body that may carry the placeholder and cannot be scrubbed: refused.
            self.mode = Mode::Off;
            return HeadersStep {
                stat,
                refuse: Some((why.reason(), Refusal::Unavailable, reply.clone())),
                ..HeadersStep::flow(Flow::Stop)
            };
        }
        self.body = PageBody::new(&plan, &self.path);
        let flow = match plan.body {
            // Hold the headers until the whole body is read: Content-Length changes.
            BodyPlan::Buffer if !end_of_stream => Flow::Hold,
            _ => Flow::Next,
        };
        HeadersStep {
            stat,
            edits: plan.edits,
            ..HeadersStep::flow(flow)
        }
    }

    /// A response body chunk (see [`PageBody::chunk`]).
    pub fn response_body(
        &mut self,
        config: &PageGuardConfig,
        size: usize,
        end: bool,
        read: impl FnOnce() -> Vec<u8>,
    ) -> BodyStep {
        self.body.chunk(config, size, end, read)
    }

    /// Trailers end the response body (see [`PageBody::trailers`]).
    pub fn response_trailers(
        &mut self,
        config: &PageGuardConfig,
        read: impl FnOnce() -> Vec<u8>,
    ) -> BodyStep {
        self.body.trailers(config, read)
    }
}

//! Request and response planning: the report endpoint, the guarded page, the headers and what
//! happens to the body.

use crate::path::PathError;
use crate::reply::{LocalReply, Refusal};
use base64::Engine;

use super::config::{Compressed, PageGuardConfig, Policy, UpstreamHeaders};
use super::html::{Nonces, RewriteParams};

impl PageGuardConfig {
    /// What applies to a request on Envoy route `route`, `:path` `path`, `:authority` `host`:
    /// `None` when a rule turns page-guard off there; a path with dot-segments or hidden
    /// separators is refused first ([`Rules::select`]).
    pub fn select(
        &self,
        route: Option<&str>,
        path: &str,
        host: &str,
    ) -> Result<Option<PolicyId>, PathError> {
        Ok(match self.rules.select(route, path, host)? {
            Some((i, p)) => p.as_ref().map(|_| PolicyId(Some(i))),
            None => Some(PolicyId(None)),
        })
    }

    /// The policy a [`PolicyId`] from [`Self::select`] names.
    pub fn policy(&self, id: PolicyId) -> &Policy {
        id.0.and_then(|i| self.rules.get(i))
            .and_then(Option::as_ref)
            .unwrap_or(&self.policy)
    }

    /// [`Self::select`] and [`Self::policy`] in one.
    pub fn policy_for(
        &self,
        route: Option<&str>,
        path: &str,
        host: &str,
    ) -> Result<Option<&Policy>, PathError> {
        Ok(self.select(route, path, host)?.map(|id| self.policy(id)))
    }

    /// The request side: the report endpoint, a guarded page, or nothing to do. A path with a
    /// dot-segment or a hidden separator is refused (400) before any rule looks at it: it could
    /// match a `disabled` rule here (`/off/../page`) and reach a marked page upstream, which
    /// would then leave unscrubbed.
    pub fn on_request(&self, req: &PageRequest<'_>) -> RequestDecision {
        let selected = match self.select(req.route_name, req.path, req.host) {
            Ok(selected) => selected,
            Err(e) => {
                return RequestDecision::Refuse {
                    reason: e,
                    reply: Refusal::BadRequest.reply(None),
                }
            }
        };
        if let Some(r) = &self.reports {
            let p = req.path.split('?').next().unwrap_or("");
            if p == r.path {
                if !req.method.eq_ignore_ascii_case("POST") {
                    let mut reply = Refusal::MethodNotAllowed.reply(None);
                    reply.headers.push(("allow".into(), "POST".into()));
                    return RequestDecision::Reply(reply);
                }
                return RequestDecision::Report;
            }
        }
        match selected {
            None => RequestDecision::Off,
            Some(policy) => RequestDecision::Guard {
                policy,
                identity: self.compressed == Compressed::RequestIdentity,
                strip_range: !self.placeholder.is_empty(),
            },
        }
    }

    /// The response side: header edits and what to do with the body. `nonce` is 32 fresh
    /// random bytes, the script nonce's 16 then the style nonce's (`None` when the host has no
    /// randomness: marked tags then get no nonce).
    ///
    /// With a placeholder configured, no body on a guarded route leaves with it: HTML is
    /// rewritten, any other type blanked ([`BodyPlan::Blank`]); a body that cannot be scrubbed
    /// (compressed while `compressed` asks for identity, or a 206 part of one: page-guard
    /// removed `Range`, and a part can cut the placeholder where no part shows it whole) is
    /// refused ([`ResponsePlan::deny`]).
    pub fn on_response(
        &self,
        policy: &Policy,
        resp: &PageResponse<'_>,
        nonce: Option<[u8; 32]>,
    ) -> ResponsePlan {
        let mut edits = Vec::new();
        let mut outcome = Outcome::Headers;
        let html = resp.content_type.is_some_and(is_html);
        let has_body = !resp.head
            && !matches!(resp.status, 100..=199 | 204 | 304)
            && resp.content_length != Some(0);
        let compressed = resp
            .content_encoding
            .is_some_and(|e| !e.trim().is_empty() && !e.trim().eq_ignore_ascii_case("identity"));
        let secret = !self.placeholder.is_empty();
        let mut body = BodyPlan::Untouched;
        let mut nonces = None;
        let mut deny = None;
        if has_body && secret && resp.status == 206 {
            deny = Some(ResponseDenial::Partial);
        } else if has_body && secret && compressed && self.compressed == Compressed::RequestIdentity
        {
            deny = Some(ResponseDenial::Compressed);
        } else if html && has_body {
            if compressed {
                outcome = Outcome::SkippedCompressed;
            } else {
                let over = resp.content_length.is_some_and(|l| l > self.max_body_bytes);
                body = if over {
                    outcome = Outcome::OverCap;
                    edits.push(HeaderEdit::Remove("content-length".into()));
                    BodyPlan::Stream
                } else {
                    outcome = Outcome::Rewritten;
                    BodyPlan::Buffer
                };
                if secret {
                    match nonce {
                        Some(n) => {
                            let b64 =
                                |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
                            nonces = Some(NonceText {
                                script: b64(&n[..16]),
                                style: b64(&n[16..]),
                            })
                        }
                        None => outcome = Outcome::NoRandomness,
                    }
                }
            }
        } else if !html {
            outcome = Outcome::NotHtml;
            if has_body && secret && !compressed {
                body = BodyPlan::Blank;
            }
        }
        if let Some(d) = deny {
            return ResponsePlan {
                edits: Vec::new(),
                body: BodyPlan::Untouched,
                nonce: None,
                outcome: Outcome::Denied(d),
                deny: Some(Refusal::Unavailable.reply(None)),
            };
        }

        for name in &self.remove_headers {
            edits.push(HeaderEdit::Remove(name.clone()));
        }
        let mode = self.upstream_headers;
        let mut put = |name: &str, value: String, mergeable: bool| {
            let present = (resp.has_header)(name);
            match (mode, present) {
                (_, false) | (UpstreamHeaders::Replace, true) => {
                    edits.push(HeaderEdit::Set(name.to_string(), value))
                }
                (UpstreamHeaders::Merge, true) if mergeable => {
                    edits.push(HeaderEdit::Add(name.to_string(), value))
                }
                _ => {}
            }
        };
        if let Some(csp) = &policy.csp {
            put(
                csp.header,
                csp.value(nonces.as_ref().map(NonceText::as_nonces)),
                true,
            );
        }
        for (name, value) in &policy.headers {
            let mergeable = name == "permissions-policy" || name == "reporting-endpoints";
            put(name, value.clone(), mergeable);
        }
        if let Some(h) = &self.hsts {
            let https =
                crate::origin::is_https(resp.tls, resp.forwarded_proto, self.trust_forwarded_proto);
            if https {
                put("strict-transport-security", h.clone(), false);
            }
        }
        ResponsePlan {
            edits,
            body,
            nonce: nonces,
            outcome,
            deny: None,
        }
    }

    /// The rewriting settings for one response.
    pub fn rewrite_params<'a>(
        &'a self,
        nonce: Option<&'a NonceText>,
        page_path: &'a str,
    ) -> RewriteParams<'a> {
        RewriteParams {
            placeholder: &self.placeholder,
            nonce: nonce.map(NonceText::as_nonces),
            sri: self.sri.as_ref(),
            page_path,
        }
    }
}

/// The request header changes of a [`RequestDecision::Guard`]: `identity` asks the upstream
/// for an uncompressed body; `strip_range` removes the range headers, so the whole body comes,
/// never a part that cuts the placeholder (`request-range`: the pre-HTTP/1.1 spelling that
/// Apache httpd still honours). `None`: remove the header.
pub fn guard_request_edits(
    identity: bool,
    strip_range: bool,
) -> Vec<(&'static str, Option<&'static str>)> {
    let mut edits = Vec::new();
    if identity {
        edits.push(("accept-encoding", Some("identity")));
    }
    if strip_range {
        edits.extend(["range", "request-range", "if-range"].map(|name| (name, None)));
    }
    edits
}

/// Is this `Content-Type` HTML (`text/html`, any parameters)?
pub fn is_html(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/html"))
}

/// Which policy applies to a request: the global one (`None`) or a rule's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyId(Option<usize>);

/// The request facts page-guard needs.
pub struct PageRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub host: &'a str,
    pub route_name: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestDecision {
    /// The CSP report endpoint: read the body, then [`parse_reports`].
    Report,
    /// A local reply (the report endpoint asked with another method than POST).
    Reply(LocalReply),
    /// A guarded route with its policy; `identity`: ask the upstream for an uncompressed body;
    /// `strip_range`: remove `range`, `request-range` and `if-range` from the request (a placeholder is
    /// configured: a partial reply could cut it where no scrubber sees it whole), so the
    /// upstream answers with the whole body.
    Guard {
        policy: PolicyId,
        identity: bool,
        strip_range: bool,
    },
    /// Refused before any rule matched (a path with a dot-segment or a hidden separator):
    /// count `denied.<reason>`, send `reply`.
    Refuse {
        reason: PathError,
        reply: LocalReply,
    },
    /// page-guard is off on this route.
    Off,
}

/// The response facts page-guard needs.
pub struct PageResponse<'a> {
    pub status: u32,
    pub content_type: Option<&'a str>,
    pub content_encoding: Option<&'a str>,
    pub content_length: Option<usize>,
    /// The request was `HEAD`.
    pub head: bool,
    /// The downstream connection is TLS.
    pub tls: bool,
    pub forwarded_proto: Option<&'a str>,
    /// Does the upstream response have this header (lowercase name)?
    pub has_header: &'a dyn Fn(&str) -> bool,
}

use crate::reply::HeaderEdit;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum BodyPlan {
    #[default]
    Untouched,
    /// Buffer the body up to `max_body_bytes`, rewrite it, fix `Content-Length`; past the cap
    /// switch to [`BodyPlan::Stream`] for the rest.
    Buffer,
    /// Rewrite chunk by chunk (`Content-Length` removed).
    Stream,
    /// Not HTML: blank every placeholder chunk by chunk ([`Blanker`]); the length stays, and so
    /// does `Content-Length`.
    Blank,
}

/// Why a response on a guarded route was refused: its body may carry the placeholder and
/// cannot be scrubbed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseDenial {
    /// Compressed (any `content-encoding` but `identity`) although page-guard asked for
    /// `identity` (`compressed: "request_identity"`).
    Compressed,
    /// A 206 Partial Content: page-guard removed `Range` and `If-Range`, so something between
    /// it and the upstream answers ranges on its own.
    Partial,
}

impl ResponseDenial {
    pub fn reason(self) -> &'static str {
        match self {
            ResponseDenial::Compressed => "compressed",
            ResponseDenial::Partial => "partial",
        }
    }
}

/// A response's nonces, base64.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonceText {
    pub script: String,
    pub style: String,
}

impl NonceText {
    pub fn as_nonces(&self) -> Nonces<'_> {
        Nonces {
            script: &self.script,
            style: &self.style,
        }
    }
}

/// The outcome of a response, counted as `gatehouse.page_guard.<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// HTML buffered and rewritten.
    Rewritten,
    /// HTML over `max_body_bytes`: rewritten as a stream, `Content-Length` dropped.
    OverCap,
    /// Compressed HTML: headers only, body untouched.
    SkippedCompressed,
    /// HTML rewritten without a nonce: the host gave no randomness.
    NoRandomness,
    /// Not HTML: headers only.
    NotHtml,
    /// HTML without a body (HEAD, 204, 304): headers only.
    Headers,
    /// Refused: the body cannot be scrubbed of the placeholder.
    Denied(ResponseDenial),
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Rewritten => "rewritten",
            Outcome::OverCap => "over_cap",
            Outcome::SkippedCompressed => "skipped.compressed",
            Outcome::NoRandomness => "no_randomness",
            Outcome::NotHtml => "not_html",
            Outcome::Headers => "headers_only",
            Outcome::Denied(ResponseDenial::Compressed) => "denied.compressed",
            Outcome::Denied(ResponseDenial::Partial) => "denied.partial",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponsePlan {
    pub edits: Vec<HeaderEdit>,
    pub body: BodyPlan,
    /// This response's nonces, when the body is rewritten with them.
    pub nonce: Option<NonceText>,
    pub outcome: Outcome,
    /// Refused: send this reply instead of the response (503, as for any dependency that
    /// cannot be trusted right now), count `outcome`, and apply nothing else.
    pub deny: Option<LocalReply>,
}

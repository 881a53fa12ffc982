//! page-guard: the security headers of the pages that host a phone. A structured CSP compiled
//! at load, a fresh nonce per HTML response written into the tags the upstream marked with a
//! deployment-secret placeholder, SRI `integrity` from a manifest plus `Integrity-Policy`,
//! `Permissions-Policy` and the other response headers, and a local CSP report endpoint.
//!
//! The shell reads the request and response facts, gives them to the stream's [`PageStream`]
//! (which decides through [`PageGuardConfig::on_request`], [`PageGuardConfig::on_response`] and
//! [`PageBody`]), applies the [`HeadersStep`] / [`BodyStep`] it answers, and answers reports
//! with [`PageGuardConfig::on_report_body`]. See docs/page-guard.md.

mod body;
mod config;
mod csp;
pub mod html;
mod plan;
mod reports;
mod sri;
mod stream;
#[cfg(test)]
mod tests;

pub use body::{BodyStep, PageBody};
pub use config::{
    Compressed, IntegrityMode, PageGuardConfig, Policy, Reports, UpstreamHeaders,
    MIN_PLACEHOLDER_LEN,
};
pub use csp::CspTemplate;
pub use html::{Blanker, Nonces, RewriteParams, RewriteStats, Rewriter};
pub use plan::{
    guard_request_edits, is_html, BodyPlan, NonceText, Outcome, PageRequest, PageResponse,
    PolicyId, RequestDecision, ResponseDenial, ResponsePlan,
};
pub use reports::{
    parse_reports, report_reply, ReportAnswer, ReportDirective, ReportError, Violation,
};
pub use sri::SriManifest;
pub use stream::{HeadersStep, PageStream, ResponseHeaders};

pub use crate::log_limit::LogLimiter;
pub use crate::reply::HeaderEdit;

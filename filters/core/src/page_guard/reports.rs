//! CSP reports: parsed, normalised for a stat, answered locally.

use crate::log_limit::LogLimiter;
use crate::reply::LocalReply;
use crate::stats::PageGuardStat;
use serde_json::Value;

use super::config::PageGuardConfig;
use super::csp::DIRECTIVES;

/// One violation from a report body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The directive, normalized for a stat name: a known directive, `integrity`, or `other`.
    pub directive: ReportDirective,
    pub blocked: String,
    pub document: String,
    pub disposition: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportError {
    /// Not `application/csp-report` / `application/reports+json`.
    ContentType,
    TooLarge,
    /// Not the JSON a browser sends.
    Malformed,
}

impl ReportError {
    pub fn reason(self) -> &'static str {
        match self {
            ReportError::ContentType => "content_type",
            ReportError::TooLarge => "too_large",
            ReportError::Malformed => "malformed",
        }
    }
}

/// What a violation report is about, as counted (`report.<name>`): a CSP directive page-guard
/// knows, `integrity` (an SRI violation) or `other`. Only the report parser makes one, so the
/// stat names stay a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportDirective(&'static str);

impl ReportDirective {
    const INTEGRITY: Self = Self("integrity");
    const OTHER: Self = Self("other");

    pub fn name(self) -> &'static str {
        self.0
    }

    /// Every value a report can be counted under.
    pub fn all() -> impl Iterator<Item = Self> {
        DIRECTIVES
            .iter()
            .map(|d| Self(d))
            .chain([Self::INTEGRITY, Self::OTHER])
    }
}

impl PartialEq<&str> for ReportDirective {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

fn directive_name(raw: &str) -> ReportDirective {
    let first = raw
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    DIRECTIVES
        .iter()
        .find(|d| **d == first)
        .map_or(ReportDirective::OTHER, |d| ReportDirective(d))
}

fn text(v: &Value, keys: &[&str]) -> String {
    for k in keys {
        if let Some(s) = v.get(*k).and_then(Value::as_str) {
            return s.chars().take(200).collect();
        }
    }
    String::new()
}

/// Parse a report body (`application/csp-report`, the CSP2 `report-uri` format, or
/// `application/reports+json`, the Reporting API's list).
pub fn parse_reports(
    content_type: Option<&str>,
    body: &[u8],
    max_bytes: usize,
) -> Result<Vec<Violation>, ReportError> {
    if body.len() > max_bytes {
        return Err(ReportError::TooLarge);
    }
    let ct = content_type
        .and_then(|c| c.split(';').next())
        .map(|c| c.trim().to_ascii_lowercase())
        .unwrap_or_default();
    if ct != "application/csp-report" && ct != "application/reports+json" {
        return Err(ReportError::ContentType);
    }
    let v: Value = serde_json::from_slice(body).map_err(|_| ReportError::Malformed)?;
    match ct.as_str() {
        "application/csp-report" => {
            let r = v.get("csp-report").ok_or(ReportError::Malformed)?;
            Ok(vec![Violation {
                directive: directive_name(&text(r, &["effective-directive", "violated-directive"])),
                blocked: text(r, &["blocked-uri"]),
                document: text(r, &["document-uri"]),
                disposition: text(r, &["disposition"]),
            }])
        }
        "application/reports+json" => {
            let list = v.as_array().ok_or(ReportError::Malformed)?;
            let mut out = Vec::new();
            for r in list {
                let body = r.get("body").ok_or(ReportError::Malformed)?;
                let kind = r.get("type").and_then(Value::as_str).unwrap_or("");
                let directive = if kind == "csp-violation" {
                    directive_name(&text(body, &["effectiveDirective", "violatedDirective"]))
                } else if kind.starts_with("integrity") {
                    ReportDirective::INTEGRITY
                } else {
                    ReportDirective::OTHER
                };
                out.push(Violation {
                    directive,
                    blocked: text(body, &["blockedURL", "blockedURI"]),
                    document: text(body, &["documentURL", "documentURI"]),
                    disposition: text(body, &["disposition"]),
                });
            }
            Ok(out)
        }
        _ => Err(ReportError::ContentType),
    }
}

/// The reply to a report: always 204, whatever was in it (browsers do not retry on errors
/// anyway, and the endpoint tells a prober nothing).
pub fn report_reply() -> LocalReply {
    LocalReply {
        status: 204,
        headers: vec![("cache-control".into(), "no-store".into())],
        body: Vec::new(),
    }
}

/// What answering one report does: count `stats`, log `lines` (warnings), send `reply`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportAnswer {
    pub stats: Vec<PageGuardStat>,
    pub lines: Vec<String>,
    pub reply: LocalReply,
}

impl PageGuardConfig {
    /// The body of a report request, `size` bytes buffered so far (`end`: all of it): the
    /// answer once it is complete or too large to be a browser's report (`read` reads it,
    /// only when it is complete), `None` to keep reading. Report lines are limited to
    /// `reports.log_per_minute` by `log` at `now`; the stats stay exact.
    pub fn on_report_body(
        &self,
        content_type: Option<&str>,
        size: usize,
        end: bool,
        read: impl FnOnce() -> Vec<u8>,
        now: u64,
        log: &mut LogLimiter,
    ) -> Option<ReportAnswer> {
        let mut answer = ReportAnswer {
            stats: Vec::new(),
            lines: Vec::new(),
            reply: report_reply(),
        };
        let Some(reports) = &self.reports else {
            return Some(answer);
        };
        if size > reports.max_body_bytes {
            // Too large to be a browser's report: answered without reading it.
            answer
                .stats
                .push(PageGuardStat::ReportInvalid(ReportError::TooLarge));
            return Some(answer);
        }
        if !end {
            return None;
        }
        match parse_reports(content_type, &read(), reports.max_body_bytes) {
            Ok(violations) => {
                for v in &violations {
                    answer.stats.push(PageGuardStat::Report(v.directive));
                    if let Some(suppressed) = log.allow(now, reports.log_per_minute) {
                        let more = if suppressed > 0 {
                            format!(" ({suppressed} earlier report lines suppressed)")
                        } else {
                            String::new()
                        };
                        answer.lines.push(format!(
                            "violation of {} ({}): blocked {:?} on {:?}{more}",
                            v.directive.name(),
                            v.disposition,
                            v.blocked,
                            v.document
                        ));
                    }
                }
            }
            Err(e) => answer.stats.push(PageGuardStat::ReportInvalid(e)),
        }
        Some(answer)
    }
}

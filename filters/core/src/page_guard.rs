//! page-guard: the security headers of the pages that host a phone. A structured CSP compiled
//! at load, a fresh nonce per HTML response written into the tags the upstream marked with a
//! deployment-secret placeholder, SRI `integrity` from a manifest plus `Integrity-Policy`,
//! `Permissions-Policy` and the other response headers, and a local CSP report endpoint.
//!
//! The shell reads the request and response facts, calls [`PageGuardConfig::on_request`] and
//! [`PageGuardConfig::on_response`], applies the [`ResponsePlan`] and runs the body through
//! [`html::Rewriter`]. See docs/page-guard.md.

pub mod html;
#[cfg(test)]
mod tests;

use crate::config::{parse_json, ConfigError, EnvLookup};
use crate::path::PathError;
use crate::reply::{LocalReply, Refusal};
use crate::rules::{RawMatch, Rules};
use base64::Engine;
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};

pub use html::{Blanker, Nonces, RewriteParams, RewriteStats, Rewriter};

/// CSP directives page-guard knows; any other name is a config error (a typo would silently
/// drop a restriction).
const DIRECTIVES: &[&str] = &[
    "default-src",
    "script-src",
    "script-src-elem",
    "script-src-attr",
    "style-src",
    "style-src-elem",
    "style-src-attr",
    "img-src",
    "font-src",
    "connect-src",
    "media-src",
    "object-src",
    "frame-src",
    "child-src",
    "worker-src",
    "manifest-src",
    "fenced-frame-src",
    "base-uri",
    "form-action",
    "frame-ancestors",
    "sandbox",
    "upgrade-insecure-requests",
    "block-all-mixed-content",
    "require-trusted-types-for",
    "trusted-types",
    "webrtc",
    "report-uri",
    "report-to",
];

/// CSP keywords, which must be written quoted (`'self'`): unquoted, `self` is a host name.
const KEYWORDS: &[&str] = &[
    "self",
    "none",
    "unsafe-inline",
    "unsafe-eval",
    "strict-dynamic",
    "unsafe-hashes",
    "report-sample",
    "wasm-unsafe-eval",
    "inline-speculation-rules",
    "unsafe-allow-redirects",
];

const REFERRER_POLICIES: &[&str] = &[
    "no-referrer",
    "no-referrer-when-downgrade",
    "origin",
    "origin-when-cross-origin",
    "same-origin",
    "strict-origin",
    "strict-origin-when-cross-origin",
    "unsafe-url",
];

const COOP_VALUES: &[&str] = &[
    "same-origin",
    "same-origin-allow-popups",
    "noopener-allow-popups",
    "unsafe-none",
];

/// The shortest placeholder accepted: it is a secret, and it must not occur by chance.
pub const MIN_PLACEHOLDER_LEN: usize = 16;

// ---------------------------------------------------------------------------------------------
// Raw config.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    csp: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    csp_report_only: bool,
    nonce: Option<RawNonce>,
    sri: Option<RawSri>,
    #[serde(default)]
    permissions_policy: BTreeMap<String, Vec<String>>,
    #[serde(default = "default_referrer")]
    referrer_policy: Option<String>,
    #[serde(default = "default_true")]
    content_type_nosniff: bool,
    #[serde(default = "default_coop")]
    cross_origin_opener_policy: Option<String>,
    #[serde(default = "default_hsts")]
    hsts: Option<RawHsts>,
    #[serde(default)]
    trust_forwarded_proto: bool,
    #[serde(default)]
    reporting_endpoints: BTreeMap<String, String>,
    reports: Option<RawReports>,
    #[serde(default)]
    remove_headers: Vec<String>,
    #[serde(default)]
    upstream_headers: UpstreamHeaders,
    #[serde(default = "default_max_body")]
    max_body_bytes: usize,
    #[serde(default)]
    compressed: Compressed,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNonce {
    placeholder: Option<String>,
    placeholder_env: Option<String>,
    #[serde(default = "default_nonce_directives")]
    directives: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSri {
    manifest: BTreeMap<String, String>,
    #[serde(default)]
    integrity_policy: IntegrityMode,
    #[serde(default)]
    hashes_in_script_src: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHsts {
    #[serde(default = "default_hsts_age")]
    max_age_seconds: u64,
    #[serde(default)]
    include_subdomains: bool,
    #[serde(default)]
    preload: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReports {
    path: String,
    #[serde(default = "default_endpoint")]
    endpoint: Option<String>,
    #[serde(default = "default_log_per_minute")]
    log_per_minute: u32,
    #[serde(default = "default_report_bytes")]
    max_body_bytes: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(rename = "match")]
    matcher: RawMatch,
    #[serde(default)]
    disabled: bool,
    csp: Option<BTreeMap<String, Vec<String>>>,
    csp_report_only: Option<bool>,
    permissions_policy: Option<BTreeMap<String, Vec<String>>>,
}

/// What to do with an upstream header of a name page-guard sets.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamHeaders {
    /// page-guard's value replaces the upstream's.
    #[default]
    Replace,
    /// The upstream's value stays; page-guard sets only the headers the upstream did not.
    Keep,
    /// Both apply: a second `Content-Security-Policy` (browsers enforce both),
    /// `Permissions-Policy` and `Reporting-Endpoints` added as further lines; for the
    /// single-valued headers the upstream's value stays.
    Merge,
}

/// Compressed HTML cannot be rewritten.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Compressed {
    /// Ask the upstream for `accept-encoding: identity` on guarded routes (and still skip any
    /// compressed body it sends anyway).
    #[default]
    RequestIdentity,
    /// Leave `accept-encoding` alone; compressed HTML gets the headers only.
    Skip,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum IntegrityMode {
    /// `Integrity-Policy: blocked-destinations=(script)`.
    #[default]
    Enforce,
    /// `Integrity-Policy-Report-Only`.
    ReportOnly,
    /// No Integrity-Policy header (the `integrity` attributes are still written).
    Off,
}

fn default_true() -> bool {
    true
}
fn default_referrer() -> Option<String> {
    Some("strict-origin-when-cross-origin".into())
}
fn default_coop() -> Option<String> {
    Some("same-origin".into())
}
fn default_hsts() -> Option<RawHsts> {
    Some(RawHsts {
        max_age_seconds: default_hsts_age(),
        include_subdomains: false,
        preload: false,
    })
}
fn default_hsts_age() -> u64 {
    31_536_000
}
fn default_max_body() -> usize {
    1024 * 1024
}
fn default_nonce_directives() -> Vec<String> {
    vec!["script-src".into(), "style-src".into()]
}
fn default_endpoint() -> Option<String> {
    Some("gatehouse-csp".into())
}
fn default_log_per_minute() -> u32 {
    10
}
fn default_report_bytes() -> usize {
    64 * 1024
}

// ---------------------------------------------------------------------------------------------
// Compiled config.

/// SRI hashes by URL: `/path` for the page's own origin, `https://host/path` for others.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SriManifest {
    entries: HashMap<String, String>,
}

impl SriManifest {
    /// The manifest as written (`path → sha384-…`); errors name the entry.
    pub fn compile(raw: BTreeMap<String, String>, at: &str) -> Result<Self, ConfigError> {
        let mut entries = HashMap::new();
        for (url, hash) in raw {
            let here = format!("{at}.{url}");
            if !(url.starts_with('/') && !url.starts_with("//")
                || url.starts_with("https://")
                || url.starts_with("http://"))
            {
                return Err(ConfigError::new(
                    here,
                    "a manifest URL is a path starting with `/` or an absolute http(s) URL",
                ));
            }
            if !valid_sri_hash(&hash) {
                return Err(ConfigError::new(
                    here,
                    "must be `sha256-`, `sha384-` or `sha512-` followed by the base64 digest",
                ));
            }
            entries.insert(url, hash);
        }
        Ok(Self { entries })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The hash for a `src`/`href` as written in a page at `page_path`.
    pub fn lookup(&self, url: &str, page_path: &str) -> Option<&str> {
        let url = url
            .trim_matches(|c: char| c.is_ascii_whitespace())
            .replace("&amp;", "&");
        let resolved = if let Some(rest) = url.strip_prefix("//") {
            format!("https://{rest}")
        } else if url.contains("://") || url.starts_with('/') {
            url
        } else if url.contains(':') && !url.contains('/') || url.starts_with("data:") {
            return None;
        } else {
            resolve_relative(page_path, &url)
        };
        if let Some(h) = self.entries.get(&resolved) {
            return Some(h);
        }
        let bare = resolved.split(['?', '#']).next().unwrap_or("");
        if bare != resolved {
            return self.entries.get(bare).map(String::as_str);
        }
        None
    }

    /// `'sha384-…'` sources of the scripts (`.js`, `.mjs`) in the manifest, sorted.
    fn script_hash_sources(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .entries
            .iter()
            .filter(|(u, _)| u.ends_with(".js") || u.ends_with(".mjs"))
            .map(|(_, h)| format!("'{h}'"))
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

fn valid_sri_hash(h: &str) -> bool {
    let (alg, b64) = match h.split_once('-') {
        Some(x) => x,
        None => return false,
    };
    let len = match alg {
        "sha256" => 32,
        "sha384" => 48,
        "sha512" => 64,
        _ => return false,
    };
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .is_ok_and(|d| d.len() == len)
}

/// `rel` relative to the directory of `page` (`/a/b.html` + `c.js` → `/a/c.js`), with `.` and
/// `..` segments resolved.
fn resolve_relative(page: &str, rel: &str) -> String {
    let page = page.split(['?', '#']).next().unwrap_or("/");
    let dir = &page[..page.rfind('/').map_or(0, |i| i + 1)];
    let (rel_path, tail) = match rel.find(['?', '#']) {
        Some(i) => (&rel[..i], &rel[i..]),
        None => (rel, ""),
    };
    let mut segs: Vec<&str> = dir.split('/').filter(|s| !s.is_empty()).collect();
    let parts: Vec<&str> = rel_path.split('/').collect();
    for (i, s) in parts.iter().enumerate() {
        match *s {
            "." => {}
            ".." => {
                segs.pop();
            }
            s if s.is_empty() && i + 1 < parts.len() => {}
            s => segs.push(s),
        }
    }
    format!("/{}{tail}", segs.join("/"))
}

/// Which nonce a nonce directive gets: `script-src*` the script nonce, `style-src*` the style
/// nonce, any other (`default-src`, the fallback of both) both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Script,
    Style,
    Both,
}

impl Slot {
    fn of(directive: &str) -> Slot {
        if directive.starts_with("script-src") {
            Slot::Script
        } else if directive.starts_with("style-src") {
            Slot::Style
        } else {
            Slot::Both
        }
    }
}

/// A CSP header value with slots for the nonces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CspTemplate {
    pub header: &'static str,
    /// The value is these pieces with ` 'nonce-…'` of `slots[i]` after `pieces[i]`.
    pieces: Vec<String>,
    slots: Vec<Slot>,
}

impl CspTemplate {
    /// The header value, with the nonces in the nonce directives (`None`: without them).
    pub fn value(&self, nonce: Option<Nonces<'_>>) -> String {
        let mut v = String::new();
        for (i, piece) in self.pieces.iter().enumerate() {
            v.push_str(piece);
            if let (Some(n), Some(slot)) = (nonce, self.slots.get(i)) {
                let mut put = |n: &str| {
                    v.push_str(" 'nonce-");
                    v.push_str(n);
                    v.push('\'');
                };
                match slot {
                    Slot::Script => put(n.script),
                    Slot::Style => put(n.style),
                    Slot::Both => {
                        put(n.script);
                        put(n.style);
                    }
                }
            }
        }
        v
    }
}

/// The headers of one route: the global settings or a rule's overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub csp: Option<CspTemplate>,
    /// Headers set on every guarded response (lowercase names), in order.
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reports {
    pub path: String,
    /// The Reporting API endpoint name (`report-to`); `None`: `report-uri` only.
    pub endpoint: Option<String>,
    pub log_per_minute: u32,
    pub max_body_bytes: usize,
}

#[derive(Debug)]
pub struct PageGuardConfig {
    pub policy: Policy,
    /// First match wins; `None`: page-guard is off on that route.
    pub rules: Rules<Option<Policy>>,
    pub placeholder: Vec<u8>,
    /// Where the placeholder came from (`placeholder_env`), for the load log line.
    pub placeholder_env: Option<String>,
    pub sri: Option<SriManifest>,
    /// `Strict-Transport-Security`, sent on https only.
    pub hsts: Option<String>,
    pub trust_forwarded_proto: bool,
    pub reports: Option<Reports>,
    pub remove_headers: Vec<String>,
    pub upstream_headers: UpstreamHeaders,
    pub max_body_bytes: usize,
    pub compressed: Compressed,
}

/// Settings shared by the global policy and the rules' policies while compiling.
struct PolicyInputs<'a> {
    nonce_directives: &'a [String],
    script_hashes: &'a [String],
    reports: Option<&'a Reports>,
    fixed: &'a [(String, String)],
    reporting_endpoints: Option<String>,
}

fn check_value(at: &str, v: &str) -> Result<(), ConfigError> {
    if v.is_empty()
        || v.bytes()
            .any(|b| !(0x21..0x7f).contains(&b) || b == b';' || b == b',')
    {
        return Err(ConfigError::new(
            at,
            "must be printable ASCII without spaces, `;` or `,`",
        ));
    }
    Ok(())
}

fn compile_csp(
    raw: &BTreeMap<String, Vec<String>>,
    report_only: bool,
    inputs: &PolicyInputs<'_>,
    at: &str,
) -> Result<Option<CspTemplate>, ConfigError> {
    if raw.is_empty() {
        return Ok(None);
    }
    let mut directives: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, sources) in raw {
        let here = format!("{at}.{name}");
        if !DIRECTIVES.contains(&name.as_str()) {
            return Err(ConfigError::new(
                here,
                "unknown CSP directive (directive names are lowercase, e.g. `script-src`)",
            ));
        }
        for (i, s) in sources.iter().enumerate() {
            let here = format!("{here}[{i}]");
            check_value(&here, s)?;
            if KEYWORDS.contains(&s.to_ascii_lowercase().as_str()) {
                return Err(ConfigError::new(
                    here,
                    format!("CSP keywords are quoted: write `'{s}'` (unquoted it is a host name)"),
                ));
            }
            if s.to_ascii_lowercase().starts_with("'nonce-") {
                return Err(ConfigError::new(
                    here,
                    "a fixed nonce defeats the point: page-guard adds a fresh one per response \
                     (configure `nonce`)",
                ));
            }
        }
        directives.insert(name.clone(), sources.clone());
    }
    if !inputs.script_hashes.is_empty() {
        let d = directive_or_default(&mut directives, "script-src", at)?;
        d.extend(inputs.script_hashes.iter().cloned());
    }
    let mut nonced: Vec<&str> = Vec::new();
    for d in inputs.nonce_directives {
        directive_or_default(&mut directives, d, at)?;
        nonced.push(d);
    }
    if let Some(r) = inputs.reports {
        directives
            .entry("report-uri".into())
            .or_insert_with(|| vec![r.path.clone()]);
        if let Some(e) = &r.endpoint {
            directives
                .entry("report-to".into())
                .or_insert_with(|| vec![e.clone()]);
        }
    }
    // report-uri and report-to last (after the fetch directives), the rest sorted.
    let mut order: Vec<&String> = directives
        .keys()
        .filter(|k| !k.starts_with("report-"))
        .collect();
    order.extend(directives.keys().filter(|k| k.starts_with("report-")));
    let mut pieces = vec![String::new()];
    let mut slots = Vec::new();
    for (i, name) in order.into_iter().enumerate() {
        let cur = pieces
            .last_mut()
            .ok_or_else(|| ConfigError::new(at, "empty"))?;
        if i > 0 {
            cur.push_str("; ");
        }
        cur.push_str(name);
        for s in &directives[name] {
            cur.push(' ');
            cur.push_str(s);
        }
        if nonced.contains(&name.as_str()) {
            slots.push(Slot::of(name));
            pieces.push(String::new());
        }
    }
    Ok(Some(CspTemplate {
        header: if report_only {
            "content-security-policy-report-only"
        } else {
            "content-security-policy"
        },
        pieces,
        slots,
    }))
}

/// The sources of directive `name`, created from `default-src` when it is not set (which keeps
/// its meaning: a missing fetch directive falls back to `default-src`).
fn directive_or_default<'a>(
    directives: &'a mut BTreeMap<String, Vec<String>>,
    name: &str,
    at: &str,
) -> Result<&'a mut Vec<String>, ConfigError> {
    if !directives.contains_key(name) {
        let default = directives.get("default-src").cloned().ok_or_else(|| {
            ConfigError::new(
                format!("{at}.{name}"),
                "needed for the nonce or the SRI hashes: set it, or `default-src` to derive it from",
            )
        })?;
        // `'none'` cannot be combined with other sources.
        let default = default
            .into_iter()
            .filter(|s| !s.eq_ignore_ascii_case("'none'"))
            .collect();
        directives.insert(name.to_string(), default);
    }
    directives
        .get_mut(name)
        .ok_or_else(|| ConfigError::new(at, "directive vanished"))
}

fn compile_permissions(
    raw: &BTreeMap<String, Vec<String>>,
    at: &str,
) -> Result<Option<String>, ConfigError> {
    if raw.is_empty() {
        return Ok(None);
    }
    let mut parts = Vec::new();
    for (feature, allow) in raw {
        let here = format!("{at}.{feature}");
        if feature.is_empty()
            || !feature
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(ConfigError::new(
                here,
                "a feature name is lowercase letters, digits and `-` (e.g. `microphone`)",
            ));
        }
        let mut items = Vec::new();
        for (i, a) in allow.iter().enumerate() {
            let here = format!("{here}[{i}]");
            match a.as_str() {
                "self" | "'self'" => items.push("self".to_string()),
                "src" | "'src'" => items.push("src".to_string()),
                "*" => items.push("*".to_string()),
                o if (o.starts_with("https://") || o.starts_with("http://"))
                    && !o.contains(['"', ' ', ',', ';', '(', ')']) =>
                {
                    items.push(format!("\"{o}\""))
                }
                _ => {
                    return Err(ConfigError::new(
                        here,
                        "an allowlist item is `self`, `src`, `*` or an origin like `https://example.com`",
                    ))
                }
            }
        }
        if items.iter().any(|i| i == "*") {
            parts.push(format!("{feature}=*"));
        } else {
            parts.push(format!("{feature}=({})", items.join(" ")));
        }
    }
    Ok(Some(parts.join(", ")))
}

fn compile_policy(
    csp: &BTreeMap<String, Vec<String>>,
    csp_report_only: bool,
    permissions: &BTreeMap<String, Vec<String>>,
    inputs: &PolicyInputs<'_>,
    at: &str,
) -> Result<Policy, ConfigError> {
    let prefix = |f: &str| {
        if at.is_empty() {
            f.to_string()
        } else {
            format!("{at}.{f}")
        }
    };
    let csp = compile_csp(csp, csp_report_only, inputs, &prefix("csp"))?;
    let mut headers = Vec::new();
    if let Some(p) = compile_permissions(permissions, &prefix("permissions_policy"))? {
        headers.push(("permissions-policy".to_string(), p));
    }
    headers.extend(inputs.fixed.iter().cloned());
    if let Some(r) = &inputs.reporting_endpoints {
        headers.push(("reporting-endpoints".to_string(), r.clone()));
    }
    Ok(Policy { csp, headers })
}

impl PageGuardConfig {
    /// Compile the JSON config. `env` stands for the VM's environment (`placeholder_env`).
    pub fn compile(bytes: &[u8], env: EnvLookup<'_>) -> Result<Self, ConfigError> {
        let raw: RawConfig = parse_json(bytes)?;

        let (placeholder, placeholder_env, nonce_directives) = match &raw.nonce {
            None => (Vec::new(), None, Vec::new()),
            Some(n) => {
                let value = match (&n.placeholder, &n.placeholder_env) {
                    (Some(p), None) => p.clone(),
                    (None, Some(var)) => env(var).ok_or_else(|| {
                        ConfigError::new(
                            "nonce.placeholder_env",
                            format!(
                                "environment variable {var} is not set (list it in \
                                 vm_config.environment_variables.host_env_keys)"
                            ),
                        )
                    })?,
                    _ => {
                        return Err(ConfigError::new(
                            "nonce",
                            "set exactly one of `placeholder` and `placeholder_env`",
                        ))
                    }
                };
                let at = if n.placeholder.is_some() {
                    "nonce.placeholder"
                } else {
                    "nonce.placeholder_env"
                };
                if value.len() < MIN_PLACEHOLDER_LEN
                    || !value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    return Err(ConfigError::new(
                        at,
                        format!(
                            "the placeholder is a secret of at least {MIN_PLACEHOLDER_LEN} \
                             characters from A-Z a-z 0-9 - _"
                        ),
                    ));
                }
                for (i, d) in n.directives.iter().enumerate() {
                    if !DIRECTIVES.contains(&d.as_str()) || !d.contains("-src") {
                        return Err(ConfigError::new(
                            format!("nonce.directives[{i}]"),
                            "a nonce goes into a `*-src` directive, e.g. `script-src`",
                        ));
                    }
                }
                if raw.csp.is_empty() {
                    return Err(ConfigError::new(
                        "csp",
                        "a nonce needs a CSP: set at least `default-src` or `script-src`",
                    ));
                }
                (
                    value.into_bytes(),
                    n.placeholder_env.clone(),
                    n.directives.clone(),
                )
            }
        };

        let (sri, integrity_mode, script_hashes) = match raw.sri {
            None => (None, IntegrityMode::Off, Vec::new()),
            Some(s) => {
                let m = SriManifest::compile(s.manifest, "sri.manifest")?;
                let hashes = if s.hashes_in_script_src {
                    m.script_hash_sources()
                } else {
                    Vec::new()
                };
                (Some(m), s.integrity_policy, hashes)
            }
        };

        let reports = match raw.reports {
            None => None,
            Some(r) => {
                if !r.path.starts_with('/') || r.path.contains(['?', '#', ' ', ';', ',', '"']) {
                    return Err(ConfigError::new(
                        "reports.path",
                        "a path starting with `/`, without query, spaces, `;`, `,` or `\"`",
                    ));
                }
                if r.endpoint.as_deref().is_some_and(|e| !valid_token(e)) {
                    return Err(ConfigError::new(
                        "reports.endpoint",
                        "an endpoint name is lowercase letters, digits, `-`, `_` (e.g. `csp`)",
                    ));
                }
                Some(Reports {
                    path: r.path,
                    endpoint: r.endpoint,
                    log_per_minute: r.log_per_minute,
                    max_body_bytes: r.max_body_bytes,
                })
            }
        };

        let mut endpoints: Vec<String> = Vec::new();
        for (name, url) in &raw.reporting_endpoints {
            let here = format!("reporting_endpoints.{name}");
            if !valid_token(name) {
                return Err(ConfigError::new(
                    here,
                    "an endpoint name is lowercase letters, digits, `-`, `_`",
                ));
            }
            if url.is_empty() || url.contains(['"', '\\', ' ', ',']) {
                return Err(ConfigError::new(
                    here,
                    "a URL without quotes, spaces or `,`",
                ));
            }
            endpoints.push(format!("{name}=\"{url}\""));
        }
        if let Some((name, path)) = reports
            .as_ref()
            .and_then(|r| Some((r.endpoint.as_ref()?, &r.path)))
        {
            if !raw.reporting_endpoints.contains_key(name) {
                endpoints.push(format!("{name}=\"{path}\""));
            }
        }
        let reporting_endpoints = (!endpoints.is_empty()).then(|| endpoints.join(", "));

        let mut fixed = Vec::new();
        if let Some(r) = &raw.referrer_policy {
            if !REFERRER_POLICIES.contains(&r.as_str()) {
                return Err(ConfigError::new(
                    "referrer_policy",
                    format!("one of {}", REFERRER_POLICIES.join(", ")),
                ));
            }
            fixed.push(("referrer-policy".to_string(), r.clone()));
        }
        if raw.content_type_nosniff {
            fixed.push(("x-content-type-options".to_string(), "nosniff".to_string()));
        }
        if let Some(c) = &raw.cross_origin_opener_policy {
            if !COOP_VALUES.contains(&c.as_str()) {
                return Err(ConfigError::new(
                    "cross_origin_opener_policy",
                    format!("one of {}", COOP_VALUES.join(", ")),
                ));
            }
            fixed.push(("cross-origin-opener-policy".to_string(), c.clone()));
        }
        if sri.is_some() {
            let endpoints = reports
                .as_ref()
                .and_then(|r| r.endpoint.as_ref())
                .map(|e| format!(", endpoints=({e})"))
                .unwrap_or_default();
            let value = format!("blocked-destinations=(script){endpoints}");
            match integrity_mode {
                IntegrityMode::Enforce => fixed.push(("integrity-policy".into(), value)),
                IntegrityMode::ReportOnly => {
                    fixed.push(("integrity-policy-report-only".into(), value))
                }
                IntegrityMode::Off => {}
            }
        }

        let hsts = raw.hsts.map(|h| {
            let mut v = format!("max-age={}", h.max_age_seconds);
            if h.include_subdomains {
                v.push_str("; includeSubDomains");
            }
            if h.preload {
                v.push_str("; preload");
            }
            v
        });

        let mut remove_headers = Vec::new();
        for (i, h) in raw.remove_headers.iter().enumerate() {
            if h.is_empty() || h.starts_with(':') || !h.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ConfigError::new(
                    format!("remove_headers[{i}]"),
                    "a header name, e.g. `x-powered-by`",
                ));
            }
            remove_headers.push(h.to_ascii_lowercase());
        }
        if raw.max_body_bytes == 0 {
            return Err(ConfigError::new("max_body_bytes", "must be more than 0"));
        }

        let inputs = PolicyInputs {
            nonce_directives: &nonce_directives,
            script_hashes: &script_hashes,
            reports: reports.as_ref(),
            fixed: &fixed,
            reporting_endpoints,
        };
        let policy = compile_policy(
            &raw.csp,
            raw.csp_report_only,
            &raw.permissions_policy,
            &inputs,
            "",
        )?;
        let mut rules = Vec::new();
        for (i, r) in raw.rules.into_iter().enumerate() {
            let at = format!("rules[{i}]");
            let matcher = r.matcher.compile(&at)?;
            if r.disabled {
                if r.csp.is_some() || r.csp_report_only.is_some() || r.permissions_policy.is_some()
                {
                    return Err(ConfigError::new(
                        at,
                        "a `disabled` rule has no other settings",
                    ));
                }
                rules.push((matcher, None));
                continue;
            }
            let csp = r.csp.as_ref().unwrap_or(&raw.csp);
            if !nonce_directives.is_empty() && csp.is_empty() {
                return Err(ConfigError::new(
                    format!("{at}.csp"),
                    "a nonce needs a CSP: set at least `default-src` or `script-src`",
                ));
            }
            let policy = compile_policy(
                csp,
                r.csp_report_only.unwrap_or(raw.csp_report_only),
                r.permissions_policy
                    .as_ref()
                    .unwrap_or(&raw.permissions_policy),
                &inputs,
                &at,
            )?;
            rules.push((matcher, Some(policy)));
        }

        Ok(Self {
            policy,
            rules: Rules::new(rules),
            placeholder,
            placeholder_env,
            sri,
            hsts,
            trust_forwarded_proto: raw.trust_forwarded_proto,
            reports,
            remove_headers,
            upstream_headers: raw.upstream_headers,
            max_body_bytes: raw.max_body_bytes,
            compressed: raw.compressed,
        })
    }

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

fn valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && s.as_bytes()[0].is_ascii_lowercase()
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

pub use crate::reply::HeaderEdit;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyPlan {
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

// ---------------------------------------------------------------------------------------------
// CSP reports.

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

pub use crate::log_limit::LogLimiter;

//! page-guard's config: the raw JSON (unknown fields refused) and its compiled form.

use crate::config::{parse_json, ConfigError, EnvLookup};
use crate::rules::{RawMatch, Rules};
use serde::Deserialize;
use std::collections::BTreeMap;

use super::csp::{
    compile_policy, CspTemplate, PolicyInputs, COOP_VALUES, DIRECTIVES, REFERRER_POLICIES,
};
use super::sri::SriManifest;

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

impl PageGuardConfig {
    /// Compile the JSON config. `env` stands for the VM's environment (`placeholder_env`).
    /// One line saying what this configures, logged at load.
    pub fn summary(&self) -> String {
        format!(
            "configured: csp {}, nonce {}, sri manifest {} entries, {} rule(s), body cap {} bytes",
            if self.policy.csp.is_some() {
                "on"
            } else {
                "off"
            },
            match (&self.placeholder_env, self.placeholder.is_empty()) {
                (_, true) => "off".to_string(),
                (Some(var), false) => format!("placeholder from {var}"),
                (None, false) => "placeholder inline".to_string(),
            },
            self.sri.as_ref().map_or(0, |s| s.len()),
            self.rules.len(),
            self.max_body_bytes,
        )
    }

    pub fn compile(bytes: &[u8], env: EnvLookup<'_>) -> Result<Self, ConfigError> {
        let mut raw: RawConfig = parse_json(bytes)?;
        let nonce = compile_nonce(&raw, env)?;
        let (sri, integrity_mode, script_hashes) = match raw.sri.take() {
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

        let reports = compile_reports(raw.reports.take())?;
        let reporting_endpoints = reporting_endpoints(&raw.reporting_endpoints, reports.as_ref())?;
        let fixed = fixed_headers(&raw, sri.is_some(), integrity_mode, reports.as_ref())?;
        let hsts = compile_hsts(raw.hsts.take());
        let remove_headers = compile_remove_headers(&raw.remove_headers)?;
        if raw.max_body_bytes == 0 {
            return Err(ConfigError::new("max_body_bytes", "must be more than 0"));
        }

        let inputs = PolicyInputs {
            nonce_directives: &nonce.directives,
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
        let rules = compile_rules(&mut raw, &nonce.directives, &inputs)?;

        Ok(Self {
            policy,
            rules: Rules::new(rules),
            placeholder: nonce.placeholder,
            placeholder_env: nonce.placeholder_env,
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
}

/// The nonce settings: the placeholder secret (from the config or the VM's environment) and the
/// directives the nonces go into.
#[derive(Default)]
struct NonceSettings {
    placeholder: Vec<u8>,
    placeholder_env: Option<String>,
    directives: Vec<String>,
}

fn compile_nonce(raw: &RawConfig, env: EnvLookup<'_>) -> Result<NonceSettings, ConfigError> {
    match &raw.nonce {
        None => Ok(NonceSettings::default()),
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
            Ok(NonceSettings {
                placeholder: value.into_bytes(),
                placeholder_env: n.placeholder_env.clone(),
                directives: n.directives.clone(),
            })
        }
    }
}

/// The reports endpoint (`reports`).
fn compile_reports(raw: Option<RawReports>) -> Result<Option<Reports>, ConfigError> {
    let reports = match raw {
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

    Ok(reports)
}

/// The `Reporting-Endpoints` value: the configured endpoints plus the local report path.
fn reporting_endpoints(
    raw: &BTreeMap<String, String>,
    reports: Option<&Reports>,
) -> Result<Option<String>, ConfigError> {
    let mut endpoints: Vec<String> = Vec::new();
    for (name, url) in raw {
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
    if let Some((name, path)) = reports.and_then(|r| Some((r.endpoint.as_ref()?, &r.path))) {
        if !raw.contains_key(name) {
            endpoints.push(format!("{name}=\"{path}\""));
        }
    }
    Ok((!endpoints.is_empty()).then(|| endpoints.join(", ")))
}

/// The headers every policy sends as configured: Referrer-Policy, nosniff, COOP,
/// Integrity-Policy.
fn fixed_headers(
    raw: &RawConfig,
    has_sri: bool,
    integrity_mode: IntegrityMode,
    reports: Option<&Reports>,
) -> Result<Vec<(String, String)>, ConfigError> {
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
    if has_sri {
        let endpoints = reports
            .and_then(|r| r.endpoint.as_ref())
            .map(|e| format!(", endpoints=({e})"))
            .unwrap_or_default();
        let value = format!("blocked-destinations=(script){endpoints}");
        match integrity_mode {
            IntegrityMode::Enforce => fixed.push(("integrity-policy".into(), value)),
            IntegrityMode::ReportOnly => fixed.push(("integrity-policy-report-only".into(), value)),
            IntegrityMode::Off => {}
        }
    }

    Ok(fixed)
}

fn compile_hsts(raw: Option<RawHsts>) -> Option<String> {
    raw.map(|h| {
        let mut v = format!("max-age={}", h.max_age_seconds);
        if h.include_subdomains {
            v.push_str("; includeSubDomains");
        }
        if h.preload {
            v.push_str("; preload");
        }
        v
    })
}

fn compile_remove_headers(raw: &[String]) -> Result<Vec<String>, ConfigError> {
    let mut remove_headers = Vec::new();
    for (i, h) in raw.iter().enumerate() {
        if h.is_empty() || h.starts_with(':') || !h.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::new(
                format!("remove_headers[{i}]"),
                "a header name, e.g. `x-powered-by`",
            ));
        }
        remove_headers.push(h.to_ascii_lowercase());
    }
    Ok(remove_headers)
}

/// The rules: each a matcher and its policy (`None`: page-guard off there).
fn compile_rules(
    raw: &mut RawConfig,
    nonce_directives: &[String],
    inputs: &PolicyInputs<'_>,
) -> Result<Vec<(crate::rules::Matcher, Option<Policy>)>, ConfigError> {
    let mut rules = Vec::new();
    for (i, r) in std::mem::take(&mut raw.rules).into_iter().enumerate() {
        let at = format!("rules[{i}]");
        let matcher = r.matcher.compile(&at)?;
        if r.disabled {
            if r.csp.is_some() || r.csp_report_only.is_some() || r.permissions_policy.is_some() {
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
            inputs,
            &at,
        )?;
        rules.push((matcher, Some(policy)));
    }

    Ok(rules)
}

fn valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && s.as_bytes()[0].is_ascii_lowercase()
}

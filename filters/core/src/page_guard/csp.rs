//! The CSP compiler: directives and keywords checked at load, a header template with slots
//! for the nonces, and the Permissions-Policy and fixed headers of one policy.

use crate::config::ConfigError;
use std::collections::BTreeMap;

use super::config::{Policy, Reports};
use super::html::Nonces;

/// drop a restriction).
pub(super) const DIRECTIVES: &[&str] = &[
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
pub(super) const KEYWORDS: &[&str] = &[
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

pub(super) const REFERRER_POLICIES: &[&str] = &[
    "no-referrer",
    "no-referrer-when-downgrade",
    "origin",
    "origin-when-cross-origin",
    "same-origin",
    "strict-origin",
    "strict-origin-when-cross-origin",
    "unsafe-url",
];

pub(super) const COOP_VALUES: &[&str] = &[
    "same-origin",
    "same-origin-allow-popups",
    "noopener-allow-popups",
    "unsafe-none",
];

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

/// Settings shared by the global policy and the rules' policies while compiling.
pub(super) struct PolicyInputs<'a> {
    pub(super) nonce_directives: &'a [String],
    pub(super) script_hashes: &'a [String],
    pub(super) reports: Option<&'a Reports>,
    pub(super) fixed: &'a [(String, String)],
    pub(super) reporting_endpoints: Option<String>,
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

pub(super) fn compile_policy(
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

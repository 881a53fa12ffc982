//! The configuration: the raw JSON users write (unknown fields are errors) and its compiled
//! form, checked at load.

use super::store::{JtiLimits, SlotLimits};
use crate::config::{check_fetch, parse_json, ConfigError, EnvLookup, RawSecret};
use crate::path::PathError;
use crate::rules::{Needs, RawMatch, Rules};
use crate::store::{RawStore, StoreConfig, MAX_CAP};
use serde::Deserialize;
use std::collections::BTreeMap;

use super::*;

// ---------------------------------------------------------------------------------------------
// Raw config: exactly the JSON users write. Unknown fields are errors.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    claims_from: Option<Vec<RawSource>>,
    // The bindings of requests no rule matches.
    session: Option<RawSession>,
    scope: Option<Vec<RawTemplate>>,
    fingerprint: Option<String>,
    #[serde(default)]
    single_use: bool,
    max_sockets: Option<RawCap>,
    #[serde(default)]
    allow_missing: bool,
    #[serde(default)]
    rules: Vec<RawRule>,
    // Global settings.
    jti: Option<RawJti>,
    sockets: Option<RawSockets>,
    revocation: Option<RawRevocation>,
    /// Fleet state on etcd (docs/fleet.md); without it, this Envoy's shared data.
    store: Option<RawStore>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub(super) enum RawSource {
    /// gatehouse jwt-auth: filter state `gatehouse.jwt_auth.claims` (+ `.kid`).
    JwtAuth {},
    /// Envoy `jwt_authn`: `payload_in_metadata` (+ `header_in_metadata` for the kid).
    JwtAuthn {
        #[serde(default = "default_payload_key")]
        payload_key: String,
        header_key: Option<String>,
    },
}

pub(super) fn default_payload_key() -> String {
    "jwt_payload".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSession {
    /// Default: `sid_hash` (mode `sha256`), `sid` (mode `plain`).
    claim: Option<String>,
    cookie: String,
    #[serde(default = "default_session_mode")]
    mode: String,
    /// The gateway key of mode `hmac_sha256`.
    key: Option<RawSecret>,
}

/// The shortest HMAC key accepted for `hmac_sha256` (the hash's size).
pub const MIN_SESSION_KEY_BYTES: usize = 32;

pub(super) fn default_session_mode() -> String {
    "sha256".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTemplate {
    template: String,
    /// Template variable → claim (default: the claim named like the variable).
    #[serde(default)]
    claims: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCap {
    limit: u32,
    #[serde(default = "default_sub")]
    per_claim: String,
}

pub(super) fn default_sub() -> String {
    "sub".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    #[serde(rename = "match")]
    matcher: RawMatch,
    /// No binding at all on this rule's requests (the same word as Envoy's
    /// `FilterConfig{disabled: true}` and page-guard's rules).
    #[serde(default)]
    disabled: bool,
    session: Option<RawSession>,
    scope: Option<Vec<RawTemplate>>,
    fingerprint: Option<String>,
    #[serde(default)]
    single_use: bool,
    max_sockets: Option<RawCap>,
    #[serde(default)]
    allow_missing: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJti {
    #[serde(default = "default_jti_entries")]
    max_entries: usize,
    #[serde(default = "default_buckets")]
    buckets: u32,
    #[serde(default = "default_when_full")]
    when_full: String,
    #[serde(default = "default_max_ttl")]
    max_ttl_seconds: u64,
    #[serde(default = "default_skew")]
    clock_skew_seconds: u64,
    #[serde(default = "default_per_subject")]
    max_per_subject: usize,
}

pub(super) fn default_jti_entries() -> usize {
    65_536
}
pub(super) fn default_buckets() -> u32 {
    256
}
pub(super) fn default_when_full() -> String {
    "refuse".into()
}
pub(super) fn default_max_ttl() -> u64 {
    3600
}
pub(super) fn default_skew() -> u64 {
    30
}
pub(super) fn default_per_subject() -> usize {
    64
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSockets {
    #[serde(default = "default_slot_ttl")]
    slot_ttl_seconds: u64,
    #[serde(default = "default_slot_entries")]
    max_entries: usize,
    #[serde(default = "default_buckets")]
    buckets: u32,
}

pub(super) fn default_slot_ttl() -> u64 {
    60
}
pub(super) fn default_slot_entries() -> usize {
    65_536
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRevocation {
    cluster: String,
    path: String,
    authority: Option<String>,
    #[serde(default = "default_refresh")]
    refresh_seconds: u64,
    #[serde(default = "default_timeout")]
    timeout_ms: u64,
    #[serde(default = "default_max_stale")]
    max_stale_seconds: u64,
    #[serde(default = "default_when_stale")]
    when_stale: String,
}

pub(super) fn default_refresh() -> u64 {
    30
}
pub(super) fn default_timeout() -> u64 {
    2000
}
pub(super) fn default_max_stale() -> u64 {
    300
}
pub(super) fn default_when_stale() -> String {
    "open".into()
}

// ---------------------------------------------------------------------------------------------
// Compiled config.

/// Where the verified claims come from, tried in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimsSource {
    /// jwt-auth's filter state ([`crate::jwt_auth::CLAIMS_PROPERTY`], [`crate::jwt_auth::KID_PROPERTY`]).
    JwtAuth,
    /// `jwt_authn` dynamic metadata under [`JWT_AUTHN_NAMESPACE`].
    JwtAuthn {
        payload_key: String,
        header_key: Option<String>,
    },
}

/// How the session cookie is compared with the claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionMode {
    /// The claim is `base64url(SHA-256(cookie value))`: the token does not reveal the cookie, so
    /// a leaked token is useless without the `HttpOnly` cookie itself (the default).
    Sha256,
    /// The claim equals the cookie value. **Weak**: the claim is readable in the token, so
    /// whoever holds the token can forge the cookie. Only for issuers that cannot mint a hash.
    Plain,
    /// The claim is `base64url(HMAC-SHA256(key, cookie value))` with a key the issuer and the
    /// gateway share: even a guessable cookie cannot be tested against a leaked token offline.
    HmacSha256,
}

/// A key that never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKey(Vec<u8>);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(<redacted>)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRule {
    pub claim: String,
    pub cookie: String,
    pub mode: SessionMode,
    /// The key of [`SessionMode::HmacSha256`].
    pub key: Option<SessionKey>,
}

impl SessionRule {
    /// What the claim must be for the cookie value `cookie` (`None`: nothing can match).
    pub fn expected(&self, cookie: &str) -> Option<String> {
        match (self.mode, &self.key) {
            (SessionMode::Plain, _) => Some(cookie.to_string()),
            (SessionMode::Sha256, _) => Some(session_hash(cookie)),
            (SessionMode::HmacSha256, Some(key)) => session_hmac(&key.0, cookie),
            (SessionMode::HmacSha256, None) => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Segment {
    Literal(String),
    /// A variable and the claim it must match.
    Var(String, String),
}

/// A path template: `/ws/rooms/{room}`, `/tenants/{tenant}/...` (`...` or `…` last: any rest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub text: String,
    pub(super) segments: Vec<Segment>,
    pub(super) rest: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FingerprintMode {
    Off,
    /// Compared when the token has a `cfp` claim.
    IfPresent,
    /// A token without `cfp` is refused.
    Required,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketCap {
    pub limit: u32,
    pub per_claim: String,
}

/// The bindings of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub session: Option<SessionRule>,
    pub scope: Vec<Template>,
    pub fingerprint: FingerprintMode,
    pub single_use: bool,
    pub max_sockets: Option<SocketCap>,
    pub allow_missing: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JtiSettings {
    pub limits: JtiLimits,
    pub max_ttl: u64,
    pub skew: u64,
    /// Outstanding single-use token ids one subject (`iss` + `sub`) may hold: at most half a
    /// bucket, so one subject alone can neither fill the store nor push out others' entries.
    pub per_subject: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketSettings {
    pub limits: SlotLimits,
    pub slot_ttl: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationFeed {
    pub cluster: String,
    pub path: String,
    pub authority: String,
    pub refresh_seconds: u64,
    pub timeout_ms: u64,
    pub max_stale: u64,
    /// Refuse (503 / close 1013) once the list is stale, instead of serving with it.
    pub fail_closed: bool,
}

#[derive(Debug)]
pub struct SessionBindingConfig {
    pub sources: Vec<ClaimsSource>,
    pub default_binding: Binding,
    /// A rule's binding; `None` for a `disabled` rule.
    pub rules: Rules<Option<Binding>>,
    pub jti: JtiSettings,
    pub sockets: SocketSettings,
    pub revocation: Option<RevocationFeed>,
    /// Fleet state on etcd; `None`: this Envoy's shared data.
    pub store: Option<StoreConfig>,
    /// Which request facts its rules match by (compiled once).
    pub needs: Needs,
}

pub(super) fn compile_template(raw: RawTemplate, at: &str) -> Result<Template, ConfigError> {
    let text = raw.template;
    let Some(body) = text.strip_prefix('/') else {
        return Err(ConfigError::new(
            format!("{at}.template"),
            "must start with `/`",
        ));
    };
    let parts: Vec<&str> = body.split('/').collect();
    let mut segments = Vec::new();
    let mut rest = false;
    let mut vars: Vec<String> = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        if *part == "..." || *part == "…" {
            if i + 1 != parts.len() {
                return Err(ConfigError::new(
                    format!("{at}.template"),
                    "`...` may only be the last segment",
                ));
            }
            rest = true;
            continue;
        }
        if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(ConfigError::new(
                    format!("{at}.template"),
                    format!("bad variable `{part}`"),
                ));
            }
            if vars.iter().any(|v| v == name) {
                return Err(ConfigError::new(
                    format!("{at}.template"),
                    format!("variable `{name}` appears twice"),
                ));
            }
            vars.push(name.to_string());
            let claim = raw
                .claims
                .get(name)
                .cloned()
                .unwrap_or_else(|| name.to_string());
            segments.push(Segment::Var(name.to_string(), claim));
        } else if part.contains('{') || part.contains('}') {
            return Err(ConfigError::new(
                format!("{at}.template"),
                format!("`{part}`: a variable is a whole segment, `{{name}}`"),
            ));
        } else {
            segments.push(Segment::Literal((*part).to_string()));
        }
    }
    if vars.is_empty() {
        return Err(ConfigError::new(
            format!("{at}.template"),
            "has no `{variable}` to bind",
        ));
    }
    for (var, claim) in &raw.claims {
        if !vars.contains(var) {
            return Err(ConfigError::new(
                format!("{at}.claims.{var}"),
                "is not a variable of the template",
            ));
        }
        if claim.is_empty() {
            return Err(ConfigError::new(
                format!("{at}.claims.{var}"),
                "must not be empty",
            ));
        }
    }
    Ok(Template {
        text,
        segments,
        rest,
    })
}

/// The fields a binding is made of, as written (top level or in a rule).
pub(super) struct RawBindingFields {
    session: Option<RawSession>,
    scope: Option<Vec<RawTemplate>>,
    fingerprint: Option<String>,
    single_use: bool,
    max_sockets: Option<RawCap>,
    allow_missing: bool,
}

pub(super) fn session_key(
    raw: RawSecret,
    at: &str,
    env: EnvLookup<'_>,
) -> Result<SessionKey, ConfigError> {
    raw.resolve(at, env, "key", MIN_SESSION_KEY_BYTES)
        .map(SessionKey)
}

pub(super) fn compile_binding(
    raw: RawBindingFields,
    at: &str,
    env: EnvLookup<'_>,
) -> Result<Binding, ConfigError> {
    let field = |f: &str| {
        if at.is_empty() {
            f.to_string()
        } else {
            format!("{at}.{f}")
        }
    };
    let session = match raw.session {
        None => None,
        Some(s) => {
            let mode = match s.mode.as_str() {
                "sha256" => SessionMode::Sha256,
                "hmac_sha256" => SessionMode::HmacSha256,
                "plain" => SessionMode::Plain,
                _ => {
                    return Err(ConfigError::new(
                        field("session.mode"),
                        "must be `sha256` (the claim is the cookie's hash), `hmac_sha256` (its HMAC with `key`) or `plain` (weak: the claim is the cookie)",
                    ))
                }
            };
            let key =
                match (mode, s.key) {
                    (SessionMode::HmacSha256, Some(k)) => {
                        Some(session_key(k, &field("session.key"), env)?)
                    }
                    (SessionMode::HmacSha256, None) => return Err(ConfigError::new(
                        field("session.key"),
                        "mode `hmac_sha256` needs a `key` (`{\"env\": NAME}` or `{\"value\": …}`)",
                    )),
                    (_, Some(_)) => {
                        return Err(ConfigError::new(
                            field("session.key"),
                            "only mode `hmac_sha256` takes a key",
                        ))
                    }
                    (_, None) => None,
                };
            let claim = s.claim.unwrap_or_else(|| {
                match mode {
                    SessionMode::Sha256 | SessionMode::HmacSha256 => "sid_hash",
                    SessionMode::Plain => "sid",
                }
                .to_string()
            });
            if claim.is_empty() {
                return Err(ConfigError::new(
                    field("session.claim"),
                    "must not be empty",
                ));
            }
            if s.cookie.is_empty()
                || s.cookie
                    .bytes()
                    .any(|b| b <= b' ' || b"=;,\"".contains(&b) || b >= 0x7f)
            {
                return Err(ConfigError::new(
                    field("session.cookie"),
                    "must be a cookie name",
                ));
            }
            Some(SessionRule {
                claim,
                cookie: s.cookie,
                mode,
                key,
            })
        }
    };
    let scope = raw
        .scope
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, t)| compile_template(t, &field(&format!("scope[{i}]"))))
        .collect::<Result<Vec<_>, _>>()?;
    let fingerprint = match raw.fingerprint.as_deref() {
        None | Some("if_present") => FingerprintMode::IfPresent,
        Some("off") => FingerprintMode::Off,
        Some("required") => FingerprintMode::Required,
        Some(_) => {
            return Err(ConfigError::new(
                field("fingerprint"),
                "must be `off`, `if_present` or `required`",
            ))
        }
    };
    let max_sockets = match raw.max_sockets {
        None => None,
        Some(c) => {
            if c.limit == 0 {
                return Err(ConfigError::new(
                    field("max_sockets.limit"),
                    "must be at least 1",
                ));
            }
            if c.per_claim.is_empty() {
                return Err(ConfigError::new(
                    field("max_sockets.per_claim"),
                    "must not be empty",
                ));
            }
            Some(SocketCap {
                limit: c.limit,
                per_claim: c.per_claim,
            })
        }
    };
    Ok(Binding {
        session,
        scope,
        fingerprint,
        single_use: raw.single_use,
        max_sockets,
        allow_missing: raw.allow_missing,
    })
}

pub(super) fn per_bucket(max_entries: usize, buckets: u32, at: &str) -> Result<usize, ConfigError> {
    if buckets == 0 || buckets > 65_536 {
        return Err(ConfigError::new(
            format!("{at}.buckets"),
            "must be between 1 and 65536",
        ));
    }
    if max_entries == 0 {
        return Err(ConfigError::new(
            format!("{at}.max_entries"),
            "must be at least 1",
        ));
    }
    Ok(max_entries.div_ceil(buckets as usize))
}

impl SessionBindingConfig {
    /// [`Self::compile_with_env`] with an empty environment (a `session.key` from `env` fails).
    pub fn compile(bytes: &[u8]) -> Result<Self, ConfigError> {
        Self::compile_with_env(bytes, &|_| None)
    }

    /// Compile the configuration; `env` stands for the Wasm VM's environment (`session.key`).
    pub fn compile_with_env(bytes: &[u8], env: EnvLookup<'_>) -> Result<Self, ConfigError> {
        let raw: RawConfig = parse_json(bytes)?;
        let sources = match raw.claims_from {
            None => vec![ClaimsSource::JwtAuth],
            Some(list) if list.is_empty() => {
                return Err(ConfigError::new("claims_from", "name at least one source"))
            }
            Some(list) => list
                .into_iter()
                .enumerate()
                .map(|(i, s)| match s {
                    RawSource::JwtAuth {} => Ok(ClaimsSource::JwtAuth),
                    RawSource::JwtAuthn {
                        payload_key,
                        header_key,
                    } => {
                        if payload_key.is_empty() || header_key.as_deref() == Some("") {
                            return Err(ConfigError::new(
                                format!("claims_from[{i}].jwt_authn"),
                                "keys must not be empty",
                            ));
                        }
                        Ok(ClaimsSource::JwtAuthn {
                            payload_key,
                            header_key,
                        })
                    }
                })
                .collect::<Result<_, _>>()?,
        };
        let default_binding = compile_binding(
            RawBindingFields {
                session: raw.session,
                scope: raw.scope,
                fingerprint: raw.fingerprint,
                single_use: raw.single_use,
                max_sockets: raw.max_sockets,
                allow_missing: raw.allow_missing,
            },
            "",
            env,
        )?;
        let mut rules = Vec::with_capacity(raw.rules.len());
        for (i, r) in raw.rules.into_iter().enumerate() {
            let at = format!("rules[{i}]");
            let matcher = r.matcher.compile(&at)?;
            let binding = if r.disabled {
                if r.session.is_some()
                    || r.scope.is_some()
                    || r.fingerprint.is_some()
                    || r.single_use
                    || r.max_sockets.is_some()
                {
                    return Err(ConfigError::new(
                        format!("{at}.disabled"),
                        "a `disabled` rule binds nothing else",
                    ));
                }
                None
            } else {
                Some(compile_binding(
                    RawBindingFields {
                        session: r.session,
                        scope: r.scope,
                        fingerprint: r.fingerprint,
                        single_use: r.single_use,
                        max_sockets: r.max_sockets,
                        allow_missing: r.allow_missing,
                    },
                    &at,
                    env,
                )?)
            };
            rules.push((matcher, binding));
        }
        let raw_jti = raw.jti.unwrap_or(RawJti {
            max_entries: default_jti_entries(),
            buckets: default_buckets(),
            when_full: default_when_full(),
            max_ttl_seconds: default_max_ttl(),
            clock_skew_seconds: default_skew(),
            max_per_subject: default_per_subject(),
        });
        let evict = match raw_jti.when_full.as_str() {
            "refuse" => false,
            "evict" => true,
            _ => {
                return Err(ConfigError::new(
                    "jti.when_full",
                    "must be `refuse` or `evict`",
                ))
            }
        };
        if raw_jti.max_ttl_seconds == 0 {
            return Err(ConfigError::new(
                "jti.max_ttl_seconds",
                "must be at least 1",
            ));
        }
        if raw_jti.max_per_subject == 0 {
            return Err(ConfigError::new(
                "jti.max_per_subject",
                "must be at least 1",
            ));
        }
        let jti_per_bucket = per_bucket(raw_jti.max_entries, raw_jti.buckets, "jti")?;
        let jti = JtiSettings {
            limits: JtiLimits {
                buckets: raw_jti.buckets,
                per_bucket: jti_per_bucket,
                evict,
            },
            max_ttl: raw_jti.max_ttl_seconds,
            skew: raw_jti.clock_skew_seconds,
            per_subject: raw_jti.max_per_subject.min((jti_per_bucket / 2).max(1)),
        };
        let raw_sockets = raw.sockets.unwrap_or(RawSockets {
            slot_ttl_seconds: default_slot_ttl(),
            max_entries: default_slot_entries(),
            buckets: default_buckets(),
        });
        if raw_sockets.slot_ttl_seconds < 3 {
            return Err(ConfigError::new(
                "sockets.slot_ttl_seconds",
                "must be at least 3 (live slots are refreshed every third of it)",
            ));
        }
        let sockets = SocketSettings {
            limits: SlotLimits {
                buckets: raw_sockets.buckets,
                per_bucket: per_bucket(raw_sockets.max_entries, raw_sockets.buckets, "sockets")?,
            },
            slot_ttl: raw_sockets.slot_ttl_seconds,
        };
        let revocation = match raw.revocation {
            None => None,
            Some(r) => {
                check_fetch("revocation", &r.cluster, &r.path, r.refresh_seconds)?;
                if r.max_stale_seconds < r.refresh_seconds {
                    return Err(ConfigError::new(
                        "revocation.max_stale_seconds",
                        "must be at least refresh_seconds",
                    ));
                }
                let fail_closed = match r.when_stale.as_str() {
                    "open" => false,
                    "closed" => true,
                    _ => {
                        return Err(ConfigError::new(
                            "revocation.when_stale",
                            "must be `open` (keep serving) or `closed` (refuse)",
                        ))
                    }
                };
                Some(RevocationFeed {
                    authority: r.authority.unwrap_or_else(|| r.cluster.clone()),
                    cluster: r.cluster,
                    path: r.path,
                    refresh_seconds: r.refresh_seconds,
                    timeout_ms: r.timeout_ms,
                    max_stale: r.max_stale_seconds,
                    fail_closed,
                })
            }
        };
        let store = raw.store.map(StoreConfig::compile).transpose()?;
        if store.is_some() {
            let bindings = std::iter::once(("".to_string(), Some(&default_binding))).chain(
                rules
                    .iter()
                    .enumerate()
                    .map(|(i, (_, b))| (format!("rules[{i}]."), b.as_ref())),
            );
            for (at, b) in bindings {
                if b.and_then(|b| b.max_sockets.as_ref())
                    .is_some_and(|c| c.limit > MAX_CAP)
                {
                    return Err(ConfigError::new(
                        format!("{at}max_sockets.limit"),
                        format!("must be at most {MAX_CAP} with `store`"),
                    ));
                }
            }
        }
        let rules = Rules::new(rules);
        Ok(Self {
            needs: rules.needs(),
            sources,
            default_binding,
            rules,
            jti,
            sockets,
            revocation,
            store,
        })
    }

    /// The binding of a request: the first matching rule's (`None` when it is `disabled`), else the
    /// top-level one; a path with dot-segments or hidden separators is refused first
    /// ([`Rules::select`]).
    pub fn binding_for(
        &self,
        route: Option<&str>,
        path: &str,
        host: &str,
    ) -> Result<Option<&Binding>, PathError> {
        Ok(match self.rules.select(route, path, host)? {
            Some((_, b)) => b.as_ref(),
            None => Some(&self.default_binding),
        })
    }
}

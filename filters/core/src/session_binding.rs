//! session-binding: a verified token is only good with the session, room and client it was
//! issued for, once (single-use connect tokens), while not revoked, and within a cap of open
//! sockets.
//!
//! It runs after a filter that verified the token (gatehouse jwt-auth, or Envoy's native
//! `jwt_authn` with `payload_in_metadata`) and reads the verified claims from where that filter
//! put them (filter state, dynamic metadata), never from a header a client could send. The shell
//! gathers the request facts into [`BindRequest`], calls [`SessionBinding::decide`] with `now`,
//! the worker's [`RevocationState`] and a [`BindingStore`], and applies the [`BindDecision`].
//! See docs/session-binding.md.

pub mod metadata;
pub mod revocation;
pub mod store;

use crate::config::{check_fetch, parse_json, ConfigError, EnvLookup, RawSecret};
use crate::jwt::claims::claim_text;
use crate::jwt::Claims;
use crate::path::PathError;
use crate::reply::{LocalReply, Refusal, WsHandshake};
use crate::rules::{Needs, RawMatch, Rules};
use crate::stats::SessionBindingStat;
use crate::store::{Claimed, Connect, RawStore, StoreConfig, StoreError, WhenUnavailable, MAX_CAP};
use crate::{cookie, ws};
use revocation::{RevocationState, Revoked, TokenId};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::IpAddr;
use store::{short_hash, Acquire, BindingStore, JtiLimits, SlotLimits, UseOnce};
use subtle::ConstantTimeEq;

/// Envoy's native JWT filter: the dynamic-metadata namespace of `payload_in_metadata`.
pub const JWT_AUTHN_NAMESPACE: &str = "envoy.filters.http.jwt_authn";

/// jwt-auth's filter state on a live socket: the payload and the verifying key id of the last
/// in-band re-auth token it accepted (overwritten on every re-auth).
pub use crate::jwt_auth::{REAUTH_CLAIMS_PROPERTY, REAUTH_KID_PROPERTY};

// ---------------------------------------------------------------------------------------------
// Raw config: exactly the JSON users write. Unknown fields are errors.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
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
enum RawSource {
    /// gatehouse jwt-auth: filter state `gatehouse.jwt_auth.claims` (+ `.kid`).
    JwtAuth {},
    /// Envoy `jwt_authn`: `payload_in_metadata` (+ `header_in_metadata` for the kid).
    JwtAuthn {
        #[serde(default = "default_payload_key")]
        payload_key: String,
        header_key: Option<String>,
    },
}

fn default_payload_key() -> String {
    "jwt_payload".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSession {
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

fn default_session_mode() -> String {
    "sha256".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    template: String,
    /// Template variable → claim (default: the claim named like the variable).
    #[serde(default)]
    claims: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCap {
    limit: u32,
    #[serde(default = "default_sub")]
    per_claim: String,
}

fn default_sub() -> String {
    "sub".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
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
struct RawJti {
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

fn default_jti_entries() -> usize {
    65_536
}
fn default_buckets() -> u32 {
    256
}
fn default_when_full() -> String {
    "refuse".into()
}
fn default_max_ttl() -> u64 {
    3600
}
fn default_skew() -> u64 {
    30
}
fn default_per_subject() -> usize {
    64
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSockets {
    #[serde(default = "default_slot_ttl")]
    slot_ttl_seconds: u64,
    #[serde(default = "default_slot_entries")]
    max_entries: usize,
    #[serde(default = "default_buckets")]
    buckets: u32,
}

fn default_slot_ttl() -> u64 {
    60
}
fn default_slot_entries() -> usize {
    65_536
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRevocation {
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

fn default_refresh() -> u64 {
    30
}
fn default_timeout() -> u64 {
    2000
}
fn default_max_stale() -> u64 {
    300
}
fn default_when_stale() -> String {
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
enum Segment {
    Literal(String),
    /// A variable and the claim it must match.
    Var(String, String),
}

/// A path template: `/ws/rooms/{room}`, `/tenants/{tenant}/...` (`...` or `…` last: any rest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub text: String,
    segments: Vec<Segment>,
    rest: bool,
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

fn compile_template(raw: RawTemplate, at: &str) -> Result<Template, ConfigError> {
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
struct RawBindingFields {
    session: Option<RawSession>,
    scope: Option<Vec<RawTemplate>>,
    fingerprint: Option<String>,
    single_use: bool,
    max_sockets: Option<RawCap>,
    allow_missing: bool,
}

fn session_key(raw: RawSecret, at: &str, env: EnvLookup<'_>) -> Result<SessionKey, ConfigError> {
    raw.resolve(at, env, "key", MIN_SESSION_KEY_BYTES)
        .map(SessionKey)
}

fn compile_binding(
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

fn per_bucket(max_entries: usize, buckets: u32, at: &str) -> Result<usize, ConfigError> {
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

// ---------------------------------------------------------------------------------------------
// Helpers: paths, claims, fingerprints.

fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Does `claim` bind `segment`: equal as text, or (a list) contain it.
fn claim_binds(claim: Option<&Value>, segment: &str) -> bool {
    match claim {
        Some(Value::String(s)) => s == segment,
        Some(v @ (Value::Number(_) | Value::Bool(_))) => claim_text(v) == segment,
        Some(Value::Array(list)) => list.iter().any(|v| match v {
            Value::String(s) => s == segment,
            Value::Number(_) => claim_text(v) == segment,
            _ => false,
        }),
        _ => false,
    }
}

/// The outcome of the scope templates on a path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ScopeCheck {
    /// No template of the binding matches the path.
    NoTemplate,
    /// A template matched and `variable`'s segment is not in its claim.
    Mismatch(String),
    Bound,
}

impl Template {
    /// `None` when the path does not have this template's shape; otherwise every
    /// `(variable, claim, decoded segment)`.
    fn bind<'a>(&'a self, path: &str) -> Option<Vec<(&'a str, &'a str, Option<String>)>> {
        let body = path.strip_prefix('/')?;
        let parts: Vec<&str> = body.split('/').collect();
        if parts.len() < self.segments.len() || (!self.rest && parts.len() != self.segments.len()) {
            return None;
        }
        let mut vars = Vec::new();
        for (seg, part) in self.segments.iter().zip(parts.iter()) {
            match seg {
                Segment::Literal(l) => {
                    if percent_decode(part).as_deref() != Some(l.as_str()) {
                        return None;
                    }
                }
                Segment::Var(name, claim) => {
                    // An empty or undecodable segment binds nothing (and so never matches).
                    let decoded = percent_decode(part).filter(|s| !s.is_empty());
                    vars.push((name.as_str(), claim.as_str(), decoded));
                }
            }
        }
        Some(vars)
    }
}

fn check_scope(templates: &[Template], path: &str, claims: &Claims) -> ScopeCheck {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let mut matched = false;
    for t in templates {
        let Some(vars) = t.bind(path) else { continue };
        matched = true;
        for (name, claim, segment) in vars {
            let ok = segment
                .as_deref()
                .is_some_and(|s| claim_binds(claims.get(claim), s));
            if !ok {
                return ScopeCheck::Mismatch(name.to_string());
            }
        }
    }
    if matched {
        ScopeCheck::Bound
    } else {
        ScopeCheck::NoTemplate
    }
}

/// The client's network prefix as the fingerprint covers it: `a.b.c.0/24` for IPv4 (and
/// IPv4-mapped IPv6), the RFC 5952 text of the address masked to 64 bits plus `/64` for IPv6.
pub fn ip_prefix(ip: IpAddr) -> String {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.0/24", o[0], o[1], o[2])
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            format!("{}/64", std::net::Ipv6Addr::from(bits))
        }
    }
}

/// The `cfp` claim a client should carry: base64url(SHA-256(User-Agent + "|" + prefix)).
pub fn fingerprint(user_agent: &str, ip: IpAddr) -> String {
    let digest = crate::sha256(format!("{user_agent}|{}", ip_prefix(ip)).as_bytes());
    crate::b64url(&digest)
}

/// The IP of an Envoy address property: `1.2.3.4:5678`, `[2001:db8::1]:5678`, or bare.
pub fn parse_address(address: &str) -> Option<IpAddr> {
    if let Ok(ip) = address.parse() {
        return Some(ip);
    }
    if let Ok(sa) = address.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    None
}

fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

// ---------------------------------------------------------------------------------------------
// Requests and decisions.

/// The request facts the decision needs; the shell reads them from the host.
#[derive(Debug, Default, Clone)]
pub struct BindRequest<'a> {
    /// `:path`, with the query string.
    pub path: &'a str,
    pub host: &'a str,
    pub route_name: Option<&'a str>,
    pub websocket: bool,
    pub ws_key: Option<&'a str>,
    /// `Sec-WebSocket-Protocol` as it reaches this filter (jwt-auth has taken its token out).
    pub ws_protocols: Option<&'a str>,
    pub cookie: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    /// The downstream peer's address (Envoy's `source.address`).
    pub client_ip: Option<IpAddr>,
    /// The verified claims, from the first configured source that had them.
    pub claims: Option<&'a Claims>,
    /// The verified token's `kid`, when the source publishes it.
    pub kid: Option<&'a str>,
    /// A random id for this stream's socket slot.
    pub slot_id: &'a str,
}

/// The request facts a bound request's decision reads ([`SessionBinding::facts_needed`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FactsNeeded {
    /// `Cookie` (a session binding).
    pub cookie: bool,
    /// `User-Agent` and the peer address (a client fingerprint to check).
    pub client: bool,
    /// A socket slot id (an upgrade under a socket cap).
    pub slot: bool,
}

/// Why a request was refused (the stat `denied.<reason>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindDenial {
    /// The path walks with dot-segments or hides a separator ([`crate::path::check`]): refused
    /// before any rule or template looks at it.
    BadPath(PathError),
    /// A decision needed the time and the host could not tell it.
    Clock,
    NoClaims,
    NoSessionCookie,
    NoSessionClaim,
    SessionMismatch,
    /// No scope template matches the path.
    ScopeUnknown,
    ScopeMismatch,
    NoFingerprint,
    FingerprintMismatch,
    NoJti,
    /// A single-use token without `exp`, or whose `exp` lies beyond what the store remembers
    /// (`exp + clock_skew_seconds > now + max_ttl_seconds`): a replay after the store forgot it
    /// would pass.
    JtiUnbounded,
    Replay,
    JtiStoreFull,
    /// The subject already holds `jti.max_per_subject` outstanding single-use token ids.
    JtiSubjectFull,
    Revoked(Revoked),
    RevocationStale,
    NoCapClaim,
    TooManySockets,
    SlotStoreFull,
    /// The fleet store did not answer usably within `timeout_ms` (`when_unavailable: closed`).
    StoreUnavailable,
}

impl BindDenial {
    pub fn reason(self) -> &'static str {
        match self {
            BindDenial::BadPath(e) => e.reason(),
            BindDenial::Clock => "clock",
            BindDenial::NoClaims => "no_claims",
            BindDenial::NoSessionCookie => "no_session_cookie",
            BindDenial::NoSessionClaim => "no_session_claim",
            BindDenial::SessionMismatch => "session_mismatch",
            BindDenial::ScopeUnknown => "scope_unknown",
            BindDenial::ScopeMismatch => "scope_mismatch",
            BindDenial::NoFingerprint => "no_fingerprint",
            BindDenial::FingerprintMismatch => "fingerprint_mismatch",
            BindDenial::NoJti => "no_jti",
            BindDenial::JtiUnbounded => "jti_unbounded",
            BindDenial::Replay => "replay",
            BindDenial::JtiStoreFull => "jti_store_full",
            BindDenial::JtiSubjectFull => "jti_subject_full",
            BindDenial::Revoked(r) => r.reason(),
            BindDenial::RevocationStale => "revocation_stale",
            BindDenial::NoCapClaim => "no_cap_claim",
            BindDenial::TooManySockets => "too_many_sockets",
            BindDenial::SlotStoreFull => "slot_store_full",
            BindDenial::StoreUnavailable => "store_unavailable",
        }
    }

    pub fn refusal(self) -> Refusal {
        match self {
            BindDenial::BadPath(_) => Refusal::BadRequest,
            BindDenial::NoClaims => Refusal::MissingCredentials,
            BindDenial::NoSessionCookie
            | BindDenial::NoSessionClaim
            | BindDenial::SessionMismatch
            | BindDenial::NoFingerprint
            | BindDenial::FingerprintMismatch
            | BindDenial::NoJti
            | BindDenial::JtiUnbounded
            | BindDenial::Replay
            | BindDenial::Revoked(_)
            | BindDenial::NoCapClaim => Refusal::InvalidCredentials,
            BindDenial::ScopeUnknown | BindDenial::ScopeMismatch => Refusal::Forbidden,
            BindDenial::JtiStoreFull
            | BindDenial::JtiSubjectFull
            | BindDenial::TooManySockets
            | BindDenial::SlotStoreFull => Refusal::TooMany,
            BindDenial::RevocationStale | BindDenial::Clock | BindDenial::StoreUnavailable => {
                Refusal::Unavailable
            }
        }
    }

    /// How a live socket closes for this denial: `(code, reason, stat)`.
    pub fn live_close(self) -> LiveClose {
        let reason = match self {
            BindDenial::Revoked(_) => "token revoked",
            BindDenial::Replay => "token reused",
            BindDenial::RevocationStale => "revocation list stale",
            BindDenial::Clock => "clock unavailable",
            _ => "re-auth refused",
        };
        (self.refusal().close_code(), reason, self)
    }
}

/// What a live socket keeps after its upgrade was allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveTerms {
    /// Checked against the revocation list on every frame.
    pub token: TokenId,
    /// The socket's slot `(owner, slot)`: refreshed while it lives, freed when it ends.
    pub slot: Option<(String, String)>,
    /// The binding is single-use: an in-band re-auth token is claimed like a connect token.
    pub single_use: bool,
    /// The last accepted in-band re-auth token: checked against the revocation list too.
    pub reauth: Option<Box<TokenId>>,
}

impl LiveTerms {
    /// Must this socket look at in-band re-auth tokens (single use, or a revocation feed)?
    pub fn checks_reauth(&self, binding: &SessionBinding) -> bool {
        self.single_use || binding.config.revocation.is_some()
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum BindDecision {
    /// No binding applies (a `disabled` rule, or claims missing where that is allowed).
    Pass,
    Allow {
        /// For an upgrade: what the live socket keeps.
        live: Option<LiveTerms>,
        /// Stats to count besides `allowed` (`jti.evicted`, `revocation.stale_served`).
        notes: Vec<SessionBindingStat>,
    },
    Deny {
        denial: BindDenial,
        reply: LocalReply,
    },
}

/// Why a live socket must close now: `(code, reason, denial)` (counted `ws.closed.<reason>`).
pub type LiveClose = (u16, &'static str, BindDenial);

/// The compiled config; per worker.
pub struct SessionBinding {
    pub config: SessionBindingConfig,
}

fn text_claim(claims: &Claims, name: &str) -> Option<String> {
    match claims.get(name)? {
        v @ (Value::String(_) | Value::Number(_)) => Some(claim_text(v)).filter(|s| !s.is_empty()),
        _ => None,
    }
}

/// The revocation identity of verified claims.
pub fn token_id(claims: &Claims, kid: Option<&str>) -> TokenId {
    TokenId {
        jti: text_claim(claims, "jti"),
        sub: text_claim(claims, "sub"),
        iat: claims.get("iat").and_then(Value::as_u64),
        kid: kid.map(str::to_string),
        sid: text_claim(claims, "sid"),
    }
}

/// The value a `sha256` session binding expects in the claim for a cookie value:
/// `base64url_nopad(SHA-256(cookie value))`.
pub fn session_hash(cookie_value: &str) -> String {
    crate::b64url(&crate::sha256(cookie_value.as_bytes()))
}

/// The value an `hmac_sha256` session binding expects in the claim:
/// `base64url_nopad(HMAC-SHA256(key, cookie value))`.
pub fn session_hmac(key: &[u8], cookie_value: &str) -> Option<String> {
    use hmac::{Hmac, KeyInit, Mac};
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key).ok()?;
    mac.update(cookie_value.as_bytes());
    Some(crate::b64url(&mac.finalize().into_bytes()))
}

/// The handshake answer of an upgrade request (`None` for plain HTTP).
fn handshake(req: &BindRequest<'_>) -> Option<WsHandshake> {
    if req.websocket {
        req.ws_key.map(|key| WsHandshake {
            accept: ws::accept_key(key),
            protocol: req
                .ws_protocols
                .and_then(|h| ws::protocols(h).next())
                .map(str::to_string),
        })
    } else {
        None
    }
}

/// The refusal of `denial` for `req`: problem+json, or a 101 and a close frame on an upgrade.
pub fn deny(req: &BindRequest<'_>, denial: BindDenial) -> BindDecision {
    deny_with(handshake(req).as_ref(), denial)
}

fn deny_with(hs: Option<&WsHandshake>, denial: BindDenial) -> BindDecision {
    BindDecision::Deny {
        denial,
        reply: denial.refusal().reply(hs),
    }
}

/// A decision with a fleet store ([`SessionBinding::decide_fleet`]).
#[derive(Debug)]
pub enum FleetDecision {
    /// Decided without the store (refused before any claim, or nothing to claim).
    Now(BindDecision),
    /// Allowed if the store confirms the claims: send [`Pending::connect`], then
    /// [`Pending::finish`] with its answer.
    Ask(Box<Pending>),
}

/// An allowed connect waiting for the store.
#[derive(Debug)]
pub struct Pending {
    pub connect: Connect,
    handshake: Option<WsHandshake>,
    live: Option<LiveTerms>,
    notes: Vec<SessionBindingStat>,
}

/// How a connect ended once the store answered.
#[derive(Debug, PartialEq, Eq)]
pub struct Finished {
    pub decision: BindDecision,
    /// The etcd slot number the socket holds (`None`: no slot, or a slot in local state).
    pub etcd_slot: Option<u32>,
    /// Decided on this Envoy's own state because the store could not answer.
    pub fallback: bool,
}

impl Pending {
    /// The decision once the store answered `answer`; on a store error, `when` says whether to
    /// refuse or to claim in `local` (this Envoy's shared data).
    pub fn finish(
        self,
        answer: Result<Claimed, StoreError>,
        when: WhenUnavailable,
        local: &mut dyn BindingStore,
    ) -> Finished {
        let refuse = |denial, fallback| Finished {
            decision: deny_with(self.handshake.as_ref(), denial),
            etcd_slot: None,
            fallback,
        };
        let (etcd_slot, fallback) = match answer {
            Ok(Claimed::Fresh { slot }) => (slot, false),
            Ok(Claimed::Replay) => return refuse(BindDenial::Replay, false),
            Ok(Claimed::OverCap) => return refuse(BindDenial::TooManySockets, false),
            Err(_) if when == WhenUnavailable::Closed => {
                return refuse(BindDenial::StoreUnavailable, false)
            }
            Err(_) => match self.connect.claim_locally(local) {
                Ok(()) => (None, true),
                Err((UseOnce::Replay, _)) => return refuse(BindDenial::Replay, true),
                Err((UseOnce::OwnerFull, _)) => return refuse(BindDenial::JtiSubjectFull, true),
                Err((UseOnce::Full, _)) => return refuse(BindDenial::JtiStoreFull, true),
                Err((_, Acquire::OverCap)) => return refuse(BindDenial::TooManySockets, true),
                Err(_) => return refuse(BindDenial::SlotStoreFull, true),
            },
        };
        Finished {
            decision: BindDecision::Allow {
                live: self.live,
                notes: self.notes,
            },
            etcd_slot,
            fallback,
        }
    }
}

impl SessionBinding {
    pub fn new(config: SessionBindingConfig) -> Self {
        Self { config }
    }

    /// [`Self::decide_at`] with a known time.
    pub fn decide(
        &self,
        req: &BindRequest<'_>,
        now: u64,
        revocations: Option<&RevocationState>,
        store: &mut dyn BindingStore,
    ) -> BindDecision {
        self.decide_at(req, Some(now), revocations, store)
    }

    /// Decide what happens to a request at `now` (`None`: the host cannot tell the time, and a
    /// check that needs it refuses with 503 / close 1013, reason `clock`). `revocations` is the
    /// worker's list (`None` without a feed); `store` holds used token ids and socket slots.
    pub fn decide_at(
        &self,
        req: &BindRequest<'_>,
        now: Option<u64>,
        revocations: Option<&RevocationState>,
        store: &mut dyn BindingStore,
    ) -> BindDecision {
        // Before any rule or template looks at the path.
        let selected = self.config.binding_for(req.route_name, req.path, req.host);
        self.decide_selected(selected, req, now, revocations, store)
    }

    /// Which request facts the decision needs beyond the rule target and the claims, for the
    /// binding [`SessionBindingConfig::binding_for`] selected: the shell reads only these (each
    /// host call costs about a microsecond inside V8). `None`: nothing at all, the request is
    /// not bound and passes.
    pub fn facts_needed(
        selected: &Result<Option<&Binding>, PathError>,
        claims: Option<&Claims>,
        websocket: bool,
    ) -> Option<FactsNeeded> {
        Some(match selected {
            Ok(None) => return None,
            // Refused for its path before anything else is looked at.
            Err(_) => FactsNeeded::default(),
            Ok(Some(b)) => FactsNeeded {
                cookie: b.session.is_some(),
                client: b.fingerprint == FingerprintMode::Required
                    || (b.fingerprint != FingerprintMode::Off
                        && claims.is_some_and(|c| c.contains_key("cfp"))),
                slot: websocket && b.max_sockets.is_some(),
            },
        })
    }

    /// [`Self::decide_at`] for the binding the shell already selected (so the rules are matched
    /// once per request).
    pub fn decide_selected(
        &self,
        selected: Result<Option<&Binding>, PathError>,
        req: &BindRequest<'_>,
        now: Option<u64>,
        revocations: Option<&RevocationState>,
        store: &mut dyn BindingStore,
    ) -> BindDecision {
        let binding = match selected {
            Ok(Some(binding)) => binding,
            Ok(None) => return BindDecision::Pass,
            Err(e) => return deny(req, BindDenial::BadPath(e)),
        };
        let Some(claims) = req.claims else {
            return if binding.allow_missing {
                BindDecision::Pass
            } else {
                deny(req, BindDenial::NoClaims)
            };
        };
        let mut notes = Vec::new();
        let token = token_id(claims, req.kid);

        // Revocation first: a revoked token is refused whatever else it would pass.
        if let Err(d) = self.check_revocation(&token, now, revocations, &mut notes) {
            return deny(req, d);
        }

        if let Some(session) = &binding.session {
            let Some(want) = text_claim(claims, &session.claim) else {
                return deny(req, BindDenial::NoSessionClaim);
            };
            let Some(have) = req
                .cookie
                .and_then(|c| cookie::get(c, &session.cookie))
                .filter(|v| !v.is_empty())
            else {
                return deny(req, BindDenial::NoSessionCookie);
            };
            if !session
                .expected(have)
                .is_some_and(|expected| ct_eq(&want, &expected))
            {
                return deny(req, BindDenial::SessionMismatch);
            }
        }

        if !binding.scope.is_empty() {
            match check_scope(&binding.scope, req.path, claims) {
                ScopeCheck::Bound => {}
                ScopeCheck::NoTemplate => return deny(req, BindDenial::ScopeUnknown),
                ScopeCheck::Mismatch(_) => return deny(req, BindDenial::ScopeMismatch),
            }
        }

        if binding.fingerprint != FingerprintMode::Off {
            match claims.get("cfp") {
                None if binding.fingerprint == FingerprintMode::Required => {
                    return deny(req, BindDenial::NoFingerprint)
                }
                None => {}
                Some(cfp) => {
                    let ok = match (cfp.as_str(), req.client_ip) {
                        (Some(cfp), Some(ip)) => {
                            ct_eq(cfp, &fingerprint(req.user_agent.unwrap_or(""), ip))
                        }
                        _ => false,
                    };
                    if !ok {
                        return deny(req, BindDenial::FingerprintMismatch);
                    }
                }
            }
        }

        // The checks that write to the store come last: a request refused above uses nothing.
        if binding.single_use {
            match self.use_jti(claims, now, store) {
                Ok(Some(note)) => notes.push(note),
                Ok(None) => {}
                Err(d) => return deny(req, d),
            }
        }

        let mut slot = None;
        if let (true, Some(cap)) = (req.websocket, &binding.max_sockets) {
            let Some(value) = text_claim(claims, &cap.per_claim) else {
                return deny(req, BindDenial::NoCapClaim);
            };
            let Some(now) = now else {
                return deny(req, BindDenial::Clock);
            };
            let owner = short_hash(&format!("{}\0{value}", cap.per_claim));
            match store.acquire_slot(
                &owner,
                req.slot_id,
                cap.limit,
                self.config.sockets.slot_ttl,
                now,
            ) {
                Acquire::Granted => slot = Some((owner, req.slot_id.to_string())),
                Acquire::OverCap => return deny(req, BindDenial::TooManySockets),
                Acquire::Full => return deny(req, BindDenial::SlotStoreFull),
            }
        }

        BindDecision::Allow {
            live: req.websocket.then_some(LiveTerms {
                token,
                slot,
                single_use: binding.single_use,
                reauth: None,
            }),
            notes,
        }
    }

    /// [`Self::decide_selected`] with the fleet store: the claims an allowed request makes are
    /// recorded, to be confirmed by etcd before the request goes on.
    pub fn decide_fleet(
        &self,
        selected: Result<Option<&Binding>, PathError>,
        req: &BindRequest<'_>,
        now: Option<u64>,
        revocations: Option<&RevocationState>,
    ) -> FleetDecision {
        let mut connect = Connect::default();
        match self.decide_selected(selected, req, now, revocations, &mut connect) {
            BindDecision::Allow { live, notes } if !connect.is_empty() => {
                FleetDecision::Ask(Box::new(Pending {
                    connect,
                    handshake: handshake(req),
                    live,
                    notes,
                }))
            }
            decision => FleetDecision::Now(decision),
        }
    }

    /// The revocation feed's verdict on `token`: a stale list (or an unknown time) refuses under
    /// fail-closed, and is noted under fail-open.
    fn check_revocation(
        &self,
        token: &TokenId,
        now: Option<u64>,
        revocations: Option<&RevocationState>,
        notes: &mut Vec<SessionBindingStat>,
    ) -> Result<(), BindDenial> {
        let (Some(feed), Some(state)) = (&self.config.revocation, revocations) else {
            return Ok(());
        };
        match now {
            Some(now) if state.is_stale(now, feed.max_stale) => {
                if feed.fail_closed {
                    return Err(BindDenial::RevocationStale);
                }
                notes.push(SessionBindingStat::RevocationStaleServed);
            }
            Some(_) => {}
            None if feed.fail_closed => return Err(BindDenial::Clock),
            None => {}
        }
        match state.list.check(token) {
            Some(r) => Err(BindDenial::Revoked(r)),
            None => Ok(()),
        }
    }

    /// Claim the `jti` of a single-use token: once per issuer, remembered until `exp` + skew,
    /// which must lie within what the store remembers; at most `jti.max_per_subject` outstanding
    /// per subject. `Ok(Some(note))` when the store pushed out another entry.
    fn use_jti(
        &self,
        claims: &Claims,
        now: Option<u64>,
        store: &mut dyn BindingStore,
    ) -> Result<Option<SessionBindingStat>, BindDenial> {
        let Some(jti) = text_claim(claims, "jti") else {
            return Err(BindDenial::NoJti);
        };
        let Some(now) = now else {
            return Err(BindDenial::Clock);
        };
        let jti_cfg = &self.config.jti;
        let Some(until) = claims
            .get("exp")
            .and_then(Value::as_u64)
            .map(|exp| exp.saturating_add(jti_cfg.skew))
        else {
            return Err(BindDenial::JtiUnbounded);
        };
        if until > now.saturating_add(jti_cfg.max_ttl) {
            return Err(BindDenial::JtiUnbounded);
        }
        let iss = text_claim(claims, "iss").unwrap_or_default();
        let owner = text_claim(claims, "sub").map(|sub| short_hash(&format!("{iss}\0sub\0{sub}")));
        let id = short_hash(&format!("{iss}\0{jti}"));
        match store.use_once(
            &id,
            owner.as_deref().map(|o| (o, jti_cfg.per_subject)),
            until,
            now,
        ) {
            UseOnce::Fresh => Ok(None),
            UseOnce::FreshEvicted => Ok(Some(SessionBindingStat::JtiEvicted)),
            UseOnce::Replay => Err(BindDenial::Replay),
            UseOnce::Full => Err(BindDenial::JtiStoreFull),
            UseOnce::OwnerFull => Err(BindDenial::JtiSubjectFull),
        }
    }

    /// Must a live socket carrying `terms` close now? A revoked token (the connect token or the
    /// last accepted re-auth token) closes it with 4401; a stale list, or an unknown time, under
    /// fail-closed with 1013.
    pub fn check_live(
        &self,
        terms: &LiveTerms,
        revocations: Option<&RevocationState>,
        now: Option<u64>,
    ) -> Option<LiveClose> {
        let (feed, state) = (self.config.revocation.as_ref()?, revocations?);
        for token in std::iter::once(&terms.token).chain(terms.reauth.as_deref()) {
            if let Some(r) = state.list.check(token) {
                return Some(BindDenial::Revoked(r).live_close());
            }
        }
        if feed.fail_closed {
            match now {
                None => return Some(BindDenial::Clock.live_close()),
                Some(now) if state.is_stale(now, feed.max_stale) => {
                    return Some(BindDenial::RevocationStale.live_close())
                }
                Some(_) => {}
            }
        }
        None
    }

    /// An in-band re-auth token that jwt-auth verified and accepted on a live socket (its
    /// payload `claims` and `kid`): checked against the revocation feed and, on a single-use
    /// binding, claimed like a connect token. `Ok` keeps the socket (and it is remembered in
    /// `terms` for later revocation checks); `Err` says how to close it.
    pub fn check_reauth(
        &self,
        terms: &mut LiveTerms,
        claims: &Claims,
        kid: Option<&str>,
        now: Option<u64>,
        revocations: Option<&RevocationState>,
        store: &mut dyn BindingStore,
    ) -> Result<Vec<SessionBindingStat>, LiveClose> {
        let token = token_id(claims, kid);
        let mut notes = Vec::new();
        self.check_revocation(&token, now, revocations, &mut notes)
            .map_err(BindDenial::live_close)?;
        if terms.single_use {
            if let Some(note) = self
                .use_jti(claims, now, store)
                .map_err(BindDenial::live_close)?
            {
                notes.push(note);
            }
        }
        terms.reauth = Some(Box::new(token));
        Ok(notes)
    }
}

#[cfg(test)]
mod tests;

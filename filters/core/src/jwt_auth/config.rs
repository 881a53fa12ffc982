//! The configuration: the raw JSON users write (unknown fields are errors) and its compiled
//! form, checked at load.

use crate::b64url_decode;
use crate::config::{check_fetch, parse_json, ConfigError};
use crate::jwt::claims::claim_text;
use crate::jwt::{Claims, KeySet, TimeRules, VerifyingKey};
use crate::path::PathError;
use crate::rules::{Needs, RawMatch, Rules};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;

// ---------------------------------------------------------------------------------------------
// Raw config: exactly the JSON users write. Unknown fields are errors.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    providers: Vec<RawProvider>,
    sources: Option<Vec<RawSource>>,
    refused_query_params: Option<Vec<String>>,
    #[serde(default = "default_skew")]
    clock_skew_seconds: u64,
    max_lifetime_seconds: Option<u64>,
    max_age_seconds: Option<u64>,
    #[serde(default = "default_max_token_bytes")]
    max_token_bytes: usize,
    #[serde(default)]
    require: Vec<RawRequirement>,
    #[serde(default)]
    allow_missing: bool,
    #[serde(default)]
    forward_claims: BTreeMap<String, String>,
    #[serde(default = "default_cache_entries")]
    cache_entries: usize,
    session_claims: Option<Vec<String>>,
    reauth_type: Option<String>,
    max_socket_seconds: Option<u64>,
    #[serde(default)]
    wss_only: bool,
    #[serde(default)]
    trust_forwarded_proto: bool,
    /// Forward the verified token upstream as `Authorization: Bearer <token>`.
    #[serde(default)]
    forward: bool,
    /// Web origins whose pages may use a cookie-sourced token on a state-changing request or a
    /// WebSocket upgrade.
    #[serde(default)]
    trusted_web_origins: Vec<String>,
    /// Token `typ` values accepted by every provider that does not set its own.
    required_typ: Option<Vec<String>>,
    #[serde(default = "default_sessions_per_subject")]
    max_sessions_per_subject: usize,
    /// Fleet store for session deadlines (docs/fleet.md).
    store: Option<crate::store::RawStore>,
    #[serde(default)]
    rules: Vec<RawRule>,
}

pub(super) fn default_skew() -> u64 {
    30
}
pub(super) fn default_max_token_bytes() -> usize {
    8192
}
pub(super) fn default_cache_entries() -> usize {
    1024
}
pub(super) fn default_prefix() -> String {
    "bearer.".to_string()
}
pub(super) fn default_refresh() -> u64 {
    300
}
pub(super) fn default_timeout() -> u64 {
    2000
}
pub(super) fn default_min_refetch() -> u64 {
    10
}
pub(super) fn default_sessions_per_subject() -> usize {
    crate::sessions::DEFAULT_PER_SUBJECT
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProvider {
    name: String,
    issuer: String,
    #[serde(default)]
    audiences: Vec<String>,
    jwks: Option<RawJwks>,
    #[serde(default)]
    hs256_secrets: Vec<RawSecret>,
    required_typ: Option<Vec<String>>,
    #[serde(default)]
    require_kid: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub(super) enum RawJwks {
    Inline(Value),
    Remote(RawRemote),
    /// OpenID Connect discovery: `path` is the issuer's `/.well-known/openid-configuration`.
    Discovery(RawRemote),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRemote {
    cluster: String,
    path: String,
    authority: Option<String>,
    #[serde(default = "default_refresh")]
    refresh_seconds: u64,
    #[serde(default = "default_timeout")]
    timeout_ms: u64,
    #[serde(default = "default_min_refetch")]
    min_refetch_seconds: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSecret {
    kid: Option<String>,
    secret_base64url: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub(super) enum RawSource {
    WebsocketProtocol {
        #[serde(default = "default_prefix")]
        prefix: String,
    },
    Authorization {},
    Cookie {
        name: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRequirement {
    claim: String,
    contains: Option<String>,
    equals: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    #[serde(rename = "match")]
    matcher: RawMatch,
    providers: Option<Vec<String>>,
    require: Option<Vec<RawRequirement>>,
    allow_missing: Option<bool>,
    max_age_seconds: Option<u64>,
    max_lifetime_seconds: Option<u64>,
    max_socket_seconds: Option<u64>,
    wss_only: Option<bool>,
    forward: Option<bool>,
    sources: Option<Vec<RawSource>>,
    trusted_web_origins: Option<Vec<String>>,
}

// ---------------------------------------------------------------------------------------------
// Compiled config.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteJwks {
    pub cluster: String,
    /// The JWKS, or with `discovery` the OpenID configuration naming it (`jwks_uri`).
    pub path: String,
    /// `jwks.discovery`: `path` is an OpenID Connect discovery document.
    pub discovery: bool,
    pub authority: String,
    pub refresh_seconds: u64,
    pub timeout_ms: u64,
    pub min_refetch_seconds: u64,
}

#[derive(Debug)]
pub struct Provider {
    pub name: String,
    pub issuer: String,
    pub audiences: Vec<String>,
    /// Inline JWKS keys and HS256 secrets.
    pub static_keys: KeySet,
    pub remote: Option<RemoteJwks>,
    /// Accepted `typ` header values, normalised ([`normal_typ`]); empty: no check.
    pub required_typ: Vec<String>,
    /// Refuse a token without `kid` when more than one of the provider's keys could verify it.
    pub require_kid: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    WebsocketProtocol { prefix: String },
    Authorization,
    Cookie { name: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    Present(String),
    Equals(String, String),
    Contains(String, String),
}

impl Requirement {
    pub(super) fn claim(&self) -> &str {
        match self {
            Requirement::Present(c) | Requirement::Equals(c, _) | Requirement::Contains(c, _) => c,
        }
    }

    pub fn is_met(&self, claims: &Claims) -> bool {
        let Some(value) = claims.get(self.claim()) else {
            return false;
        };
        match self {
            Requirement::Present(_) => !value.is_null(),
            Requirement::Equals(_, want) => match value {
                Value::String(_) | Value::Number(_) | Value::Bool(_) => claim_text(value) == *want,
                _ => false,
            },
            Requirement::Contains(_, want) => match value {
                Value::String(s) => s.split(' ').any(|part| part == want),
                Value::Array(list) => list.iter().any(|v| v.as_str() == Some(want.as_str())),
                _ => false,
            },
        }
    }
}

/// What applies to one request: the global settings or a rule's overrides of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Indexes into `JwtAuthConfig::providers`.
    pub providers: Vec<usize>,
    pub require: Vec<Requirement>,
    pub allow_missing: bool,
    pub time: TimeRules,
    /// Absolute maximum lifetime of a WebSocket, whatever the token refreshes.
    pub max_socket: Option<u64>,
    /// Refuse upgrades that did not arrive over TLS (close 4400).
    pub wss_only: bool,
    /// Forward the verified token upstream as `Authorization: Bearer <token>`.
    pub forward: bool,
    /// Where the token is looked for, in order.
    pub sources: Vec<Source>,
    /// Origins trusted for cookie-sourced tokens (lowercase).
    pub trusted_web_origins: Vec<String>,
}

#[derive(Debug)]
pub struct JwtAuthConfig {
    pub providers: Vec<Provider>,
    /// The global `sources` (a rule may override them: [`Policy::sources`]).
    pub sources: Vec<Source>,
    /// Every credential location of every policy: removed from every request, whatever the
    /// decision, so no credential jwt-auth did not verify reaches the upstream.
    pub strip: Vec<Source>,
    pub refused_query_params: Vec<String>,
    pub max_token_bytes: usize,
    /// `(claim, lowercase header name)`.
    pub forward_claims: Vec<(String, String)>,
    pub cache_entries: usize,
    /// Live sockets follow their session, named by the first of these claims a token has: a
    /// fresh token of the same session extends every live socket of it. Empty: sockets follow
    /// their own token only.
    pub session_claims: Vec<String>,
    /// The `type` of in-band re-auth messages on live sockets (see [`crate::reauth`]).
    pub reauth: Option<String>,
    /// Session records one subject may keep per shared-data bucket (see [`crate::sessions`]).
    pub sessions_per_subject: usize,
    /// Session deadlines shared by every replica through etcd (`store`, docs/fleet.md).
    pub store: Option<crate::store::StoreConfig>,
    /// Believe `x-forwarded-proto: https` from the hop before Envoy (for `wss_only`).
    pub trust_forwarded_proto: bool,
    pub default_policy: Arc<Policy>,
    /// A rule's policy; shared, so a request takes its policy without copying it.
    pub rules: Rules<Arc<Policy>>,
    /// Which request facts it looks at beyond the path and the token headers (compiled once).
    pub needs: Needs,
}

pub(super) fn positive(value: Option<u64>, path: &str) -> Result<Option<u64>, ConfigError> {
    match value {
        Some(0) => Err(ConfigError::new(path, "must be at least 1")),
        v => Ok(v),
    }
}

pub(super) fn compile_requirements(
    raw: Vec<RawRequirement>,
    path: &str,
) -> Result<Vec<Requirement>, ConfigError> {
    raw.into_iter()
        .enumerate()
        .map(|(i, r)| {
            if r.claim.is_empty() {
                return Err(ConfigError::new(
                    format!("{path}[{i}].claim"),
                    "must not be empty",
                ));
            }
            Ok(match (r.contains, r.equals) {
                (None, None) => Requirement::Present(r.claim),
                (Some(c), None) => Requirement::Contains(r.claim, c),
                (None, Some(e)) => Requirement::Equals(r.claim, e),
                (Some(_), Some(_)) => {
                    return Err(ConfigError::new(
                        format!("{path}[{i}]"),
                        "give either `contains` or `equals`, not both",
                    ))
                }
            })
        })
        .collect()
}

pub(super) fn compile_sources(raw: Vec<RawSource>, path: &str) -> Result<Vec<Source>, ConfigError> {
    if raw.is_empty() {
        return Err(ConfigError::new(path, "at least one source is required"));
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, s)| match s {
            RawSource::WebsocketProtocol { prefix } if prefix.is_empty() => Err(ConfigError::new(
                format!("{path}[{i}].websocket_protocol.prefix"),
                "must not be empty",
            )),
            RawSource::WebsocketProtocol { prefix } => Ok(Source::WebsocketProtocol { prefix }),
            RawSource::Authorization {} => Ok(Source::Authorization),
            RawSource::Cookie { name } if name.is_empty() => Err(ConfigError::new(
                format!("{path}[{i}].cookie.name"),
                "must not be empty",
            )),
            RawSource::Cookie { name } => Ok(Source::Cookie { name }),
        })
        .collect()
}

/// Web origins as `scheme://host[:port]`, lowercased.
pub(super) fn compile_origins(raw: Vec<String>, path: &str) -> Result<Vec<String>, ConfigError> {
    raw.into_iter()
        .enumerate()
        .map(|(i, o)| {
            let ok = o.split_once("://").is_some_and(|(scheme, rest)| {
                !scheme.is_empty() && !rest.is_empty() && !rest.contains(['/', '?', '#', ' '])
            });
            if ok {
                Ok(o.to_ascii_lowercase())
            } else {
                Err(ConfigError::new(
                    format!("{path}[{i}]"),
                    "must be an origin, `scheme://host[:port]` without a path",
                ))
            }
        })
        .collect()
}

/// A policy that takes tokens from a cookie must say which web origins may use it.
pub(super) fn check_cookie_origins(policy: &Policy, path: &str) -> Result<(), ConfigError> {
    let cookie = policy
        .sources
        .iter()
        .any(|s| matches!(s, Source::Cookie { .. }));
    if cookie && policy.trusted_web_origins.is_empty() {
        return Err(ConfigError::new(
            path,
            "a cookie source needs the web origins whose pages may use it (CSRF and cross-site WebSocket hijacking)",
        ));
    }
    Ok(())
}

pub(super) fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A `typ` compared case-insensitively, `application/` prefix or not (RFC 7515 4.1.9).
pub fn normal_typ(typ: &str) -> String {
    let t = typ.trim().to_ascii_lowercase();
    match t.strip_prefix("application/") {
        Some(rest) => rest.to_string(),
        None => t,
    }
}

pub(super) fn compile_typ(raw: Vec<String>, path: &str) -> Result<Vec<String>, ConfigError> {
    if raw.is_empty() {
        return Err(ConfigError::new(
            path,
            "list at least one `typ`, or leave it out",
        ));
    }
    raw.iter()
        .enumerate()
        .map(|(i, t)| match normal_typ(t) {
            n if n.is_empty() => Err(ConfigError::new(
                format!("{path}[{i}]"),
                "must not be empty",
            )),
            n => Ok(n),
        })
        .collect()
}

pub(super) fn compile_provider(
    i: usize,
    raw: RawProvider,
    default_typ: &[String],
) -> Result<Provider, ConfigError> {
    let at = |field: &str| format!("providers[{i}].{field}");
    if raw.name.is_empty() {
        return Err(ConfigError::new(at("name"), "must not be empty"));
    }
    if raw.issuer.is_empty() {
        return Err(ConfigError::new(at("issuer"), "must not be empty"));
    }
    let mut static_keys = KeySet::default();
    let mut remote = None;
    match raw.jwks {
        Some(RawJwks::Inline(jwks)) => {
            let (keys, _) =
                KeySet::from_jwks(&jwks, true).map_err(|e| e.within(&at("jwks.inline")))?;
            if keys.is_empty() {
                return Err(ConfigError::new(at("jwks.inline.keys"), "has no keys"));
            }
            static_keys = keys;
        }
        Some(RawJwks::Remote(r)) => remote = Some(compile_remote(&at("jwks.remote"), r, false)?),
        Some(RawJwks::Discovery(r)) => {
            remote = Some(compile_remote(&at("jwks.discovery"), r, true)?)
        }
        None => {}
    }
    let mut secrets = Vec::new();
    for (j, s) in raw.hs256_secrets.into_iter().enumerate() {
        let path = at(&format!("hs256_secrets[{j}]"));
        let bytes = b64url_decode(&s.secret_base64url)
            .ok_or_else(|| ConfigError::new(format!("{path}.secret_base64url"), "not base64url"))?;
        secrets.push(VerifyingKey::hs256(s.kid, bytes).map_err(|e| e.within(&path))?);
    }
    static_keys.extend(&KeySet::new(secrets));
    if static_keys.is_empty() && remote.is_none() {
        return Err(ConfigError::new(
            at("jwks"),
            "a provider needs `jwks` (inline or remote) or `hs256_secrets`",
        ));
    }
    let required_typ = match raw.required_typ {
        Some(list) => compile_typ(list, &at("required_typ"))?,
        None => default_typ.to_vec(),
    };
    Ok(Provider {
        name: raw.name,
        issuer: raw.issuer,
        audiences: raw.audiences,
        static_keys,
        remote,
        required_typ,
        require_kid: raw.require_kid,
    })
}

pub(super) fn compile_remote(
    at: &str,
    r: RawRemote,
    discovery: bool,
) -> Result<RemoteJwks, ConfigError> {
    check_fetch(at, &r.cluster, &r.path, r.refresh_seconds)?;
    if r.timeout_ms == 0 {
        return Err(ConfigError::new(
            format!("{at}.timeout_ms"),
            "must be at least 1",
        ));
    }
    Ok(RemoteJwks {
        authority: r.authority.unwrap_or_else(|| r.cluster.clone()),
        cluster: r.cluster,
        path: r.path,
        discovery,
        refresh_seconds: r.refresh_seconds,
        timeout_ms: r.timeout_ms,
        min_refetch_seconds: r.min_refetch_seconds,
    })
}

impl JwtAuthConfig {
    /// Parse and compile the filter's JSON config. Every problem is reported with the path of
    /// the field.
    pub fn compile(bytes: &[u8]) -> Result<Self, ConfigError> {
        let raw: RawConfig = parse_json(bytes)?;
        if raw.providers.is_empty() {
            return Err(ConfigError::new(
                "providers",
                "at least one provider is required",
            ));
        }
        let default_typ = match raw.required_typ {
            Some(list) => compile_typ(list, "required_typ")?,
            None => Vec::new(),
        };
        let mut providers = Vec::with_capacity(raw.providers.len());
        for (i, p) in raw.providers.into_iter().enumerate() {
            if providers.iter().any(|q: &Provider| q.name == p.name) {
                return Err(ConfigError::new(
                    format!("providers[{i}].name"),
                    "duplicate name",
                ));
            }
            providers.push(compile_provider(i, p, &default_typ)?);
        }
        let sources = match raw.sources {
            None => vec![
                Source::WebsocketProtocol {
                    prefix: default_prefix(),
                },
                Source::Authorization,
            ],
            Some(list) => compile_sources(list, "sources")?,
        };
        let mut forward_claims = Vec::new();
        for (claim, header) in raw.forward_claims {
            if !valid_header_name(&header) {
                return Err(ConfigError::new(
                    format!("forward_claims.{claim}"),
                    "not a valid header name",
                ));
            }
            let header = header.to_ascii_lowercase();
            if header.starts_with(':')
                || ["authorization", "cookie", "host", "sec-websocket-protocol"]
                    .contains(&header.as_str())
            {
                return Err(ConfigError::new(
                    format!("forward_claims.{claim}"),
                    "may not overwrite this header",
                ));
            }
            forward_claims.push((claim, header));
        }
        let time = TimeRules {
            skew: raw.clock_skew_seconds,
            max_age: raw.max_age_seconds,
            max_lifetime: raw.max_lifetime_seconds,
        };
        let default_policy = Policy {
            providers: (0..providers.len()).collect(),
            require: compile_requirements(raw.require, "require")?,
            allow_missing: raw.allow_missing,
            time,
            max_socket: positive(raw.max_socket_seconds, "max_socket_seconds")?,
            wss_only: raw.wss_only,
            forward: raw.forward,
            sources: sources.clone(),
            trusted_web_origins: compile_origins(raw.trusted_web_origins, "trusted_web_origins")?,
        };
        check_cookie_origins(&default_policy, "trusted_web_origins")?;
        let mut rules = Vec::with_capacity(raw.rules.len());
        for (i, r) in raw.rules.into_iter().enumerate() {
            let at = |f: &str| format!("rules[{i}].{f}");
            let matcher = r.matcher.compile(&format!("rules[{i}]"))?;
            let mut policy = default_policy.clone();
            if let Some(names) = r.providers {
                if names.is_empty() {
                    return Err(ConfigError::new(
                        at("providers"),
                        "must name at least one provider",
                    ));
                }
                policy.providers = names
                    .iter()
                    .enumerate()
                    .map(|(j, n)| {
                        providers.iter().position(|p| &p.name == n).ok_or_else(|| {
                            ConfigError::new(
                                format!("rules[{i}].providers[{j}]"),
                                format!("no provider named `{n}`"),
                            )
                        })
                    })
                    .collect::<Result<_, _>>()?;
            }
            if let Some(req) = r.require {
                policy.require = compile_requirements(req, &at("require"))?;
            }
            if let Some(a) = r.allow_missing {
                policy.allow_missing = a;
            }
            if r.max_age_seconds.is_some() {
                policy.time.max_age = r.max_age_seconds;
            }
            if r.max_lifetime_seconds.is_some() {
                policy.time.max_lifetime = r.max_lifetime_seconds;
            }
            if r.max_socket_seconds.is_some() {
                policy.max_socket = positive(r.max_socket_seconds, &at("max_socket_seconds"))?;
            }
            if let Some(w) = r.wss_only {
                policy.wss_only = w;
            }
            if let Some(f) = r.forward {
                policy.forward = f;
            }
            if let Some(list) = r.sources {
                policy.sources = compile_sources(list, &at("sources"))?;
            }
            if let Some(list) = r.trusted_web_origins {
                policy.trusted_web_origins = compile_origins(list, &at("trusted_web_origins"))?;
            }
            check_cookie_origins(&policy, &at("trusted_web_origins"))?;
            rules.push((matcher, Arc::new(policy)));
        }
        let session_claims = raw.session_claims.unwrap_or_default();
        if let Some(i) = session_claims.iter().position(String::is_empty) {
            return Err(ConfigError::new(
                format!("session_claims[{i}]"),
                "must not be empty",
            ));
        }
        // Every credential location any policy reads: stripped from every request.
        let mut strip: Vec<Source> = Vec::new();
        for s in std::iter::once(&default_policy)
            .chain(rules.iter().map(|(_, p)| p.as_ref()))
            .flat_map(|p| p.sources.iter())
        {
            if !strip.contains(s) {
                strip.push(s.clone());
            }
        }
        let rules = Rules::new(rules);
        let needs = Needs {
            cookie: strip.iter().any(|s| matches!(s, Source::Cookie { .. })),
            ..rules.needs()
        };
        Ok(Self {
            needs,
            providers,
            sources,
            strip,
            refused_query_params: raw.refused_query_params.unwrap_or_else(|| {
                ["access_token", "token", "jwt", "id_token"]
                    .map(String::from)
                    .to_vec()
            }),
            max_token_bytes: raw.max_token_bytes,
            forward_claims,
            cache_entries: raw.cache_entries,
            reauth: match raw.reauth_type {
                None => None,
                Some(_) if session_claims.is_empty() => return Err(ConfigError::new(
                    "reauth_type",
                    "needs `session_claims`: a re-auth token must belong to the socket's session",
                )),
                Some(t) if t.is_empty() => {
                    return Err(ConfigError::new("reauth_type", "must not be empty"))
                }
                t => t,
            },
            session_claims,
            sessions_per_subject: match raw.max_sessions_per_subject {
                0 => {
                    return Err(ConfigError::new(
                        "max_sessions_per_subject",
                        "must be at least 1",
                    ))
                }
                n => n,
            },
            store: raw
                .store
                .map(crate::store::StoreConfig::compile)
                .transpose()?,
            trust_forwarded_proto: raw.trust_forwarded_proto,
            default_policy: Arc::new(default_policy),
            rules,
        })
    }

    /// The policy for a request: the first matching rule's, else the global one; a path with
    /// dot-segments or hidden separators is refused first ([`Rules::select`]).
    pub fn policy_for(
        &self,
        route: Option<&str>,
        path: &str,
        host: &str,
    ) -> Result<&Arc<Policy>, PathError> {
        Ok(self
            .rules
            .select(route, path, host)?
            .map_or(&self.default_policy, |(_, p)| p))
    }
}

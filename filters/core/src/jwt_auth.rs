//! jwt-auth: config (raw serde structs → compiled config) and the per-request decision.
//!
//! The shell gathers the request facts into [`Request`], calls [`JwtAuth::decide`] with `now`,
//! and applies the [`Decision`]: header edits and filter state, a local reply, or a JWKS fetch
//! after which it decides again.

use crate::cache::TokenCache;
use crate::config::{check_fetch, parse_json, ConfigError};
use crate::jwt::claims::{check_audience, claim_text};
use crate::jwt::{Claims, Jws, KeySet, TimeRules, TokenError, TokenTimes, VerifyingKey};
use crate::path::PathError;
use crate::reply::{LocalReply, Refusal, WsHandshake};
use crate::rules::{Needs, RawMatch, Rules};
use crate::{b64url_decode, cookie, origin, sha256, ws};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The filter-state property under which verified claims are published.
pub const CLAIMS_PROPERTY: &str = "gatehouse.jwt_auth.claims";
/// The filter-state property under which the verified token's `kid` is published (when it has
/// one): session-binding revokes by key id.
pub const KID_PROPERTY: &str = "gatehouse.jwt_auth.kid";
/// The payload of the last in-band re-auth token accepted on a live socket (overwritten by each
/// accepted re-auth): session-binding checks it (revocation, single use) on the same chunk.
pub const REAUTH_CLAIMS_PROPERTY: &str = "gatehouse.jwt_auth.reauth_claims";
/// The id of the key that verified that re-auth token (as [`KID_PROPERTY`]).
pub const REAUTH_KID_PROPERTY: &str = "gatehouse.jwt_auth.reauth_kid";

// ---------------------------------------------------------------------------------------------
// Raw config: exactly the JSON users write. Unknown fields are errors.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
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

fn default_skew() -> u64 {
    30
}
fn default_max_token_bytes() -> usize {
    8192
}
fn default_cache_entries() -> usize {
    1024
}
fn default_prefix() -> String {
    "bearer.".to_string()
}
fn default_refresh() -> u64 {
    300
}
fn default_timeout() -> u64 {
    2000
}
fn default_min_refetch() -> u64 {
    10
}
fn default_sessions_per_subject() -> usize {
    crate::sessions::DEFAULT_PER_SUBJECT
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
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
enum RawJwks {
    Inline(Value),
    Remote(RawRemote),
    /// OpenID Connect discovery: `path` is the issuer's `/.well-known/openid-configuration`.
    Discovery(RawRemote),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRemote {
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
struct RawSecret {
    kid: Option<String>,
    secret_base64url: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum RawSource {
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
struct RawRequirement {
    claim: String,
    contains: Option<String>,
    equals: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
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
    fn claim(&self) -> &str {
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

fn positive(value: Option<u64>, path: &str) -> Result<Option<u64>, ConfigError> {
    match value {
        Some(0) => Err(ConfigError::new(path, "must be at least 1")),
        v => Ok(v),
    }
}

fn compile_requirements(
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

fn compile_sources(raw: Vec<RawSource>, path: &str) -> Result<Vec<Source>, ConfigError> {
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
fn compile_origins(raw: Vec<String>, path: &str) -> Result<Vec<String>, ConfigError> {
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
fn check_cookie_origins(policy: &Policy, path: &str) -> Result<(), ConfigError> {
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

fn valid_header_name(name: &str) -> bool {
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

fn compile_typ(raw: Vec<String>, path: &str) -> Result<Vec<String>, ConfigError> {
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

fn compile_provider(
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

fn compile_remote(at: &str, r: RawRemote, discovery: bool) -> Result<RemoteJwks, ConfigError> {
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

// ---------------------------------------------------------------------------------------------
// Requests and decisions.

/// The request facts the decision needs; the shell reads them from the host.
#[derive(Debug, Default, Clone)]
pub struct Request<'a> {
    /// `:path`, with the query string.
    pub path: &'a str,
    pub host: &'a str,
    /// Envoy's `xds.route_name`.
    pub route_name: Option<&'a str>,
    /// `Upgrade: websocket` was asked for.
    pub websocket: bool,
    pub ws_key: Option<&'a str>,
    pub ws_protocols: Option<&'a str>,
    pub authorization: Option<&'a str>,
    pub cookie: Option<&'a str>,
    /// The downstream connection is TLS.
    pub tls: bool,
    /// `x-forwarded-proto` as received.
    pub forwarded_proto: Option<&'a str>,
    /// `:method`, `Origin` and `Sec-Fetch-Site`: read only when a cookie source is configured
    /// (`Needs::cookie`), for the origin check of cookie-sourced tokens.
    pub method: Option<&'a str>,
    pub origin: Option<&'a str>,
    pub sec_fetch_site: Option<&'a str>,
}

pub use crate::reply::HeaderEdit;

/// A verified token.
#[derive(Debug)]
pub struct Verified {
    pub provider: usize,
    pub claims: Claims,
    /// The decoded payload, exactly as signed: what goes into filter state.
    pub payload: Vec<u8>,
    pub times: TokenTimes,
    /// The protected header's `kid` (what the token claims; not what verified it).
    pub kid: Option<String>,
    /// The key that verified the signature: its `kid`, or its RFC 7638 thumbprint when it has
    /// none. What is published as [`KID_PROPERTY`] (revocation by key id).
    pub key_id: String,
    /// That key, so a JWKS refresh keeps cached tokens whose key is still published.
    pub key: Arc<VerifyingKey>,
    /// The session key of its claims (`session_claims`), hashed once here, not on every hit.
    pub session: Option<String>,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    Missing,
    /// A token in the query string.
    QueryToken,
    /// The token subprotocol was the only one offered, or the upgrade had no key.
    WsProtocol,
    Token(TokenError),
    /// A valid token that a requirement refuses.
    Forbidden,
    /// A plain `ws://` upgrade on a `wss_only` route.
    InsecureTransport,
    /// A re-auth token of another session than the socket's.
    OtherSession,
    /// A path with dot-segments or hidden separators (checked before any rule matches).
    Path(PathError),
    /// Two different tokens in the request's credential locations.
    MultipleTokens,
    /// A cookie-sourced token on a state-changing request or an upgrade from an untrusted origin.
    Origin,
    /// The host cannot tell the time: nothing time-bound can be decided.
    Clock,
    /// The token's key may be in the provider's remote JWKS, which has not loaded yet (the
    /// first fetch is under way or failed): the token cannot be checked now, which says nothing
    /// against it (503 / 1013, never 401).
    KeysNotLoaded,
}

impl Denial {
    /// The stat suffix: `gatehouse.jwt_auth.denied.<reason>`.
    pub fn reason(self) -> &'static str {
        match self {
            Denial::Missing => "missing",
            Denial::QueryToken => "query_token",
            Denial::WsProtocol => "ws_protocol",
            Denial::Token(e) => e.reason(),
            Denial::Forbidden => "forbidden",
            Denial::InsecureTransport => "insecure_transport",
            Denial::OtherSession => "other_session",
            Denial::Path(e) => e.reason(),
            Denial::MultipleTokens => "multiple_tokens",
            Denial::Origin => "origin",
            Denial::Clock => "clock",
            Denial::KeysNotLoaded => "jwks_unavailable",
        }
    }

    pub fn refusal(self) -> Refusal {
        match self {
            Denial::Missing => Refusal::MissingCredentials,
            Denial::QueryToken
            | Denial::WsProtocol
            | Denial::InsecureTransport
            | Denial::Path(_)
            | Denial::MultipleTokens => Refusal::BadRequest,
            Denial::Token(_) | Denial::OtherSession => Refusal::InvalidCredentials,
            Denial::Forbidden | Denial::Origin => Refusal::Forbidden,
            Denial::Clock | Denial::KeysNotLoaded => Refusal::Unavailable,
        }
    }
}

/// What a verified token means for live sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketTerms {
    /// The session key (a hash of the session claim, never the claim itself), when `sessions`
    /// is configured and the token names a session.
    pub session: Option<String>,
    /// The absolute end of a socket opened now (`max_socket_seconds`).
    pub until: Option<u64>,
}

#[derive(Debug)]
pub enum Decision {
    /// Forward, after applying `edits`. `token` is `None` when a missing token was allowed.
    Allow {
        edits: Vec<HeaderEdit>,
        token: Option<Arc<Verified>>,
        /// When the token stops counting (exp + skew): the deadline of a live socket.
        deadline: Option<u64>,
        cache_hit: bool,
        /// For a live socket (and for extending the live sockets of its session).
        socket: Option<SocketTerms>,
    },
    Deny {
        denial: Denial,
        reply: LocalReply,
    },
    /// The token names a key we do not have for a remote-JWKS provider: fetch that JWKS, then
    /// decide again with `may_fetch = false`.
    FetchJwks {
        provider: usize,
    },
}

/// Which document a fetch is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Doc {
    Jwks,
    /// An OpenID Connect discovery document (`jwks.discovery`).
    Discovery,
}

/// A fetch for the shell to start: `GET path` on `cluster` with `:authority`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchRequest<'a> {
    pub cluster: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub timeout_ms: u64,
    pub doc: Doc,
}

/// What a fetched document did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// A JWKS: its usable keys now verify (`skipped`: keys refused for what they are).
    Keys { count: usize, skipped: usize },
    /// A discovery document of the provider's issuer: fetch its JWKS now ([`JwtAuth::jwks_fetch`]).
    Discovered { jwks_uri: String },
    /// Nothing changed: the last good keys stay.
    Failed(String),
}

fn parse_jwks(body: &[u8]) -> Result<(KeySet, usize), String> {
    let value = crate::jwt::jwk::parse_jwks_document(body).map_err(|e| e.to_string())?;
    let (keys, skipped) = KeySet::from_jwks(&value, false).map_err(|e| e.to_string())?;
    if keys.is_empty() {
        return Err("no usable keys".into());
    }
    Ok((keys, skipped))
}

/// An OpenID Connect discovery document's `jwks_uri`, as (`:authority`, path with query), when
/// its `issuer` is exactly the provider's (OpenID Connect Discovery 1.0 section 4.3).
pub fn parse_discovery(body: &[u8], issuer: &str) -> Result<(String, String), String> {
    #[derive(Deserialize)]
    struct Discovery {
        issuer: Option<String>,
        jwks_uri: Option<String>,
    }
    let doc: Discovery =
        serde_json::from_slice(body).map_err(|e| format!("not an OpenID configuration: {e}"))?;
    match doc.issuer.as_deref() {
        Some(i) if i == issuer => {}
        Some(i) => return Err(format!("its issuer `{i}` is not the provider's `{issuer}`")),
        None => return Err("it has no `issuer`".into()),
    }
    let uri = doc.jwks_uri.ok_or("it has no `jwks_uri`")?;
    let rest = uri
        .strip_prefix("https://")
        .or_else(|| uri.strip_prefix("http://"))
        .ok_or_else(|| format!("jwks_uri `{uri}` is not an http(s) URL"))?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(at) => rest.split_at(at),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') || path.starts_with('?') {
        return Err(format!("jwks_uri `{uri}` is not a usable URL"));
    }
    Ok((authority.to_string(), path.to_string()))
}

/// Everything jwt-auth keeps per worker: the compiled config, the fetched keys, the cache.
pub struct JwtAuth {
    pub config: JwtAuthConfig,
    remote_keys: Vec<Option<KeySet>>,
    /// Per `jwks.discovery` provider, the JWKS its discovery document named last
    /// (`:authority`, path).
    discovered: Vec<Option<(String, String)>>,
    last_fetch: Vec<Option<u64>>,
    cache: TokenCache<Arc<Verified>>,
}

impl JwtAuth {
    pub fn new(config: JwtAuthConfig) -> Self {
        let n = config.providers.len();
        Self {
            cache: TokenCache::new(config.cache_entries),
            config,
            remote_keys: vec![None; n],
            discovered: vec![None; n],
            last_fetch: vec![None; n],
        }
    }

    /// The scheduled fetch of `provider`: its `jwks.remote`, or the discovery document of a
    /// `jwks.discovery` provider (whose answer names the JWKS to fetch next).
    pub fn scheduled_fetch(&self, provider: usize) -> Option<FetchRequest<'_>> {
        let remote = self.config.providers.get(provider)?.remote.as_ref()?;
        Some(FetchRequest {
            cluster: &remote.cluster,
            authority: &remote.authority,
            path: &remote.path,
            timeout_ms: remote.timeout_ms,
            doc: if remote.discovery {
                Doc::Discovery
            } else {
                Doc::Jwks
            },
        })
    }

    /// The fetch of `provider`'s JWKS itself: `jwks.remote`, or the `jwks_uri` of the last
    /// good discovery document (none before one arrived), on the same cluster.
    pub fn jwks_fetch(&self, provider: usize) -> Option<FetchRequest<'_>> {
        let remote = self.config.providers.get(provider)?.remote.as_ref()?;
        let (authority, path) = if remote.discovery {
            let (a, p) = self.discovered.get(provider)?.as_ref()?;
            (a.as_str(), p.as_str())
        } else {
            (remote.authority.as_str(), remote.path.as_str())
        };
        Some(FetchRequest {
            cluster: &remote.cluster,
            authority,
            path,
            timeout_ms: remote.timeout_ms,
            doc: Doc::Jwks,
        })
    }

    /// Apply the answer to a fetch of `doc` for `provider`. A failure (a status other than
    /// 200, an unusable document, a discovery document of another issuer) keeps the last good
    /// keys and the last good `jwks_uri`.
    pub fn apply_fetch(&mut self, provider: usize, doc: Doc, status: u32, body: &[u8]) -> Fetched {
        if status != 200 {
            return Fetched::Failed(format!("HTTP status {status}"));
        }
        match doc {
            Doc::Jwks => match parse_jwks(body) {
                Ok((keys, skipped)) => {
                    let count = keys.len();
                    self.set_remote_keys(provider, keys);
                    Fetched::Keys { count, skipped }
                }
                Err(why) => Fetched::Failed(why),
            },
            Doc::Discovery => {
                let Some(issuer) = self
                    .config
                    .providers
                    .get(provider)
                    .map(|p| p.issuer.clone())
                else {
                    return Fetched::Failed("no such provider".into());
                };
                match parse_discovery(body, &issuer) {
                    Ok((authority, path)) => {
                        let jwks_uri = format!("{authority}{path}");
                        if let Some(slot) = self.discovered.get_mut(provider) {
                            *slot = Some((authority, path));
                        }
                        Fetched::Discovered { jwks_uri }
                    }
                    Err(why) => Fetched::Failed(why),
                }
            }
        }
    }

    /// Replace a provider's fetched keys. Cached tokens of the provider whose verifying key is
    /// no longer published (same material, algorithm and `kid`) are dropped: a decision must
    /// never rest on a withdrawn key. The others stay, so a refetch (which an unknown `kid` can
    /// trigger, rate-limited) does not cost every user a signature check.
    pub fn set_remote_keys(&mut self, provider: usize, keys: KeySet) {
        if let Some(slot) = self.remote_keys.get_mut(provider) {
            *slot = Some(keys);
            let now_published = self.keys_of(provider);
            self.cache
                .retain(|v| v.provider != provider || now_published.contains(&v.key));
        }
    }

    pub fn has_remote_keys(&self, provider: usize) -> bool {
        matches!(self.remote_keys.get(provider), Some(Some(_)))
    }

    /// Record that a fetch of `provider`'s JWKS started at `now` (for the refetch rate limit).
    pub fn note_fetch(&mut self, provider: usize, now: u64) {
        if let Some(slot) = self.last_fetch.get_mut(provider) {
            *slot = Some(now);
        }
    }

    /// A provider with a remote JWKS that has not loaded yet: an unknown key proves nothing.
    fn awaits_remote_keys(&self, provider: usize) -> bool {
        self.config
            .providers
            .get(provider)
            .is_some_and(|p| p.remote.is_some())
            && !self.has_remote_keys(provider)
    }

    fn may_refetch(&self, provider: usize, now: u64) -> bool {
        if self.jwks_fetch(provider).is_none() {
            return false;
        }
        let Some(remote) = self
            .config
            .providers
            .get(provider)
            .and_then(|p| p.remote.as_ref())
        else {
            return false;
        };
        match self.last_fetch.get(provider).copied().flatten() {
            None => true,
            Some(t) => now >= t.saturating_add(remote.min_refetch_seconds),
        }
    }

    fn keys_of(&self, provider: usize) -> KeySet {
        let mut keys = self
            .config
            .providers
            .get(provider)
            .map(|p| p.static_keys.clone())
            .unwrap_or_default();
        if let Some(Some(remote)) = self.remote_keys.get(provider) {
            keys.extend(remote);
        }
        keys
    }

    /// Decide what happens to a request at `now`.
    pub fn decide(&mut self, req: &Request<'_>, now: u64, may_fetch: bool) -> Decision {
        self.decide_at(req, Some(now), may_fetch)
    }

    /// Decide what happens to a request; `now` is `None` when the host cannot tell the time,
    /// and then every decision that needs it fails closed (503 / close 1013, `clock`).
    pub fn decide_at(&mut self, req: &Request<'_>, now: Option<u64>, may_fetch: bool) -> Decision {
        let handshake = |protocol: Option<String>| {
            req.ws_key.map(|key| WsHandshake {
                accept: ws::accept_key(key),
                protocol,
            })
        };
        let token_prefixes: Vec<&str> = self
            .config
            .strip
            .iter()
            .filter_map(|s| match s {
                Source::WebsocketProtocol { prefix } => Some(prefix.as_str()),
                _ => None,
            })
            .collect();
        // The subprotocol a refusal selects: the first one that is not a token (a token is
        // never echoed back in the 101).
        let protocol = req.ws_protocols.and_then(|h| {
            ws::protocols(h)
                .find(|p| !token_prefixes.iter().any(|pre| p.starts_with(pre)))
                .map(str::to_string)
        });
        let deny = |denial: Denial, protocol: Option<String>| {
            let hs = if req.websocket {
                handshake(protocol)
            } else {
                None
            };
            Decision::Deny {
                denial,
                reply: denial.refusal().reply(hs.as_ref()),
            }
        };

        if req.websocket && req.ws_key.is_none() {
            // Without a key the handshake cannot be completed: plain 400.
            return Decision::Deny {
                denial: Denial::WsProtocol,
                reply: Refusal::BadRequest.reply(None),
            };
        }
        // Before any rule looks at the path: `/public/../api` must not match `/public`.
        let policy = match self.config.policy_for(req.route_name, req.path, req.host) {
            Ok(p) => p.clone(),
            Err(e) => return deny(Denial::Path(e), protocol),
        };
        if self.query_has_token(req.path) {
            return deny(Denial::QueryToken, protocol);
        }
        if req.websocket && policy.wss_only && !self.secure(req) {
            return deny(Denial::InsecureTransport, protocol);
        }

        // Client-sent copies of forwarded-claim headers never reach the upstream, and neither
        // does any credential in a location jwt-auth reads, whatever the decision.
        let mut edits: Vec<HeaderEdit> = self
            .config
            .forward_claims
            .iter()
            .map(|(_, h)| HeaderEdit::Remove(h.clone()))
            .collect();
        if req.websocket && self.config.reauth.is_some() {
            // Re-auth frames must be readable: no permessage-deflate.
            edits.push(HeaderEdit::Remove("sec-websocket-extensions".into()));
        }
        let only_token_protocol = self.strip_credentials(req, &mut edits);

        // The tokens the policy's sources hold, in source order.
        let found = policy_tokens(&policy, req);
        let Some(&(token, from)) = found.first() else {
            if policy.allow_missing {
                return Decision::Allow {
                    edits,
                    token: None,
                    deadline: None,
                    cache_hit: false,
                    socket: None,
                };
            }
            return deny(Denial::Missing, protocol);
        };
        if found.iter().any(|(t, _)| *t != token) {
            return deny(Denial::MultipleTokens, protocol);
        }
        if only_token_protocol && from == From::Protocol {
            // Nothing to select but the token: the browser needs an app protocol. The refusal
            // selects none (never the token).
            return deny(Denial::WsProtocol, None);
        }
        if from == From::Cookie
            && (req.websocket || req.method.is_some_and(origin::state_changing))
            && !origin::is_trusted(req.origin, req.sec_fetch_site, &policy.trusted_web_origins)
        {
            return deny(Denial::Origin, protocol);
        }
        let Some(now) = now else {
            return deny(Denial::Clock, protocol);
        };

        let (verified, cache_hit) = match self.verify(token, &policy, now, may_fetch) {
            Ok(v) => v,
            Err(VerifyError::Fetch(provider)) => return Decision::FetchJwks { provider },
            Err(VerifyError::KeysNotLoaded) => return deny(Denial::KeysNotLoaded, protocol),
            Err(VerifyError::Token(e)) => return deny(Denial::Token(e), protocol),
        };
        if !policy.require.iter().all(|r| r.is_met(&verified.claims)) {
            return deny(Denial::Forbidden, protocol);
        }
        for (claim, header) in &self.config.forward_claims {
            if let Some(value) = verified.claims.get(claim) {
                let text = claim_text(value);
                // A claim that cannot be a header value is not forwarded (never mangled).
                if !text.bytes().any(|b| b.is_ascii_control()) {
                    edits.push(HeaderEdit::Set(header.clone(), text));
                }
            }
        }
        if policy.forward {
            // Only ever the token just verified, in the one place an API looks for it.
            edits.retain(|e| !matches!(e, HeaderEdit::Remove(h) if h == "authorization"));
            edits.push(HeaderEdit::Set(
                "authorization".into(),
                format!("Bearer {token}"),
            ));
        }
        let socket = SocketTerms {
            session: verified.session.clone(),
            until: policy.max_socket.map(|s| now.saturating_add(s)),
        };
        Decision::Allow {
            edits,
            deadline: Some(verified.times.deadline(policy.time.skew)),
            token: Some(verified),
            cache_hit,
            socket: Some(socket),
        }
    }

    /// Remove every credential from every location any policy reads (like Envoy's jwt_authn
    /// `sanitizeHeaders`): token subprotocol entries, the `Authorization` header (all of its
    /// values: Envoy joins repeated headers with `,`; and a `Bearer` one even when it is not a
    /// source, since an upstream would take it for a token jwt-auth vouched for), the token
    /// cookies. True when the subprotocol header held only token entries.
    fn strip_credentials(&self, req: &Request<'_>, edits: &mut Vec<HeaderEdit>) -> bool {
        let mut only_tokens = false;
        let mut auth_source = false;
        let mut cookies: Vec<&str> = Vec::new();
        let mut prefixes: Vec<&str> = Vec::new();
        for s in &self.config.strip {
            match s {
                Source::WebsocketProtocol { prefix } => prefixes.push(prefix),
                Source::Authorization => auth_source = true,
                Source::Cookie { name } => cookies.push(name),
            }
        }
        if let Some(header) = req.ws_protocols.filter(|_| !prefixes.is_empty()) {
            let all: Vec<&str> = ws::protocols(header).collect();
            let others: Vec<&str> = all
                .iter()
                .copied()
                .filter(|p| !prefixes.iter().any(|pre| p.starts_with(pre)))
                .collect();
            if others.len() != all.len() {
                only_tokens = others.is_empty();
                edits.push(if others.is_empty() {
                    HeaderEdit::Remove("sec-websocket-protocol".into())
                } else {
                    HeaderEdit::Set("sec-websocket-protocol".into(), others.join(", "))
                });
            }
        }
        if let Some(value) = req.authorization {
            if auth_source || !bearer_tokens(value).is_empty() {
                edits.push(HeaderEdit::Remove("authorization".into()));
            }
        }
        if let Some(header) = req.cookie.filter(|_| !cookies.is_empty()) {
            if cookies.iter().any(|n| cookie::get(header, n).is_some()) {
                edits.push(match cookie::without(header, &cookies) {
                    Some(rest) => HeaderEdit::Set("cookie".into(), rest),
                    None => HeaderEdit::Remove("cookie".into()),
                });
            }
        }
        only_tokens
    }

    /// An in-band re-auth token on a live socket of `session` opened on `(route, path, host)`:
    /// verified like a connect token, with the route's rules, and it must belong to the same
    /// session. Returns the socket's new deadline and the verified token: the shell publishes
    /// it as [`REAUTH_CLAIMS_PROPERTY`] / [`REAUTH_KID_PROPERTY`] for session-binding, and never
    /// extends the shared session deadline with it (a re-auth extends its own socket only).
    pub fn reauth(
        &mut self,
        token: &str,
        at: (Option<&str>, &str, &str),
        session: &str,
        now: u64,
    ) -> Result<(u64, Arc<Verified>), Denial> {
        let policy = self
            .config
            .policy_for(at.0, at.1, at.2)
            .map_err(Denial::Path)?
            .clone();
        let (verified, _) = match self.verify(token, &policy, now, false) {
            Ok(v) => v,
            Err(VerifyError::Token(e)) => return Err(Denial::Token(e)),
            Err(VerifyError::Fetch(_)) => return Err(Denial::Token(TokenError::UnknownKey)),
            Err(VerifyError::KeysNotLoaded) => return Err(Denial::KeysNotLoaded),
        };
        if !policy.require.iter().all(|r| r.is_met(&verified.claims)) {
            return Err(Denial::Forbidden);
        }
        if verified.session.as_deref() != Some(session) {
            return Err(Denial::OtherSession);
        }
        Ok((verified.times.deadline(policy.time.skew), verified))
    }

    /// TLS to Envoy, or `x-forwarded-proto: https` from a trusted hop.
    fn secure(&self, req: &Request<'_>) -> bool {
        origin::is_https(
            req.tls,
            req.forwarded_proto,
            self.config.trust_forwarded_proto,
        )
    }

    /// The session key of verified claims: a short hash, so shared memory never holds the id.
    fn session_of(&self, claims: &Claims) -> Option<String> {
        let (name, value) = self
            .config
            .session_claims
            .iter()
            .find_map(|name| claims.get(name).map(|v| (name, claim_text(v))))?;
        if value.is_empty() {
            return None;
        }
        let hash = crate::short_hash(&format!("{name}\0{value}"));
        // Tagged with its subject, so one subject cannot fill the session buckets.
        Some(
            match claims.get("sub").map(claim_text).filter(|s| !s.is_empty()) {
                Some(sub) => {
                    let tag = sha256(format!("sub\0{sub}").as_bytes());
                    format!("{}.{hash}", crate::b64url(&tag[..6]))
                }
                None => hash,
            },
        )
    }

    fn query_has_token(&self, path: &str) -> bool {
        let Some((_, query)) = path.split_once('?') else {
            return false;
        };
        let query = query.split('#').next().unwrap_or(query);
        form_urlencoded::parse(query.as_bytes()).any(|(k, _)| {
            self.config
                .refused_query_params
                .iter()
                .any(|r| r.eq_ignore_ascii_case(&k))
        })
    }

    fn verify(
        &mut self,
        token: &str,
        policy: &Policy,
        now: u64,
        may_fetch: bool,
    ) -> Result<(Arc<Verified>, bool), VerifyError> {
        if token.len() > self.config.max_token_bytes {
            return Err(VerifyError::Token(TokenError::TooLarge));
        }
        if let Some(v) = self.cache.get(token.as_bytes(), now) {
            // A hit saves the signature check only; time and policy checks run as on a miss.
            if !policy.providers.contains(&v.provider) {
                return Err(VerifyError::Token(TokenError::Issuer));
            }
            v.times
                .check(now, &policy.time)
                .map_err(VerifyError::Token)?;
            return Ok((v, true));
        }
        let jws = Jws::parse(token, self.config.max_token_bytes).map_err(VerifyError::Token)?;
        let claims: Claims = match serde_json::from_slice(&jws.payload) {
            Ok(Value::Object(map)) => map,
            _ => return Err(VerifyError::Token(TokenError::Malformed)),
        };
        // The issuer picks the provider (among those the policy allows).
        let iss = claims.get("iss").and_then(Value::as_str);
        let provider = policy
            .providers
            .iter()
            .copied()
            .find(|&p| {
                self.config
                    .providers
                    .get(p)
                    .is_some_and(|pr| Some(pr.issuer.as_str()) == iss)
            })
            .ok_or(VerifyError::Token(TokenError::Issuer))?;
        // RFC 8725 3.11: a token of another type (an ID token, a logout token) is not an
        // access token, even signed by the same key.
        if let Some(p) = self.config.providers.get(provider) {
            if !p.required_typ.is_empty()
                && !jws
                    .typ
                    .as_deref()
                    .is_some_and(|t| p.required_typ.contains(&normal_typ(t)))
            {
                return Err(VerifyError::Token(TokenError::Type));
            }
        }
        let keys = self.keys_of(provider);
        if jws.kid.is_none()
            && self
                .config
                .providers
                .get(provider)
                .is_some_and(|p| p.require_kid)
            && keys.candidates(None).filter(|k| k.alg == jws.alg).count() > 1
        {
            // Which key is meant is the token's to say when several could fit.
            return Err(VerifyError::Token(TokenError::UnknownKey));
        }
        let key = match jws.verify(&keys) {
            Ok(key) => key,
            Err(TokenError::UnknownKey) if may_fetch && self.may_refetch(provider, now) => {
                return Err(VerifyError::Fetch(provider));
            }
            Err(TokenError::UnknownKey) if self.awaits_remote_keys(provider) => {
                return Err(VerifyError::KeysNotLoaded);
            }
            Err(e) => return Err(VerifyError::Token(e)),
        };
        let times = TokenTimes::read(&claims).map_err(VerifyError::Token)?;
        if let Some(p) = self.config.providers.get(provider) {
            check_audience(&claims, &p.audiences).map_err(VerifyError::Token)?;
        }
        let verified = Arc::new(Verified {
            provider,
            session: self.session_of(&claims),
            claims,
            payload: jws.payload,
            times,
            kid: jws.kid,
            key_id: key.id().to_string(),
            key,
        });
        // Cached before the time check: validity is re-checked on every hit anyway.
        self.cache.insert(
            token.as_bytes(),
            verified.clone(),
            times.deadline(policy.time.skew),
            now,
        );
        times.check(now, &policy.time).map_err(VerifyError::Token)?;
        Ok((verified, false))
    }
}

/// The `Bearer` credentials of an `Authorization` value (Envoy joins repeated headers with
/// `,`; the scheme is case-insensitive and any run of spaces or tabs may follow it).
pub fn bearer_tokens(value: &str) -> Vec<&str> {
    value
        .split(',')
        .filter_map(|cred| {
            let cred = cred.trim_matches([' ', '\t']);
            let (scheme, rest) = cred.split_once([' ', '\t'])?;
            let token = rest.trim_matches([' ', '\t']);
            (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
        })
        .collect()
}

/// Which kind of location a token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum From {
    Protocol,
    Authorization,
    Cookie,
}

/// Every token in `policy`'s sources, in source order, with the kind of location it was in.
fn policy_tokens<'r>(policy: &Policy, req: &Request<'r>) -> Vec<(&'r str, From)> {
    let mut found = Vec::new();
    for source in &policy.sources {
        match source {
            Source::WebsocketProtocol { prefix } => {
                if let Some(header) = req.ws_protocols {
                    found.extend(
                        ws::protocols(header)
                            .filter_map(|p| p.strip_prefix(prefix.as_str()))
                            .map(|t| (t, From::Protocol)),
                    );
                }
            }
            Source::Authorization => {
                if let Some(value) = req.authorization {
                    found.extend(
                        bearer_tokens(value)
                            .into_iter()
                            .map(|t| (t, From::Authorization)),
                    );
                }
            }
            Source::Cookie { name } => {
                if let Some(t) = req.cookie.and_then(|h| cookie::get(h, name)) {
                    found.push((t, From::Cookie));
                }
            }
        }
    }
    found
}

enum VerifyError {
    Token(TokenError),
    Fetch(usize),
    /// Unknown key while the provider's remote JWKS has never loaded.
    KeysNotLoaded,
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod discovery_tests;

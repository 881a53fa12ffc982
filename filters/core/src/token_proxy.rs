//! token-proxy: the OAuth-Proxy half of the token-handler pattern. Encrypted HttpOnly cookies
//! in, `Authorization: Bearer` out; CSRF on state-changing requests; CORS for the SPA's origin;
//! `Set-Cookie` hardening on responses.
//!
//! Cookies are byte-compatible with the Curity token-handler v1 format: base64url (no padding)
//! of `0x01 || 12-byte IV || AES-256-GCM ciphertext || 16-byte tag`, no AAD, key as 64 hex chars.

use crate::cache::TokenCache;
use crate::config::{parse_json, ConfigError};
use crate::cookie;
use crate::origin;
use crate::reply::{LocalReply, Refusal, WsHandshake};
use crate::ws;
use aes_gcm::aead::Aead;
use aes_gcm::{Aes256Gcm, KeyInit};
use base64::Engine;
use serde::Deserialize;
use std::sync::{Arc, Mutex};
use subtle::ConstantTimeEq;

const VERSION: u8 = 0x01;
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Cookies above this size are refused before decoding.
const MAX_COOKIE_BYTES: usize = 16 * 1024;
/// Decrypted cookies kept per VM. AES-GCM has no hardware help in wasm: one decrypt of a
/// token-sized cookie costs ~40 µs of Envoy CPU, and a browser sends the same cookie on every
/// request until it logs in again. See docs/token-proxy.md.
const DECRYPTED_CACHE_ENTRIES: usize = 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    cookie_prefix: String,
    #[serde(default)]
    encryption_keys: Option<Vec<String>>,
    #[serde(default)]
    encryption_keys_env: Option<String>,
    #[serde(default)]
    trusted_web_origins: Vec<String>,
    #[serde(default)]
    allow_tokens: bool,
    #[serde(default)]
    cors: Option<RawCors>,
    #[serde(default)]
    harden_cookies: Option<RawHarden>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCors {
    #[serde(default = "default_true")]
    enabled: bool,
    #[serde(default)]
    allow_headers: Vec<String>,
    #[serde(default = "default_max_age")]
    max_age_seconds: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHarden {
    names: Vec<String>,
    #[serde(default = "default_path")]
    path: String,
}

fn default_true() -> bool {
    true
}
fn default_max_age() -> u64 {
    600
}
fn default_path() -> String {
    "/".to_string()
}

/// Cookie name prefixes the browser enforces (RFC 6265bis §4.1.3): a `__Secure-` cookie must be
/// `Secure`; a `__Host-` cookie must also have `Path=/` and no `Domain`, so a sibling subdomain
/// cannot set or shadow it (cookie tossing). Browsers match them case-insensitively.
const HOST_PREFIX: &str = "__Host-";
const SECURE_PREFIX: &str = "__Secure-";

fn has_prefix(name: &str, prefix: &str) -> bool {
    name.get(..prefix.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
}

/// `name` without a `__Host-` / `__Secure-` prefix.
fn without_cookie_prefix(name: &str) -> &str {
    [HOST_PREFIX, SECURE_PREFIX]
        .iter()
        .find(|p| has_prefix(name, p))
        .and_then(|p| name.get(p.len()..))
        .unwrap_or(name)
}

/// Why a request was refused. The client only ever sees a generic 401; this goes to the log and
/// the stat `gatehouse.token_proxy.denied.<reason>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CookieError {
    NotBase64,
    TooShort,
    TooLarge,
    Version,
    /// The tag did not verify under any configured key: tampered, or the wrong key.
    Decrypt,
    NotUtf8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyDenial {
    Cookie(CookieError),
    /// A bearer token sent by the client while `allow_tokens` is off.
    TokenNotAllowed,
    /// `Origin` missing or not trusted on a state-changing request, a WebSocket upgrade that
    /// carries the access cookie, or a preflight.
    Origin,
    /// The CSRF header is missing or does not match the CSRF cookie.
    Csrf,
}

impl ProxyDenial {
    pub fn reason(self) -> &'static str {
        match self {
            ProxyDenial::Cookie(CookieError::NotBase64) => "cookie_encoding",
            ProxyDenial::Cookie(CookieError::TooShort) => "cookie_truncated",
            ProxyDenial::Cookie(CookieError::TooLarge) => "cookie_too_large",
            ProxyDenial::Cookie(CookieError::Version) => "cookie_version",
            ProxyDenial::Cookie(CookieError::Decrypt) => "cookie_decrypt",
            ProxyDenial::Cookie(CookieError::NotUtf8) => "cookie_content",
            ProxyDenial::TokenNotAllowed => "token_not_allowed",
            ProxyDenial::Origin => "origin",
            ProxyDenial::Csrf => "csrf",
        }
    }

    /// How the client is refused: a generic 401 (close 4401 on an upgrade), except a WebSocket
    /// upgrade from an untrusted origin, which is forbidden (close 4403).
    pub fn refusal(self, websocket: bool) -> Refusal {
        match self {
            ProxyDenial::Origin if websocket => Refusal::Forbidden,
            _ => Refusal::InvalidCredentials,
        }
    }
}

/// AES-256-GCM keys, the current one first; older ones only decrypt (rotation).
pub struct CookieKeys {
    ciphers: Vec<Aes256Gcm>,
    /// A cookie value → its plaintext. The plaintext of a value never changes under
    /// the same keys (new keys come with a new `CookieKeys`), so entries need no expiry; only
    /// successful decryptions are kept, and a forged value cannot collide with a cached one.
    decrypted: Mutex<TokenCache<Arc<str>>>,
}

impl CookieKeys {
    /// Keys as written in `encryption_keys`: 64 hex characters each, the current one first.
    /// Errors name the key by index (`encryption_keys[1]`) and never repeat key material.
    pub fn from_hex(keys: &[String]) -> Result<Self, ConfigError> {
        if keys.is_empty() {
            return Err(ConfigError::new(
                "encryption_keys",
                "at least one key is required",
            ));
        }
        let mut ciphers = Vec::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            let bytes = decode_hex(k).filter(|b| b.len() == 32).ok_or_else(|| {
                ConfigError::new(
                    format!("encryption_keys[{i}]"),
                    "must be 64 hex characters (32 bytes)",
                )
            })?;
            let cipher = Aes256Gcm::new_from_slice(&bytes).map_err(|_| {
                ConfigError::new(format!("encryption_keys[{i}]"), "not an AES-256 key")
            })?;
            ciphers.push(cipher);
        }
        Ok(Self {
            ciphers,
            decrypted: Mutex::new(TokenCache::new(DECRYPTED_CACHE_ENTRIES)),
        })
    }

    /// Keys as one text, the way an environment variable carries them: 64 hex characters each,
    /// separated by commas, the current one first (`GATEHOUSE_COOKIE_KEYS=<current>,<previous>`).
    /// Spaces around a key are ignored. Errors name the key by position, never its value.
    pub fn from_list(list: &str) -> Result<Self, ConfigError> {
        let keys: Vec<String> = list.split(',').map(|k| k.trim().to_string()).collect();
        let count = keys.len();
        Self::from_hex(&keys).map_err(|_| {
            let bad = keys
                .iter()
                .position(|k| decode_hex(k).is_none_or(|b| b.len() != 32))
                .unwrap_or(0);
            ConfigError::new(
                "",
                format!(
                    "key {} of {count} is not 64 hex characters (32 bytes); give the keys as \
                     64 hex characters each, comma-separated, the current one first",
                    bad + 1
                ),
            )
        })
    }

    /// How many keys there are (the current one and those kept for rotation).
    pub fn len(&self) -> usize {
        self.ciphers.len()
    }

    /// Never true for compiled keys (at least one is required); here for API completeness.
    pub fn is_empty(&self) -> bool {
        self.ciphers.is_empty()
    }

    /// Decrypt a cookie value with the first key that authenticates it (from the cache when
    /// this value was decrypted before).
    pub fn decrypt(&self, value: &str) -> Result<String, CookieError> {
        if value.len() > MAX_COOKIE_BYTES {
            return Err(CookieError::TooLarge);
        }
        if let Some(plain) = self
            .decrypted
            .lock()
            .ok()
            .and_then(|mut c| c.get(value.as_bytes(), 0))
        {
            return Ok(plain.to_string());
        }
        let plain = self.decrypt_uncached(value)?;
        if let Ok(mut cache) = self.decrypted.lock() {
            cache.insert(value.as_bytes(), Arc::from(plain.as_str()), u64::MAX, 0);
        }
        Ok(plain)
    }

    fn decrypt_uncached(&self, value: &str) -> Result<String, CookieError> {
        if value.len() > MAX_COOKIE_BYTES {
            return Err(CookieError::TooLarge);
        }
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(value)
            .map_err(|_| CookieError::NotBase64)?;
        if raw.len() < 1 + IV_LEN + 1 + TAG_LEN {
            return Err(CookieError::TooShort);
        }
        if raw[0] != VERSION {
            return Err(CookieError::Version);
        }
        let nonce = aes_gcm::Nonce::<aes_gcm::aead::consts::U12>::try_from(&raw[1..1 + IV_LEN])
            .map_err(|_| CookieError::TooShort)?;
        let sealed = &raw[1 + IV_LEN..];
        for cipher in &self.ciphers {
            if let Ok(plain) = cipher.decrypt(&nonce, sealed) {
                return String::from_utf8(plain).map_err(|_| CookieError::NotUtf8);
            }
        }
        Err(CookieError::Decrypt)
    }

    /// Encrypt with the current key (for the dev login and tests); `iv` must be fresh random.
    pub fn encrypt(&self, plaintext: &str, iv: [u8; IV_LEN]) -> Option<String> {
        let cipher = self.ciphers.first()?;
        let nonce = aes_gcm::Nonce::<aes_gcm::aead::consts::U12>::from(iv);
        let sealed = cipher.encrypt(&nonce, plaintext.as_bytes()).ok()?;
        let mut out = Vec::with_capacity(1 + IV_LEN + sealed.len());
        out.push(VERSION);
        out.extend_from_slice(&iv);
        out.extend_from_slice(&sealed);
        Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(out))
    }
}

/// The keys from the environment variable `name`. Errors are at `encryption_keys_env` and name
/// the variable, never its value.
fn keys_from_env(name: &str, env: EnvLookup<'_>) -> Result<CookieKeys, ConfigError> {
    const FIELD: &str = "encryption_keys_env";
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(ConfigError::new(
            FIELD,
            "must name an environment variable (letters, digits, `_`)",
        ));
    }
    let Some(value) = env(name) else {
        return Err(ConfigError::new(
            FIELD,
            format!(
                "environment variable {name} is not set in the Wasm VM: list it in \
                 vm_config.environment_variables.host_env_keys and set it in Envoy's environment"
            ),
        ));
    };
    if value.trim().is_empty() {
        return Err(ConfigError::new(
            FIELD,
            format!("environment variable {name} is empty"),
        ));
    }
    CookieKeys::from_list(&value)
        .map_err(|e| ConfigError::new(FIELD, format!("environment variable {name}: {}", e.message)))
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    // from_str_radix alone would also take a sign (`+f`).
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect()
}

pub struct Cors {
    pub allow_headers: String,
    pub max_age_seconds: u64,
}

pub struct TokenProxyConfig {
    /// The environment variable the keys came from (`encryption_keys_env`), if not inline.
    pub keys_env: Option<String>,
    pub access_cookie: String,
    pub csrf_cookie: String,
    pub csrf_header: String,
    pub keys: CookieKeys,
    /// Lowercased.
    pub trusted_origins: Vec<String>,
    pub allow_tokens: bool,
    pub cors: Option<Cors>,
    pub harden_names: Vec<String>,
    pub harden_path: String,
}

pub use crate::config::EnvLookup;

impl TokenProxyConfig {
    /// Compile the JSON config. `env` resolves `encryption_keys_env`; it is only called for the
    /// variable the config names.
    pub fn compile(bytes: &[u8], env: EnvLookup<'_>) -> Result<Self, ConfigError> {
        let raw: RawConfig = parse_json(bytes)?;
        let prefix = raw.cookie_prefix;
        if prefix.is_empty()
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ConfigError::new(
                "cookie_prefix",
                "must be non-empty letters, digits, `-` or `_`",
            ));
        }
        let keys_env = raw.encryption_keys_env.clone();
        let keys = match (raw.encryption_keys, raw.encryption_keys_env) {
            (Some(keys), None) => CookieKeys::from_hex(&keys)?,
            (None, Some(name)) => keys_from_env(&name, env)?,
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "encryption_keys_env",
                    "give either encryption_keys or encryption_keys_env, not both",
                ))
            }
            (None, None) => {
                return Err(ConfigError::new(
                    "encryption_keys",
                    "required: the keys inline, or encryption_keys_env naming an environment \
                     variable that holds them",
                ))
            }
        };
        let mut trusted_origins = Vec::new();
        for (i, o) in raw.trusted_web_origins.iter().enumerate() {
            let ok = (o.starts_with("https://") || o.starts_with("http://"))
                && !o.ends_with('/')
                && o.matches('/').count() == 2;
            if !ok {
                return Err(ConfigError::new(
                    format!("trusted_web_origins[{i}]"),
                    "an origin is scheme://host[:port], without a path or trailing slash",
                ));
            }
            trusted_origins.push(o.to_ascii_lowercase());
        }
        // `__Host-gh` names the cookies `__Host-gh-at` / `__Host-gh-csrf`; the header stays
        // `x-gh-csrf` (the browser prefix means nothing in a header name).
        let csrf_header = format!(
            "x-{}-csrf",
            without_cookie_prefix(&prefix).to_ascii_lowercase()
        );
        let cors = match raw.cors {
            Some(c) if c.enabled => {
                if trusted_origins.is_empty() {
                    return Err(ConfigError::new("cors", "CORS needs trusted_web_origins"));
                }
                let mut headers = vec!["content-type".to_string(), csrf_header.clone()];
                headers.extend(c.allow_headers.iter().map(|h| h.to_ascii_lowercase()));
                Some(Cors {
                    allow_headers: headers.join(", "),
                    max_age_seconds: c.max_age_seconds,
                })
            }
            _ => None,
        };
        let (harden_names, harden_path) = match raw.harden_cookies {
            Some(h) => {
                if !h.path.starts_with('/') {
                    return Err(ConfigError::new(
                        "harden_cookies.path",
                        "must start with `/`",
                    ));
                }
                if let Some(name) = h.names.iter().find(|n| has_prefix(n, HOST_PREFIX)) {
                    if h.path != "/" {
                        return Err(ConfigError::new(
                            "harden_cookies.path",
                            format!(
                                "must be `/` for the `__Host-` cookie `{name}` (browsers drop a \
                                 `__Host-` cookie with another path)"
                            ),
                        ));
                    }
                }
                (h.names, h.path)
            }
            None => (Vec::new(), "/".to_string()),
        };
        Ok(Self {
            keys_env,
            access_cookie: format!("{prefix}-at"),
            csrf_cookie: format!("{prefix}-csrf"),
            csrf_header,
            keys,
            trusted_origins,
            allow_tokens: raw.allow_tokens,
            cors,
            harden_names,
            harden_path,
        })
    }

    /// Is `origin` one of `trusted_web_origins` (for CORS: what the browser's `Origin` says,
    /// nothing else)?
    fn trusted(&self, origin: Option<&str>) -> bool {
        origin::is_trusted(origin, None, &self.trusted_origins)
    }

    /// CORS headers for a response to `origin` (only a trusted one gets any).
    pub fn cors_headers(&self, origin: Option<&str>) -> Vec<(String, String)> {
        match (&self.cors, origin) {
            (Some(_), Some(o)) if self.trusted(Some(o)) => vec![
                ("access-control-allow-origin".into(), o.to_string()),
                ("access-control-allow-credentials".into(), "true".into()),
                ("vary".into(), "origin".into()),
            ],
            _ => Vec::new(),
        }
    }
}

/// The request facts token-proxy needs.
#[derive(Debug, Default, Clone)]
pub struct ProxyRequest<'a> {
    pub method: &'a str,
    pub origin: Option<&'a str>,
    pub authorization: Option<&'a str>,
    pub cookie: Option<&'a str>,
    pub csrf_header: Option<&'a str>,
    /// `Access-Control-Request-Method`: present on a CORS preflight.
    pub preflight_method: Option<&'a str>,
    /// `Sec-Fetch-Site` (read when [`Needs::sec_fetch_site`]).
    pub sec_fetch_site: Option<&'a str>,
    /// A WebSocket upgrade (`Upgrade: websocket`).
    pub websocket: bool,
    /// `Sec-WebSocket-Key` and `Sec-WebSocket-Protocol` of an upgrade: a refusal completes the
    /// handshake and closes, so browser code sees the close code rather than 1006.
    pub ws_key: Option<&'a str>,
    pub ws_protocols: Option<&'a str>,
}

/// Which request headers a request needs read (every host call costs about a microsecond
/// inside V8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    /// `Origin`: CORS, a state-changing request, or an upgrade.
    pub origin: bool,
    /// `Sec-Fetch-Site`: a state-changing request or an upgrade.
    pub sec_fetch_site: bool,
    /// `Access-Control-Request-Method`: a possible CORS preflight.
    pub preflight: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ProxyDecision {
    /// Forward unchanged (no gatehouse cookie, or a client bearer token that is allowed).
    Pass,
    /// Forward with these changes.
    Forward {
        authorization: String,
        /// The `Cookie` header without the gatehouse cookies; `None` removes it.
        cookie: Option<String>,
    },
    /// Answer locally (preflight, or a refusal).
    Reply {
        reply: LocalReply,
        denial: Option<ProxyDenial>,
    },
}

impl TokenProxyConfig {
    /// The headers a request with `method` (a WebSocket upgrade when `websocket`) needs read;
    /// the filter reads no others.
    pub fn needs(&self, method: &str, websocket: bool) -> Needs {
        let cors = self.cors.is_some();
        let checked = origin::state_changing(method) || websocket;
        Needs {
            origin: cors || checked,
            sec_fetch_site: checked,
            preflight: cors && method.eq_ignore_ascii_case("OPTIONS"),
        }
    }

    pub fn decide(&self, req: &ProxyRequest<'_>) -> ProxyDecision {
        let refuse = |denial: ProxyDenial| {
            let handshake = req
                .websocket
                .then_some(req.ws_key)
                .flatten()
                .map(|key| WsHandshake {
                    accept: ws::accept_key(key),
                    // The browser fails a handshake that selects none of the subprotocols it
                    // offered: select the first, the close frame follows at once.
                    protocol: req
                        .ws_protocols
                        .and_then(|h| ws::protocols(h).next())
                        .map(str::to_string),
                });
            let mut reply = denial.refusal(req.websocket).reply(handshake.as_ref());
            if handshake.is_none() {
                reply.headers.extend(self.cors_headers(req.origin));
            }
            ProxyDecision::Reply {
                reply,
                denial: Some(denial),
            }
        };
        if let (Some(cors), true) = (&self.cors, req.method.eq_ignore_ascii_case("OPTIONS")) {
            if req.preflight_method.is_some() {
                if !self.trusted(req.origin) {
                    return refuse(ProxyDenial::Origin);
                }
                let mut headers = self.cors_headers(req.origin);
                headers.extend([
                    (
                        "access-control-allow-methods".to_string(),
                        "GET, POST, PUT, PATCH, DELETE, OPTIONS".to_string(),
                    ),
                    (
                        "access-control-allow-headers".to_string(),
                        cors.allow_headers.clone(),
                    ),
                    (
                        "access-control-max-age".to_string(),
                        cors.max_age_seconds.to_string(),
                    ),
                ]);
                return ProxyDecision::Reply {
                    reply: LocalReply {
                        status: 204,
                        headers,
                        body: Vec::new(),
                    },
                    denial: None,
                };
            }
        }
        if let Some(auth) = req.authorization {
            let is_bearer = auth
                .trim_start()
                .get(..7)
                .is_some_and(|s| s.eq_ignore_ascii_case("bearer "));
            if is_bearer {
                return if self.allow_tokens {
                    ProxyDecision::Pass
                } else {
                    refuse(ProxyDenial::TokenNotAllowed)
                };
            }
        }
        let Some(cookies) = req.cookie else {
            return ProxyDecision::Pass;
        };
        let Some(sealed) = cookie::get(cookies, &self.access_cookie) else {
            return ProxyDecision::Pass;
        };
        let token = match self.keys.decrypt(sealed) {
            Ok(t) => t,
            Err(e) => return refuse(ProxyDenial::Cookie(e)),
        };
        // A cookie rides along whatever page made the request: the credential it carries is only
        // good on a state-changing request or a WebSocket upgrade (which CORS does not guard)
        // from a trusted origin. Browsers always send `Origin` on an upgrade: one without it
        // is refused.
        let state_changing = origin::state_changing(req.method);
        if (state_changing || req.websocket)
            && (!origin::is_trusted(req.origin, req.sec_fetch_site, &self.trusted_origins)
                || (req.websocket && req.origin.is_none()))
        {
            return refuse(ProxyDenial::Origin);
        }
        if state_changing {
            let expected =
                match cookie::get(cookies, &self.csrf_cookie).map(|c| self.keys.decrypt(c)) {
                    Some(Ok(v)) => v,
                    Some(Err(e)) => return refuse(ProxyDenial::Cookie(e)),
                    None => return refuse(ProxyDenial::Csrf),
                };
            let sent = req.csrf_header.unwrap_or("");
            if expected.is_empty() || !bool::from(sent.as_bytes().ct_eq(expected.as_bytes())) {
                return refuse(ProxyDenial::Csrf);
            }
        }
        ProxyDecision::Forward {
            authorization: format!("Bearer {token}"),
            cookie: cookie::without(
                cookies,
                &[self.access_cookie.as_str(), self.csrf_cookie.as_str()],
            ),
        }
    }

    /// Harden one `Set-Cookie` value if it sets a configured cookie: `HttpOnly; Secure;
    /// SameSite=Strict` and the configured `Path`, replacing whatever the upstream said for
    /// those attributes; a `__Host-` cookie also loses any `Domain` (its path is `/`, checked at
    /// load). Other cookies come back unchanged.
    pub fn harden_set_cookie(&self, value: &str) -> Option<String> {
        let mut parts = value.split(';');
        let pair = parts.next()?.trim();
        let name = pair.split_once('=').map_or(pair, |(n, _)| n).trim();
        if !self.harden_names.iter().any(|n| n == name) {
            return None;
        }
        let host_only = has_prefix(name, HOST_PREFIX);
        let mut out = vec![pair.to_string()];
        for attr in parts.map(str::trim).filter(|a| !a.is_empty()) {
            let key = attr
                .split_once('=')
                .map_or(attr, |(k, _)| k)
                .trim()
                .to_ascii_lowercase();
            let replaced = matches!(key.as_str(), "httponly" | "secure" | "samesite" | "path")
                || (host_only && key == "domain");
            if !replaced {
                out.push(attr.to_string());
            }
        }
        out.push(format!("Path={}", self.harden_path));
        out.extend(["HttpOnly", "Secure", "SameSite=Strict"].map(String::from));
        Some(out.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEY: &str = "4f1f4ce9b6aa17e5e3d3c7a0c2f6b4a8d2e0f1a3b5c7d9e1f3a5b7c9d1e3f5a7";
    const OLD: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn cfg(extra: serde_json::Value) -> TokenProxyConfig {
        let mut base = json!({
            "cookie_prefix": "gh",
            "encryption_keys": [KEY, OLD],
            "trusted_web_origins": ["http://localhost:8080"],
            "cors": {},
            "harden_cookies": {"names": ["gh-at", "gh-csrf"], "path": "/api"},
        });
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        TokenProxyConfig::compile(base.to_string().as_bytes(), &no_env).unwrap()
    }

    fn seal(c: &TokenProxyConfig, text: &str) -> String {
        c.keys.encrypt(text, [7; 12]).unwrap()
    }

    #[test]
    fn cookie_round_trip_and_rejections() {
        let c = cfg(json!({}));
        let sealed = seal(&c, "a.b.c");
        assert_eq!(c.keys.decrypt(&sealed), Ok("a.b.c".into()));
        let mut raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&sealed)
            .unwrap();
        let enc = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let last = raw.len() - 1;
        raw[last] ^= 1;
        assert_eq!(
            c.keys.decrypt(&enc(&raw)),
            Err(CookieError::Decrypt),
            "tampered tag"
        );
        raw[last] ^= 1;
        raw[20] ^= 1;
        assert_eq!(
            c.keys.decrypt(&enc(&raw)),
            Err(CookieError::Decrypt),
            "tampered ciphertext"
        );
        raw[20] ^= 1;
        raw[0] = 2;
        assert_eq!(c.keys.decrypt(&enc(&raw)), Err(CookieError::Version));
        assert_eq!(c.keys.decrypt(&enc(&[1; 29])), Err(CookieError::TooShort));
        assert_eq!(c.keys.decrypt("not*base64"), Err(CookieError::NotBase64));
        let other = TokenProxyConfig::compile(
            json!({"cookie_prefix": "gh", "encryption_keys": [OLD.replace('0', "f")]})
                .to_string()
                .as_bytes(),
            &no_env,
        )
        .unwrap();
        assert_eq!(
            other.keys.decrypt(&sealed),
            Err(CookieError::Decrypt),
            "wrong key"
        );
    }

    #[test]
    fn previous_key_still_decrypts() {
        let old_only = TokenProxyConfig::compile(
            json!({"cookie_prefix": "gh", "encryption_keys": [OLD]})
                .to_string()
                .as_bytes(),
            &no_env,
        )
        .unwrap();
        let sealed_with_old = seal(&old_only, "tok");
        assert_eq!(
            cfg(json!({})).keys.decrypt(&sealed_with_old),
            Ok("tok".into())
        );
    }

    #[test]
    fn get_forwards_bearer_and_strips_only_gatehouse_cookies() {
        let c = cfg(json!({}));
        let cookie = format!(
            "theme=dark; gh-at={}; gh-csrf={}; z=1",
            seal(&c, "tok"),
            seal(&c, "csrf")
        );
        let d = c.decide(&ProxyRequest {
            method: "GET",
            cookie: Some(&cookie),
            ..Default::default()
        });
        assert_eq!(
            d,
            ProxyDecision::Forward {
                authorization: "Bearer tok".into(),
                cookie: Some("theme=dark; z=1".into())
            }
        );
    }

    #[test]
    fn csrf_on_state_changing_requests() {
        let c = cfg(json!({}));
        let cookie = format!("gh-at={}; gh-csrf={}", seal(&c, "tok"), seal(&c, "s3cret"));
        let post = |origin: Option<&'static str>, header: Option<&'static str>| {
            c.decide(&ProxyRequest {
                method: "POST",
                origin,
                cookie: Some(&cookie),
                csrf_header: header,
                ..Default::default()
            })
        };
        assert!(matches!(
            post(Some("http://localhost:8080"), Some("s3cret")),
            ProxyDecision::Forward { .. }
        ));
        assert!(matches!(
            post(Some("HTTP://LOCALHOST:8080"), Some("s3cret")),
            ProxyDecision::Forward { .. }
        ));
        for (o, h, why) in [
            (Some("http://localhost:8080"), None, ProxyDenial::Csrf),
            (
                Some("http://localhost:8080"),
                Some("wrong"),
                ProxyDenial::Csrf,
            ),
            (
                Some("http://evil.test"),
                Some("s3cret"),
                ProxyDenial::Origin,
            ),
            (None, Some("s3cret"), ProxyDenial::Origin),
        ] {
            match post(o, h) {
                ProxyDecision::Reply { reply, denial } => {
                    assert_eq!(reply.status, 401);
                    assert_eq!(denial, Some(why));
                    let body = String::from_utf8_lossy(&reply.body);
                    assert!(
                        !body.contains("csrf") && !body.contains("origin"),
                        "body must not say which check failed"
                    );
                }
                other => panic!("{other:?}"),
            }
        }
    }

    fn close_code(reply: &LocalReply) -> Option<u16> {
        let b = &reply.body;
        (reply.status == 101 && b.len() >= 4 && b[0] == 0x88)
            .then(|| u16::from_be_bytes([b[2], b[3]]))
    }

    #[test]
    fn a_websocket_upgrade_with_the_cookie_needs_a_trusted_origin() {
        let c = cfg(json!({}));
        let cookie = format!("gh-at={}", seal(&c, "tok"));
        let upgrade = |origin: Option<&'static str>, site: Option<&'static str>| {
            c.decide(&ProxyRequest {
                method: "GET",
                origin,
                sec_fetch_site: site,
                cookie: Some(&cookie),
                websocket: true,
                ws_key: Some("dGhlIHNhbXBsZSBub25jZQ=="),
                ws_protocols: Some("sip, other"),
                ..Default::default()
            })
        };
        for (origin, site) in [
            (Some("http://localhost:8080"), None),
            (Some("http://LOCALHOST:8080"), Some("same-site")),
            // The browser says the page is the gateway's own origin.
            (Some("http://127.0.0.1:9000"), Some("same-origin")),
        ] {
            assert!(
                matches!(upgrade(origin, site), ProxyDecision::Forward { .. }),
                "{origin:?} {site:?}"
            );
        }
        for (origin, site) in [
            (Some("http://evil.test"), None),
            (Some("http://evil.test"), Some("cross-site")),
            (Some("http://sub.localhost:8080"), Some("same-site")),
            (Some("null"), None),
            (None, None),
            // Browsers always send Origin on an upgrade.
            (None, Some("same-origin")),
        ] {
            let ProxyDecision::Reply { reply, denial } = upgrade(origin, site) else {
                panic!("{origin:?} {site:?} must be refused")
            };
            assert_eq!(denial, Some(ProxyDenial::Origin));
            // A completed handshake and a close frame: browser code reads 4403, not 1006.
            assert_eq!(close_code(&reply), Some(4403), "{origin:?} {site:?}");
            assert!(reply.headers.contains(&(
                "sec-websocket-accept".into(),
                "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".into()
            )));
            assert!(reply
                .headers
                .contains(&("sec-websocket-protocol".into(), "sip".into())));
        }
        // Without the cookie token-proxy has nothing to protect: the upgrade passes (jwt-auth
        // decides on whatever credential it carries).
        let d = c.decide(&ProxyRequest {
            method: "GET",
            origin: Some("http://evil.test"),
            websocket: true,
            ws_key: Some("k"),
            ..Default::default()
        });
        assert_eq!(d, ProxyDecision::Pass);
        // A bad cookie on an upgrade closes 4401; without a key there is no handshake to
        // complete: a plain 403.
        let bad = c.decide(&ProxyRequest {
            method: "GET",
            origin: Some("http://localhost:8080"),
            cookie: Some("gh-at=garbage"),
            websocket: true,
            ws_key: Some("k"),
            ..Default::default()
        });
        let ProxyDecision::Reply { reply, .. } = bad else {
            panic!()
        };
        assert_eq!(close_code(&reply), Some(4401));
        let keyless = c.decide(&ProxyRequest {
            method: "GET",
            origin: Some("http://evil.test"),
            cookie: Some(&cookie),
            websocket: true,
            ..Default::default()
        });
        let ProxyDecision::Reply { reply, .. } = keyless else {
            panic!()
        };
        assert_eq!(reply.status, 403);
    }

    #[test]
    fn sec_fetch_site_same_origin_counts_as_trusted_on_state_changing_requests() {
        let c = cfg(json!({}));
        let cookie = format!("gh-at={}; gh-csrf={}", seal(&c, "tok"), seal(&c, "s3cret"));
        let post = |origin: Option<&'static str>, site: Option<&'static str>| {
            c.decide(&ProxyRequest {
                method: "DELETE",
                origin,
                sec_fetch_site: site,
                cookie: Some(&cookie),
                csrf_header: Some("s3cret"),
                ..Default::default()
            })
        };
        assert!(matches!(
            post(None, Some("same-origin")),
            ProxyDecision::Forward { .. }
        ));
        for site in [None, Some("same-site"), Some("cross-site"), Some("none")] {
            assert!(
                matches!(
                    post(Some("https://sibling.localhost"), site),
                    ProxyDecision::Reply {
                        denial: Some(ProxyDenial::Origin),
                        ..
                    }
                ),
                "{site:?}"
            );
        }
    }

    #[test]
    fn only_the_headers_a_request_needs_are_read() {
        let plain = cfg(json!({"cors": {"enabled": false}}));
        let n = |c: &TokenProxyConfig, m, ws| c.needs(m, ws);
        assert_eq!(
            n(&plain, "GET", false),
            Needs {
                origin: false,
                sec_fetch_site: false,
                preflight: false
            }
        );
        assert_eq!(
            n(&plain, "GET", true),
            Needs {
                origin: true,
                sec_fetch_site: true,
                preflight: false
            }
        );
        assert_eq!(
            n(&plain, "patch", false),
            Needs {
                origin: true,
                sec_fetch_site: true,
                preflight: false
            }
        );
        assert!(n(&cfg(json!({})), "OPTIONS", false).preflight);
    }

    #[test]
    fn bearer_from_client_and_preflight() {
        let c = cfg(json!({}));
        let d = c.decide(&ProxyRequest {
            method: "GET",
            authorization: Some("Bearer x"),
            ..Default::default()
        });
        assert!(matches!(
            d,
            ProxyDecision::Reply {
                denial: Some(ProxyDenial::TokenNotAllowed),
                ..
            }
        ));
        let c2 = cfg(json!({"allow_tokens": true}));
        let d = c2.decide(&ProxyRequest {
            method: "GET",
            authorization: Some("Bearer x"),
            ..Default::default()
        });
        assert_eq!(d, ProxyDecision::Pass);
        let pre = c.decide(&ProxyRequest {
            method: "OPTIONS",
            origin: Some("http://localhost:8080"),
            preflight_method: Some("POST"),
            ..Default::default()
        });
        let ProxyDecision::Reply {
            reply,
            denial: None,
        } = pre
        else {
            panic!("{pre:?}")
        };
        assert_eq!(reply.status, 204);
        assert!(reply.headers.contains(&(
            "access-control-allow-origin".into(),
            "http://localhost:8080".into()
        )));
        assert!(reply
            .headers
            .contains(&("access-control-allow-credentials".into(), "true".into())));
        // Error responses carry CORS headers too, so the SPA can read them.
        let err = c.decide(&ProxyRequest {
            method: "POST",
            origin: Some("http://localhost:8080"),
            cookie: Some("gh-at=garbage"),
            ..Default::default()
        });
        let ProxyDecision::Reply { reply, .. } = err else {
            panic!()
        };
        assert!(reply
            .headers
            .iter()
            .any(|(k, _)| k == "access-control-allow-origin"));
    }

    #[test]
    fn set_cookie_hardening() {
        let c = cfg(json!({}));
        assert_eq!(
            c.harden_set_cookie("gh-at=v; Path=/; SameSite=Lax; Max-Age=300")
                .as_deref(),
            Some("gh-at=v; Max-Age=300; Path=/api; HttpOnly; Secure; SameSite=Strict")
        );
        assert_eq!(c.harden_set_cookie("theme=dark; Path=/"), None);
    }

    #[test]
    fn host_prefixed_cookies() {
        let c = cfg(json!({
            "cookie_prefix": "__Host-gh",
            "harden_cookies": {"names": ["__Host-gh-at", "__Host-gh-csrf"]},
        }));
        assert_eq!(
            (
                c.access_cookie.as_str(),
                c.csrf_cookie.as_str(),
                c.csrf_header.as_str()
            ),
            ("__Host-gh-at", "__Host-gh-csrf", "x-gh-csrf")
        );
        // Secure, Path=/ and no Domain, whatever the upstream said: a sibling subdomain can
        // neither set nor shadow it.
        assert_eq!(
            c.harden_set_cookie("__Host-gh-at=v; Domain=example.com; Path=/api; Max-Age=300")
                .as_deref(),
            Some("__Host-gh-at=v; Max-Age=300; Path=/; HttpOnly; Secure; SameSite=Strict")
        );
        // The cookies are read under their prefixed names.
        let cookie = format!(
            "gh-at={}; __Host-gh-at={}",
            seal(&c, "tossed"),
            seal(&c, "tok")
        );
        assert!(matches!(
            c.decide(&ProxyRequest {
                method: "GET",
                cookie: Some(&cookie),
                ..Default::default()
            }),
            ProxyDecision::Forward { ref authorization, .. } if authorization == "Bearer tok"
        ));
        // Other cookies keep their Domain.
        let plain = cfg(json!({"harden_cookies": {"names": ["gh-at"], "path": "/api"}}));
        assert_eq!(
            plain
                .harden_set_cookie("gh-at=v; Domain=example.com")
                .as_deref(),
            Some("gh-at=v; Domain=example.com; Path=/api; HttpOnly; Secure; SameSite=Strict")
        );
        // A `__Host-` name with another path would be dropped by every browser: a load error.
        for names in [json!(["__Host-gh-at"]), json!(["x", "__host-gh-csrf"])] {
            let err = TokenProxyConfig::compile(
                json!({"cookie_prefix": "__Host-gh", "encryption_keys": [KEY],
                       "harden_cookies": {"names": names, "path": "/api"}})
                .to_string()
                .as_bytes(),
                &no_env,
            )
            .err()
            .unwrap();
            assert_eq!(err.path, "harden_cookies.path", "{err}");
            assert!(err.message.contains("__Host-"), "{err}");
        }
    }

    #[test]
    fn config_errors() {
        for (cfg, path) in [
            (
                json!({"cookie_prefix": "gh", "encryption_keys": ["abc"]}),
                "encryption_keys[0]",
            ),
            (
                json!({"cookie_prefix": "gh", "encryption_keys": []}),
                "encryption_keys",
            ),
            (
                json!({"cookie_prefix": "g h", "encryption_keys": [KEY]}),
                "cookie_prefix",
            ),
            (
                json!({"cookie_prefix": "gh", "encryption_keys": [KEY], "trusted_web_origins": ["http://x/"]}),
                "trusted_web_origins[0]",
            ),
            (
                json!({"cookie_prefix": "gh", "encryption_keys": [KEY], "cors": {}}),
                "cors",
            ),
        ] {
            let err = TokenProxyConfig::compile(cfg.to_string().as_bytes(), &no_env)
                .err()
                .unwrap();
            assert_eq!(err.path, path);
        }
    }

    fn compile_with_env(
        config: serde_json::Value,
        var: &str,
        value: Option<&str>,
    ) -> Result<TokenProxyConfig, ConfigError> {
        let value = value.map(str::to_string);
        let var = var.to_string();
        let seen = std::cell::RefCell::new(Vec::new());
        let lookup = |name: &str| {
            seen.borrow_mut().push(name.to_string());
            (name == var).then(|| value.clone()).flatten()
        };
        let result = TokenProxyConfig::compile(config.to_string().as_bytes(), &lookup);
        assert!(
            seen.borrow().iter().all(|n| *n == "GH_KEYS"),
            "only the named variable is looked up: {:?}",
            seen.borrow()
        );
        result
    }

    #[test]
    fn keys_from_an_environment_variable() {
        let config = json!({"cookie_prefix": "gh", "encryption_keys_env": "GH_KEYS"});
        let both = format!(" {KEY} , {OLD}");
        let c = compile_with_env(config.clone(), "GH_KEYS", Some(&both)).unwrap();
        let old_only = compile_with_env(config.clone(), "GH_KEYS", Some(OLD)).unwrap();
        // The first key encrypts; every key decrypts (rotation).
        let sealed_old = seal(&old_only, "tok");
        assert_eq!(c.keys.decrypt(&sealed_old), Ok("tok".into()));
        let inline = cfg(json!({}));
        assert_eq!(inline.keys.decrypt(&seal(&c, "x")), Ok("x".into()));
    }

    #[test]
    fn environment_key_errors_name_the_field_and_never_the_value() {
        let config = json!({"cookie_prefix": "gh", "encryption_keys_env": "GH_KEYS"});
        let secret_ish = format!("{KEY},{}", &OLD[..40]);
        for (value, says) in [
            (None, "GH_KEYS is not set in the Wasm VM"),
            (Some(""), "GH_KEYS is empty"),
            (Some("  "), "GH_KEYS is empty"),
            (Some("zz"), "GH_KEYS: key 1 of 1 is not 64 hex"),
            (
                Some(secret_ish.as_str()),
                "GH_KEYS: key 2 of 2 is not 64 hex",
            ),
            (
                Some(&format!("{KEY},")),
                "GH_KEYS: key 2 of 2 is not 64 hex",
            ),
            (
                Some(&format!("+{}", &KEY[1..])),
                "GH_KEYS: key 1 of 1 is not 64 hex",
            ),
        ] {
            let err = compile_with_env(config.clone(), "GH_KEYS", value)
                .err()
                .unwrap();
            assert_eq!(err.path, "encryption_keys_env", "{err}");
            assert!(err.message.contains(says), "{value:?}: {err}");
            assert!(
                !err.to_string().contains(&KEY[..16]),
                "leaks the key: {err}"
            );
            assert!(
                !err.to_string().contains(&OLD[..16]),
                "leaks the key: {err}"
            );
        }
    }

    #[test]
    fn exactly_one_key_source() {
        let both = json!({"cookie_prefix": "gh", "encryption_keys": [KEY], "encryption_keys_env": "GH_KEYS"});
        let err = compile_with_env(both, "GH_KEYS", Some(KEY)).err().unwrap();
        assert_eq!(err.path, "encryption_keys_env");
        let neither = json!({"cookie_prefix": "gh"});
        let err = compile_with_env(neither, "GH_KEYS", Some(KEY))
            .err()
            .unwrap();
        assert_eq!(err.path, "encryption_keys");
        let bad_name = json!({"cookie_prefix": "gh", "encryption_keys_env": "GH-KEYS"});
        let err = compile_with_env(bad_name, "GH_KEYS", Some(KEY))
            .err()
            .unwrap();
        assert_eq!(err.path, "encryption_keys_env");
    }
}

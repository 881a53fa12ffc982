//! DEV ONLY: the local stack's token issuer. `POST /dev/login` mints a short-lived JWT for
//! anyone who asks — it exists so users can try the stack, and is marked on every response.
//! The signing key is generated on first run into the keys folder (git-ignored); its public
//! half is served at `/.well-known/jwks.json`, which jwt-auth fetches through Envoy.
//!
//! Login also plays the OAuth Agent of the token-handler pattern: it sets the JWT and a fresh
//! CSRF token as encrypted `HttpOnly` cookies (`__Host-gh-at`, `__Host-gh-csrf`; Curity v1
//! format, sealed by `gatehouse_core::token_proxy::CookieKeys`, the code token-proxy decrypts
//! with), and returns the CSRF value in the body for the page to send as `x-gh-csrf`. Every
//! cookie it sets is `__Host-` (`Secure`, `Path=/`, no `Domain`): a sibling subdomain can
//! neither set nor shadow them (cookie tossing). Chromium accepts them on http://127.0.0.1 and
//! http://localhost, which it treats as secure origins.
//!
//! Sessions: the `HttpOnly` cookie `__Host-gh-sid` (on `/`) holds a fresh random **secret**; every
//! token carries `sid_hash = base64url(SHA-256(secret))`, which session-binding compares with the
//! hash of the cookie on the signaling socket, so a leaked token does not reveal the cookie. The
//! token also carries `sid`, the session's public id (derived one-way from the secret, so the
//! issuer keeps no session table), for revocation and jwt-auth's session following, and a fresh
//! `jti` (connect tokens are single-use there). A login that presents a live `__Host-gh-sid` stays in
//! that session, so a refresh extends the session's sockets (jwt-auth follows `sid`).
//! `POST /dev/logout` revokes the session: its `sid` joins `GET /dev/revoked.json`, the
//! revocation feed session-binding fetches, which closes the session's live sockets with 4401.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{AppendHeaders, IntoResponse, Response};
use axum::Json;
use gatehouse_cli::keys::{self, KeyAlg, PrivateKey};
use gatehouse_core::token_proxy::CookieKeys;
use serde_json::{json, Value};

pub const ISSUER: &str = "https://demo.gatehouse.local";
pub const AUDIENCE: &str = "gatehouse-demo";
/// Connect tokens are short-lived: jwt-auth's signaling rule refuses tokens older than 300 s.
/// `GATEHOUSE_DEMO_TOKEN_TTL` sets another lifetime (the tests use a few seconds).
pub const TOKEN_TTL_SECONDS: u64 = 300;
/// token-proxy's `cookie_prefix` in envoy-config/envoy.yaml: cookies `__Host-gh-at` and
/// `__Host-gh-csrf`, CSRF header `x-gh-csrf`.
pub const COOKIE_PREFIX: &str = "__Host-gh";
/// A `__Host-` cookie must be `Path=/` (browsers drop it otherwise): the token cookies go to
/// every path of the host, and token-proxy strips them where it runs (`/api/`).
pub const COOKIE_PATH: &str = "/";
/// The session cookie (the signaling upgrade carries it); session-binding's `session` binding
/// in envoy-config/envoy.yaml compares its SHA-256 with the token's `sid_hash`.
pub const SID_COOKIE: &str = "__Host-gh-sid";
/// How long a session lasts, and how long a logged-out session stays on the revocation feed:
/// jwt-auth's `max_socket_seconds` in envoy-config/envoy.yaml.
pub const SESSION_SECONDS: u64 = 12 * 3600;
/// Revoked sessions the feed keeps (the oldest go first; this is a demo).
const MAX_REVOKED: usize = 10_000;

pub struct Issuer {
    key: PrivateKey,
    jwks: Value,
    cookie_keys: CookieKeys,
    /// Lifetime of the tokens (and cookies) it issues, in seconds.
    ttl: u64,
    /// Logged-out sessions and when they leave the feed.
    revoked: Mutex<Vec<(String, u64)>>,
}

impl Issuer {
    /// Loads the key from `dir`, or generates an EdDSA key there on first run. `cookie_keys`
    /// encrypt the login cookies (the first one; Envoy's token-proxy must know it).
    pub fn load_or_create(dir: &Path, cookie_keys: CookieKeys, ttl: u64) -> Result<Self, String> {
        let fail = |e: gatehouse_cli::Error| format!("keys in {}: {}", dir.display(), e.message());
        let key = if dir.join(keys::PRIVATE_KEY_FILE).exists() {
            PrivateKey::load(dir).map_err(fail)?
        } else {
            let key = PrivateKey::generate(KeyAlg::EdDsa, None).map_err(fail)?;
            keys::write_key_files(dir, &key, false).map_err(fail)?;
            key
        };
        let jwks = keys::jwks([&key]);
        Ok(Self {
            key,
            jwks,
            cookie_keys,
            ttl,
            revoked: Mutex::new(Vec::new()),
        })
    }

    fn is_revoked(&self, sid: &str) -> bool {
        self.revoked
            .lock()
            .is_ok_and(|r| r.iter().any(|(s, _)| s == sid))
    }

    /// The session secret of this login (the `__Host-gh-sid` cookie's value): the caller's, unless its
    /// session was logged out; else a new one.
    fn session(&self, headers: &HeaderMap) -> Result<String, String> {
        match session_cookie(headers) {
            Some(secret) if !self.is_revoked(&sid_of(secret)) => Ok(secret.to_owned()),
            _ => random_text(16),
        }
    }

    /// `value` sealed as a token-handler cookie: AES-256-GCM under the current key, fresh IV.
    fn seal(&self, value: &str) -> Result<String, String> {
        let mut iv = [0u8; 12];
        getrandom::fill(&mut iv).map_err(|e| format!("no randomness for the cookie IV: {e}"))?;
        self.cookie_keys
            .encrypt(value, iv)
            .ok_or_else(|| "cannot encrypt the cookie".to_owned())
    }

    /// The `Set-Cookie` values for the access token and CSRF cookies. `Secure` is kept:
    /// browsers treat http://127.0.0.1 and http://localhost as secure for cookies.
    fn cookies(&self, token: &str, csrf: &str) -> Result<[String; 2], String> {
        let attrs = format!(
            "Path={COOKIE_PATH}; Max-Age={}; HttpOnly; Secure; SameSite=Strict",
            self.ttl
        );
        Ok([
            format!("{COOKIE_PREFIX}-at={}; {attrs}", self.seal(token)?),
            format!("{COOKIE_PREFIX}-csrf={}; {attrs}", self.seal(csrf)?),
        ])
    }
}

/// `n` random bytes, base64url: CSRF tokens, session ids, token ids.
fn random_text(n: usize) -> Result<String, String> {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness: {e}"))?;
    Ok(gatehouse_cli::b64url(&bytes))
}

/// The public session id of a session secret: one-way, so the token's `sid` (readable by whoever
/// holds the token) reveals nothing of the cookie.
fn sid_of(secret: &str) -> String {
    let digest = gatehouse_core::sha256(format!("gatehouse-demo-sid\0{secret}").as_bytes());
    gatehouse_cli::b64url(digest.get(..16).unwrap_or(&digest))
}

/// The `sid_hash` claim session-binding compares with the cookie (its default `sha256` mode).
fn sid_hash(secret: &str) -> String {
    gatehouse_core::session_binding::session_hash(secret)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The session cookie of the request, if it looks like one we issue (16 random bytes).
fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|h| gatehouse_core::cookie::get(h, SID_COOKIE))
        .filter(|v| {
            v.len() == 22
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

pub async fn jwks(State(issuer): State<Arc<Issuer>>) -> Json<Value> {
    Json(issuer.jwks.clone())
}

#[derive(serde::Deserialize)]
pub struct LoginQuery {
    user: Option<String>,
}

/// The phone's login body: `{"user": "1001"}`, the extension to call as.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PhoneLogin {
    user: String,
}

/// The tenant of every phone token the demo issues (seed 001: tenant / agent / session scope).
pub const TENANT: &str = "demo";

/// An extension: what Kamailio's config accepts as a SIP user (kamailio.cfg checks the same).
fn valid_extension(user: &str) -> bool {
    (1..=64).contains(&user.len())
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'))
}

/// `POST /dev/login`: a token in the caller's session. Without a body (or `?user=` only) as
/// before: `sub` = the query's user or `demo-user`. With the phone's JSON body `{"user": "1001"}`
/// the token is also the SIP credential: `sip_identity` (what jwt-auth forwards to Kamailio as
/// `x-gatehouse-sip-identity`) and the tenant / agent / session scope claims.
pub async fn login(
    State(issuer): State<Arc<Issuer>>,
    Query(q): Query<LoginQuery>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let phone = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        match serde_json::from_slice::<PhoneLogin>(&body) {
            Ok(p) if valid_extension(&p.user) => Some(p.user),
            Ok(_) => {
                return (
                    StatusCode::BAD_REQUEST,
                    "user: 1 to 64 of A-Z a-z 0-9 . _ + -\n",
                )
                    .into_response()
            }
            Err(e) => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("expected {{\"user\": \"<extension>\"}}: {e}\n"),
                )
                    .into_response()
            }
        }
    };
    let issued = issuer.session(&headers).and_then(|secret| {
        let sid = sid_of(&secret);
        let mut claims = json!({
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": phone.as_deref().or(q.user.as_deref()).unwrap_or("demo-user"),
            "scope": "phone:call",
            "sid": &sid,
            "sid_hash": sid_hash(&secret),
            "jti": random_text(16)?,
        });
        if let (Some(user), Some(map)) = (phone.as_deref(), claims.as_object_mut()) {
            map.insert("sip_identity".into(), json!(user));
            map.insert("tenant_id".into(), json!(TENANT));
            map.insert("agent_id".into(), json!(user));
            map.insert("session_id".into(), json!(sid));
        }
        let token = gatehouse_cli::mint(&issuer.key, &claims, now(), issuer.ttl)
            .map_err(|e| e.message().to_owned())?;
        let csrf = random_text(32)?;
        let cookies = issuer.cookies(&token, &csrf)?;
        let sid_cookie = format!(
            "{SID_COOKIE}={secret}; Path=/; Max-Age={SESSION_SECONDS}; HttpOnly; Secure; SameSite=Strict"
        );
        Ok((token, csrf, cookies, sid_cookie))
    });
    match issued {
        Ok((token, csrf, [at_cookie, csrf_cookie], sid_cookie)) => (
            [
                ("x-gatehouse-dev-only", "true"),
                (header::CACHE_CONTROL.as_str(), "no-store"),
            ],
            // Appended: an array of headers would keep only the last `Set-Cookie`.
            AppendHeaders([
                (header::SET_COOKIE, at_cookie),
                (header::SET_COOKIE, csrf_cookie),
                (header::SET_COOKIE, sid_cookie),
            ]),
            Json(json!({
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": issuer.ttl,
                "csrf_token": csrf,
            })),
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    }
}

/// `POST /dev/logout`: the caller's session goes on the revocation feed (session-binding closes
/// its live sockets and refuses its tokens) and the browser's cookies are cleared.
pub async fn logout(State(issuer): State<Arc<Issuer>>, headers: HeaderMap) -> Response {
    if let Some(secret) = session_cookie(&headers) {
        let sid = sid_of(secret);
        if let Ok(mut revoked) = issuer.revoked.lock() {
            let now = now();
            revoked.retain(|(s, until)| *until > now && *s != sid);
            if revoked.len() >= MAX_REVOKED {
                revoked.remove(0);
            }
            revoked.push((sid, now + SESSION_SECONDS));
        }
    }
    let gone = |name: &str, path: &str| {
        format!("{name}=; Path={path}; Max-Age=0; HttpOnly; Secure; SameSite=Strict")
    };
    (
        StatusCode::NO_CONTENT,
        [
            ("x-gatehouse-dev-only", "true"),
            (header::CACHE_CONTROL.as_str(), "no-store"),
        ],
        AppendHeaders([
            (header::SET_COOKIE, gone(SID_COOKIE, "/")),
            (
                header::SET_COOKIE,
                gone(&format!("{COOKIE_PREFIX}-at"), COOKIE_PATH),
            ),
            (
                header::SET_COOKIE,
                gone(&format!("{COOKIE_PREFIX}-csrf"), COOKIE_PATH),
            ),
        ]),
    )
        .into_response()
}

/// `GET /dev/revoked.json`: session-binding's revocation feed in the local stack.
pub async fn revoked(State(issuer): State<Arc<Issuer>>) -> Response {
    let now = now();
    let entries: Vec<Value> = issuer
        .revoked
        .lock()
        .map(|r| {
            r.iter()
                .filter(|(_, until)| *until > now)
                .map(|(sid, _)| json!({ "sid": sid }))
                .collect()
        })
        .unwrap_or_default();
    (
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({ "revoked": entries })),
    )
        .into_response()
}

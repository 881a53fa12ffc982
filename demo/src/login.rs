//! DEV ONLY: the local stack's token issuer. `POST /dev/login` mints a short-lived JWT for
//! anyone who asks — it exists so users can try the stack, and is marked on every response.
//! The signing key is generated on first run into the keys folder (git-ignored); its public
//! half is served at `/.well-known/jwks.json`, which jwt-auth fetches through Envoy.
//!
//! Login also plays the OAuth Agent of the token-handler pattern: it sets the JWT and a fresh
//! CSRF token as encrypted `HttpOnly` cookies (`gh-at`, `gh-csrf`; Curity v1 format, sealed
//! by `gatehouse_core::token_proxy::CookieKeys`, the code token-proxy decrypts with), and
//! returns the CSRF value in the body for the page to send as `x-gh-csrf`.

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
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
/// token-proxy's `cookie_prefix` in envoy-config/envoy.yaml: cookies `gh-at` and `gh-csrf`,
/// CSRF header `x-gh-csrf`.
pub const COOKIE_PREFIX: &str = "gh";
/// Where token-proxy runs in the local stack; the cookies are only sent there.
pub const COOKIE_PATH: &str = "/api";

pub struct Issuer {
    key: PrivateKey,
    jwks: Value,
    cookie_keys: CookieKeys,
    /// Lifetime of the tokens (and cookies) it issues, in seconds.
    ttl: u64,
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
        })
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

/// A fresh CSRF token: 32 random bytes, base64url.
fn csrf_token() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for the CSRF token: {e}"))?;
    Ok(gatehouse_cli::b64url(&bytes))
}

pub async fn jwks(State(issuer): State<Arc<Issuer>>) -> Json<Value> {
    Json(issuer.jwks.clone())
}

#[derive(serde::Deserialize)]
pub struct LoginQuery {
    user: Option<String>,
}

pub async fn login(State(issuer): State<Arc<Issuer>>, Query(q): Query<LoginQuery>) -> Response {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": q.user.as_deref().unwrap_or("demo-user"),
        "scope": "phone:call",
    });
    let issued = gatehouse_cli::mint(&issuer.key, &claims, now, issuer.ttl)
        .map_err(|e| e.message().to_owned())
        .and_then(|token| {
            let csrf = csrf_token()?;
            let cookies = issuer.cookies(&token, &csrf)?;
            Ok((token, csrf, cookies))
        });
    match issued {
        Ok((token, csrf, [at_cookie, csrf_cookie])) => (
            [
                ("x-gatehouse-dev-only", "true"),
                (header::CACHE_CONTROL.as_str(), "no-store"),
            ],
            // Appended: an array of headers would keep only the last `Set-Cookie`.
            AppendHeaders([
                (header::SET_COOKIE, at_cookie),
                (header::SET_COOKIE, csrf_cookie),
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

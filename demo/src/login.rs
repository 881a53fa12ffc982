//! DEV ONLY: the local stack's token issuer. `POST /dev/login` mints a short-lived JWT for
//! anyone who asks — it exists so users can try the stack, and is marked on every response.
//! The signing key is generated on first run into the keys folder (git-ignored); its public
//! half is served at `/.well-known/jwks.json`, which jwt-auth fetches through Envoy.

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use gatehouse_cli::keys::{self, KeyAlg, PrivateKey};
use serde_json::{json, Value};

pub const ISSUER: &str = "https://demo.gatehouse.local";
pub const AUDIENCE: &str = "gatehouse-demo";
/// Connect tokens are short-lived: jwt-auth's signaling rule refuses tokens older than 300 s.
pub const TOKEN_TTL_SECONDS: u64 = 300;

pub struct Issuer {
    key: PrivateKey,
    jwks: Value,
}

impl Issuer {
    /// Loads the key from `dir`, or generates an EdDSA key there on first run.
    pub fn load_or_create(dir: &Path) -> Result<Self, String> {
        let fail = |e: gatehouse_cli::Error| format!("keys in {}: {}", dir.display(), e.message());
        let key = if dir.join(keys::PRIVATE_KEY_FILE).exists() {
            PrivateKey::load(dir).map_err(fail)?
        } else {
            let key = PrivateKey::generate(KeyAlg::EdDsa, None).map_err(fail)?;
            keys::write_key_files(dir, &key, false).map_err(fail)?;
            key
        };
        let jwks = keys::jwks([&key]);
        Ok(Self { key, jwks })
    }
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
    match gatehouse_cli::mint(&issuer.key, &claims, now, TOKEN_TTL_SECONDS) {
        Ok(token) => (
            [("x-gatehouse-dev-only", "true"), (header::CACHE_CONTROL.as_str(), "no-store")],
            Json(json!({ "access_token": token, "token_type": "Bearer", "expires_in": TOKEN_TTL_SECONDS })),
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.message().to_owned()).into_response(),
    }
}

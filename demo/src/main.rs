//! The upstream of the gatehouse local stack.
//!
//! It shows users (and tests) exactly what reached the upstream after the filters ran:
//! - `/api/*`: echoes the request (method, path, query, headers, body size) as JSON;
//! - `/ws/*`: a WebSocket echo that selects the app subprotocol `sip`;
//! - `/`: a static demo phone page (JsSIP at `/vendor/jssip.min.js`, see [`jssip`]);
//! - `/.well-known/jwks.json`: the public keys of the local stack;
//! - `POST /dev/login`: DEV ONLY, mints a short-lived JWT with the local stack's key, in the
//!   caller's session (`__Host-gh-sid` cookie) or a new one; `POST /dev/logout` ends the session and
//!   `GET /dev/revoked.json` lists ended sessions (session-binding's revocation feed).
//!
//! Settings come from the environment: `GATEHOUSE_DEMO_ADDR` (default `127.0.0.1:8081`),
//! `GATEHOUSE_KEYS_DIR` (default `.local/keys`, generated on first run, git-ignored),
//! `GATEHOUSE_DEMO_TOKEN_TTL` (seconds, default 300), `GATEHOUSE_DEMO_PING_SECONDS` (default 20) and
//! `GATEHOUSE_COOKIE_KEYS` (required: the AES-256 keys of the login cookies, 64 hex characters
//! each, comma-separated, current first; the same value Envoy's token-proxy gets. `cargo xtask
//! up` generates it into `.local/keys/cookie-keys` on first run and passes it to both).

mod echo;
mod login;
mod ws;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{any, get, post};
use axum::Router;

fn main() {
    if let Err(e) = run() {
        eprintln!("gatehouse-demo: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let addr: SocketAddr = std::env::var("GATEHOUSE_DEMO_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:8081".into())
        .parse()
        .map_err(|e| format!("GATEHOUSE_DEMO_ADDR: {e}"))?;
    let keys_dir =
        PathBuf::from(std::env::var("GATEHOUSE_KEYS_DIR").unwrap_or_else(|_| ".local/keys".into()));
    let cookie_keys = cookie_keys()?;
    let ttl = match std::env::var("GATEHOUSE_DEMO_TOKEN_TTL") {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|&t| t > 0)
            .ok_or("GATEHOUSE_DEMO_TOKEN_TTL: seconds, at least 1")?,
        Err(_) => login::TOKEN_TTL_SECONDS,
    };
    let issuer = login::Issuer::load_or_create(&keys_dir, cookie_keys, ttl)?;
    let app = router(Arc::new(issuer));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        println!(
            "gatehouse-demo listening on http://{addr} (keys in {})",
            keys_dir.display()
        );
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .map_err(|e| e.to_string())
    })
}

/// The login cookies' keys, from `GATEHOUSE_COOKIE_KEYS` (never printed).
fn cookie_keys() -> Result<gatehouse_core::token_proxy::CookieKeys, String> {
    const VAR: &str = "GATEHOUSE_COOKIE_KEYS";
    let value = std::env::var(VAR).map_err(|_| {
        format!(
            "{VAR} is not set: the login cookies need the AES-256 key that Envoy's token-proxy \
             decrypts with (64 hex characters, e.g. `openssl rand -hex 32`). `cargo xtask up` \
             sets it from .local/keys/cookie-keys"
        )
    })?;
    gatehouse_core::token_proxy::CookieKeys::from_list(&value)
        .map_err(|e| format!("{VAR}: {}", e.message))
}

/// The phone's third-party script, bundled by `cargo xtask build` into `demo/static/vendor/`
/// (not committed): from `GATEHOUSE_DEMO_VENDOR_DIR`, default `demo/static/vendor` (relative to
/// the working directory, the repo root). Missing: the page says so, the rest of the demo runs.
fn jssip() -> Option<&'static str> {
    let dir =
        std::env::var("GATEHOUSE_DEMO_VENDOR_DIR").unwrap_or_else(|_| "demo/static/vendor".into());
    let file = std::path::Path::new(&dir).join("jssip.min.js");
    match std::fs::read_to_string(&file) {
        Ok(text) => Some(Box::leak(text.into_boxed_str())),
        Err(e) => {
            eprintln!("gatehouse-demo: {}: {e} (run `cargo xtask build`): /vendor/jssip.min.js answers 503", file.display());
            None
        }
    }
}

fn router(issuer: Arc<login::Issuer>) -> Router {
    let jssip = jssip();
    Router::new()
        .route(
            "/",
            get(|| {
                static_file(
                    "text/html; charset=utf-8",
                    include_str!("../static/index.html"),
                )
            }),
        )
        .route(
            "/phone.js",
            get(|| static_file("text/javascript", include_str!("../static/phone.js"))),
        )
        .route(
            "/sip-phone.js",
            get(|| static_file("text/javascript", include_str!("../static/sip-phone.js"))),
        )
        .route(
            "/phone.css",
            get(|| static_file("text/css", include_str!("../static/phone.css"))),
        )
        .route(
            "/vendor/jssip.min.js",
            get(move || async move {
                match jssip {
                    Some(body) => static_file("text/javascript", body).await.into_response(),
                    None => (
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        "JsSIP is not bundled: run `cargo xtask build`\n",
                    )
                        .into_response(),
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/api/{*rest}", any(echo::echo))
        .route("/ws/{*rest}", get(ws::upgrade))
        .route("/.well-known/jwks.json", get(login::jwks))
        .route("/dev/login", post(login::login))
        .route("/dev/logout", post(login::logout))
        .route("/dev/revoked.json", get(login::revoked))
        .with_state(issuer)
}

async fn static_file(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
}

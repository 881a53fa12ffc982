//! gatehouse-core: all gatehouse filter logic, with no proxy-wasm dependency.
//!
//! Each `filters/<name>` crate is a thin proxy-wasm shell over this crate. Everything here is
//! host-free and deterministic: time comes in as a parameter (`now`, unix seconds), randomness
//! (WebSocket masks) comes in as bytes, and the results are plain values the shell applies.

mod buckets;
pub mod cache;
pub mod config;
pub mod cookie;
pub mod fetch;
pub mod jwt;
pub mod jwt_auth;
pub mod kv;
pub mod log_limit;
pub mod notes;
pub mod origin;
pub mod page_guard;
pub mod path;
pub mod pipeline;
pub mod reauth;
pub mod reply;
pub mod rules;
pub mod session_binding;
pub mod sessions;
pub mod stats;
pub mod store;
pub mod tick;
pub mod token_proxy;
pub mod turn;
pub mod ws;

pub use config::ConfigError;

/// Base64url without padding, as JOSE uses it.
pub(crate) fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()
}

/// Base64url without padding.
pub(crate) fn b64url(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// A short hash of `text` (12 bytes of SHA-256, base64url): fixed size in a store, no
/// separators, never the value itself.
pub fn short_hash(text: &str) -> String {
    b64url(sha256(text.as_bytes()).get(..12).unwrap_or_default())
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

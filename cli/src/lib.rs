//! gatehouse-cli: the library behind the `gatehouse` command.
//!
//! - [`keys`]: signing keys (EdDSA, ES256, RS256) as JWKs: generate, load, write, publish.
//! - [`token`]: compact JWS signing, i.e. minting test tokens ([`token::mint`]).
//! - [`check`]: find every gatehouse Wasm filter in an Envoy config and compile its
//!   configuration with the same code the filters run ([`check::check_document`]).
//! - [`routes`]: per route of an Envoy config, which gatehouse filters and rules apply
//!   ([`routes::route_report`], printed by `gatehouse check`).
//!
//! Everything here is plain Rust with no proxy-wasm dependency, so other tools (the demo
//! server, tests) can mint tokens with the same code as the command.

pub mod check;
pub mod keys;
pub mod routes;
pub mod sri;
pub mod token;

use std::fmt;

pub use keys::{KeyAlg, PrivateKey};
pub use token::mint;

/// An error of the CLI library: a message meant for a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    message: String,
}

impl Error {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// Base64url without padding, as JOSE uses it.
pub fn b64url(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// Decode base64url without padding (padding is tolerated, since some tools write it).
pub fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .ok()
}

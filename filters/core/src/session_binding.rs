//! session-binding: a verified token is only good with the session, room and client it was
//! issued for, once (single-use connect tokens), while not revoked, and within a cap of open
//! sockets.
//!
//! It runs after a filter that verified the token (gatehouse jwt-auth, or Envoy's native
//! `jwt_authn` with `payload_in_metadata`) and reads the verified claims from where that filter
//! put them (filter state, dynamic metadata), never from a header a client could send. The shell
//! gathers the request facts into [`BindRequest`], calls [`SessionBinding::decide`] with `now`,
//! the worker's [`revocation::RevocationState`] and a [`store::BindingStore`], and applies the
//! [`BindDecision`]. See docs/session-binding.md.
//!
//! One job per file: `config` the raw and compiled configuration, `scope` the path templates,
//! fingerprints and comparisons a binding checks, `decide` the request facts and the decisions;
//! `metadata`, `revocation` and `store` as named; `worker` what each proxy-wasm callback does
//! with the per-worker and per-stream state.

mod config;
mod decide;
pub mod metadata;
pub mod revocation;
mod scope;
pub mod store;
pub mod worker;

pub use config::*;
pub use decide::*;
pub use scope::*;

/// Envoy's native JWT filter: the dynamic-metadata namespace of `payload_in_metadata`.
pub const JWT_AUTHN_NAMESPACE: &str = "envoy.filters.http.jwt_authn";

/// jwt-auth's filter state on a live socket: the payload and the verifying key id of the last
/// in-band re-auth token it accepted (overwritten on every re-auth).
pub use crate::jwt_auth::{REAUTH_CLAIMS_PROPERTY, REAUTH_KID_PROPERTY};
#[cfg(test)]
mod tests;

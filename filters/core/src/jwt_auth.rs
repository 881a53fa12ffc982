//! jwt-auth: config (raw serde structs → compiled config) and the per-request decision.
//!
//! The shell gathers the request facts into [`Request`], calls [`JwtAuth::decide`] with `now`,
//! and applies the [`Decision`]: header edits and filter state, a local reply, or a JWKS fetch
//! after which it decides again.
//!
//! One job per file: `config` the raw and compiled configuration, `extract` the credential
//! locations and their stripping, `verify` the per-worker state and the token check, `jwks` the key
//! fetches, `decide` the request facts and the decision.

mod config;
mod decide;
mod extract;
mod jwks;
mod notes;
mod stream;
mod verify;

pub use config::*;
pub use decide::*;
pub use extract::*;
pub use jwks::*;
pub use notes::*;
pub use stream::*;
pub use verify::*;

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

#[cfg(test)]
mod tests;

#[cfg(test)]
mod discovery_tests;

#[cfg(test)]
mod stream_tests;

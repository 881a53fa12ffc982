//! jwt-auth: config (raw serde structs → compiled config), the per-request decision, and what
//! one stream and the root do with it.
//!
//! The shell reads the facts [`RequestFacts::read`] asks for and makes one call per callback:
//! on [`AuthStream`] (request headers, the answer to its JWKS fetch, response headers, live
//! chunks) and on [`JwtAuth`] (the root tick, the root's fetch answers). It applies what they
//! return (header edits, filter state, a local reply, a call to start) and writes the stats and
//! log lines they noted ([`Notes`]). [`JwtAuth::decide_at`] is the decision itself.
//!
//! One job per file: `config` the raw and compiled configuration, `extract` the credential
//! locations and their stripping, `verify` the per-worker state and the token check, `jwks` the key
//! fetches, `decide` the request facts and the decision, `stream` one stream callback by
//! callback, `notes` what the shell counts and logs.

mod config;
mod decide;
mod extract;
mod fleet;
mod jwks;
mod stream;
mod verify;

pub use crate::notes::Line;
pub use config::*;
pub use decide::*;
pub use extract::*;
pub use jwks::*;
/// What jwt-auth's core steps leave for the shell.
pub type Notes = crate::notes::Notes<crate::stats::JwtAuthStat>;
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

//! JWT verification: JWK parsing (`jwk`), compact JWS parsing and signature checks (`jws`), and
//! claim checks (`claims`). The key fixes the algorithm; the token header never chooses it.

pub mod claims;
pub mod es256;
pub mod jwk;
pub mod jws;

#[cfg(test)]
mod algorithms_tests;

pub use claims::{Claims, TimeRules, TokenTimes};
pub use jwk::{KeySet, VerifyingKey};
pub use jws::Jws;

/// The signature algorithms gatehouse accepts. `none` is not one of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alg {
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
    Es256,
    Es384,
    EdDsa,
    Hs256,
}

impl Alg {
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "RS256" => Alg::Rs256,
            "RS384" => Alg::Rs384,
            "RS512" => Alg::Rs512,
            "PS256" => Alg::Ps256,
            "PS384" => Alg::Ps384,
            "PS512" => Alg::Ps512,
            "ES256" => Alg::Es256,
            "ES384" => Alg::Es384,
            "EdDSA" => Alg::EdDsa,
            "HS256" => Alg::Hs256,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Rs384 => "RS384",
            Alg::Rs512 => "RS512",
            Alg::Ps256 => "PS256",
            Alg::Ps384 => "PS384",
            Alg::Ps512 => "PS512",
            Alg::Es256 => "ES256",
            Alg::Es384 => "ES384",
            Alg::EdDsa => "EdDSA",
            Alg::Hs256 => "HS256",
        }
    }
}

/// Why a token was refused. `reason()` is the stat suffix and the word in the log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenError {
    /// Longer than the configured cap; refused before any parsing.
    TooLarge,
    /// Not three base64url parts, not JSON, a `crit` header, a non-numeric time claim…
    Malformed,
    /// `alg` is `none`, unknown, or differs from the key's algorithm.
    Algorithm,
    /// No key with the token's `kid` (or no key of its algorithm).
    UnknownKey,
    Signature,
    /// A required claim (`exp`, or `iat` when an age or lifetime limit is set) is absent.
    MissingClaim,
    Expired,
    NotYetValid,
    /// `now - iat` exceeds `max_age_seconds`.
    TooOld,
    /// `exp - iat` exceeds `max_lifetime_seconds`, or `iat` lies in the future.
    Lifetime,
    Issuer,
    Audience,
    /// The header's `typ` is not one of the provider's `required_typ` (RFC 8725 3.11).
    Type,
}

impl TokenError {
    pub fn reason(self) -> &'static str {
        match self {
            TokenError::TooLarge => "too_large",
            TokenError::Malformed => "malformed",
            TokenError::Algorithm => "algorithm",
            TokenError::UnknownKey => "unknown_key",
            TokenError::Signature => "signature",
            TokenError::MissingClaim => "missing_claim",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::TooOld => "too_old",
            TokenError::Lifetime => "lifetime",
            TokenError::Issuer => "issuer",
            TokenError::Audience => "audience",
            TokenError::Type => "typ",
        }
    }
}

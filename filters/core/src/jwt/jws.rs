//! Compact JWS parsing, bounded before any decoding, and verification against a key set.

use super::{Alg, KeySet, TokenError, VerifyingKey};
use crate::b64url_decode;
use serde::Deserialize;
use std::sync::Arc;

/// A parsed, not yet verified, compact JWS.
#[derive(Debug)]
pub struct Jws<'a> {
    pub alg: Alg,
    pub kid: Option<String>,
    /// The header's `typ`, as written.
    pub typ: Option<String>,
    /// `header.payload`, the bytes the signature covers.
    pub signing_input: &'a [u8],
    /// The decoded payload (JSON).
    pub payload: Vec<u8>,
    pub signature: Vec<u8>,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
    typ: Option<String>,
    /// Present at all (even `null`): see `parse`.
    #[serde(default, deserialize_with = "present")]
    crit: bool,
}

/// `true` for any value, `null` included (a missing field takes the default, `false`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(d).map(|_| true)
}

fn is_b64url(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl<'a> Jws<'a> {
    /// Parse `token`; refuses anything longer than `max_bytes` before looking inside.
    pub fn parse(token: &'a str, max_bytes: usize) -> Result<Self, TokenError> {
        if token.len() > max_bytes {
            return Err(TokenError::TooLarge);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        if !is_b64url(h) || !is_b64url(p) {
            return Err(TokenError::Malformed);
        }
        let header_json = b64url_decode(h).ok_or(TokenError::Malformed)?;
        let header: Header =
            serde_json::from_slice(&header_json).map_err(|_| TokenError::Malformed)?;
        // RFC 7515 4.1.11: `crit` must list extensions the recipient understands; we understand
        // none, so any `crit` (`null`, `[]` and a list alike) makes the token unusable.
        if header.crit {
            return Err(TokenError::Malformed);
        }
        // Before the signature is even looked at: `alg: none` tokens (empty signature) are
        // refused for what they are.
        let alg = Alg::from_name(&header.alg).ok_or(TokenError::Algorithm)?;
        if !is_b64url(s) {
            return Err(TokenError::Malformed);
        }
        let payload = b64url_decode(p).ok_or(TokenError::Malformed)?;
        let signature = b64url_decode(s).ok_or(TokenError::Malformed)?;
        Ok(Self {
            alg,
            kid: header.kid,
            typ: header.typ,
            signing_input: &token.as_bytes()[..h.len() + 1 + p.len()],
            payload,
            signature,
        })
    }

    /// Verify against `keys`. The key's algorithm must equal the header's: a token cannot pick
    /// HS256 to have an RSA public key used as an HMAC secret.
    /// Returns the key that verified the signature (for a token without `kid`, the one key of
    /// the set that fits, whatever `kid` it is published under).
    pub fn verify(&self, keys: &KeySet) -> Result<Arc<VerifyingKey>, TokenError> {
        let mut saw_key = false;
        let mut saw_alg = false;
        for key in keys.candidates(self.kid.as_deref()) {
            saw_key = true;
            if key.alg != self.alg {
                continue;
            }
            saw_alg = true;
            if key.verify(self.signing_input, &self.signature) {
                return Ok(key.clone());
            }
        }
        Err(match (saw_key, saw_alg) {
            (false, _) => TokenError::UnknownKey,
            (true, false) => TokenError::Algorithm,
            (true, true) => TokenError::Signature,
        })
    }
}

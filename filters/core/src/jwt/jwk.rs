//! JWK / JWKS parsing into verifying keys. Each key carries exactly one algorithm.

use super::Alg;
use crate::b64url_decode;
use crate::config::ConfigError;
use hmac::{Hmac, KeyInit, Mac};
use rsa::signature::Verifier;
use serde::Deserialize;
use sha2::{Sha256, Sha384, Sha512};
use std::sync::Arc;

enum Material {
    /// RSASSA-PKCS1-v1_5 with the hash of `RS256`, `RS384` or `RS512` (the key's `alg`).
    Rs(rsa::PublicKey, Alg),
    Ps256(rsa::pss::VerifyingKey<Sha256>),
    Ps384(rsa::pss::VerifyingKey<Sha384>),
    Ps512(rsa::pss::VerifyingKey<Sha512>),
    Es256(super::es256::Es256Key),
    Es384(p384::ecdsa::VerifyingKey),
    EdDsa(ed25519_dalek::VerifyingKey),
    Hs256(Vec<u8>),
}

/// One public key (or HS256 secret) with its `kid` and the one algorithm it verifies.
pub struct VerifyingKey {
    pub kid: Option<String>,
    pub alg: Alg,
    /// RFC 7638 JWK thumbprint (SHA-256, base64url) of the public key: the key's identity
    /// whatever its `kid` says.
    pub thumbprint: String,
    material: Material,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("thumbprint", &self.thumbprint)
            .finish_non_exhaustive()
    }
}

/// RSASSA-PKCS1-v1_5 with SHA-256, -384 or -512 (RFC 8017 8.2.2), the public operation done
/// variable-time in the exponent: `e` is public, so `s^e mod n` is plain square-and-multiply (16
/// squarings and one multiply for e = 65537) instead of the constant-time windowed power the
/// `rsa` crate uses for every exponent, which measured twice as slow inside Envoy's V8.
fn rs_verify(key: &rsa::PublicKey, alg: Alg, signing_input: &[u8], signature: &[u8]) -> bool {
    use crypto_bigint::modular::BoxedMontyForm;
    use rsa::traits::PublicKeyParts;
    use sha2::Digest;
    /// DER DigestInfo prefixes (RFC 8017 9.2, note 1): SHA-256, SHA-384, SHA-512.
    const SHA256_PREFIX: [u8; 19] = [
        0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01,
        0x05, 0x00, 0x04, 0x20,
    ];
    const SHA384_PREFIX: [u8; 19] = [
        0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02,
        0x05, 0x00, 0x04, 0x30,
    ];
    const SHA512_PREFIX: [u8; 19] = [
        0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03,
        0x05, 0x00, 0x04, 0x40,
    ];
    let (prefix, digest): (&[u8], Vec<u8>) = match alg {
        Alg::Rs384 => (&SHA384_PREFIX, Sha384::digest(signing_input).to_vec()),
        Alg::Rs512 => (&SHA512_PREFIX, Sha512::digest(signing_input).to_vec()),
        _ => (&SHA256_PREFIX, Sha256::digest(signing_input).to_vec()),
    };
    let k = key.size();
    if signature.len() != k || k < prefix.len() + digest.len() + 11 {
        return false;
    }
    let n = key.n().as_ref();
    let Ok(s) = rsa::BoxedUint::from_be_slice(signature, n.bits_precision()) else {
        return false;
    };
    if s >= *n {
        return false;
    }
    let base = BoxedMontyForm::new(s, key.n_params());
    let e = key.e();
    let mut m = base.clone();
    for i in (0..e.bit_width_vartime().saturating_sub(1)).rev() {
        m = m.square();
        if bool::from(e.bit(i)) {
            m = m.mul(&base);
        }
    }
    let m = m.retrieve().to_be_bytes();
    let Some((high, em)) = m.split_at_checked(m.len().saturating_sub(k)) else {
        return false;
    };
    // EM = 0x00 || 0x01 || 0xff.. || 0x00 || DigestInfo(hash(input)), compared as a whole.
    let pad = k - 3 - prefix.len() - digest.len();
    let mut expected = Vec::with_capacity(k);
    expected.extend_from_slice(&[0x00, 0x01]);
    expected.resize(2 + pad, 0xff);
    expected.push(0x00);
    expected.extend_from_slice(prefix);
    expected.extend_from_slice(&digest);
    high.iter().all(|&b| b == 0) && em == expected.as_slice()
}

/// RFC 7638: SHA-256 over the required members, sorted, without whitespace.
fn thumbprint(members: &[(&str, &str)]) -> String {
    let mut json = String::from("{");
    for (i, (k, v)) in members.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        json.push_str(&serde_json::json!(k).to_string());
        json.push(':');
        json.push_str(&serde_json::json!(v).to_string());
    }
    json.push('}');
    crate::b64url(&crate::sha256(json.as_bytes()))
}

impl VerifyingKey {
    /// What names this key in filter state and revocation lists: its `kid`, or its RFC 7638
    /// thumbprint when it has none.
    pub fn id(&self) -> &str {
        self.kid.as_deref().unwrap_or(&self.thumbprint)
    }

    /// Same key material and algorithm (and the same `kid`): a refreshed JWKS that still
    /// publishes it keeps what it verified.
    pub fn same_key(&self, other: &VerifyingKey) -> bool {
        self.thumbprint == other.thumbprint && self.alg == other.alg && self.kid == other.kid
    }

    /// Check `signature` over `signing_input` (the ASCII `header.payload`).
    pub fn verify(&self, signing_input: &[u8], signature: &[u8]) -> bool {
        match &self.material {
            Material::Rs(key, alg) => rs_verify(key, *alg, signing_input, signature),
            Material::Ps256(key) => rsa::pss::Signature::try_from(signature)
                .map(|sig| key.verify(signing_input, &sig).is_ok())
                .unwrap_or(false),
            Material::Ps384(key) => rsa::pss::Signature::try_from(signature)
                .map(|sig| key.verify(signing_input, &sig).is_ok())
                .unwrap_or(false),
            Material::Ps512(key) => rsa::pss::Signature::try_from(signature)
                .map(|sig| key.verify(signing_input, &sig).is_ok())
                .unwrap_or(false),
            Material::Es256(key) => key.verify(signing_input, signature),
            Material::Es384(key) => p384::ecdsa::Signature::from_slice(signature)
                .map(|sig| {
                    p384::ecdsa::signature::Verifier::verify(key, signing_input, &sig).is_ok()
                })
                .unwrap_or(false),
            Material::EdDsa(key) => ed25519_dalek::Signature::from_slice(signature)
                .map(|sig| key.verify_strict(signing_input, &sig).is_ok())
                .unwrap_or(false),
            Material::Hs256(secret) => match <Hmac<Sha256> as KeyInit>::new_from_slice(secret) {
                Ok(mut mac) => {
                    mac.update(signing_input);
                    mac.verify_slice(signature).is_ok()
                }
                Err(_) => false,
            },
        }
    }

    /// An HS256 secret, only ever from explicit configuration (never from a JWKS).
    pub fn hs256(kid: Option<String>, secret: Vec<u8>) -> Result<Self, ConfigError> {
        if secret.len() < 32 {
            return Err(ConfigError::new(
                "secret_base64url",
                "an HS256 secret must be at least 32 bytes",
            ));
        }
        Ok(Self {
            kid,
            alg: Alg::Hs256,
            thumbprint: thumbprint(&[("k", &crate::b64url(&secret)), ("kty", "oct")]),
            material: Material::Hs256(secret),
        })
    }

    /// Parse one JWK. Errors name the field within the key.
    pub fn from_jwk(value: &serde_json::Value) -> Result<Self, ConfigError> {
        let jwk: Jwk = serde_json::from_value(value.clone())
            .map_err(|e| ConfigError::new("", format!("not a JWK: {e}")))?;
        if let Some(ops) = &jwk.key_ops {
            if !ops.iter().any(|o| o == "verify") {
                return Err(ConfigError::new(
                    "key_ops",
                    "does not include `verify`: the key is not for checking signatures",
                ));
            }
        }
        if let Some(u) = jwk.use_.as_deref() {
            if u != "sig" {
                return Err(ConfigError::new(
                    "use",
                    format!("`{u}` keys do not verify signatures"),
                ));
            }
        }
        let declared = match jwk.alg.as_deref() {
            None => None,
            Some(name) => Some(Alg::from_name(name).ok_or_else(|| {
                ConfigError::new("alg", format!("unsupported algorithm `{name}`"))
            })?),
        };
        let field = |name: &'static str, v: &Option<String>| -> Result<Vec<u8>, ConfigError> {
            let s = v
                .as_deref()
                .ok_or_else(|| ConfigError::new(name, "missing"))?;
            b64url_decode(s).ok_or_else(|| ConfigError::new(name, "not base64url"))
        };
        let text = |v: &Option<String>| v.clone().unwrap_or_default();
        let print = match jwk.kty.as_str() {
            "RSA" => thumbprint(&[("e", &text(&jwk.e)), ("kty", "RSA"), ("n", &text(&jwk.n))]),
            "EC" => thumbprint(&[
                ("crv", &text(&jwk.crv)),
                ("kty", "EC"),
                ("x", &text(&jwk.x)),
                ("y", &text(&jwk.y)),
            ]),
            _ => thumbprint(&[
                ("crv", &text(&jwk.crv)),
                ("kty", "OKP"),
                ("x", &text(&jwk.x)),
            ]),
        };
        let (alg, material) = match jwk.kty.as_str() {
            "RSA" => {
                let n = field("n", &jwk.n)?;
                let e = field("e", &jwk.e)?;
                let key = rsa::PublicKey::new(
                    rsa::BoxedUint::from_be_slice_vartime(&n),
                    rsa::BoxedUint::from_be_slice_vartime(&e),
                )
                .map_err(|err| ConfigError::new("n", format!("not a usable RSA key: {err}")))?;
                {
                    use rsa::traits::PublicKeyParts;
                    // RFC 7518 3.3: 2048 bits or more.
                    if key.n().as_ref().bit_width_vartime() < 2048 {
                        return Err(ConfigError::new(
                            "n",
                            "RSA keys under 2048 bits are refused",
                        ));
                    }
                }
                // RFC 7518 3.5: a PSS salt is as long as the hash.
                match declared.unwrap_or(Alg::Rs256) {
                    alg @ (Alg::Rs256 | Alg::Rs384 | Alg::Rs512) => (alg, Material::Rs(key, alg)),
                    Alg::Ps256 => (
                        Alg::Ps256,
                        Material::Ps256(rsa::pss::VerifyingKey::new_with_salt_len(key, 32)),
                    ),
                    Alg::Ps384 => (
                        Alg::Ps384,
                        Material::Ps384(rsa::pss::VerifyingKey::new_with_salt_len(key, 48)),
                    ),
                    Alg::Ps512 => (
                        Alg::Ps512,
                        Material::Ps512(rsa::pss::VerifyingKey::new_with_salt_len(key, 64)),
                    ),
                    other => return Err(mismatch(other, "RSA")),
                }
            }
            "EC" => {
                let x = field("x", &jwk.x)?;
                let y = field("y", &jwk.y)?;
                // The curve fixes the algorithm: P-256 is ES256, P-384 is ES384.
                let (curve, size) = match jwk.crv.as_deref() {
                    Some("P-256") => (Alg::Es256, 32),
                    Some("P-384") => (Alg::Es384, 48),
                    _ => {
                        return Err(ConfigError::new(
                            "crv",
                            "only P-256 and P-384 EC keys are supported",
                        ))
                    }
                };
                if x.len() != size || y.len() != size {
                    return Err(ConfigError::new(
                        "x",
                        format!("{} coordinates are {size} bytes", text(&jwk.crv)),
                    ));
                }
                let mut sec1 = Vec::with_capacity(1 + 2 * size);
                sec1.push(0x04);
                sec1.extend_from_slice(&x);
                sec1.extend_from_slice(&y);
                let not_on_curve = || ConfigError::new("x", format!("not a point on {}", text(&jwk.crv)));
                let material = if curve == Alg::Es256 {
                    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1)
                        .map_err(|_| not_on_curve())?;
                    Material::Es256(super::es256::Es256Key::new(&key))
                } else {
                    Material::Es384(
                        p384::ecdsa::VerifyingKey::from_sec1_bytes(&sec1)
                            .map_err(|_| not_on_curve())?,
                    )
                };
                match declared.unwrap_or(curve) {
                    alg if alg == curve => (alg, material),
                    other => return Err(mismatch(other, &format!("EC {}", text(&jwk.crv)))),
                }
            }
            "OKP" => {
                if jwk.crv.as_deref() != Some("Ed25519") {
                    return Err(ConfigError::new("crv", "only Ed25519 OKP keys are supported"));
                }
                let x = field("x", &jwk.x)?;
                let key = <[u8; 32]>::try_from(x.as_slice())
                    .ok()
                    .and_then(|x| ed25519_dalek::VerifyingKey::from_bytes(&x).ok())
                    .ok_or_else(|| ConfigError::new("x", "not an Ed25519 public key"))?;
                match declared.unwrap_or(Alg::EdDsa) {
                    Alg::EdDsa => (Alg::EdDsa, Material::EdDsa(key)),
                    other => return Err(mismatch(other, "OKP")),
                }
            }
            "oct" => {
                return Err(ConfigError::new(
                    "kty",
                    "symmetric (oct) keys are not accepted in a JWKS; configure hs256_secrets explicitly",
                ))
            }
            other => return Err(ConfigError::new("kty", format!("unsupported key type `{other}`"))),
        };
        Ok(Self {
            kid: jwk.kid,
            alg,
            thumbprint: print,
            material,
        })
    }
}

fn mismatch(alg: Alg, kty: &str) -> ConfigError {
    ConfigError::new("alg", format!("`{}` does not fit a {kty} key", alg.name()))
}

#[derive(Deserialize)]
struct Jwk {
    kty: String,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    key_ops: Option<Vec<String>>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

/// The keys of one provider. Cheap to clone (keys are shared).
#[derive(Clone, Debug, Default)]
pub struct KeySet {
    keys: Vec<Arc<VerifyingKey>>,
}

impl KeySet {
    pub fn new(keys: Vec<VerifyingKey>) -> Self {
        Self {
            keys: keys.into_iter().map(Arc::new).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn extend(&mut self, other: &KeySet) {
        self.keys.extend(other.keys.iter().cloned());
    }

    /// Parse a JWKS (`{"keys": [...]}`). `strict` (inline config): every key must be usable.
    /// Not strict (a fetched JWKS): unusable keys are skipped and counted, so one exotic key
    /// in an identity provider's JWKS does not take the others down.
    pub fn from_jwks(
        value: &serde_json::Value,
        strict: bool,
    ) -> Result<(Self, usize), ConfigError> {
        let keys = value
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or_else(|| ConfigError::new("keys", "a JWKS needs a `keys` list"))?;
        let mut out = Vec::with_capacity(keys.len());
        let mut skipped = 0;
        for (i, key) in keys.iter().enumerate() {
            match VerifyingKey::from_jwk(key) {
                Ok(k) => out.push(k),
                Err(e) if strict => return Err(e.within(&format!("keys[{i}]"))),
                Err(_) => skipped += 1,
            }
        }
        Ok((Self::new(out), skipped))
    }

    /// The keys a token may be checked against: the one with its `kid`, or, for a token without
    /// `kid`, every key of the token's algorithm.
    pub fn candidates<'a>(
        &'a self,
        kid: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Arc<VerifyingKey>> + 'a {
        self.keys
            .iter()
            .filter(move |k| kid.is_none() || k.kid.as_deref() == kid)
    }

    /// Whether this set still has `key` (same material, algorithm and `kid`).
    pub fn contains(&self, key: &VerifyingKey) -> bool {
        self.keys.iter().any(|k| k.same_key(key))
    }
}

/// Parse a fetched JWKS document (bounded: identity providers publish a few KB).
pub fn parse_jwks_document(body: &[u8]) -> Result<serde_json::Value, ConfigError> {
    const MAX_JWKS_BYTES: usize = 256 * 1024;
    if body.len() > MAX_JWKS_BYTES {
        return Err(ConfigError::new("", "JWKS document larger than 256 KiB"));
    }
    serde_json::from_slice(body).map_err(|e| ConfigError::new("", format!("not JSON: {e}")))
}

//! Signing keys as JWKs: generation, loading, the public JWKS, and the key files on disk.
//!
//! A key carries exactly one algorithm, as in `gatehouse_core::jwt`: an Ed25519 key signs
//! `EdDSA`, a P-256 key `ES256`, an RSA key `RS256`.

use crate::{b64url, b64url_decode, Error};
use rsa::rand_core::{TryCryptoRng, TryRng};
use rsa::signature::RandomizedSigner;
use rsa::traits::{PrivateKeyParts, PublicKeyParts};
use serde_json::{json, Map, Value};
use sha2::Sha256;
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// File name of the private key in a key directory.
pub const PRIVATE_KEY_FILE: &str = "private.jwk.json";
/// File name of the public JWKS in a key directory.
pub const JWKS_FILE: &str = "jwks.json";
/// RSA modulus size used when none is given.
pub const DEFAULT_RSA_BITS: usize = 2048;
/// Length of a default `kid`: the start of the key's RFC 7638 thumbprint.
pub const DEFAULT_KID_LEN: usize = 16;

/// The signature algorithms the CLI can generate keys for and sign with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyAlg {
    /// Ed25519 (`kty: OKP`).
    EdDsa,
    /// ECDSA on P-256 with SHA-256 (`kty: EC`).
    Es256,
    /// RSASSA-PKCS1-v1_5 with SHA-256 (`kty: RSA`).
    Rs256,
}

impl KeyAlg {
    /// The JOSE name: `EdDSA`, `ES256`, `RS256`.
    pub fn name(self) -> &'static str {
        match self {
            KeyAlg::EdDsa => "EdDSA",
            KeyAlg::Es256 => "ES256",
            KeyAlg::Rs256 => "RS256",
        }
    }

    /// Parse a JOSE name (exact) or the CLI spelling (`eddsa`, `es256`, `rs256`, any case).
    pub fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "eddsa" | "ed25519" => Some(KeyAlg::EdDsa),
            "es256" => Some(KeyAlg::Es256),
            "rs256" => Some(KeyAlg::Rs256),
            _ => None,
        }
    }
}

impl fmt::Display for KeyAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

enum Material {
    EdDsa(ed25519_dalek::SigningKey),
    /// The key and its public point's affine coordinates.
    Es256(p256::ecdsa::SigningKey, Vec<u8>, Vec<u8>),
    Rs256(Box<rsa::pkcs1v15::SigningKey<Sha256>>),
}

/// A private signing key with its `kid`.
pub struct PrivateKey {
    kid: String,
    material: Material,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg())
            .finish_non_exhaustive()
    }
}

/// The operating system's RNG (getrandom) as the `rand_core` RNG the RSA crate wants.
struct OsRng;

#[derive(Debug)]
struct RngError(getrandom::Error);

impl fmt::Display for RngError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "system random number generator failed: {}", self.0)
    }
}

impl std::error::Error for RngError {}

impl TryRng for OsRng {
    type Error = RngError;

    fn try_next_u32(&mut self) -> Result<u32, RngError> {
        let mut b = [0u8; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn try_next_u64(&mut self) -> Result<u64, RngError> {
        let mut b = [0u8; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), RngError> {
        getrandom::fill(dst).map_err(RngError)
    }
}

impl TryCryptoRng for OsRng {}

fn random_32() -> Result<[u8; 32], Error> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b)
        .map_err(|e| Error::new(format!("system random number generator failed: {e}")))?;
    Ok(b)
}

fn uint_bytes(n: &rsa::BoxedUint) -> Vec<u8> {
    n.to_be_bytes_trimmed_vartime().into_vec()
}

impl PrivateKey {
    /// Generate a new key for `alg` (RSA keys have [`DEFAULT_RSA_BITS`] bits). Without `kid`,
    /// the key's id is the start of its RFC 7638 thumbprint.
    pub fn generate(alg: KeyAlg, kid: Option<String>) -> Result<Self, Error> {
        Self::generate_with_rsa_bits(alg, kid, DEFAULT_RSA_BITS)
    }

    /// As [`PrivateKey::generate`], with the RSA modulus size (2048 to 8192 bits; ignored for
    /// the other algorithms).
    pub fn generate_with_rsa_bits(
        alg: KeyAlg,
        kid: Option<String>,
        rsa_bits: usize,
    ) -> Result<Self, Error> {
        let material = match alg {
            KeyAlg::EdDsa => Material::EdDsa(ed25519_dalek::SigningKey::from_bytes(&random_32()?)),
            KeyAlg::Es256 => {
                // A random 32-byte string is a valid scalar with overwhelming probability;
                // retry the astronomically rare zero or out-of-range value.
                let mut key = None;
                for _ in 0..16 {
                    if let Ok(k) = p256::ecdsa::SigningKey::from_slice(&random_32()?) {
                        key = Some(k);
                        break;
                    }
                }
                es256(key.ok_or_else(|| Error::new("could not generate a P-256 key"))?)?
            }
            KeyAlg::Rs256 => {
                if !(2048..=8192).contains(&rsa_bits) || !rsa_bits.is_multiple_of(8) {
                    return Err(Error::new(format!(
                        "RSA keys must have 2048 to 8192 bits (a multiple of 8), not {rsa_bits}"
                    )));
                }
                let key = rsa::PrivateKey::new(&mut OsRng, rsa_bits)
                    .map_err(|e| Error::new(format!("RSA key generation failed: {e}")))?;
                Material::Rs256(Box::new(rsa::pkcs1v15::SigningKey::new(key)))
            }
        };
        Self::with_kid(material, kid)
    }

    fn with_kid(material: Material, kid: Option<String>) -> Result<Self, Error> {
        let mut key = Self {
            kid: String::new(),
            material,
        };
        key.kid = match kid {
            Some(k) if k.is_empty() => return Err(Error::new("a kid must not be empty")),
            Some(k) => k,
            None => key.thumbprint().chars().take(DEFAULT_KID_LEN).collect(),
        };
        Ok(key)
    }

    /// Load a private JWK (as written by [`write_key_files`], or by another JOSE tool).
    /// `alg` defaults from the key type; `kid` defaults as for a generated key. The public
    /// members, when present, must match the private key.
    pub fn from_jwk(jwk: &Value) -> Result<Self, Error> {
        let obj = jwk
            .as_object()
            .ok_or_else(|| Error::new("a JWK must be a JSON object"))?;
        let text = |name: &str| -> Result<Option<&str>, Error> {
            match obj.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.as_str())),
                Some(_) => Err(Error::new(format!("JWK member `{name}` must be a string"))),
            }
        };
        let bytes = |name: &str| -> Result<Option<Vec<u8>>, Error> {
            match text(name)? {
                None => Ok(None),
                Some(s) => b64url_decode(s)
                    .map(Some)
                    .ok_or_else(|| Error::new(format!("JWK member `{name}` is not base64url"))),
            }
        };
        let required = |name: &str| -> Result<Vec<u8>, Error> {
            bytes(name)?.ok_or_else(|| Error::new(format!("JWK member `{name}` is missing")))
        };
        let kty = text("kty")?.ok_or_else(|| Error::new("JWK member `kty` is missing"))?;
        let key_alg = match kty {
            "OKP" => KeyAlg::EdDsa,
            "EC" => KeyAlg::Es256,
            "RSA" => KeyAlg::Rs256,
            other => {
                return Err(Error::new(format!(
                "unsupported key type `{other}` (EdDSA/OKP, ES256/EC and RS256/RSA keys can sign)"
            )))
            }
        };
        if let Some(alg) = text("alg")? {
            if alg != key_alg.name() {
                return Err(Error::new(format!(
                    "a {kty} key signs {}, not `{alg}`",
                    key_alg.name()
                )));
            }
        }
        let material = match key_alg {
            KeyAlg::EdDsa => {
                if text("crv")? != Some("Ed25519") {
                    return Err(Error::new("only Ed25519 OKP keys are supported"));
                }
                let d = required("d")?;
                let seed = <[u8; 32]>::try_from(d.as_slice())
                    .map_err(|_| Error::new("JWK member `d` must be a 32-byte Ed25519 seed"))?;
                let kp = ed25519_dalek::SigningKey::from_bytes(&seed);
                if let Some(x) = bytes("x")? {
                    if x.as_slice() != kp.verifying_key().as_bytes() {
                        return Err(Error::new("JWK member `x` does not match the private key"));
                    }
                }
                Material::EdDsa(kp)
            }
            KeyAlg::Es256 => {
                if text("crv")? != Some("P-256") {
                    return Err(Error::new("only P-256 EC keys are supported"));
                }
                let d = required("d")?;
                if d.len() != 32 {
                    return Err(Error::new("JWK member `d` must be 32 bytes for P-256"));
                }
                let sk = p256::ecdsa::SigningKey::from_slice(&d)
                    .map_err(|_| Error::new("JWK member `d` is not a P-256 private key"))?;
                let key = es256(sk)?;
                let Material::Es256(_, px, py) = &key else {
                    return Err(Error::new("not an EC key"));
                };
                for (name, want) in [("x", px), ("y", py)] {
                    if let Some(got) = bytes(name)? {
                        if &got != want {
                            return Err(Error::new(format!(
                                "JWK member `{name}` does not match the private key"
                            )));
                        }
                    }
                }
                key
            }
            KeyAlg::Rs256 => {
                let uint = |b: Vec<u8>| rsa::BoxedUint::from_be_slice_vartime(&b);
                let n = uint(required("n")?);
                let e = uint(required("e")?);
                let d = uint(required("d")?);
                let primes = match (bytes("p")?, bytes("q")?) {
                    (Some(p), Some(q)) => vec![uint(p), uint(q)],
                    _ => Vec::new(),
                };
                let key = rsa::PrivateKey::from_components(n, e, d, primes)
                    .map_err(|e| Error::new(format!("not a usable RSA private key: {e}")))?;
                Material::Rs256(Box::new(rsa::pkcs1v15::SigningKey::new(key)))
            }
        };
        Self::with_kid(material, text("kid")?.map(str::to_string))
    }

    /// Read a private JWK file. `path` may also be a key directory, meaning its
    /// [`PRIVATE_KEY_FILE`].
    pub fn load(path: &Path) -> Result<Self, Error> {
        let file = if path.is_dir() {
            path.join(PRIVATE_KEY_FILE)
        } else {
            path.to_path_buf()
        };
        let text = fs::read_to_string(&file)
            .map_err(|e| Error::new(format!("cannot read {}: {e}", file.display())))?;
        let jwk: Value = serde_json::from_str(&text)
            .map_err(|e| Error::new(format!("{} is not JSON: {e}", file.display())))?;
        Self::from_jwk(&jwk).map_err(|e| Error::new(format!("{}: {e}", file.display())))
    }

    pub fn alg(&self) -> KeyAlg {
        match self.material {
            Material::EdDsa(_) => KeyAlg::EdDsa,
            Material::Es256(..) => KeyAlg::Es256,
            Material::Rs256(_) => KeyAlg::Rs256,
        }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The required public members of the JWK, in lexicographic order (RFC 7638 3.2).
    fn public_members(&self) -> Vec<(&'static str, String)> {
        match &self.material {
            Material::EdDsa(kp) => vec![
                ("crv", "Ed25519".to_string()),
                ("kty", "OKP".to_string()),
                ("x", b64url(kp.verifying_key().as_bytes())),
            ],
            Material::Es256(_, x, y) => vec![
                ("crv", "P-256".to_string()),
                ("kty", "EC".to_string()),
                ("x", b64url(x)),
                ("y", b64url(y)),
            ],
            Material::Rs256(sk) => {
                let key: &rsa::PrivateKey = sk.as_ref().as_ref();
                vec![
                    ("e", b64url(&key.e_bytes())),
                    ("kty", "RSA".to_string()),
                    ("n", b64url(&key.n_bytes())),
                ]
            }
        }
    }

    /// The RFC 7638 JWK thumbprint (SHA-256, base64url) of the public key.
    pub fn thumbprint(&self) -> String {
        thumbprint_of(&self.public_members())
    }

    /// The public JWK: key members, `kid`, `alg` and `"use": "sig"`.
    pub fn public_jwk(&self) -> Value {
        let mut m = Map::new();
        for (k, v) in self.public_members() {
            m.insert(k.to_string(), Value::String(v));
        }
        m.insert("kid".into(), Value::String(self.kid.clone()));
        m.insert("alg".into(), Value::String(self.alg().name().into()));
        m.insert("use".into(), Value::String("sig".into()));
        Value::Object(m)
    }

    /// The private JWK: the public JWK plus the private members (`d`, and for RSA `p`, `q`,
    /// `dp`, `dq`, `qi`). Keep it secret.
    pub fn private_jwk(&self) -> Value {
        let mut jwk = self.public_jwk();
        let Some(m) = jwk.as_object_mut() else {
            return jwk;
        };
        let mut put = |k: &str, v: &[u8]| {
            m.insert(k.to_string(), Value::String(b64url(v)));
        };
        match &self.material {
            Material::EdDsa(kp) => put("d", kp.as_bytes()),
            Material::Es256(sk, ..) => put("d", sk.to_bytes().as_slice()),
            Material::Rs256(sk) => {
                let key: &rsa::PrivateKey = sk.as_ref().as_ref();
                put("d", &uint_bytes(key.d()));
                if let [p, q] = key.primes() {
                    put("p", &uint_bytes(p.as_ref()));
                    put("q", &uint_bytes(q.as_ref()));
                }
                if let (Some(dp), Some(dq), Some(qi)) = (key.dp(), key.dq(), key.crt_coefficient())
                {
                    put("dp", &uint_bytes(dp));
                    put("dq", &uint_bytes(dq));
                    put("qi", &uint_bytes(&qi));
                }
            }
        }
        jwk
    }

    /// Sign `signing_input` (the ASCII `header.payload` of a JWS) with the key's algorithm.
    /// ES256 signatures are the 64-byte `r || s` JOSE wants, not DER.
    pub fn sign(&self, signing_input: &[u8]) -> Result<Vec<u8>, Error> {
        match &self.material {
            Material::EdDsa(kp) => Ok(ed25519_dalek::Signer::sign(kp, signing_input)
                .to_bytes()
                .to_vec()),
            Material::Es256(sk, ..) => {
                use p256::ecdsa::signature::Signer;
                let sig: p256::ecdsa::Signature = sk
                    .try_sign(signing_input)
                    .map_err(|e| Error::new(format!("ES256 signing failed: {e}")))?;
                Ok(sig.to_bytes().to_vec())
            }
            Material::Rs256(sk) => {
                let sig = sk
                    .try_sign_with_rng(&mut OsRng, signing_input)
                    .map_err(|e| Error::new(format!("RS256 signing failed: {e}")))?;
                Ok(Box::<[u8]>::from(sig).into_vec())
            }
        }
    }
}

/// An ES256 key with its public point's affine coordinates.
fn es256(sk: p256::ecdsa::SigningKey) -> Result<Material, Error> {
    let sec1 = sk.verifying_key().to_sec1_bytes();
    match (sec1.first(), sec1.get(1..33), sec1.get(33..65)) {
        (Some(0x04), Some(x), Some(y)) if sec1.len() == 65 => {
            let (x, y) = (x.to_vec(), y.to_vec());
            Ok(Material::Es256(sk, x, y))
        }
        _ => Err(Error::new("unexpected P-256 public key encoding")),
    }
}

/// RFC 7638: SHA-256 over the required members, sorted, without whitespace. The members are
/// fixed names with base64url or constant values, so there is nothing to escape.
fn thumbprint_of(members: &[(&str, String)]) -> String {
    let canonical = members
        .iter()
        .map(|(k, v)| format!("\"{k}\":\"{v}\""))
        .collect::<Vec<_>>()
        .join(",");
    b64url(&gatehouse_core::sha256(
        format!("{{{canonical}}}").as_bytes(),
    ))
}

/// A public JWKS (`{"keys": [...]}`) of `keys`.
pub fn jwks<'a>(keys: impl IntoIterator<Item = &'a PrivateKey>) -> Value {
    json!({ "keys": keys.into_iter().map(PrivateKey::public_jwk).collect::<Vec<_>>() })
}

/// The files [`write_key_files`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFiles {
    pub private_jwk: PathBuf,
    pub jwks: PathBuf,
}

/// Write `dir/private.jwk.json` (mode 0600 on Unix) and `dir/jwks.json` (the public JWKS),
/// creating `dir` if needed. Existing files are replaced only with `force`.
pub fn write_key_files(dir: &Path, key: &PrivateKey, force: bool) -> Result<KeyFiles, Error> {
    let files = KeyFiles {
        private_jwk: dir.join(PRIVATE_KEY_FILE),
        jwks: dir.join(JWKS_FILE),
    };
    if !force {
        for f in [&files.private_jwk, &files.jwks] {
            if f.exists() {
                return Err(Error::new(format!(
                    "{} already exists; use --force to replace it",
                    f.display()
                )));
            }
        }
    }
    fs::create_dir_all(dir)
        .map_err(|e| Error::new(format!("cannot create {}: {e}", dir.display())))?;
    let private = pretty(&key.private_jwk())?;
    write_atomic(&files.private_jwk, private.as_bytes(), true)?;
    let public = pretty(&jwks([key]))?;
    write_atomic(&files.jwks, public.as_bytes(), false)?;
    Ok(files)
}

fn pretty(v: &Value) -> Result<String, Error> {
    let mut s = serde_json::to_string_pretty(v)
        .map_err(|e| Error::new(format!("cannot serialize JSON: {e}")))?;
    s.push('\n');
    Ok(s)
}

/// Write through a temporary file in the same directory and rename it over `path`, so a
/// reader never sees half a key and a private key is never readable by others, not even
/// briefly.
fn write_atomic(path: &Path, data: &[u8], secret: bool) -> Result<(), Error> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let fail = |what: &str, e: std::io::Error| {
        Error::new(format!("cannot {what} {}: {e}", path.display()))
    };
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let _ = fs::remove_file(&tmp);
    let result = opts
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(data)?;
            f.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(fail("write", e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbprint_matches_rfc_7638_example() {
        // RFC 7638 section 3.1 computes the thumbprint of this RSA key.
        let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
        let members = [
            ("e", "AQAB".to_string()),
            ("kty", "RSA".to_string()),
            ("n", n.to_string()),
        ];
        assert_eq!(
            thumbprint_of(&members),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn generated_keys_round_trip_through_their_private_jwk() {
        for alg in [KeyAlg::EdDsa, KeyAlg::Es256] {
            let key = PrivateKey::generate(alg, None).unwrap();
            assert_eq!(key.kid().len(), DEFAULT_KID_LEN);
            assert!(key.thumbprint().starts_with(key.kid()));
            let again = PrivateKey::from_jwk(&key.private_jwk()).unwrap();
            assert_eq!(again.kid(), key.kid());
            assert_eq!(again.alg(), alg);
            assert_eq!(again.public_jwk(), key.public_jwk());
            let public = key.public_jwk();
            assert!(public.get("d").is_none());
            assert_eq!(public["use"], "sig");
            assert_eq!(public["alg"], alg.name());
        }
    }

    #[test]
    fn mismatched_public_members_are_refused() {
        let a = PrivateKey::generate(KeyAlg::EdDsa, Some("a".into())).unwrap();
        let b = PrivateKey::generate(KeyAlg::EdDsa, Some("b".into())).unwrap();
        let mut jwk = a.private_jwk();
        jwk["x"] = b.public_jwk()["x"].clone();
        let err = PrivateKey::from_jwk(&jwk).unwrap_err();
        assert!(err.message().contains("does not match"), "{err}");
        let mut jwk = a.private_jwk();
        jwk["alg"] = json!("ES256");
        assert!(PrivateKey::from_jwk(&jwk).is_err());
    }
}

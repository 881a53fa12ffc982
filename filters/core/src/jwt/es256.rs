//! ES256 verification with precomputed tables: the base point's table is built once per VM and
//! each configured key's table when the key is loaded, so a verify is 128 mixed point additions
//! and no doublings (the generic variable-time Straus/wNAF verify in the `ecdsa` crate does 256
//! doublings plus ~100 additions). Everything here is public data: no constant-time needed.
//!
//! Field and point arithmetic are RustCrypto `p256`'s; only the scalar-multiplication strategy
//! is ours.

use p256::elliptic_curve::group::Group as _;
use p256::elliptic_curve::ops::Reduce;
use p256::elliptic_curve::point::AffineCoordinates;
use p256::elliptic_curve::{BatchNormalize, PrimeField};
use p256::{AffinePoint, FieldBytes, ProjectivePoint, Scalar};
use std::sync::OnceLock;

/// 4-bit windows: 64 windows × 15 non-zero digits of affine points (≈ 61 KB).
const WINDOWS: usize = 64;
const DIGITS: usize = 15;

/// `table[w * 15 + (d - 1)] = d · 16^w · P` for every window `w` and digit `d` in 1..=15.
pub struct Table(Vec<AffinePoint>);

impl Table {
    pub fn new(point: ProjectivePoint) -> Self {
        let mut points = Vec::with_capacity(WINDOWS * DIGITS);
        let mut base = point;
        for _ in 0..WINDOWS {
            let mut multiple = base;
            points.push(multiple);
            for _ in 1..DIGITS {
                multiple += base;
                points.push(multiple);
            }
            base = multiple + base; // 16 · base
        }
        Self(<ProjectivePoint as BatchNormalize<[ProjectivePoint]>>::batch_normalize(&points))
    }

    /// `acc += k · P`.
    fn mul_add(&self, k: &Scalar, acc: &mut ProjectivePoint) {
        let bytes = k.to_repr(); // big endian
        for w in 0..WINDOWS {
            let byte = bytes[31 - w / 2];
            let digit = if w % 2 == 0 { byte & 0x0f } else { byte >> 4 };
            if digit != 0 {
                if let Some(p) = self.0.get(w * DIGITS + usize::from(digit) - 1) {
                    *acc += p;
                }
            }
        }
    }
}

fn generator_table() -> &'static Table {
    static G: OnceLock<Table> = OnceLock::new();
    G.get_or_init(|| Table::new(ProjectivePoint::GENERATOR))
}

/// An ES256 public key with its table.
pub struct Es256Key(Table);

impl Es256Key {
    /// Builds the key's table, and the base point's on first use, when keys are loaded (in
    /// `on_configure` or after a JWKS fetch), never on a request.
    pub fn new(key: &p256::ecdsa::VerifyingKey) -> Self {
        generator_table();
        Self(Table::new(key.as_affine().into()))
    }

    /// ECDSA P-256 / SHA-256 (FIPS 186-5 6.4.2) over `message`, `signature` = r ‖ s (64 bytes).
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        use sha2::Digest;
        let Ok(sig) = p256::ecdsa::Signature::from_slice(signature) else {
            return false; // r or s zero or not below n
        };
        let (r, s) = sig.split_scalars();
        let digest: [u8; 32] = sha2::Sha256::digest(message).into();
        let z = <Scalar as Reduce<FieldBytes>>::reduce(&FieldBytes::from(digest));
        let Some(s_inv) = Option::<Scalar>::from(s.invert_vartime()) else {
            return false;
        };
        let u1 = z * s_inv;
        let u2 = *r * s_inv;
        let mut point = ProjectivePoint::IDENTITY;
        generator_table().mul_add(&u1, &mut point);
        self.0.mul_add(&u2, &mut point);
        if bool::from(point.is_identity()) {
            return false;
        }
        let x = point.to_affine().x();
        <Scalar as Reduce<FieldBytes>>::reduce(&x) == *r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Signer;

    #[test]
    fn agrees_with_the_ecdsa_crate() {
        let sk = p256::ecdsa::SigningKey::from_bytes(&FieldBytes::from([0x42u8; 32])).unwrap();
        let key = Es256Key::new(sk.verifying_key());
        for i in 0..20u8 {
            let msg = [i; 40];
            let sig: p256::ecdsa::Signature = sk.sign(&msg);
            let bytes = sig.to_bytes();
            assert!(key.verify(&msg, &bytes));
            assert!(!key.verify(&[i ^ 1; 40], &bytes));
            let mut bad = bytes.to_vec();
            bad[63] ^= 1;
            assert!(!key.verify(&msg, &bad));
        }
        assert!(!key.verify(b"x", &[0u8; 64]));
        assert!(!key.verify(b"x", &[0xffu8; 64]));
    }
}

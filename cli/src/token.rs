//! Compact JWS signing: minting (test) tokens with a [`PrivateKey`].

use crate::{b64url, Error, PrivateKey};
use serde_json::{Map, Value};

/// Sign `claims` as a compact JWS. The header is `{"alg": <the key's>, "typ": "JWT",
/// "kid": <the key's>}`, with `extra_header` members added over it (they may replace the
/// defaults, which is how negative tests make a token that lies about its `alg` or `kid`).
pub fn sign_compact(
    key: &PrivateKey,
    extra_header: &Map<String, Value>,
    claims: &Value,
) -> Result<String, Error> {
    let mut header = Map::new();
    header.insert("alg".into(), Value::String(key.alg().name().into()));
    header.insert("typ".into(), Value::String("JWT".into()));
    header.insert("kid".into(), Value::String(key.kid().into()));
    for (k, v) in extra_header {
        header.insert(k.clone(), v.clone());
    }
    let json = |v: &Value| {
        serde_json::to_vec(v).map_err(|e| Error::new(format!("cannot serialize JSON: {e}")))
    };
    let signing_input = format!(
        "{}.{}",
        b64url(&json(&Value::Object(header))?),
        b64url(&json(claims)?)
    );
    let signature = key.sign(signing_input.as_bytes())?;
    Ok(format!("{signing_input}.{}", b64url(&signature)))
}

/// Mint a JWT: `iat` = `now`, `exp` = `now + ttl`, then the members of `claims` (a JSON
/// object) over them, so a caller may set its own `iat` or `exp` (say, an expired token).
pub fn mint(key: &PrivateKey, claims: &Value, now: u64, ttl: u64) -> Result<String, Error> {
    mint_with_header(key, &Map::new(), claims, now, ttl)
}

/// [`mint`] with extra header members, as [`sign_compact`] takes them.
pub fn mint_with_header(
    key: &PrivateKey,
    extra_header: &Map<String, Value>,
    claims: &Value,
    now: u64,
    ttl: u64,
) -> Result<String, Error> {
    let given = match claims {
        Value::Object(m) => m,
        Value::Null => &Map::new(),
        _ => return Err(Error::new("the claims must be a JSON object")),
    };
    let exp = now
        .checked_add(ttl)
        .ok_or_else(|| Error::new("now + ttl overflows"))?;
    let mut all = Map::new();
    all.insert("iat".into(), Value::from(now));
    all.insert("exp".into(), Value::from(exp));
    for (k, v) in given {
        all.insert(k.clone(), v.clone());
    }
    sign_compact(key, extra_header, &Value::Object(all))
}

/// Parse a `name=value` argument. The value is JSON if it parses as JSON (`5`, `true`,
/// `["a","b"]`, `{"k":1}`, `"quoted"`), otherwise the text as a string.
pub fn parse_assignment(arg: &str) -> Result<(String, Value), Error> {
    let (name, value) = arg
        .split_once('=')
        .ok_or_else(|| Error::new(format!("expected name=value, got `{arg}`")))?;
    if name.is_empty() {
        return Err(Error::new(format!("empty name in `{arg}`")));
    }
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
    Ok((name.to_string(), value))
}

/// The current time in unix seconds.
pub fn unix_now() -> Result<u64, Error> {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| Error::new("the system clock is before 1970"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeyAlg;
    use gatehouse_core::jwt::{Jws, KeySet};
    use serde_json::json;

    #[test]
    fn assignments_are_json_or_text() {
        assert_eq!(parse_assignment("n=5").unwrap(), ("n".into(), json!(5)));
        assert_eq!(
            parse_assignment("scope=phone:call sip").unwrap(),
            ("scope".into(), json!("phone:call sip"))
        );
        assert_eq!(
            parse_assignment("roles=[\"a\",\"b\"]").unwrap(),
            ("roles".into(), json!(["a", "b"]))
        );
        assert_eq!(
            parse_assignment("id=\"123\"").unwrap(),
            ("id".into(), json!("123"))
        );
        assert_eq!(parse_assignment("e=").unwrap(), ("e".into(), json!("")));
        assert_eq!(
            parse_assignment("a=b=c").unwrap(),
            ("a".into(), json!("b=c"))
        );
        assert!(parse_assignment("novalue").is_err());
        assert!(parse_assignment("=x").is_err());
    }

    #[test]
    fn minted_tokens_verify_with_the_core_and_carry_the_claims() {
        for alg in [KeyAlg::EdDsa, KeyAlg::Es256] {
            let key = PrivateKey::generate(alg, None).unwrap();
            let token = mint(&key, &json!({"sub": "alice", "exp": 50}), 1000, 300).unwrap();
            let (keys, skipped) = KeySet::from_jwks(&crate::keys::jwks([&key]), true).unwrap();
            assert_eq!(skipped, 0);
            let jws = Jws::parse(&token, 8192).unwrap();
            assert_eq!(jws.kid.as_deref(), Some(key.kid()));
            jws.verify(&keys).unwrap();
            let claims: Value = serde_json::from_slice(&jws.payload).unwrap();
            assert_eq!(claims, json!({"sub": "alice", "iat": 1000, "exp": 50}));
        }
    }

    #[test]
    fn claims_must_be_an_object() {
        let key = PrivateKey::generate(KeyAlg::EdDsa, None).unwrap();
        assert!(mint(&key, &json!([1]), 0, 1).is_err());
        assert!(mint(&key, &Value::Null, 0, 1).is_ok());
        assert!(mint(&key, &json!({}), u64::MAX, 1).is_err());
    }
}

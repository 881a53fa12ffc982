//! Claim checks: time (with skew, age and lifetime limits), issuer, audience.

use super::TokenError;
use serde_json::{Map, Value};

pub type Claims = Map<String, Value>;

/// Time limits of a policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeRules {
    pub skew: u64,
    pub max_age: Option<u64>,
    pub max_lifetime: Option<u64>,
}

/// The time claims of a token, read once (and cached with it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenTimes {
    pub exp: u64,
    pub iat: Option<u64>,
    pub nbf: Option<u64>,
}

fn numeric_date(claims: &Claims, name: &str) -> Result<Option<u64>, TokenError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => {
            if let Some(n) = v.as_u64() {
                Ok(Some(n))
            } else if let Some(f) = v.as_f64() {
                // NumericDate may carry a fraction; negative or non-finite is malformed.
                if f.is_finite() && f >= 0.0 {
                    Ok(Some(f as u64))
                } else {
                    Err(TokenError::Malformed)
                }
            } else {
                Err(TokenError::Malformed)
            }
        }
    }
}

impl TokenTimes {
    /// Read `exp` (required), `iat` and `nbf`.
    pub fn read(claims: &Claims) -> Result<Self, TokenError> {
        Ok(Self {
            exp: numeric_date(claims, "exp")?.ok_or(TokenError::MissingClaim)?,
            iat: numeric_date(claims, "iat")?,
            nbf: numeric_date(claims, "nbf")?,
        })
    }

    /// Check the times against `now` under `rules`. Runs on every request, cached or not.
    pub fn check(&self, now: u64, rules: &TimeRules) -> Result<(), TokenError> {
        let skew = rules.skew;
        if now >= self.exp.saturating_add(skew) {
            return Err(TokenError::Expired);
        }
        if let Some(nbf) = self.nbf {
            if nbf > now.saturating_add(skew) {
                return Err(TokenError::NotYetValid);
            }
        }
        if rules.max_age.is_some() || rules.max_lifetime.is_some() {
            let iat = self.iat.ok_or(TokenError::MissingClaim)?;
            if iat > now.saturating_add(skew) {
                return Err(TokenError::Lifetime);
            }
            if let Some(max_age) = rules.max_age {
                if now.saturating_sub(iat) > max_age.saturating_add(skew) {
                    return Err(TokenError::TooOld);
                }
            }
            if let Some(max_lifetime) = rules.max_lifetime {
                if self.exp.saturating_sub(iat) > max_lifetime {
                    return Err(TokenError::Lifetime);
                }
            }
        }
        Ok(())
    }

    /// The instant (unix seconds) from which the token no longer counts.
    pub fn deadline(&self, skew: u64) -> u64 {
        self.exp.saturating_add(skew)
    }
}

/// `aud` (a string or a list) must contain one of `audiences`; an empty list skips the check.
pub fn check_audience(claims: &Claims, audiences: &[String]) -> Result<(), TokenError> {
    if audiences.is_empty() {
        return Ok(());
    }
    let ok = match claims.get("aud") {
        Some(Value::String(a)) => audiences.iter().any(|x| x == a),
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(Value::as_str)
            .any(|a| audiences.iter().any(|x| x == a)),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(TokenError::Audience)
    }
}

/// A claim as text: strings as they are, numbers and booleans printed, others as JSON.
pub fn claim_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: Value) -> Claims {
        match v {
            Value::Object(m) => m,
            _ => Claims::new(),
        }
    }

    #[test]
    fn exp_is_required_and_checked_with_skew() {
        assert_eq!(
            TokenTimes::read(&claims(json!({}))),
            Err(TokenError::MissingClaim)
        );
        let t = TokenTimes::read(&claims(json!({"exp": 100}))).unwrap();
        let rules = TimeRules {
            skew: 10,
            ..Default::default()
        };
        assert_eq!(t.check(109, &rules), Ok(()));
        assert_eq!(t.check(110, &rules), Err(TokenError::Expired));
        assert_eq!(t.check(99, &TimeRules::default()), Ok(()));
        assert_eq!(
            t.check(100, &TimeRules::default()),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn nbf_age_and_lifetime() {
        let t = TokenTimes::read(&claims(json!({"exp": 1000, "iat": 100, "nbf": 200}))).unwrap();
        let none = TimeRules::default();
        assert_eq!(t.check(150, &none), Err(TokenError::NotYetValid));
        assert_eq!(t.check(200, &none), Ok(()));
        let age = TimeRules {
            max_age: Some(300),
            ..none
        };
        assert_eq!(t.check(400, &age), Ok(()));
        assert_eq!(t.check(401, &age), Err(TokenError::TooOld));
        let life = TimeRules {
            max_lifetime: Some(899),
            ..none
        };
        assert_eq!(t.check(300, &life), Err(TokenError::Lifetime));
        let no_iat = TokenTimes::read(&claims(json!({"exp": 1000}))).unwrap();
        assert_eq!(no_iat.check(300, &age), Err(TokenError::MissingClaim));
        let future_iat = TokenTimes::read(&claims(json!({"exp": 1000, "iat": 500}))).unwrap();
        assert_eq!(future_iat.check(300, &age), Err(TokenError::Lifetime));
    }

    #[test]
    fn malformed_times() {
        assert_eq!(
            TokenTimes::read(&claims(json!({"exp": "soon"}))),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            TokenTimes::read(&claims(json!({"exp": -5}))),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            TokenTimes::read(&claims(json!({"exp": 10.7}))).unwrap().exp,
            10
        );
    }

    #[test]
    fn audience_string_or_list() {
        let want = vec!["api".to_string()];
        assert!(check_audience(&claims(json!({"aud": "api"})), &want).is_ok());
        assert!(check_audience(&claims(json!({"aud": ["x", "api"]})), &want).is_ok());
        assert_eq!(
            check_audience(&claims(json!({"aud": "x"})), &want),
            Err(TokenError::Audience)
        );
        assert_eq!(
            check_audience(&claims(json!({})), &want),
            Err(TokenError::Audience)
        );
        assert!(check_audience(&claims(json!({})), &[]).is_ok());
    }
}

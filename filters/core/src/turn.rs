//! turn-credentials: ephemeral TURN credentials in the TURN REST API format that coturn checks
//! with `use-auth-secret` + `static-auth-secret`: username `<expiry-unix>:<user>`, credential
//! base64(HMAC-SHA1(secret, username)). The browser never holds a long-lived TURN password.
//!
//! Answered locally on a configured path, for callers jwt-auth has verified (claims from filter
//! state), from an allowed `Origin`, with POST only.

use crate::config::{parse_json, ConfigError, EnvLookup, RawSecret};
use crate::reply::{LocalReply, Refusal};
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use serde_json::{json, Value};

/// The longest TTL a config may ask for.
pub const MAX_TTL_SECONDS: u64 = 86_400;
/// Shorter secrets are refused at load.
const MIN_SECRET_BYTES: usize = 16;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_path")]
    path: String,
    #[serde(default = "default_claim")]
    user_claim: String,
    #[serde(default = "default_ttl")]
    ttl_seconds: u64,
    urls: Vec<String>,
    allowed_origins: Vec<String>,
    secret: RawSecret,
    next_secret: Option<RawSecret>,
    next_secret_from: Option<u64>,
}

fn default_path() -> String {
    "/turn-credentials".into()
}
fn default_claim() -> String {
    "sub".into()
}
fn default_ttl() -> u64 {
    3600
}

#[derive(Debug)]
pub struct TurnConfig {
    pub path: String,
    pub user_claim: String,
    pub ttl: u64,
    pub urls: Vec<String>,
    allowed_origins: Vec<String>,
    secret: Vec<u8>,
    /// The next secret and the unix time from which it signs.
    next: Option<(Vec<u8>, u64)>,
}

fn secret(raw: RawSecret, at: &str, env: EnvLookup<'_>) -> Result<Vec<u8>, ConfigError> {
    raw.resolve(at, env, "secret", MIN_SECRET_BYTES)
}

/// Why a request for credentials was refused (the stat `denied.<reason>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnDenial {
    Method,
    Origin,
    NoClaims,
    BadUser,
    /// The host cannot tell the time: credentials whose expiry is unknown are never minted.
    Clock,
}

impl TurnDenial {
    pub fn reason(self) -> &'static str {
        match self {
            TurnDenial::Method => "method",
            TurnDenial::Origin => "origin",
            TurnDenial::NoClaims => "no_claims",
            TurnDenial::BadUser => "bad_user",
            TurnDenial::Clock => "clock",
        }
    }

    pub fn refusal(self) -> Refusal {
        match self {
            TurnDenial::Method => Refusal::MethodNotAllowed,
            TurnDenial::Origin | TurnDenial::BadUser => Refusal::Forbidden,
            TurnDenial::NoClaims => Refusal::MissingCredentials,
            TurnDenial::Clock => Refusal::Unavailable,
        }
    }
}

/// The request facts the decision needs.
#[derive(Debug, Default)]
pub struct TurnRequest<'a> {
    pub method: &'a str,
    /// `:path`, query string included (ignored).
    pub path: &'a str,
    pub origin: Option<&'a str>,
    /// jwt-auth's verified claims (filter state), as JSON.
    pub claims: Option<&'a [u8]>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum TurnDecision {
    /// Not the credentials path: let the request through.
    Pass,
    /// Credentials minted: `user` is the claim they were minted for.
    Minted { reply: LocalReply, user: String },
    Refused {
        reply: LocalReply,
        denial: TurnDenial,
    },
}

impl TurnConfig {
    pub fn compile(bytes: &[u8], env: EnvLookup<'_>) -> Result<Self, ConfigError> {
        let raw: RawConfig = parse_json(bytes)?;
        if !raw.path.starts_with('/') {
            return Err(ConfigError::new("path", "must start with `/`"));
        }
        if raw.user_claim.is_empty() {
            return Err(ConfigError::new("user_claim", "must not be empty"));
        }
        if raw.ttl_seconds == 0 || raw.ttl_seconds > MAX_TTL_SECONDS {
            return Err(ConfigError::new(
                "ttl_seconds",
                format!("must be between 1 and {MAX_TTL_SECONDS}"),
            ));
        }
        if raw.urls.is_empty() {
            return Err(ConfigError::new(
                "urls",
                "at least one TURN URL is required",
            ));
        }
        for (i, u) in raw.urls.iter().enumerate() {
            if !["turn:", "turns:", "stun:"]
                .iter()
                .any(|s| u.starts_with(s))
            {
                return Err(ConfigError::new(
                    format!("urls[{i}]"),
                    "must start with turn:, turns: or stun:",
                ));
            }
        }
        if raw.allowed_origins.is_empty() {
            return Err(ConfigError::new(
                "allowed_origins",
                "list the origins of the pages that may ask (scheme://host[:port])",
            ));
        }
        let next = match (raw.next_secret, raw.next_secret_from) {
            (None, None) => None,
            (Some(s), Some(from)) => Some((secret(s, "next_secret", env)?, from)),
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "next_secret_from",
                    "required with `next_secret`: the unix time it starts signing",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "next_secret",
                    "required with `next_secret_from`",
                ))
            }
        };
        Ok(Self {
            path: raw.path,
            user_claim: raw.user_claim,
            ttl: raw.ttl_seconds,
            urls: raw.urls,
            allowed_origins: raw
                .allowed_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            secret: secret(raw.secret, "secret", env)?,
            next,
        })
    }

    /// The secret that signs at `now` (the next one from its start time on).
    fn signing_secret(&self, now: u64) -> &[u8] {
        match &self.next {
            Some((next, from)) if now >= *from => next,
            _ => &self.secret,
        }
    }

    /// Decide at `now` (Unix seconds; `None` when the host cannot tell the time, and then
    /// nothing is minted: 503, reason `clock`).
    pub fn decide(&self, req: &TurnRequest<'_>, now: Option<u64>) -> TurnDecision {
        let path = req.path.split('?').next().unwrap_or("");
        if path != self.path {
            return TurnDecision::Pass;
        }
        let refuse = |denial: TurnDenial| {
            let mut reply = denial.refusal().reply(None);
            if denial == TurnDenial::Method {
                reply.headers.push(("allow".into(), "POST".into()));
            }
            TurnDecision::Refused { reply, denial }
        };
        if !req.method.eq_ignore_ascii_case("POST") {
            return refuse(TurnDenial::Method);
        }
        let origin_ok = req.origin.is_some_and(|o| {
            let o = o.trim_end_matches('/').to_ascii_lowercase();
            self.allowed_origins.contains(&o)
        });
        if !origin_ok {
            return refuse(TurnDenial::Origin);
        }
        let claims: Option<Value> = req.claims.and_then(|c| serde_json::from_slice(c).ok());
        let Some(claims) = claims.filter(Value::is_object) else {
            return refuse(TurnDenial::NoClaims);
        };
        // The separator and control characters would change what coturn reads: refuse, never
        // mangle.
        let user = match claims.get(&self.user_claim) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return refuse(TurnDenial::BadUser),
        };
        if user.is_empty() || user.contains(':') || user.chars().any(char::is_control) {
            return refuse(TurnDenial::BadUser);
        }
        // The username carries the expiry: without the time it would be wrong (a time of 0
        // mints credentials that expired in 1970, a guess could mint ones that never do).
        let Some(now) = now else {
            return refuse(TurnDenial::Clock);
        };
        let expires_at = now.saturating_add(self.ttl);
        let username = format!("{expires_at}:{user}");
        let Ok(mut mac) = <Hmac<sha1::Sha1> as KeyInit>::new_from_slice(self.signing_secret(now))
        else {
            return refuse(TurnDenial::NoClaims);
        };
        mac.update(username.as_bytes());
        let credential =
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        let body = json!({
            "iceServers": [{"urls": self.urls, "username": username, "credential": credential}],
            "ttl": self.ttl,
            "expiresAt": expires_at,
        });
        TurnDecision::Minted {
            reply: LocalReply {
                status: 200,
                headers: vec![
                    ("content-type".into(), "application/json".into()),
                    ("cache-control".into(), "no-store".into()),
                ],
                body: body.to_string().into_bytes(),
            },
            user,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: Value) -> TurnConfig {
        let mut c = json!({
            "urls": ["turn:127.0.0.1:3478?transport=udp"],
            "allowed_origins": ["https://phone.example"],
            "secret": {"value": "0123456789abcdef-current"},
        });
        if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                c.insert(k.clone(), v.clone());
            }
        }
        TurnConfig::compile(c.to_string().as_bytes(), &|_| None).unwrap()
    }

    fn post<'a>(claims: &'a [u8]) -> TurnRequest<'a> {
        TurnRequest {
            method: "POST",
            path: "/turn-credentials",
            origin: Some("https://phone.example"),
            claims: Some(claims),
        }
    }

    fn minted(d: TurnDecision) -> Value {
        match d {
            TurnDecision::Minted { reply, .. } => serde_json::from_slice(&reply.body).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn mints_the_turn_rest_api_format() {
        let c = config(json!({}));
        let v = minted(c.decide(&post(br#"{"sub":"alice"}"#), Some(1_000)));
        let server = &v["iceServers"][0];
        assert_eq!(server["username"], "4600:alice");
        // base64(HMAC-SHA1(secret, username)); that coturn accepts it is the e2e test's job.
        let mut mac =
            <Hmac<sha1::Sha1> as KeyInit>::new_from_slice(b"0123456789abcdef-current").unwrap();
        mac.update(b"4600:alice");
        let want = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        assert_eq!(server["credential"], want.as_str());
        assert_eq!(
            (v["ttl"].as_u64(), v["expiresAt"].as_u64()),
            (Some(3600), Some(4600))
        );
    }

    #[test]
    fn refusals() {
        let c = config(json!({}));
        let denial = |r: TurnRequest<'_>| match c.decide(&r, Some(1)) {
            TurnDecision::Refused { denial, reply } => (denial, reply.status),
            other => panic!("{other:?}"),
        };
        let ok = br#"{"sub":"alice"}"#;
        assert_eq!(
            denial(TurnRequest {
                method: "GET",
                ..post(ok)
            }),
            (TurnDenial::Method, 405)
        );
        assert_eq!(
            denial(TurnRequest {
                origin: Some("https://evil.example"),
                ..post(ok)
            }),
            (TurnDenial::Origin, 403)
        );
        assert_eq!(
            denial(TurnRequest {
                origin: None,
                ..post(ok)
            }),
            (TurnDenial::Origin, 403)
        );
        assert_eq!(
            denial(TurnRequest {
                claims: None,
                ..post(ok)
            }),
            (TurnDenial::NoClaims, 401)
        );
        for bad in [
            &br#"{"sub":"a:b"}"#[..],
            br#"{"sub":"a\nb"}"#,
            br#"{"sub":""}"#,
            br#"{}"#,
        ] {
            assert_eq!(denial(post(bad)), (TurnDenial::BadUser, 403));
        }
        assert_eq!(
            c.decide(
                &TurnRequest {
                    path: "/api/echo",
                    ..post(ok)
                },
                Some(1)
            ),
            TurnDecision::Pass
        );
    }

    #[test]
    fn without_the_time_nothing_is_minted() {
        let c = config(json!({}));
        let TurnDecision::Refused { reply, denial } = c.decide(&post(br#"{"sub":"alice"}"#), None)
        else {
            panic!("minted without a clock")
        };
        assert_eq!((denial, denial.reason()), (TurnDenial::Clock, "clock"));
        assert_eq!(reply.status, 503);
        assert!(reply.headers.contains(&("retry-after".into(), "5".into())));
        // What does not need the time is refused as before, and other paths pass.
        let wrong_method = TurnRequest {
            method: "GET",
            ..post(b"{}")
        };
        assert!(matches!(
            c.decide(&wrong_method, None),
            TurnDecision::Refused {
                denial: TurnDenial::Method,
                ..
            }
        ));
        let other = TurnRequest {
            path: "/api/echo",
            ..post(b"{}")
        };
        assert_eq!(c.decide(&other, None), TurnDecision::Pass);
    }

    #[test]
    fn the_next_secret_signs_from_its_start_time() {
        let c = config(
            json!({"next_secret": {"value": "fedcba9876543210-next"}, "next_secret_from": 500}),
        );
        let before = minted(c.decide(&post(br#"{"sub":"bob"}"#), Some(499)));
        let after = minted(c.decide(&post(br#"{"sub":"bob"}"#), Some(500)));
        let with = |secret: &[u8], user: &str| {
            let mut mac = <Hmac<sha1::Sha1> as KeyInit>::new_from_slice(secret).unwrap();
            mac.update(user.as_bytes());
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        };
        assert_eq!(
            before["iceServers"][0]["credential"],
            with(b"0123456789abcdef-current", "4099:bob").as_str()
        );
        assert_eq!(
            after["iceServers"][0]["credential"],
            with(b"fedcba9876543210-next", "4100:bob").as_str()
        );
    }

    #[test]
    fn config_errors_name_the_field() {
        let err = |c: Value| {
            TurnConfig::compile(c.to_string().as_bytes(), &|_| None)
                .unwrap_err()
                .to_string()
        };
        let base = json!({"urls": ["turn:h"], "allowed_origins": ["https://a"], "secret": {"value": "0123456789abcdef"}});
        let with = |k: &str, v: Value| {
            let mut c = base.clone();
            c[k] = v;
            c
        };
        assert!(err(with("ttl_seconds", json!(100_000))).starts_with("config error at ttl_seconds"));
        assert!(err(with("urls", json!(["http://x"]))).starts_with("config error at urls[0]"));
        assert!(
            err(with("secret", json!({"value": "short"}))).starts_with("config error at secret")
        );
        assert!(err(with("secret", json!({"env": "NOPE"}))).contains("NOPE is not set"));
        assert!(
            err(with("next_secret", json!({"value": "0123456789abcdef"})))
                .starts_with("config error at next_secret_from")
        );
        assert!(err(with("bogus", json!(1))).contains("bogus"));
        let from_env = TurnConfig::compile(
            with("secret", json!({"env": "TURN"}))
                .to_string()
                .as_bytes(),
            &|n| (n == "TURN").then(|| "from-the-environment!".to_string()),
        );
        assert!(from_env.is_ok());
    }
}

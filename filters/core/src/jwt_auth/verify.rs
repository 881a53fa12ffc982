//! Verification: the per-worker state (compiled config, fetched keys, token cache) and the
//! check of one token against a policy.

use crate::cache::TokenCache;
use crate::fetch::FetchSchedule;
use crate::jwt::claims::check_audience;
use crate::jwt::{Claims, Jws, KeySet, TokenError, TokenTimes};
use crate::sessions::FleetDeadlines;
use serde_json::Value;
use std::sync::Arc;

use super::*;

/// Everything jwt-auth keeps per worker: the compiled config, the fetched keys and when to fetch
/// them, the cache, the session deadlines for the fleet store, and what the shell counts and
/// logs next.
pub struct JwtAuth {
    pub config: JwtAuthConfig,
    /// When to fetch each provider's remote JWKS (or discovery document).
    pub(super) fetches: FetchSchedule,
    /// The root's calls in flight that fetch a discovery document (the others fetch a JWKS).
    pub(super) discovering: Vec<u32>,
    /// Session deadlines shared by every replica (`store`, docs/fleet.md): written and read on
    /// the root tick, asked by live sockets at their local deadline.
    pub deadlines: Option<FleetDeadlines>,
    /// What the shell counts and logs at the end of the callback.
    pub notes: Notes,
    pub(super) remote_keys: Vec<Option<KeySet>>,
    /// Per `jwks.discovery` provider, the JWKS its discovery document named last
    /// (`:authority`, path).
    pub(super) discovered: Vec<Option<(String, String)>>,
    pub(super) last_fetch: Vec<Option<u64>>,
    pub(super) cache: TokenCache<Arc<Verified>>,
}

impl JwtAuth {
    /// The worker's state for `config`, its "configured" line noted.
    pub fn new(config: JwtAuthConfig) -> Self {
        let n = config.providers.len();
        let mut notes = Notes::default();
        notes.line(Line::Info(format!(
            "configured: {n} providers, {} rules",
            config.rules.len()
        )));
        Self {
            cache: TokenCache::new(config.cache_entries),
            fetches: FetchSchedule::new(
                config
                    .providers
                    .iter()
                    .enumerate()
                    .filter_map(|(i, p)| Some((i, p.remote.as_ref()?.refresh_seconds))),
            ),
            discovering: Vec::new(),
            deadlines: config
                .store
                .as_ref()
                .map(|s| FleetDeadlines::new(s.when_unavailable)),
            notes,
            config,
            remote_keys: vec![None; n],
            discovered: vec![None; n],
            last_fetch: vec![None; n],
        }
    }
    pub(super) fn keys_of(&self, provider: usize) -> KeySet {
        let mut keys = self
            .config
            .providers
            .get(provider)
            .map(|p| p.static_keys.clone())
            .unwrap_or_default();
        if let Some(Some(remote)) = self.remote_keys.get(provider) {
            keys.extend(remote);
        }
        keys
    }

    pub(super) fn verify(
        &mut self,
        token: &str,
        policy: &Policy,
        now: u64,
        may_fetch: bool,
    ) -> Result<(Arc<Verified>, bool), VerifyError> {
        if token.len() > self.config.max_token_bytes {
            return Err(VerifyError::Token(TokenError::TooLarge));
        }
        if let Some(v) = self.cache.get(token.as_bytes(), now) {
            // A hit saves the signature check only; time and policy checks run as on a miss.
            if !policy.providers.contains(&v.provider) {
                return Err(VerifyError::Token(TokenError::Issuer));
            }
            v.times
                .check(now, &policy.time)
                .map_err(VerifyError::Token)?;
            return Ok((v, true));
        }
        let jws = Jws::parse(token, self.config.max_token_bytes).map_err(VerifyError::Token)?;
        let claims: Claims = match serde_json::from_slice(&jws.payload) {
            Ok(Value::Object(map)) => map,
            _ => return Err(VerifyError::Token(TokenError::Malformed)),
        };
        // The issuer picks the provider (among those the policy allows).
        let iss = claims.get("iss").and_then(Value::as_str);
        let provider = policy
            .providers
            .iter()
            .copied()
            .find(|&p| {
                self.config
                    .providers
                    .get(p)
                    .is_some_and(|pr| Some(pr.issuer.as_str()) == iss)
            })
            .ok_or(VerifyError::Token(TokenError::Issuer))?;
        // RFC 8725 3.11: a token of another type (an ID token, a logout token) is not an
        // access token, even signed by the same key.
        if let Some(p) = self.config.providers.get(provider) {
            if !p.required_typ.is_empty()
                && !jws
                    .typ
                    .as_deref()
                    .is_some_and(|t| p.required_typ.contains(&normal_typ(t)))
            {
                return Err(VerifyError::Token(TokenError::Type));
            }
        }
        let keys = self.keys_of(provider);
        if jws.kid.is_none()
            && self
                .config
                .providers
                .get(provider)
                .is_some_and(|p| p.require_kid)
            && keys.candidates(None).filter(|k| k.alg == jws.alg).count() > 1
        {
            // Which key is meant is the token's to say when several could fit.
            return Err(VerifyError::Token(TokenError::UnknownKey));
        }
        let key = match jws.verify(&keys) {
            Ok(key) => key,
            Err(TokenError::UnknownKey) if may_fetch && self.may_refetch(provider, now) => {
                return Err(VerifyError::Fetch(provider));
            }
            Err(TokenError::UnknownKey) if self.awaits_remote_keys(provider) => {
                return Err(VerifyError::KeysNotLoaded);
            }
            Err(e) => return Err(VerifyError::Token(e)),
        };
        let times = TokenTimes::read(&claims).map_err(VerifyError::Token)?;
        if let Some(p) = self.config.providers.get(provider) {
            check_audience(&claims, &p.audiences).map_err(VerifyError::Token)?;
        }
        let verified = Arc::new(Verified {
            provider,
            session: self.session_of(&claims),
            claims,
            payload: jws.payload,
            times,
            kid: jws.kid,
            key_id: key.id().to_string(),
            key,
        });
        // Cached before the time check: validity is re-checked on every hit anyway.
        self.cache.insert(
            token.as_bytes(),
            verified.clone(),
            times.deadline(policy.time.skew),
            now,
        );
        times.check(now, &policy.time).map_err(VerifyError::Token)?;
        Ok((verified, false))
    }
}

pub(super) enum VerifyError {
    Token(TokenError),
    Fetch(usize),
    /// Unknown key while the provider's remote JWKS has never loaded.
    KeysNotLoaded,
}

//! The request facts, the decision and its denials: what one request (or one in-band re-auth)
//! gets.

use crate::jwt::claims::claim_text;
use crate::jwt::{Claims, TokenError, TokenTimes, VerifyingKey};
use crate::path::PathError;
use crate::reply::{LocalReply, Refusal, WsHandshake};
use crate::{origin, sha256, ws};
use std::sync::Arc;

use super::*;

/// The request facts the decision needs; the shell reads them from the host.
#[derive(Debug, Default, Clone)]
pub struct Request<'a> {
    /// `:path`, with the query string.
    pub path: &'a str,
    pub host: &'a str,
    /// Envoy's `xds.route_name`.
    pub route_name: Option<&'a str>,
    /// `Upgrade: websocket` was asked for.
    pub websocket: bool,
    pub ws_key: Option<&'a str>,
    pub ws_protocols: Option<&'a str>,
    pub authorization: Option<&'a str>,
    pub cookie: Option<&'a str>,
    /// The downstream connection is TLS.
    pub tls: bool,
    /// `x-forwarded-proto` as received.
    pub forwarded_proto: Option<&'a str>,
    /// `:method`, `Origin` and `Sec-Fetch-Site`: read only when a cookie source is configured
    /// (`Needs::cookie`), for the origin check of cookie-sourced tokens.
    pub method: Option<&'a str>,
    pub origin: Option<&'a str>,
    pub sec_fetch_site: Option<&'a str>,
}

pub use crate::reply::HeaderEdit;

/// A verified token.
#[derive(Debug)]
pub struct Verified {
    pub provider: usize,
    pub claims: Claims,
    /// The decoded payload, exactly as signed: what goes into filter state.
    pub payload: Vec<u8>,
    pub times: TokenTimes,
    /// The protected header's `kid` (what the token claims; not what verified it).
    pub kid: Option<String>,
    /// The key that verified the signature: its `kid`, or its RFC 7638 thumbprint when it has
    /// none. What is published as [`KID_PROPERTY`] (revocation by key id).
    pub key_id: String,
    /// That key, so a JWKS refresh keeps cached tokens whose key is still published.
    pub key: Arc<VerifyingKey>,
    /// The session key of its claims (`session_claims`), hashed once here, not on every hit.
    pub session: Option<String>,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    Missing,
    /// A token in the query string.
    QueryToken,
    /// The token subprotocol was the only one offered, or the upgrade had no key.
    WsProtocol,
    Token(TokenError),
    /// A valid token that a requirement refuses.
    Forbidden,
    /// A plain `ws://` upgrade on a `wss_only` route.
    InsecureTransport,
    /// A re-auth token of another session than the socket's.
    OtherSession,
    /// A path with dot-segments or hidden separators (checked before any rule matches).
    Path(PathError),
    /// Two different tokens in the request's credential locations.
    MultipleTokens,
    /// A cookie-sourced token on a state-changing request or an upgrade from an untrusted origin.
    Origin,
    /// The host cannot tell the time: nothing time-bound can be decided.
    Clock,
    /// The token's key may be in the provider's remote JWKS, which has not loaded yet (the
    /// first fetch is under way or failed): the token cannot be checked now, which says nothing
    /// against it (503 / 1013, never 401).
    KeysNotLoaded,
}

impl Denial {
    /// The stat suffix: `gatehouse.jwt_auth.denied.<reason>`.
    pub fn reason(self) -> &'static str {
        match self {
            Denial::Missing => "missing",
            Denial::QueryToken => "query_token",
            Denial::WsProtocol => "ws_protocol",
            Denial::Token(e) => e.reason(),
            Denial::Forbidden => "forbidden",
            Denial::InsecureTransport => "insecure_transport",
            Denial::OtherSession => "other_session",
            Denial::Path(e) => e.reason(),
            Denial::MultipleTokens => "multiple_tokens",
            Denial::Origin => "origin",
            Denial::Clock => "clock",
            Denial::KeysNotLoaded => "jwks_unavailable",
        }
    }

    pub fn refusal(self) -> Refusal {
        match self {
            Denial::Missing => Refusal::MissingCredentials,
            Denial::QueryToken
            | Denial::WsProtocol
            | Denial::InsecureTransport
            | Denial::Path(_)
            | Denial::MultipleTokens => Refusal::BadRequest,
            Denial::Token(_) | Denial::OtherSession => Refusal::InvalidCredentials,
            Denial::Forbidden | Denial::Origin => Refusal::Forbidden,
            Denial::Clock | Denial::KeysNotLoaded => Refusal::Unavailable,
        }
    }
}

/// What a verified token means for live sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketTerms {
    /// The session key (a hash of the session claim, never the claim itself), when `sessions`
    /// is configured and the token names a session.
    pub session: Option<String>,
    /// The absolute end of a socket opened now (`max_socket_seconds`).
    pub until: Option<u64>,
}

#[derive(Debug)]
pub enum Decision {
    /// Forward, after applying `edits`. `token` is `None` when a missing token was allowed.
    Allow {
        edits: Vec<HeaderEdit>,
        token: Option<Arc<Verified>>,
        /// When the token stops counting (exp + skew): the deadline of a live socket.
        deadline: Option<u64>,
        cache_hit: bool,
        /// For a live socket (and for extending the live sockets of its session).
        socket: Option<SocketTerms>,
    },
    Deny {
        denial: Denial,
        reply: LocalReply,
    },
    /// The token names a key we do not have for a remote-JWKS provider: fetch that JWKS, then
    /// decide again with `may_fetch = false`.
    FetchJwks {
        provider: usize,
    },
}

impl JwtAuth {
    /// Decide what happens to a request at `now`.
    pub fn decide(&mut self, req: &Request<'_>, now: u64, may_fetch: bool) -> Decision {
        self.decide_at(req, Some(now), may_fetch)
    }

    /// Decide what happens to a request; `now` is `None` when the host cannot tell the time,
    /// and then every decision that needs it fails closed (503 / close 1013, `clock`).
    pub fn decide_at(&mut self, req: &Request<'_>, now: Option<u64>, may_fetch: bool) -> Decision {
        let handshake = |protocol: Option<String>| {
            req.ws_key.map(|key| WsHandshake {
                accept: ws::accept_key(key),
                protocol,
            })
        };
        let token_prefixes: Vec<&str> = self
            .config
            .strip
            .iter()
            .filter_map(|s| match s {
                Source::WebsocketProtocol { prefix } => Some(prefix.as_str()),
                _ => None,
            })
            .collect();
        // The subprotocol a refusal selects: the first one that is not a token (a token is
        // never echoed back in the 101).
        let protocol = req.ws_protocols.and_then(|h| {
            ws::protocols(h)
                .find(|p| !token_prefixes.iter().any(|pre| p.starts_with(pre)))
                .map(str::to_string)
        });
        let deny = |denial: Denial, protocol: Option<String>| {
            let hs = if req.websocket {
                handshake(protocol)
            } else {
                None
            };
            Decision::Deny {
                denial,
                reply: denial.refusal().reply(hs.as_ref()),
            }
        };

        if req.websocket && req.ws_key.is_none() {
            // Without a key the handshake cannot be completed: plain 400.
            return Decision::Deny {
                denial: Denial::WsProtocol,
                reply: Refusal::BadRequest.reply(None),
            };
        }
        // Before any rule looks at the path: `/public/../api` must not match `/public`.
        let policy = match self.config.policy_for(req.route_name, req.path, req.host) {
            Ok(p) => p.clone(),
            Err(e) => return deny(Denial::Path(e), protocol),
        };
        if self.query_has_token(req.path) {
            return deny(Denial::QueryToken, protocol);
        }
        if req.websocket && policy.wss_only && !self.secure(req) {
            return deny(Denial::InsecureTransport, protocol);
        }

        // Client-sent copies of forwarded-claim headers never reach the upstream, and neither
        // does any credential in a location jwt-auth reads, whatever the decision.
        let mut edits: Vec<HeaderEdit> = self
            .config
            .forward_claims
            .iter()
            .map(|(_, h)| HeaderEdit::Remove(h.clone()))
            .collect();
        if req.websocket && self.config.reauth.is_some() {
            // Re-auth frames must be readable: no permessage-deflate.
            edits.push(HeaderEdit::Remove("sec-websocket-extensions".into()));
        }
        let only_token_protocol = self.strip_credentials(req, &mut edits);

        // The tokens the policy's sources hold, in source order.
        let found = policy_tokens(&policy, req);
        let Some(&(token, from)) = found.first() else {
            if policy.allow_missing {
                return Decision::Allow {
                    edits,
                    token: None,
                    deadline: None,
                    cache_hit: false,
                    socket: None,
                };
            }
            return deny(Denial::Missing, protocol);
        };
        if found.iter().any(|(t, _)| *t != token) {
            return deny(Denial::MultipleTokens, protocol);
        }
        if only_token_protocol && from == Location::Protocol {
            // Nothing to select but the token: the browser needs an app protocol. The refusal
            // selects none (never the token).
            return deny(Denial::WsProtocol, None);
        }
        if from == Location::Cookie
            && (req.websocket || req.method.is_some_and(origin::state_changing))
            && !origin::is_trusted(req.origin, req.sec_fetch_site, &policy.trusted_web_origins)
        {
            return deny(Denial::Origin, protocol);
        }
        let Some(now) = now else {
            return deny(Denial::Clock, protocol);
        };

        let (verified, cache_hit) = match self.verify(token, &policy, now, may_fetch) {
            Ok(v) => v,
            Err(VerifyError::Fetch(provider)) => return Decision::FetchJwks { provider },
            Err(VerifyError::KeysNotLoaded) => return deny(Denial::KeysNotLoaded, protocol),
            Err(VerifyError::Token(e)) => return deny(Denial::Token(e), protocol),
        };
        if !policy.require.iter().all(|r| r.is_met(&verified.claims)) {
            return deny(Denial::Forbidden, protocol);
        }
        for (claim, header) in &self.config.forward_claims {
            if let Some(value) = verified.claims.get(claim) {
                let text = claim_text(value);
                // A claim that cannot be a header value is not forwarded (never mangled).
                if !text.bytes().any(|b| b.is_ascii_control()) {
                    edits.push(HeaderEdit::Set(header.clone(), text));
                }
            }
        }
        if policy.forward {
            // Only ever the token just verified, in the one place an API looks for it.
            edits.retain(|e| !matches!(e, HeaderEdit::Remove(h) if h == "authorization"));
            edits.push(HeaderEdit::Set(
                "authorization".into(),
                format!("Bearer {token}"),
            ));
        }
        let socket = SocketTerms {
            session: verified.session.clone(),
            until: policy.max_socket.map(|s| now.saturating_add(s)),
        };
        Decision::Allow {
            edits,
            deadline: Some(verified.times.deadline(policy.time.skew)),
            token: Some(verified),
            cache_hit,
            socket: Some(socket),
        }
    }

    /// An in-band re-auth token on a live socket of `session` opened on `(route, path, host)`:
    /// verified like a connect token, with the route's rules, and it must belong to the same
    /// session. Returns the socket's new deadline and the verified token: the shell publishes
    /// it as [`REAUTH_CLAIMS_PROPERTY`] / [`REAUTH_KID_PROPERTY`] for session-binding, and never
    /// extends the shared session deadline with it (a re-auth extends its own socket only).
    pub fn reauth(
        &mut self,
        token: &str,
        at: (Option<&str>, &str, &str),
        session: &str,
        now: u64,
    ) -> Result<(u64, Arc<Verified>), Denial> {
        let policy = self
            .config
            .policy_for(at.0, at.1, at.2)
            .map_err(Denial::Path)?
            .clone();
        let (verified, _) = match self.verify(token, &policy, now, false) {
            Ok(v) => v,
            Err(VerifyError::Token(e)) => return Err(Denial::Token(e)),
            Err(VerifyError::Fetch(_)) => return Err(Denial::Token(TokenError::UnknownKey)),
            Err(VerifyError::KeysNotLoaded) => return Err(Denial::KeysNotLoaded),
        };
        if !policy.require.iter().all(|r| r.is_met(&verified.claims)) {
            return Err(Denial::Forbidden);
        }
        if verified.session.as_deref() != Some(session) {
            return Err(Denial::OtherSession);
        }
        Ok((verified.times.deadline(policy.time.skew), verified))
    }

    /// TLS to Envoy, or `x-forwarded-proto: https` from a trusted hop.
    pub(super) fn secure(&self, req: &Request<'_>) -> bool {
        origin::is_https(
            req.tls,
            req.forwarded_proto,
            self.config.trust_forwarded_proto,
        )
    }

    /// The session key of verified claims: a short hash, so shared memory never holds the id.
    pub(super) fn session_of(&self, claims: &Claims) -> Option<String> {
        let (name, value) = self
            .config
            .session_claims
            .iter()
            .find_map(|name| claims.get(name).map(|v| (name, claim_text(v))))?;
        if value.is_empty() {
            return None;
        }
        let hash = crate::short_hash(&format!("{name}\0{value}"));
        // Tagged with its subject, so one subject cannot fill the session buckets.
        Some(
            match claims.get("sub").map(claim_text).filter(|s| !s.is_empty()) {
                Some(sub) => {
                    let tag = sha256(format!("sub\0{sub}").as_bytes());
                    format!("{}.{hash}", crate::b64url(&tag[..6]))
                }
                None => hash,
            },
        )
    }
}

//! The request facts, the decision and its denials: connect, fleet, live sockets, re-auth.

use super::revocation::{RevocationState, Revoked, TokenId};
use super::store::{short_hash, Acquire, BindingStore, UseOnce};
use crate::jwt::claims::claim_text;
use crate::jwt::Claims;
use crate::path::PathError;
use crate::reply::{LocalReply, Refusal, WsHandshake};
use crate::stats::SessionBindingStat;
use crate::store::{Claimed, Connect, StoreError, WhenUnavailable};
use crate::{cookie, ws};
use serde_json::Value;
use std::net::IpAddr;

use super::*;

/// The request facts the decision needs; the shell reads them from the host.
#[derive(Debug, Default, Clone)]
pub struct BindRequest<'a> {
    /// `:path`, with the query string.
    pub path: &'a str,
    pub host: &'a str,
    pub route_name: Option<&'a str>,
    pub websocket: bool,
    pub ws_key: Option<&'a str>,
    /// `Sec-WebSocket-Protocol` as it reaches this filter (jwt-auth has taken its token out).
    pub ws_protocols: Option<&'a str>,
    pub cookie: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    /// The downstream peer's address (Envoy's `source.address`).
    pub client_ip: Option<IpAddr>,
    /// The verified claims, from the first configured source that had them.
    pub claims: Option<&'a Claims>,
    /// The verified token's `kid`, when the source publishes it.
    pub kid: Option<&'a str>,
    /// A random id for this stream's socket slot.
    pub slot_id: &'a str,
}

/// The request facts a bound request's decision reads ([`SessionBinding::facts_needed`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FactsNeeded {
    /// `Cookie` (a session binding).
    pub cookie: bool,
    /// `User-Agent` and the peer address (a client fingerprint to check).
    pub client: bool,
    /// A socket slot id (an upgrade under a socket cap).
    pub slot: bool,
}

/// Why a request was refused (the stat `denied.<reason>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindDenial {
    /// The path walks with dot-segments or hides a separator ([`crate::path::check`]): refused
    /// before any rule or template looks at it.
    BadPath(PathError),
    /// A decision needed the time and the host could not tell it.
    Clock,
    NoClaims,
    NoSessionCookie,
    NoSessionClaim,
    SessionMismatch,
    /// No scope template matches the path.
    ScopeUnknown,
    ScopeMismatch,
    NoFingerprint,
    FingerprintMismatch,
    NoJti,
    /// A single-use token without `exp`, or whose `exp` lies beyond what the store remembers
    /// (`exp + clock_skew_seconds > now + max_ttl_seconds`): a replay after the store forgot it
    /// would pass.
    JtiUnbounded,
    Replay,
    JtiStoreFull,
    /// The subject already holds `jti.max_per_subject` outstanding single-use token ids.
    JtiSubjectFull,
    Revoked(Revoked),
    RevocationStale,
    NoCapClaim,
    TooManySockets,
    SlotStoreFull,
    /// The fleet store did not answer usably within `timeout_ms` (`when_unavailable: closed`).
    StoreUnavailable,
}

impl BindDenial {
    pub fn reason(self) -> &'static str {
        match self {
            BindDenial::BadPath(e) => e.reason(),
            BindDenial::Clock => "clock",
            BindDenial::NoClaims => "no_claims",
            BindDenial::NoSessionCookie => "no_session_cookie",
            BindDenial::NoSessionClaim => "no_session_claim",
            BindDenial::SessionMismatch => "session_mismatch",
            BindDenial::ScopeUnknown => "scope_unknown",
            BindDenial::ScopeMismatch => "scope_mismatch",
            BindDenial::NoFingerprint => "no_fingerprint",
            BindDenial::FingerprintMismatch => "fingerprint_mismatch",
            BindDenial::NoJti => "no_jti",
            BindDenial::JtiUnbounded => "jti_unbounded",
            BindDenial::Replay => "replay",
            BindDenial::JtiStoreFull => "jti_store_full",
            BindDenial::JtiSubjectFull => "jti_subject_full",
            BindDenial::Revoked(r) => r.reason(),
            BindDenial::RevocationStale => "revocation_stale",
            BindDenial::NoCapClaim => "no_cap_claim",
            BindDenial::TooManySockets => "too_many_sockets",
            BindDenial::SlotStoreFull => "slot_store_full",
            BindDenial::StoreUnavailable => "store_unavailable",
        }
    }

    pub fn refusal(self) -> Refusal {
        match self {
            BindDenial::BadPath(_) => Refusal::BadRequest,
            BindDenial::NoClaims => Refusal::MissingCredentials,
            BindDenial::NoSessionCookie
            | BindDenial::NoSessionClaim
            | BindDenial::SessionMismatch
            | BindDenial::NoFingerprint
            | BindDenial::FingerprintMismatch
            | BindDenial::NoJti
            | BindDenial::JtiUnbounded
            | BindDenial::Replay
            | BindDenial::Revoked(_)
            | BindDenial::NoCapClaim => Refusal::InvalidCredentials,
            BindDenial::ScopeUnknown | BindDenial::ScopeMismatch => Refusal::Forbidden,
            BindDenial::JtiStoreFull
            | BindDenial::JtiSubjectFull
            | BindDenial::TooManySockets
            | BindDenial::SlotStoreFull => Refusal::TooMany,
            BindDenial::RevocationStale | BindDenial::Clock | BindDenial::StoreUnavailable => {
                Refusal::Unavailable
            }
        }
    }

    /// How a live socket closes for this denial: `(code, reason, stat)`.
    pub fn live_close(self) -> LiveClose {
        let reason = match self {
            BindDenial::Revoked(_) => "token revoked",
            BindDenial::Replay => "token reused",
            BindDenial::RevocationStale => "revocation list stale",
            BindDenial::Clock => "clock unavailable",
            _ => "re-auth refused",
        };
        (self.refusal().close_code(), reason, self)
    }
}

/// What a live socket keeps after its upgrade was allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveTerms {
    /// Checked against the revocation list on every frame.
    pub token: TokenId,
    /// The socket's slot `(owner, slot)`: refreshed while it lives, freed when it ends.
    pub slot: Option<(String, String)>,
    /// The binding is single-use: an in-band re-auth token is claimed like a connect token.
    pub single_use: bool,
    /// The last accepted in-band re-auth token: checked against the revocation list too.
    pub reauth: Option<Box<TokenId>>,
}

impl LiveTerms {
    /// Must this socket look at in-band re-auth tokens (single use, or a revocation feed)?
    pub fn checks_reauth(&self, binding: &SessionBinding) -> bool {
        self.single_use || binding.config.revocation.is_some()
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum BindDecision {
    /// No binding applies (a `disabled` rule, or claims missing where that is allowed).
    Pass,
    Allow {
        /// For an upgrade: what the live socket keeps.
        live: Option<LiveTerms>,
        /// Stats to count besides `allowed` (`jti.evicted`, `revocation.stale_served`).
        notes: Vec<SessionBindingStat>,
    },
    Deny {
        denial: BindDenial,
        reply: LocalReply,
    },
}

/// Why a live socket must close now: `(code, reason, denial)` (counted `ws.closed.<reason>`).
pub type LiveClose = (u16, &'static str, BindDenial);

/// The compiled config; per worker.
pub struct SessionBinding {
    pub config: SessionBindingConfig,
}

pub(super) fn text_claim(claims: &Claims, name: &str) -> Option<String> {
    match claims.get(name)? {
        v @ (Value::String(_) | Value::Number(_)) => Some(claim_text(v)).filter(|s| !s.is_empty()),
        _ => None,
    }
}

/// The revocation identity of verified claims.
pub fn token_id(claims: &Claims, kid: Option<&str>) -> TokenId {
    TokenId {
        jti: text_claim(claims, "jti"),
        sub: text_claim(claims, "sub"),
        iat: claims.get("iat").and_then(Value::as_u64),
        kid: kid.map(str::to_string),
        sid: text_claim(claims, "sid"),
    }
}

/// The value a `sha256` session binding expects in the claim for a cookie value:
/// `base64url_nopad(SHA-256(cookie value))`.
pub fn session_hash(cookie_value: &str) -> String {
    crate::b64url(&crate::sha256(cookie_value.as_bytes()))
}

/// The value an `hmac_sha256` session binding expects in the claim:
/// `base64url_nopad(HMAC-SHA256(key, cookie value))`.
pub fn session_hmac(key: &[u8], cookie_value: &str) -> Option<String> {
    use hmac::{Hmac, KeyInit, Mac};
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key).ok()?;
    mac.update(cookie_value.as_bytes());
    Some(crate::b64url(&mac.finalize().into_bytes()))
}

/// The handshake answer of an upgrade request (`None` for plain HTTP).
pub(super) fn handshake(req: &BindRequest<'_>) -> Option<WsHandshake> {
    if req.websocket {
        req.ws_key.map(|key| WsHandshake {
            accept: ws::accept_key(key),
            protocol: req
                .ws_protocols
                .and_then(|h| ws::protocols(h).next())
                .map(str::to_string),
        })
    } else {
        None
    }
}

/// The refusal of `denial` for `req`: problem+json, or a 101 and a close frame on an upgrade.
pub fn deny(req: &BindRequest<'_>, denial: BindDenial) -> BindDecision {
    deny_with(handshake(req).as_ref(), denial)
}

pub(super) fn deny_with(hs: Option<&WsHandshake>, denial: BindDenial) -> BindDecision {
    BindDecision::Deny {
        denial,
        reply: denial.refusal().reply(hs),
    }
}

/// A decision with a fleet store ([`SessionBinding::decide_fleet`]).
#[derive(Debug)]
pub enum FleetDecision {
    /// Decided without the store (refused before any claim, or nothing to claim).
    Now(BindDecision),
    /// Allowed if the store confirms the claims: send [`Pending::connect`], then
    /// [`Pending::finish`] with its answer.
    Ask(Box<Pending>),
}

/// An allowed connect waiting for the store.
#[derive(Debug)]
pub struct Pending {
    pub connect: Connect,
    handshake: Option<WsHandshake>,
    live: Option<LiveTerms>,
    notes: Vec<SessionBindingStat>,
}

/// How a connect ended once the store answered.
#[derive(Debug, PartialEq, Eq)]
pub struct Finished {
    pub decision: BindDecision,
    /// The etcd slot number the socket holds (`None`: no slot, or a slot in local state).
    pub etcd_slot: Option<u32>,
    /// Decided on this Envoy's own state because the store could not answer.
    pub fallback: bool,
}

impl Pending {
    /// The decision once the store answered `answer`; on a store error, `when` says whether to
    /// refuse or to claim in `local` (this Envoy's shared data).
    pub fn finish(
        self,
        answer: Result<Claimed, StoreError>,
        when: WhenUnavailable,
        local: &mut dyn BindingStore,
    ) -> Finished {
        let refuse = |denial, fallback| Finished {
            decision: deny_with(self.handshake.as_ref(), denial),
            etcd_slot: None,
            fallback,
        };
        let (etcd_slot, fallback) = match answer {
            Ok(Claimed::Fresh { slot }) => (slot, false),
            Ok(Claimed::Replay) => return refuse(BindDenial::Replay, false),
            Ok(Claimed::OverCap) => return refuse(BindDenial::TooManySockets, false),
            Err(_) if when == WhenUnavailable::Closed => {
                return refuse(BindDenial::StoreUnavailable, false)
            }
            Err(_) => match self.connect.claim_locally(local) {
                Ok(()) => (None, true),
                Err((UseOnce::Replay, _)) => return refuse(BindDenial::Replay, true),
                Err((UseOnce::OwnerFull, _)) => return refuse(BindDenial::JtiSubjectFull, true),
                Err((UseOnce::Full, _)) => return refuse(BindDenial::JtiStoreFull, true),
                Err((_, Acquire::OverCap)) => return refuse(BindDenial::TooManySockets, true),
                Err(_) => return refuse(BindDenial::SlotStoreFull, true),
            },
        };
        Finished {
            decision: BindDecision::Allow {
                live: self.live,
                notes: self.notes,
            },
            etcd_slot,
            fallback,
        }
    }
}

impl SessionBinding {
    pub fn new(config: SessionBindingConfig) -> Self {
        Self { config }
    }

    /// [`Self::decide_at`] with a known time.
    pub fn decide(
        &self,
        req: &BindRequest<'_>,
        now: u64,
        revocations: Option<&RevocationState>,
        store: &mut dyn BindingStore,
    ) -> BindDecision {
        self.decide_at(req, Some(now), revocations, store)
    }

    /// Decide what happens to a request at `now` (`None`: the host cannot tell the time, and a
    /// check that needs it refuses with 503 / close 1013, reason `clock`). `revocations` is the
    /// worker's list (`None` without a feed); `store` holds used token ids and socket slots.
    pub fn decide_at(
        &self,
        req: &BindRequest<'_>,
        now: Option<u64>,
        revocations: Option<&RevocationState>,
        store: &mut dyn BindingStore,
    ) -> BindDecision {
        // Before any rule or template looks at the path.
        let selected = self.config.binding_for(req.route_name, req.path, req.host);
        self.decide_selected(selected, req, now, revocations, store)
    }

    /// Which request facts the decision needs beyond the rule target and the claims, for the
    /// binding [`SessionBindingConfig::binding_for`] selected: the shell reads only these (each
    /// host call costs about a microsecond inside V8). `None`: nothing at all, the request is
    /// not bound and passes.
    pub fn facts_needed(
        selected: &Result<Option<&Binding>, PathError>,
        claims: Option<&Claims>,
        websocket: bool,
    ) -> Option<FactsNeeded> {
        Some(match selected {
            Ok(None) => return None,
            // Refused for its path before anything else is looked at.
            Err(_) => FactsNeeded::default(),
            Ok(Some(b)) => FactsNeeded {
                cookie: b.session.is_some(),
                client: b.fingerprint == FingerprintMode::Required
                    || (b.fingerprint != FingerprintMode::Off
                        && claims.is_some_and(|c| c.contains_key("cfp"))),
                slot: websocket && b.max_sockets.is_some(),
            },
        })
    }

    /// [`Self::decide_at`] for the binding the shell already selected (so the rules are matched
    /// once per request).
    pub fn decide_selected(
        &self,
        selected: Result<Option<&Binding>, PathError>,
        req: &BindRequest<'_>,
        now: Option<u64>,
        revocations: Option<&RevocationState>,
        store: &mut dyn BindingStore,
    ) -> BindDecision {
        let binding = match selected {
            Ok(Some(binding)) => binding,
            Ok(None) => return BindDecision::Pass,
            Err(e) => return deny(req, BindDenial::BadPath(e)),
        };
        let Some(claims) = req.claims else {
            return if binding.allow_missing {
                BindDecision::Pass
            } else {
                deny(req, BindDenial::NoClaims)
            };
        };
        let mut notes = Vec::new();
        let token = token_id(claims, req.kid);

        // Revocation first: a revoked token is refused whatever else it would pass.
        if let Err(d) = self.check_revocation(&token, now, revocations, &mut notes) {
            return deny(req, d);
        }

        if let Some(session) = &binding.session {
            let Some(want) = text_claim(claims, &session.claim) else {
                return deny(req, BindDenial::NoSessionClaim);
            };
            let Some(have) = req
                .cookie
                .and_then(|c| cookie::get(c, &session.cookie))
                .filter(|v| !v.is_empty())
            else {
                return deny(req, BindDenial::NoSessionCookie);
            };
            if !session
                .expected(have)
                .is_some_and(|expected| ct_eq(&want, &expected))
            {
                return deny(req, BindDenial::SessionMismatch);
            }
        }

        if !binding.scope.is_empty() {
            match check_scope(&binding.scope, req.path, claims) {
                ScopeCheck::Bound => {}
                ScopeCheck::NoTemplate => return deny(req, BindDenial::ScopeUnknown),
                ScopeCheck::Mismatch(_) => return deny(req, BindDenial::ScopeMismatch),
            }
        }

        if binding.fingerprint != FingerprintMode::Off {
            match claims.get("cfp") {
                None if binding.fingerprint == FingerprintMode::Required => {
                    return deny(req, BindDenial::NoFingerprint)
                }
                None => {}
                Some(cfp) => {
                    let ok = match (cfp.as_str(), req.client_ip) {
                        (Some(cfp), Some(ip)) => {
                            ct_eq(cfp, &fingerprint(req.user_agent.unwrap_or(""), ip))
                        }
                        _ => false,
                    };
                    if !ok {
                        return deny(req, BindDenial::FingerprintMismatch);
                    }
                }
            }
        }

        // The checks that write to the store come last: a request refused above uses nothing.
        if binding.single_use {
            match self.use_jti(claims, now, store) {
                Ok(Some(note)) => notes.push(note),
                Ok(None) => {}
                Err(d) => return deny(req, d),
            }
        }

        let mut slot = None;
        if let (true, Some(cap)) = (req.websocket, &binding.max_sockets) {
            let Some(value) = text_claim(claims, &cap.per_claim) else {
                return deny(req, BindDenial::NoCapClaim);
            };
            let Some(now) = now else {
                return deny(req, BindDenial::Clock);
            };
            let owner = short_hash(&format!("{}\0{value}", cap.per_claim));
            match store.acquire_slot(
                &owner,
                req.slot_id,
                cap.limit,
                self.config.sockets.slot_ttl,
                now,
            ) {
                Acquire::Granted => slot = Some((owner, req.slot_id.to_string())),
                Acquire::OverCap => return deny(req, BindDenial::TooManySockets),
                Acquire::Full => return deny(req, BindDenial::SlotStoreFull),
            }
        }

        BindDecision::Allow {
            live: req.websocket.then_some(LiveTerms {
                token,
                slot,
                single_use: binding.single_use,
                reauth: None,
            }),
            notes,
        }
    }

    /// [`Self::decide_selected`] with the fleet store: the claims an allowed request makes are
    /// recorded, to be confirmed by etcd before the request goes on.
    pub fn decide_fleet(
        &self,
        selected: Result<Option<&Binding>, PathError>,
        req: &BindRequest<'_>,
        now: Option<u64>,
        revocations: Option<&RevocationState>,
    ) -> FleetDecision {
        let mut connect = Connect::default();
        match self.decide_selected(selected, req, now, revocations, &mut connect) {
            BindDecision::Allow { live, notes } if !connect.is_empty() => {
                FleetDecision::Ask(Box::new(Pending {
                    connect,
                    handshake: handshake(req),
                    live,
                    notes,
                }))
            }
            decision => FleetDecision::Now(decision),
        }
    }

    /// The revocation feed's verdict on `token`: a stale list (or an unknown time) refuses under
    /// fail-closed, and is noted under fail-open.
    pub(super) fn check_revocation(
        &self,
        token: &TokenId,
        now: Option<u64>,
        revocations: Option<&RevocationState>,
        notes: &mut Vec<SessionBindingStat>,
    ) -> Result<(), BindDenial> {
        let (Some(feed), Some(state)) = (&self.config.revocation, revocations) else {
            return Ok(());
        };
        match now {
            Some(now) if state.is_stale(now, feed.max_stale) => {
                if feed.fail_closed {
                    return Err(BindDenial::RevocationStale);
                }
                notes.push(SessionBindingStat::RevocationStaleServed);
            }
            Some(_) => {}
            None if feed.fail_closed => return Err(BindDenial::Clock),
            None => {}
        }
        match state.list.check(token) {
            Some(r) => Err(BindDenial::Revoked(r)),
            None => Ok(()),
        }
    }

    /// Claim the `jti` of a single-use token: once per issuer, remembered until `exp` + skew,
    /// which must lie within what the store remembers; at most `jti.max_per_subject` outstanding
    /// per subject. `Ok(Some(note))` when the store pushed out another entry.
    pub(super) fn use_jti(
        &self,
        claims: &Claims,
        now: Option<u64>,
        store: &mut dyn BindingStore,
    ) -> Result<Option<SessionBindingStat>, BindDenial> {
        let Some(jti) = text_claim(claims, "jti") else {
            return Err(BindDenial::NoJti);
        };
        let Some(now) = now else {
            return Err(BindDenial::Clock);
        };
        let jti_cfg = &self.config.jti;
        let Some(until) = claims
            .get("exp")
            .and_then(Value::as_u64)
            .map(|exp| exp.saturating_add(jti_cfg.skew))
        else {
            return Err(BindDenial::JtiUnbounded);
        };
        if until > now.saturating_add(jti_cfg.max_ttl) {
            return Err(BindDenial::JtiUnbounded);
        }
        let iss = text_claim(claims, "iss").unwrap_or_default();
        let owner = text_claim(claims, "sub").map(|sub| short_hash(&format!("{iss}\0sub\0{sub}")));
        let id = short_hash(&format!("{iss}\0{jti}"));
        match store.use_once(
            &id,
            owner.as_deref().map(|o| (o, jti_cfg.per_subject)),
            until,
            now,
        ) {
            UseOnce::Fresh => Ok(None),
            UseOnce::FreshEvicted => Ok(Some(SessionBindingStat::JtiEvicted)),
            UseOnce::Replay => Err(BindDenial::Replay),
            UseOnce::Full => Err(BindDenial::JtiStoreFull),
            UseOnce::OwnerFull => Err(BindDenial::JtiSubjectFull),
        }
    }

    /// Must a live socket carrying `terms` close now? A revoked token (the connect token or the
    /// last accepted re-auth token) closes it with 4401; a stale list, or an unknown time, under
    /// fail-closed with 1013.
    pub fn check_live(
        &self,
        terms: &LiveTerms,
        revocations: Option<&RevocationState>,
        now: Option<u64>,
    ) -> Option<LiveClose> {
        let (feed, state) = (self.config.revocation.as_ref()?, revocations?);
        for token in std::iter::once(&terms.token).chain(terms.reauth.as_deref()) {
            if let Some(r) = state.list.check(token) {
                return Some(BindDenial::Revoked(r).live_close());
            }
        }
        if feed.fail_closed {
            match now {
                None => return Some(BindDenial::Clock.live_close()),
                Some(now) if state.is_stale(now, feed.max_stale) => {
                    return Some(BindDenial::RevocationStale.live_close())
                }
                Some(_) => {}
            }
        }
        None
    }

    /// An in-band re-auth token that jwt-auth verified and accepted on a live socket (its
    /// payload `claims` and `kid`): checked against the revocation feed and, on a single-use
    /// binding, claimed like a connect token. `Ok` keeps the socket (and it is remembered in
    /// `terms` for later revocation checks); `Err` says how to close it.
    pub fn check_reauth(
        &self,
        terms: &mut LiveTerms,
        claims: &Claims,
        kid: Option<&str>,
        now: Option<u64>,
        revocations: Option<&RevocationState>,
        store: &mut dyn BindingStore,
    ) -> Result<Vec<SessionBindingStat>, LiveClose> {
        let token = token_id(claims, kid);
        let mut notes = Vec::new();
        self.check_revocation(&token, now, revocations, &mut notes)
            .map_err(BindDenial::live_close)?;
        if terms.single_use {
            if let Some(note) = self
                .use_jti(claims, now, store)
                .map_err(BindDenial::live_close)?
            {
                notes.push(note);
            }
        }
        terms.reauth = Some(Box::new(token));
        Ok(notes)
    }
}

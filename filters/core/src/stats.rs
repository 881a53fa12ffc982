//! Each filter's stats as a closed set: one enum per filter, whose [`Stat::all`] lists every
//! counter it can count and [`Stat::name`] gives the name after the filter's prefix
//! (`gatehouse.jwt_auth.` + `denied.expired`; Envoy shows `wasmcustom.gatehouse.jwt_auth.…`).
//! The host layer's `Counters` takes the enum, so no name is formatted at a call site, and a
//! test keeps each `docs/<filter>.md` stats table equal to [`Stat::all`].
//!
//! The lists of denial reasons below are written out once each; the `match` next to each list
//! stops a new variant from compiling until it is added there too.

use crate::jwt::TokenError;
use crate::jwt_auth::Denial;
use crate::page_guard::{Outcome, ReportDirective, ReportError, ResponseDenial};
use crate::path::PathError;
use crate::session_binding::revocation::Revoked;
use crate::session_binding::BindDenial;
use crate::store::{StoreError, STORE_ERRORS};
use crate::token_proxy::{CookieError, ProxyDenial};
use crate::turn::TurnDenial;

/// A filter's closed set of counters.
pub trait Stat: Copy + PartialEq + Sized + 'static {
    /// Every counter of the filter.
    fn all() -> Vec<Self>;
    /// The counter's name after the filter's prefix (`denied.expired`).
    fn name(self) -> String;
    /// A histogram (values recorded), not a counter.
    fn is_histogram(self) -> bool {
        false
    }
}

const PATH_ERRORS: [PathError; 2] = [PathError::DotSegment, PathError::HiddenSeparator];
const _: fn(PathError) = |e| match e {
    PathError::DotSegment | PathError::HiddenSeparator => {}
};

const TOKEN_ERRORS: [TokenError; 13] = [
    TokenError::Malformed,
    TokenError::Expired,
    TokenError::NotYetValid,
    TokenError::TooOld,
    TokenError::Lifetime,
    TokenError::MissingClaim,
    TokenError::Signature,
    TokenError::Issuer,
    TokenError::Audience,
    TokenError::UnknownKey,
    TokenError::Algorithm,
    TokenError::TooLarge,
    TokenError::Type,
];
const _: fn(TokenError) = |e| match e {
    TokenError::Malformed
    | TokenError::Expired
    | TokenError::NotYetValid
    | TokenError::TooOld
    | TokenError::Lifetime
    | TokenError::MissingClaim
    | TokenError::Signature
    | TokenError::Issuer
    | TokenError::Audience
    | TokenError::UnknownKey
    | TokenError::Algorithm
    | TokenError::TooLarge
    | TokenError::Type => {}
};

fn jwt_denials() -> Vec<Denial> {
    let mut all = vec![Denial::Missing];
    all.extend(TOKEN_ERRORS.map(Denial::Token));
    all.extend([
        Denial::Forbidden,
        Denial::QueryToken,
        Denial::WsProtocol,
        Denial::InsecureTransport,
    ]);
    all.extend(PATH_ERRORS.map(Denial::Path));
    all.extend([
        Denial::MultipleTokens,
        Denial::Origin,
        Denial::Clock,
        Denial::KeysNotLoaded,
        Denial::OtherSession,
    ]);
    all
}
const _: fn(Denial) = |d| match d {
    Denial::Missing
    | Denial::Token(_)
    | Denial::Forbidden
    | Denial::QueryToken
    | Denial::WsProtocol
    | Denial::InsecureTransport
    | Denial::Path(_)
    | Denial::MultipleTokens
    | Denial::Origin
    | Denial::Clock
    | Denial::KeysNotLoaded
    | Denial::OtherSession => {}
};

/// `gatehouse.jwt_auth.*`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtAuthStat {
    Allowed,
    AllowedMissing,
    Denied(Denial),
    CacheHit,
    CacheMiss,
    JwksFetchOk,
    JwksFetchFailed,
    JwksKeySkipped,
    WsExpiredClose,
    WsReauth,
    /// Session deadlines in the fleet store (`store.*`, docs/fleet.md).
    Store(crate::sessions::DeadlineStat),
}

impl Stat for JwtAuthStat {
    fn all() -> Vec<Self> {
        use JwtAuthStat::*;
        let mut all = vec![Allowed, AllowedMissing];
        all.extend(jwt_denials().into_iter().map(Denied));
        all.extend([
            CacheHit,
            CacheMiss,
            JwksFetchOk,
            JwksFetchFailed,
            JwksKeySkipped,
            WsExpiredClose,
            WsReauth,
        ]);
        all.extend(crate::sessions::DEADLINE_STATS.map(Store));
        all.extend(STORE_ERRORS.map(|e| Store(crate::sessions::DeadlineStat::Error(e))));
        all
    }

    fn name(self) -> String {
        use JwtAuthStat::*;
        match self {
            Allowed => "allowed",
            AllowedMissing => "allowed_missing",
            Denied(d) => return format!("denied.{}", d.reason()),
            CacheHit => "cache.hit",
            CacheMiss => "cache.miss",
            JwksFetchOk => "jwks.fetch_ok",
            JwksFetchFailed => "jwks.fetch_failed",
            JwksKeySkipped => "jwks.key_skipped",
            WsExpiredClose => "ws.expired_close",
            WsReauth => "ws.reauth",
            Store(s) => return s.name(),
        }
        .to_string()
    }
}

const COOKIE_ERRORS: [CookieError; 6] = [
    CookieError::NotBase64,
    CookieError::TooShort,
    CookieError::TooLarge,
    CookieError::Version,
    CookieError::Decrypt,
    CookieError::NotUtf8,
];
const _: fn(CookieError) = |e| match e {
    CookieError::NotBase64
    | CookieError::TooShort
    | CookieError::TooLarge
    | CookieError::Version
    | CookieError::Decrypt
    | CookieError::NotUtf8 => {}
};
const _: fn(ProxyDenial) = |d| match d {
    ProxyDenial::Cookie(_)
    | ProxyDenial::TokenNotAllowed
    | ProxyDenial::Origin
    | ProxyDenial::Csrf => {}
};

/// `gatehouse.token_proxy.*`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenProxyStat {
    Forwarded,
    Passed,
    Preflight,
    CookiesHardened,
    Denied(ProxyDenial),
}

impl Stat for TokenProxyStat {
    fn all() -> Vec<Self> {
        use TokenProxyStat::*;
        let mut all = vec![Forwarded, Passed, Preflight, CookiesHardened];
        all.extend(COOKIE_ERRORS.map(|e| Denied(ProxyDenial::Cookie(e))));
        all.extend(
            [
                ProxyDenial::TokenNotAllowed,
                ProxyDenial::Origin,
                ProxyDenial::Csrf,
            ]
            .map(Denied),
        );
        all
    }

    fn name(self) -> String {
        use TokenProxyStat::*;
        match self {
            Forwarded => "forwarded",
            Passed => "passed",
            Preflight => "preflight",
            CookiesHardened => "cookies_hardened",
            Denied(d) => return format!("denied.{}", d.reason()),
        }
        .to_string()
    }
}

const REVOKED: [Revoked; 4] = [Revoked::Jti, Revoked::Sub, Revoked::Kid, Revoked::Sid];
const _: fn(Revoked) = |r| match r {
    Revoked::Jti | Revoked::Sub | Revoked::Kid | Revoked::Sid => {}
};

fn bind_denials() -> Vec<BindDenial> {
    use BindDenial::*;
    let mut all: Vec<BindDenial> = PATH_ERRORS.map(BadPath).to_vec();
    all.extend([
        Clock,
        NoClaims,
        NoSessionCookie,
        NoSessionClaim,
        SessionMismatch,
        ScopeUnknown,
        ScopeMismatch,
        NoFingerprint,
        FingerprintMismatch,
        NoJti,
        JtiUnbounded,
        Replay,
        JtiStoreFull,
        JtiSubjectFull,
    ]);
    all.extend(REVOKED.map(Revoked));
    all.extend([
        RevocationStale,
        NoCapClaim,
        TooManySockets,
        SlotStoreFull,
        StoreUnavailable,
    ]);
    all
}
const _: fn(BindDenial) = |d| {
    use BindDenial::*;
    match d {
        BadPath(_) | Clock | NoClaims | NoSessionCookie | NoSessionClaim | SessionMismatch
        | ScopeUnknown | ScopeMismatch | NoFingerprint | FingerprintMismatch | NoJti
        | JtiUnbounded | Replay | JtiStoreFull | JtiSubjectFull | Revoked(_) | RevocationStale
        | NoCapClaim | TooManySockets | SlotStoreFull | StoreUnavailable => {}
    }
};

/// The denials that close a live socket: what `SessionBinding::check_live` (revocation, a
/// stale list, no time) and `check_reauth` (those, and claiming a single-use re-auth token)
/// return.
const LIVE_CLOSES: [BindDenial; 11] = [
    BindDenial::Revoked(Revoked::Jti),
    BindDenial::Revoked(Revoked::Sub),
    BindDenial::Revoked(Revoked::Kid),
    BindDenial::Revoked(Revoked::Sid),
    BindDenial::RevocationStale,
    BindDenial::Clock,
    BindDenial::NoJti,
    BindDenial::JtiUnbounded,
    BindDenial::Replay,
    BindDenial::JtiStoreFull,
    BindDenial::JtiSubjectFull,
];

/// Why session-binding closed a live socket (`ws.closed.<reason>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsClose {
    Denied(BindDenial),
    /// The re-auth filter state was not the verified payload jwt-auth publishes.
    ReauthUnreadable,
}

impl WsClose {
    pub fn reason(self) -> &'static str {
        match self {
            WsClose::Denied(d) => d.reason(),
            WsClose::ReauthUnreadable => "reauth_unreadable",
        }
    }
}

/// The fleet store's outcomes (`store.*`, docs/fleet.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreStat {
    /// A connect's claims confirmed by etcd.
    Claimed,
    Replay,
    OverCap,
    /// No usable answer (then `when_unavailable` decides).
    Error(StoreError),
    /// Decided on this Envoy's own state (`when_unavailable: local`).
    LocalFallback,
    KeepaliveOk,
    /// The socket lease had expired (etcd away longer than its TTL): granted again and the
    /// live sockets' slots put back.
    LeaseRestored,
    KeepaliveFailed,
    Released,
    ReleaseFailed,
    /// Milliseconds from the first call to the answer of a connect (a histogram).
    LatencyMs,
}

const STORE_STATS: [StoreStat; 10] = [
    StoreStat::Claimed,
    StoreStat::Replay,
    StoreStat::OverCap,
    StoreStat::LocalFallback,
    StoreStat::KeepaliveOk,
    StoreStat::LeaseRestored,
    StoreStat::KeepaliveFailed,
    StoreStat::Released,
    StoreStat::ReleaseFailed,
    StoreStat::LatencyMs,
];

impl StoreStat {
    fn name(self) -> String {
        let name = match self {
            StoreStat::Claimed => "claimed",
            StoreStat::Replay => "replay",
            StoreStat::OverCap => "over_cap",
            StoreStat::Error(e) => return format!("store.error.{}", e.reason()),
            StoreStat::LocalFallback => "local_fallback",
            StoreStat::KeepaliveOk => "keepalive_ok",
            StoreStat::LeaseRestored => "lease_restored",
            StoreStat::KeepaliveFailed => "keepalive_failed",
            StoreStat::Released => "released",
            StoreStat::ReleaseFailed => "release_failed",
            StoreStat::LatencyMs => "latency_ms",
        };
        format!("store.{name}")
    }
}

/// `gatehouse.session_binding.*`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionBindingStat {
    Allowed,
    Passed,
    Denied(BindDenial),
    JtiEvicted,
    SocketsAcquired,
    SocketsReleased,
    RevocationFetchOk,
    RevocationFetchFailed,
    RevocationStaleServed,
    RevocationEntrySkipped,
    ReauthChecked,
    /// Fleet store: an in-band re-auth token claimed on etcd.
    ReauthStoreClaimed,
    /// Fleet store: etcd says the in-band re-auth token was used before (the socket closes).
    ReauthStoreReplay,
    /// Fleet store: no usable answer for an in-band re-auth claim (the socket stays open).
    ReauthStoreFailed,
    WsClosed(WsClose),
    Store(StoreStat),
}

impl Stat for SessionBindingStat {
    fn all() -> Vec<Self> {
        use SessionBindingStat::*;
        let mut all = vec![Allowed, Passed];
        all.extend(bind_denials().into_iter().map(Denied));
        all.extend([
            JtiEvicted,
            SocketsAcquired,
            SocketsReleased,
            RevocationFetchOk,
            RevocationFetchFailed,
            RevocationStaleServed,
            RevocationEntrySkipped,
            ReauthChecked,
            ReauthStoreClaimed,
            ReauthStoreReplay,
            ReauthStoreFailed,
        ]);
        all.extend(LIVE_CLOSES.map(|d| WsClosed(WsClose::Denied(d))));
        all.push(WsClosed(WsClose::ReauthUnreadable));
        all.extend(STORE_STATS.map(Store));
        all.extend(STORE_ERRORS.map(|e| Store(StoreStat::Error(e))));
        all
    }

    fn is_histogram(self) -> bool {
        self == SessionBindingStat::Store(StoreStat::LatencyMs)
    }

    fn name(self) -> String {
        use SessionBindingStat::*;
        match self {
            Allowed => "allowed",
            Passed => "passed",
            Denied(d) => return format!("denied.{}", d.reason()),
            JtiEvicted => "jti.evicted",
            SocketsAcquired => "sockets.acquired",
            SocketsReleased => "sockets.released",
            RevocationFetchOk => "revocation.fetch_ok",
            RevocationFetchFailed => "revocation.fetch_failed",
            RevocationStaleServed => "revocation.stale_served",
            RevocationEntrySkipped => "revocation.entry_skipped",
            ReauthChecked => "reauth.checked",
            ReauthStoreClaimed => "reauth.store_claimed",
            ReauthStoreReplay => "reauth.store_replay",
            ReauthStoreFailed => "reauth.store_failed",
            WsClosed(c) => return format!("ws.closed.{}", c.reason()),
            Store(s) => return s.name(),
        }
        .to_string()
    }
}

const OUTCOMES: [Outcome; 8] = [
    Outcome::Rewritten,
    Outcome::OverCap,
    Outcome::SkippedCompressed,
    Outcome::Denied(ResponseDenial::Compressed),
    Outcome::Denied(ResponseDenial::Partial),
    Outcome::NotHtml,
    Outcome::Headers,
    Outcome::NoRandomness,
];
const _: fn(Outcome) = |o| match o {
    Outcome::Rewritten
    | Outcome::OverCap
    | Outcome::SkippedCompressed
    | Outcome::Denied(ResponseDenial::Compressed | ResponseDenial::Partial)
    | Outcome::NotHtml
    | Outcome::Headers
    | Outcome::NoRandomness => {}
};
const REPORT_ERRORS: [ReportError; 3] = [
    ReportError::ContentType,
    ReportError::Malformed,
    ReportError::TooLarge,
];
const _: fn(ReportError) = |e| match e {
    ReportError::ContentType | ReportError::Malformed | ReportError::TooLarge => {}
};

/// `gatehouse.page_guard.*`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageGuardStat {
    /// What became of a response on a guarded route.
    Outcome(Outcome),
    /// A path refused before the rules (`denied.path_*`).
    Path(PathError),
    TagsNonce,
    TagsIntegrity,
    TagsNonceRefused,
    PlaceholderRemoved,
    OversizedTag,
    TrailersTailDropped,
    Off,
    /// A violation report, by directive.
    Report(ReportDirective),
    ReportInvalid(ReportError),
    /// The report endpoint asked with another method than POST.
    ReportInvalidMethod,
}

impl Stat for PageGuardStat {
    fn all() -> Vec<Self> {
        use PageGuardStat::*;
        let mut all: Vec<Self> = OUTCOMES.map(Outcome).to_vec();
        all.extend(PATH_ERRORS.map(Path));
        all.extend([
            TagsNonce,
            TagsIntegrity,
            TagsNonceRefused,
            PlaceholderRemoved,
            OversizedTag,
            TrailersTailDropped,
            Off,
        ]);
        all.extend(ReportDirective::all().map(Report));
        all.extend(REPORT_ERRORS.map(ReportInvalid));
        all.push(ReportInvalidMethod);
        all
    }

    fn name(self) -> String {
        use PageGuardStat::*;
        match self {
            Outcome(o) => o.name(),
            Path(e) => return format!("denied.{}", e.reason()),
            TagsNonce => "tags.nonce",
            TagsIntegrity => "tags.integrity",
            TagsNonceRefused => "tags.nonce_refused",
            PlaceholderRemoved => "placeholder_removed",
            OversizedTag => "oversized_tag",
            TrailersTailDropped => "trailers.tail_dropped",
            Off => "off",
            Report(d) => return format!("report.{}", d.name()),
            ReportInvalid(e) => return format!("report.invalid.{}", e.reason()),
            ReportInvalidMethod => "report.invalid.method",
        }
        .to_string()
    }
}

const TURN_DENIALS: [TurnDenial; 5] = [
    TurnDenial::Method,
    TurnDenial::Origin,
    TurnDenial::NoClaims,
    TurnDenial::BadUser,
    TurnDenial::Clock,
];
const _: fn(TurnDenial) = |d| match d {
    TurnDenial::Method
    | TurnDenial::Origin
    | TurnDenial::NoClaims
    | TurnDenial::BadUser
    | TurnDenial::Clock => {}
};

/// `gatehouse.turn_credentials.*`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnStat {
    Minted,
    Denied(TurnDenial),
}

impl Stat for TurnStat {
    fn all() -> Vec<Self> {
        let mut all = vec![TurnStat::Minted];
        all.extend(TURN_DENIALS.map(TurnStat::Denied));
        all
    }

    fn name(self) -> String {
        match self {
            TurnStat::Minted => "minted".to_string(),
            TurnStat::Denied(d) => format!("denied.{}", d.reason()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The stat names of a doc's `## Stats` table: every backticked name in the first column.
    fn documented(doc: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut in_stats = false;
        for line in doc.lines() {
            if line.starts_with("## ") {
                in_stats = line.trim() == "## Stats";
                continue;
            }
            let Some(row) = line.strip_prefix('|').filter(|_| in_stats) else {
                continue;
            };
            let first = row.split('|').next().unwrap_or("");
            names.extend(
                first
                    .split('`')
                    .skip(1)
                    .step_by(2)
                    .filter(|n| *n != "stat")
                    .map(str::to_string),
            );
        }
        names
    }

    fn check<S: Stat + std::fmt::Debug>(doc: &str, file: &str) {
        let names: Vec<String> = S::all().into_iter().map(S::name).collect();
        let set: BTreeSet<&String> = names.iter().collect();
        assert_eq!(
            set.len(),
            names.len(),
            "{file}: a stat name twice in the enum"
        );
        let docs = documented(doc);
        let doc_set: BTreeSet<&String> = docs.iter().collect();
        assert_eq!(doc_set.len(), docs.len(), "{file}: a stat documented twice");
        let missing: Vec<_> = set.difference(&doc_set).collect();
        let extra: Vec<_> = doc_set.difference(&set).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{file} `## Stats`: undocumented {missing:?}, documented but not counted {extra:?}"
        );
    }

    #[test]
    fn each_filters_docs_list_exactly_its_stats() {
        check::<JwtAuthStat>(include_str!("../../../docs/jwt-auth.md"), "jwt-auth.md");
        check::<TokenProxyStat>(
            include_str!("../../../docs/token-proxy.md"),
            "token-proxy.md",
        );
        check::<SessionBindingStat>(
            include_str!("../../../docs/session-binding.md"),
            "session-binding.md",
        );
        check::<PageGuardStat>(include_str!("../../../docs/page-guard.md"), "page-guard.md");
        check::<TurnStat>(
            include_str!("../../../docs/turn-credentials.md"),
            "turn-credentials.md",
        );
    }

    #[test]
    fn names_users_see_stay_the_same() {
        let name = |s: JwtAuthStat| s.name();
        assert_eq!(
            name(JwtAuthStat::Denied(Denial::Token(TokenError::Expired))),
            "denied.expired"
        );
        assert_eq!(
            name(JwtAuthStat::Denied(Denial::Path(PathError::DotSegment))),
            "denied.path_dot_segment"
        );
        assert_eq!(
            SessionBindingStat::WsClosed(WsClose::Denied(BindDenial::Revoked(Revoked::Sid))).name(),
            "ws.closed.revoked_sid"
        );
        let report = br#"{"csp-report": {"effective-directive": "script-src-elem"}}"#;
        let parsed = crate::page_guard::parse_reports(Some("application/csp-report"), report, 4096);
        let directive = parsed.ok().and_then(|v| v.first().map(|v| v.directive));
        assert_eq!(
            directive
                .map(|d| PageGuardStat::Report(d).name())
                .as_deref(),
            Some("report.script-src-elem")
        );
        assert_eq!(
            PageGuardStat::Outcome(Outcome::SkippedCompressed).name(),
            "skipped.compressed"
        );
        assert_eq!(
            TokenProxyStat::Denied(ProxyDenial::Cookie(CookieError::NotUtf8)).name(),
            "denied.cookie_content"
        );
    }
}

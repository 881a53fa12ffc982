//! The revocation list: a JSON document fetched from an Envoy cluster on a timer.
//!
//! ```json
//! { "revoked": [
//!     { "jti": "5f0c…" },                           // one token
//!     { "sub": "alice", "issued_before": 1767225600 }, // log out everywhere: tokens issued before
//!     { "kid": "2024-key" },                         // a compromised signing key
//!     { "sid": "7c1e…" }                             // one session (a logout)
//! ] }
//! ```
//!
//! A bare array of entries is accepted too. An entry of no known shape is skipped and counted,
//! the others apply: one bad line of a feed does not throw away every revocation in it. A
//! document that is not of this shape at all is an error, and a failed fetch keeps the last
//! good list. Before the first good document, and past `max_stale_seconds` without a good
//! fetch, the list is *stale*, and the filter either keeps serving with it (fail-open) or
//! refuses (fail-closed).

use serde_json::Value;
use std::collections::{HashMap, HashSet};

/// Entries in one document are capped: a runaway feed cannot exhaust the VM's memory.
pub const MAX_ENTRIES: usize = 100_000;

/// What identifies a token for revocation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenId {
    pub jti: Option<String>,
    pub sub: Option<String>,
    pub iat: Option<u64>,
    pub kid: Option<String>,
    /// The session (`sid` claim).
    pub sid: Option<String>,
}

/// Why a token is revoked (the stat `denied.revoked_<kind>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    Jti,
    Sub,
    Kid,
    Sid,
}

impl Revoked {
    pub fn reason(self) -> &'static str {
        match self {
            Revoked::Jti => "revoked_jti",
            Revoked::Sub => "revoked_sub",
            Revoked::Kid => "revoked_kid",
            Revoked::Sid => "revoked_sid",
        }
    }
}

/// A parsed revocation document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationList {
    jtis: HashSet<String>,
    /// sub → tokens issued before this time are revoked.
    subs: HashMap<String, u64>,
    kids: HashSet<String>,
    sids: HashSet<String>,
}

impl RevocationList {
    /// [`Self::parse_counted`] without the count of skipped entries.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        Self::parse_counted(body).map(|(list, _)| list)
    }

    /// The list of a document and how many of its entries were skipped (not of a known shape).
    /// Only a document that is not JSON, has no `revoked` array, or is over [`MAX_ENTRIES`] is
    /// an error.
    pub fn parse_counted(body: &[u8]) -> Result<(Self, usize), String> {
        let doc: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
        let entries = match &doc {
            Value::Array(a) => a,
            Value::Object(o) => match o.get("revoked") {
                Some(Value::Array(a)) => a,
                _ => return Err("no `revoked` array".into()),
            },
            _ => return Err("neither an object nor an array".into()),
        };
        if entries.len() > MAX_ENTRIES {
            return Err(format!(
                "{} entries, more than {MAX_ENTRIES}",
                entries.len()
            ));
        }
        let mut list = Self::default();
        let mut skipped = 0;
        for e in entries {
            let text = |k: &str| e.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
            if let Some(jti) = text("jti") {
                list.jtis.insert(jti.to_string());
            } else if let Some(kid) = text("kid") {
                list.kids.insert(kid.to_string());
            } else if let Some(sid) = text("sid") {
                list.sids.insert(sid.to_string());
            } else if let (Some(sub), Some(before)) =
                (text("sub"), e.get("issued_before").and_then(Value::as_u64))
            {
                let slot = list.subs.entry(sub.to_string()).or_insert(0);
                *slot = (*slot).max(before);
            } else {
                // Needs `jti`, `kid`, `sid`, or `sub` + `issued_before` (unix seconds).
                skipped += 1;
            }
        }
        Ok((list, skipped))
    }

    pub fn len(&self) -> usize {
        self.jtis.len() + self.subs.len() + self.kids.len() + self.sids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Is the token revoked? A token without `iat` counts as issued before any `issued_before`.
    pub fn check(&self, id: &TokenId) -> Option<Revoked> {
        if id.jti.as_ref().is_some_and(|j| self.jtis.contains(j)) {
            return Some(Revoked::Jti);
        }
        if id.kid.as_ref().is_some_and(|k| self.kids.contains(k)) {
            return Some(Revoked::Kid);
        }
        if id.sid.as_ref().is_some_and(|s| self.sids.contains(s)) {
            return Some(Revoked::Sid);
        }
        if let Some(before) = id.sub.as_ref().and_then(|s| self.subs.get(s)) {
            if id.iat.is_none_or(|iat| iat < *before) {
                return Some(Revoked::Sub);
            }
        }
        None
    }
}

/// The list a worker holds, and how fresh it is.
#[derive(Debug, Clone)]
pub struct RevocationState {
    pub list: RevocationList,
    /// When the last good document arrived; before the first one, when the filter started (the
    /// staleness clock starts then).
    pub good_at: u64,
    pub ever_loaded: bool,
    /// Bumped on every change of the list: live sockets re-check when it moves.
    pub generation: u64,
}

impl RevocationState {
    pub fn new(started: u64) -> Self {
        Self {
            list: RevocationList::default(),
            good_at: started,
            ever_loaded: false,
            generation: 0,
        }
    }

    /// A good document arrived at `now`.
    pub fn loaded(&mut self, list: RevocationList, now: u64) {
        if list != self.list {
            self.generation += 1;
        }
        self.list = list;
        self.good_at = now;
        self.ever_loaded = true;
    }

    /// Stale: never loaded (a VM that has not fetched the list yet knows no revocation), or no
    /// good fetch for more than `max_stale` seconds.
    pub fn is_stale(&self, now: u64, max_stale: u64) -> bool {
        !self.ever_loaded || now > self.good_at.saturating_add(max_stale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(jti: &str, sub: &str, iat: Option<u64>, kid: &str) -> TokenId {
        TokenId {
            jti: Some(jti.into()),
            sub: Some(sub.into()),
            iat,
            kid: Some(kid.into()),
            sid: None,
        }
    }

    #[test]
    fn each_kind_of_entry_revokes() {
        let l = RevocationList::parse(
            br#"{"revoked":[{"jti":"j1"},{"sub":"alice","issued_before":100},{"kid":"k-old"},
                {"sub":"alice","issued_before":50}]}"#,
        )
        .unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(l.check(&id("j1", "bob", Some(1), "k")), Some(Revoked::Jti));
        assert_eq!(
            l.check(&id("j2", "bob", Some(1), "k-old")),
            Some(Revoked::Kid)
        );
        assert_eq!(
            l.check(&id("j2", "alice", Some(99), "k")),
            Some(Revoked::Sub)
        );
        assert_eq!(l.check(&id("j2", "alice", None, "k")), Some(Revoked::Sub));
        // The latest `issued_before` of a sub wins; tokens issued at or after it are fine.
        assert_eq!(l.check(&id("j2", "alice", Some(100), "k")), None);
        assert_eq!(l.check(&TokenId::default()), None);
    }

    #[test]
    fn a_session_entry_revokes_every_token_of_that_session() {
        let l = RevocationList::parse(br#"[{"sid":"s1"}]"#).unwrap();
        let of = |sid: Option<&str>| TokenId {
            sid: sid.map(str::to_string),
            ..id("j", "alice", Some(1), "k")
        };
        assert_eq!(l.check(&of(Some("s1"))), Some(Revoked::Sid));
        assert_eq!(l.check(&of(Some("s2"))), None);
        assert_eq!(l.check(&of(None)), None);
    }

    #[test]
    fn bad_documents_are_errors() {
        assert!(RevocationList::parse(b"[]").unwrap().is_empty());
        assert!(RevocationList::parse(b"nope").is_err());
        assert!(RevocationList::parse(br#"{"x":[]}"#).is_err());
        assert!(RevocationList::parse(br#"{"revoked":{}}"#).is_err());
    }

    #[test]
    fn a_malformed_entry_is_skipped_and_counted_and_the_others_apply() {
        let (l, skipped) = RevocationList::parse_counted(
            br#"{"revoked":[{"sub":"a"},{"jti":"j1"},{"what":"x"},{"jti":7},{"sid":""},
                {"sub":"bob","issued_before":"soon"},{"sid":"s1"},"text",null,
                {"sub":"carol","issued_before":100}]}"#,
        )
        .unwrap();
        assert_eq!(skipped, 7);
        assert_eq!(l.len(), 3);
        assert_eq!(l.check(&id("j1", "x", Some(1), "k")), Some(Revoked::Jti));
        assert_eq!(
            l.check(&id("j2", "carol", Some(99), "k")),
            Some(Revoked::Sub)
        );
        let (_, none) = RevocationList::parse_counted(br#"[{"jti":"a"}]"#).unwrap();
        assert_eq!(none, 0);
    }

    #[test]
    fn staleness_and_generations() {
        let mut s = RevocationState::new(1000);
        assert!(
            s.is_stale(1000, 30),
            "never loaded: stale at once (it knows no revocation)"
        );
        assert!(s.is_stale(1031, 30));
        let l = RevocationList::parse(br#"[{"jti":"a"}]"#).unwrap();
        s.loaded(l.clone(), 1040);
        assert_eq!(s.generation, 1);
        s.loaded(l, 1050);
        assert_eq!(s.generation, 1, "the same list again is no change");
        assert!(!s.is_stale(1080, 30));
    }
}

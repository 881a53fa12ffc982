//! Key documents: the JWKS and OpenID discovery fetches, their answers, the refetch rate limit.

use crate::jwt::KeySet;
use crate::stats::JwtAuthStat;
use serde::Deserialize;

use super::*;

/// Which document a fetch is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Doc {
    Jwks,
    /// An OpenID Connect discovery document (`jwks.discovery`).
    Discovery,
}

/// A fetch for the shell to start: `GET path` on `cluster` with `:authority`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchRequest<'a> {
    pub cluster: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub timeout_ms: u64,
    pub doc: Doc,
}

/// What a fetched document did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// A JWKS: its usable keys now verify (`skipped`: keys refused for what they are).
    Keys { count: usize, skipped: usize },
    /// A discovery document of the provider's issuer: fetch its JWKS now ([`JwtAuth::jwks_fetch`]).
    Discovered { jwks_uri: String },
    /// Nothing changed: the last good keys stay.
    Failed(String),
}

pub(super) fn parse_jwks(body: &[u8]) -> Result<(KeySet, usize), String> {
    let value = crate::jwt::jwk::parse_jwks_document(body).map_err(|e| e.to_string())?;
    let (keys, skipped) = KeySet::from_jwks(&value, false).map_err(|e| e.to_string())?;
    if keys.is_empty() {
        return Err("no usable keys".into());
    }
    Ok((keys, skipped))
}

/// An OpenID Connect discovery document's `jwks_uri`, as (`:authority`, path with query), when
/// its `issuer` is exactly the provider's (OpenID Connect Discovery 1.0 section 4.3).
pub fn parse_discovery(body: &[u8], issuer: &str) -> Result<(String, String), String> {
    #[derive(Deserialize)]
    struct Discovery {
        issuer: Option<String>,
        jwks_uri: Option<String>,
    }
    let doc: Discovery =
        serde_json::from_slice(body).map_err(|e| format!("not an OpenID configuration: {e}"))?;
    match doc.issuer.as_deref() {
        Some(i) if i == issuer => {}
        Some(i) => return Err(format!("its issuer `{i}` is not the provider's `{issuer}`")),
        None => return Err("it has no `issuer`".into()),
    }
    let uri = doc.jwks_uri.ok_or("it has no `jwks_uri`")?;
    let rest = uri
        .strip_prefix("https://")
        .or_else(|| uri.strip_prefix("http://"))
        .ok_or_else(|| format!("jwks_uri `{uri}` is not an http(s) URL"))?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(at) => rest.split_at(at),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') || path.starts_with('?') {
        return Err(format!("jwks_uri `{uri}` is not a usable URL"));
    }
    Ok((authority.to_string(), path.to_string()))
}

impl JwtAuth {
    /// The scheduled fetch of `provider`: its `jwks.remote`, or the discovery document of a
    /// `jwks.discovery` provider (whose answer names the JWKS to fetch next).
    pub fn scheduled_fetch(&self, provider: usize) -> Option<FetchRequest<'_>> {
        let remote = self.config.providers.get(provider)?.remote.as_ref()?;
        Some(FetchRequest {
            cluster: &remote.cluster,
            authority: &remote.authority,
            path: &remote.path,
            timeout_ms: remote.timeout_ms,
            doc: if remote.discovery {
                Doc::Discovery
            } else {
                Doc::Jwks
            },
        })
    }

    /// The fetch of `provider`'s JWKS itself: `jwks.remote`, or the `jwks_uri` of the last
    /// good discovery document (none before one arrived), on the same cluster.
    pub fn jwks_fetch(&self, provider: usize) -> Option<FetchRequest<'_>> {
        let remote = self.config.providers.get(provider)?.remote.as_ref()?;
        let (authority, path) = if remote.discovery {
            let (a, p) = self.discovered.get(provider)?.as_ref()?;
            (a.as_str(), p.as_str())
        } else {
            (remote.authority.as_str(), remote.path.as_str())
        };
        Some(FetchRequest {
            cluster: &remote.cluster,
            authority,
            path,
            timeout_ms: remote.timeout_ms,
            doc: Doc::Jwks,
        })
    }

    /// Apply the answer to a fetch of `doc` for `provider`. A failure (a status other than
    /// 200, an unusable document, a discovery document of another issuer) keeps the last good
    /// keys and the last good `jwks_uri`.
    pub fn apply_fetch(&mut self, provider: usize, doc: Doc, status: u32, body: &[u8]) -> Fetched {
        if status != 200 {
            return Fetched::Failed(format!("HTTP status {status}"));
        }
        match doc {
            Doc::Jwks => match parse_jwks(body) {
                Ok((keys, skipped)) => {
                    let count = keys.len();
                    self.set_remote_keys(provider, keys);
                    Fetched::Keys { count, skipped }
                }
                Err(why) => Fetched::Failed(why),
            },
            Doc::Discovery => {
                let Some(issuer) = self
                    .config
                    .providers
                    .get(provider)
                    .map(|p| p.issuer.clone())
                else {
                    return Fetched::Failed("no such provider".into());
                };
                match parse_discovery(body, &issuer) {
                    Ok((authority, path)) => {
                        let jwks_uri = format!("{authority}{path}");
                        if let Some(slot) = self.discovered.get_mut(provider) {
                            *slot = Some((authority, path));
                        }
                        Fetched::Discovered { jwks_uri }
                    }
                    Err(why) => Fetched::Failed(why),
                }
            }
        }
    }

    /// Replace a provider's fetched keys. Cached tokens of the provider whose verifying key is
    /// no longer published (same material, algorithm and `kid`) are dropped: a decision must
    /// never rest on a withdrawn key. The others stay, so a refetch (which an unknown `kid` can
    /// trigger, rate-limited) does not cost every user a signature check.
    pub fn set_remote_keys(&mut self, provider: usize, keys: KeySet) {
        if let Some(slot) = self.remote_keys.get_mut(provider) {
            *slot = Some(keys);
            let now_published = self.keys_of(provider);
            self.cache
                .retain(|v| v.provider != provider || now_published.contains(&v.key));
        }
    }

    pub fn has_remote_keys(&self, provider: usize) -> bool {
        matches!(self.remote_keys.get(provider), Some(Some(_)))
    }

    /// Record that a fetch of `provider`'s JWKS started at `now` (for the refetch rate limit).
    pub fn note_fetch(&mut self, provider: usize, now: u64) {
        if let Some(slot) = self.last_fetch.get_mut(provider) {
            *slot = Some(now);
        }
    }

    /// A provider with a remote JWKS that has not loaded yet: an unknown key proves nothing.
    pub(super) fn awaits_remote_keys(&self, provider: usize) -> bool {
        self.config
            .providers
            .get(provider)
            .is_some_and(|p| p.remote.is_some())
            && !self.has_remote_keys(provider)
    }

    pub(super) fn may_refetch(&self, provider: usize, now: u64) -> bool {
        if self.jwks_fetch(provider).is_none() {
            return false;
        }
        let Some(remote) = self
            .config
            .providers
            .get(provider)
            .and_then(|p| p.remote.as_ref())
        else {
            return false;
        };
        match self.last_fetch.get(provider).copied().flatten() {
            None => true,
            Some(t) => now >= t.saturating_add(remote.min_refetch_seconds),
        }
    }
}

/// Which fetch of a provider to start: [`JwtAuth::scheduled_fetch`] or [`JwtAuth::jwks_fetch`].
type Which = fn(&JwtAuth, usize) -> Option<FetchRequest<'_>>;

/// The root's fetches: the schedule of every remote JWKS (or discovery document), the answers,
/// their log lines and stats.
impl JwtAuth {
    /// Whether any provider's keys are fetched (the root needs a tick then).
    pub fn fetches_keys(&self) -> bool {
        !self.fetches.is_empty()
    }

    /// The root tick at `now`: start every scheduled fetch that is due. `start` starts a `GET`:
    /// the call's token, or `None` when the host cannot start it.
    pub fn tick(&mut self, now: u64, mut start: impl FnMut(&FetchRequest<'_>) -> Option<u32>) {
        for provider in self.fetches.due(now) {
            self.note_fetch(provider, now);
            match self.start(provider, Self::scheduled_fetch, &mut start) {
                Some((call, doc)) => {
                    self.fetches.started(provider, call);
                    if doc == Doc::Discovery {
                        self.discovering.push(call);
                    }
                }
                None => self.fetches.not_started(provider, now),
            }
        }
    }

    /// The answer to root call `call` at `now`, when it is one of the root's fetches (`read`
    /// reads its status and body only then): the document is loaded, the JWKS a discovery
    /// document names is fetched next (as the same scheduled fetch), the schedule moves on.
    pub fn fetch_answered(
        &mut self,
        call: u32,
        now: u64,
        read: impl FnOnce() -> (u32, Vec<u8>),
        mut start: impl FnMut(&FetchRequest<'_>) -> Option<u32>,
    ) {
        let Some(provider) = self.fetches.in_flight(call) else {
            return;
        };
        let (status, body) = read();
        let doc = match self.discovering.iter().position(|&c| c == call) {
            Some(i) => {
                self.discovering.swap_remove(i);
                Doc::Discovery
            }
            None => Doc::Jwks,
        };
        let ok = match self.load(provider, doc, status, &body) {
            Fetched::Discovered { .. } => {
                if let Some((next, _)) = self.start(provider, Self::jwks_fetch, &mut start) {
                    self.fetches.started(provider, next);
                    return;
                }
                false
            }
            Fetched::Keys { .. } => true,
            Fetched::Failed(_) => false,
        };
        self.fetches.finished(call, ok, now);
    }

    /// Start the `which` fetch of `provider`; a call that cannot start is logged and counted as
    /// a failed fetch.
    fn start(
        &mut self,
        provider: usize,
        which: Which,
        start: &mut impl FnMut(&FetchRequest<'_>) -> Option<u32>,
    ) -> Option<(u32, Doc)> {
        let request = which(self, provider)?;
        if let Some(call) = start(&request) {
            return Some((call, request.doc));
        }
        let line = format!(
            "cannot call cluster `{}` for the JWKS; retrying",
            request.cluster
        );
        self.notes.line(Line::Warn(line));
        self.notes.count(JwtAuthStat::JwksFetchFailed);
        None
    }

    /// [`Self::apply_fetch`], with its log line and stats. A failed fetch or an unusable
    /// document keeps the last good keys.
    pub fn load(&mut self, provider: usize, doc: Doc, status: u32, body: &[u8]) -> Fetched {
        let name = self
            .config
            .providers
            .get(provider)
            .map_or("?", |p| p.name.as_str())
            .to_string();
        let fetched = self.apply_fetch(provider, doc, status, body);
        let notes = &mut self.notes;
        match &fetched {
            Fetched::Keys { count, skipped } => {
                notes.line(Line::Info(format!(
                    "provider {name}: JWKS loaded, {count} keys ({skipped} skipped)"
                )));
                notes.count(JwtAuthStat::JwksFetchOk);
                // Keys refused for what they are (RSA under 2048 bits, `key_ops` without
                // `verify`, `use` other than `sig`, unsupported types): one count each.
                notes.add(JwtAuthStat::JwksKeySkipped, *skipped as u64);
            }
            Fetched::Discovered { jwks_uri } => notes.line(Line::Info(format!(
                "provider {name}: discovery document loaded, jwks_uri {jwks_uri}"
            ))),
            Fetched::Failed(why) => {
                let what = match doc {
                    Doc::Jwks => "JWKS",
                    Doc::Discovery => "discovery document",
                };
                notes.line(Line::Warn(format!(
                    "provider {name}: {what} fetch failed ({why}); keeping the last good keys"
                )));
                notes.count(JwtAuthStat::JwksFetchFailed);
            }
        }
        fetched
    }
}

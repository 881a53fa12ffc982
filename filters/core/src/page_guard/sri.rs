//! The SRI manifest: `integrity` hashes by URL, resolved against the page.

use crate::config::ConfigError;
use base64::Engine;
use std::collections::{BTreeMap, HashMap};

/// SRI hashes by URL: `/path` for the page's own origin, `https://host/path` for others.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SriManifest {
    entries: HashMap<String, String>,
}

impl SriManifest {
    /// The manifest as written (`path → sha384-…`); errors name the entry.
    pub fn compile(raw: BTreeMap<String, String>, at: &str) -> Result<Self, ConfigError> {
        let mut entries = HashMap::new();
        for (url, hash) in raw {
            let here = format!("{at}.{url}");
            if !(url.starts_with('/') && !url.starts_with("//")
                || url.starts_with("https://")
                || url.starts_with("http://"))
            {
                return Err(ConfigError::new(
                    here,
                    "a manifest URL is a path starting with `/` or an absolute http(s) URL",
                ));
            }
            if !valid_sri_hash(&hash) {
                return Err(ConfigError::new(
                    here,
                    "must be `sha256-`, `sha384-` or `sha512-` followed by the base64 digest",
                ));
            }
            entries.insert(url, hash);
        }
        Ok(Self { entries })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The hash for a `src`/`href` as written in a page at `page_path`.
    pub fn lookup(&self, url: &str, page_path: &str) -> Option<&str> {
        let url = url
            .trim_matches(|c: char| c.is_ascii_whitespace())
            .replace("&amp;", "&");
        let resolved = if let Some(rest) = url.strip_prefix("//") {
            format!("https://{rest}")
        } else if url.contains("://") || url.starts_with('/') {
            url
        } else if url.contains(':') && !url.contains('/') || url.starts_with("data:") {
            return None;
        } else {
            resolve_relative(page_path, &url)
        };
        if let Some(h) = self.entries.get(&resolved) {
            return Some(h);
        }
        let bare = resolved.split(['?', '#']).next().unwrap_or("");
        if bare != resolved {
            return self.entries.get(bare).map(String::as_str);
        }
        None
    }

    /// `'sha384-…'` sources of the scripts (`.js`, `.mjs`) in the manifest, sorted.
    pub(super) fn script_hash_sources(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .entries
            .iter()
            .filter(|(u, _)| u.ends_with(".js") || u.ends_with(".mjs"))
            .map(|(_, h)| format!("'{h}'"))
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

fn valid_sri_hash(h: &str) -> bool {
    let (alg, b64) = match h.split_once('-') {
        Some(x) => x,
        None => return false,
    };
    let len = match alg {
        "sha256" => 32,
        "sha384" => 48,
        "sha512" => 64,
        _ => return false,
    };
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .is_ok_and(|d| d.len() == len)
}

/// `rel` relative to the directory of `page` (`/a/b.html` + `c.js` → `/a/c.js`), with `.` and
/// `..` segments resolved.
fn resolve_relative(page: &str, rel: &str) -> String {
    let page = page.split(['?', '#']).next().unwrap_or("/");
    let dir = &page[..page.rfind('/').map_or(0, |i| i + 1)];
    let (rel_path, tail) = match rel.find(['?', '#']) {
        Some(i) => (&rel[..i], &rel[i..]),
        None => (rel, ""),
    };
    let mut segs: Vec<&str> = dir.split('/').filter(|s| !s.is_empty()).collect();
    let parts: Vec<&str> = rel_path.split('/').collect();
    for (i, s) in parts.iter().enumerate() {
        match *s {
            "." => {}
            ".." => {
                segs.pop();
            }
            s if s.is_empty() && i + 1 < parts.len() => {}
            s => segs.push(s),
        }
    }
    format!("/{}{tail}", segs.join("/"))
}

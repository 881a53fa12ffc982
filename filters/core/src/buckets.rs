//! Entries kept in Envoy shared data, which has no delete and no key listing: keys must not grow
//! with traffic, so entries are spread over a fixed number of bucket keys, and each bucket's
//! value is a short text of `<key> <until>` lines, pruned and capped on every write. Used by
//! jwt-auth's session deadlines ([`crate::sessions`]) and session-binding's used token ids
//! ([`crate::session_binding::store`]).

use std::fmt::Write as _;

/// Which of `buckets` bucket keys `text` lives in.
pub(crate) fn index(text: &str, buckets: u32) -> u32 {
    let h = crate::sha256(text.as_bytes());
    u32::from_be_bytes([h[0], h[1], h[2], h[3]]) % buckets.max(1)
}

/// The `<key> <until>` lines of a bucket value; malformed lines are skipped.
pub(crate) fn entries(bucket: &[u8]) -> impl Iterator<Item = (&str, u64)> {
    std::str::from_utf8(bucket)
        .unwrap_or("")
        .lines()
        .filter_map(|line| {
            let (k, d) = line.split_once(' ')?;
            Some((k, d.parse().ok()?))
        })
}

/// Keep at most `max` entries: those that end soonest go first.
pub(crate) fn keep_latest(entries: &mut Vec<(&str, u64)>, max: usize) {
    while entries.len() > max {
        let soonest = (0..entries.len())
            .min_by_key(|&i| entries[i].1)
            .unwrap_or(0);
        entries.swap_remove(soonest);
    }
}

/// A bucket value of `<key> <until>` lines.
pub(crate) fn write(entries: &[(&str, u64)]) -> Vec<u8> {
    let mut out = String::new();
    for (k, d) in entries {
        let _ = writeln!(out, "{k} {d}");
    }
    out.into_bytes()
}

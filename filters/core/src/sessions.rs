//! Session deadlines shared by every worker, for live sockets that follow their session.
//!
//! Envoy's shared data (one key/value store per Envoy process, visible to every worker's VM) has
//! no delete and no key listing, so keys must not grow with the number of sessions: session
//! keys are spread over [`BUCKETS`] fixed keys, and each bucket's value is a short text of
//! `<session key> <deadline>` lines, pruned of expired entries and capped on every write. A
//! session pushed out of a full bucket only loses its extension: its sockets close at their own
//! deadline, never later.

use crate::buckets::{self, entries};

/// Number of shared-data keys used.
pub const BUCKETS: u32 = 256;
/// Entries kept per bucket (the latest deadlines win).
pub const PER_BUCKET: usize = 64;

/// The shared-data key holding `session`'s deadline.
pub fn bucket_key(session: &str) -> String {
    format!(
        "gatehouse.jwt_auth.sessions.{}",
        buckets::index(session, BUCKETS)
    )
}

/// `session`'s deadline in a bucket value.
pub fn lookup(bucket: &[u8], session: &str) -> Option<u64> {
    entries(bucket).find(|(k, _)| *k == session).map(|(_, d)| d)
}

/// The bucket value after recording `deadline` for `session` at `now`, or `None` when the
/// bucket already has this deadline or a later one (nothing to write).
pub fn record(bucket: &[u8], session: &str, deadline: u64, now: u64) -> Option<Vec<u8>> {
    if deadline <= now || lookup(bucket, session).is_some_and(|d| d >= deadline) {
        return None;
    }
    let mut kept: Vec<(&str, u64)> = entries(bucket)
        .filter(|(k, d)| *k != session && *d > now)
        .collect();
    kept.push((session, deadline));
    buckets::keep_latest(&mut kept, PER_BUCKET);
    Some(buckets::write(&kept))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_extend_prune_and_stay_bounded() {
        let b = record(b"", "s1", 100, 10).unwrap();
        assert_eq!(lookup(&b, "s1"), Some(100));
        assert_eq!(
            record(&b, "s1", 90, 10),
            None,
            "an older deadline never shortens"
        );
        let b = record(&b, "s1", 200, 10).unwrap();
        assert_eq!(lookup(&b, "s1"), Some(200));
        let b = record(&b, "s2", 150, 10).unwrap();
        // At 160 s1's extension is still there, s2's expired entry is pruned on the next write.
        let b = record(&b, "s3", 300, 160).unwrap();
        assert_eq!(lookup(&b, "s2"), None);
        assert_eq!((lookup(&b, "s1"), lookup(&b, "s3")), (Some(200), Some(300)));
        let mut big = Vec::new();
        for i in 0..200u64 {
            big = record(&big, &format!("k{i}"), 1_000 + i, 0).unwrap();
        }
        assert_eq!(entries(&big).count(), PER_BUCKET);
        assert_eq!(lookup(&big, "k199"), Some(1_199));
        assert_eq!(lookup(&big, "k0"), None);
        assert_eq!(lookup(b"garbage\xff\nno-number x", "garbage"), None);
        assert!(bucket_key("s1").starts_with("gatehouse.jwt_auth.sessions."));
    }
}

//! Session deadlines shared by every worker, for live sockets that follow their session.
//!
//! Envoy's shared data (one key/value store per Envoy process, visible to every worker's VM) has
//! no delete and no key listing, so keys must not grow with the number of sessions: session
//! keys are spread over [`BUCKETS`] fixed keys, and each bucket's value is a short text of
//! `<session key> <deadline>` lines, pruned of expired entries and capped on every write. A
//! session pushed out of a full bucket only loses its extension: its sockets close at their own
//! deadline, never later.
//!
//! One user must not be able to fill the buckets (minting sessions to push everyone else's
//! extensions out): a session key starts with a short tag of its subject (`<tag>.<hash>`), and a
//! bucket keeps at most `per_subject` entries of one tag, the subject's oldest dropped first. So
//! filling a bucket takes `PER_BUCKET / per_subject` different subjects, and the check is a scan
//! of the one bucket already read (no index, no extra keys).

use crate::buckets::{self, entries};

/// Number of shared-data keys used.
pub const BUCKETS: u32 = 256;
/// Entries kept per bucket (the latest deadlines win).
pub const PER_BUCKET: usize = 64;
/// Entries of one subject kept per bucket, by default (`max_sessions_per_subject`).
pub const DEFAULT_PER_SUBJECT: usize = 4;

/// The subject tag of a session key (`<tag>.<hash>`), if it has one.
pub fn subject(session: &str) -> Option<&str> {
    session.split_once('.').map(|(tag, _)| tag)
}

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

/// The bucket value after recording `deadline` for `session` at `now`, keeping at most
/// `per_subject` entries of its subject, or `None` when the bucket already has this deadline or
/// a later one (nothing to write).
pub fn record(
    bucket: &[u8],
    session: &str,
    deadline: u64,
    now: u64,
    per_subject: usize,
) -> Option<Vec<u8>> {
    if deadline <= now || lookup(bucket, session).is_some_and(|d| d >= deadline) {
        return None;
    }
    let mut kept: Vec<(&str, u64)> = entries(bucket)
        .filter(|(k, d)| *k != session && *d > now)
        .collect();
    if let Some(tag) = subject(session) {
        let mut same: Vec<(&str, u64)> = kept
            .iter()
            .copied()
            .filter(|(k, _)| subject(k) == Some(tag))
            .collect();
        let room = per_subject.max(1).saturating_sub(1);
        if same.len() > room {
            // The subject's latest deadlines stay; its oldest go.
            same.sort_by_key(|e| std::cmp::Reverse(e.1));
            let dropped: Vec<&str> = same.iter().skip(room).map(|(k, _)| *k).collect();
            kept.retain(|(k, _)| !dropped.contains(k));
        }
    }
    kept.push((session, deadline));
    buckets::keep_latest(&mut kept, PER_BUCKET);
    Some(buckets::write(&kept))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_extend_prune_and_stay_bounded() {
        let record = |b: &[u8], s: &str, d: u64, n: u64| record(b, s, d, n, PER_BUCKET);
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

    #[test]
    fn one_subject_cannot_fill_a_bucket() {
        let mut b = record(b"", "other.s0", 5_000, 0, 4).unwrap();
        for i in 0..100u64 {
            b = record(&b, &format!("mallory.s{i}"), 1_000 + i, 0, 4).unwrap();
        }
        let of = |b: &[u8], tag: &str| entries(b).filter(|(k, _)| subject(k) == Some(tag)).count();
        assert_eq!(of(&b, "mallory"), 4, "at most 4 of one subject");
        assert_eq!(
            lookup(&b, "other.s0"),
            Some(5_000),
            "someone else's session stays"
        );
        // Mallory's newest stay, the oldest went.
        assert_eq!(lookup(&b, "mallory.s99"), Some(1_099));
        assert_eq!(lookup(&b, "mallory.s96"), Some(1_096));
        assert_eq!(lookup(&b, "mallory.s95"), None);
        // Re-recording one of the kept sessions does not drop another of them.
        let b2 = record(&b, "mallory.s97", 2_000, 0, 4).unwrap();
        assert_eq!(of(&b2, "mallory"), 4);
        assert_eq!(lookup(&b2, "mallory.s96"), Some(1_096));
        // Untagged keys are not grouped; per_subject 1 keeps just the newest.
        let b3 = record(&b, "mallory.new", 3_000, 0, 1).unwrap();
        assert_eq!(of(&b3, "mallory"), 1);
        assert_eq!(subject("plainkey"), None);
    }
}

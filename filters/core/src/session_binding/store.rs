//! The state session-binding shares between requests: used token ids (single-use connect tokens)
//! and open-socket slots (the concurrent-socket cap).
//!
//! [`BindingStore`] is what the filter needs; [`KvStore`] implements it over any
//! compare-and-swap key/value store ([`Kv`]) — in Envoy, proxy-wasm shared data, one store per
//! Envoy process, visible to every worker thread. An external store (Redis, …) shared by several
//! Envoys would implement [`BindingStore`] directly (`SET NX EX` for a token id, a scripted
//! count-and-add for a slot).
//!
//! Shared data has no delete and no key listing, so keys must not grow with traffic: entries are
//! spread over a fixed number of bucket keys, each bucket's value is a short text of lines,
//! pruned of expired entries on every write and capped.

use crate::buckets;
use std::fmt::Write as _;

pub use crate::kv::{Kv, MemoryKv};

/// The outcome of using a token id once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UseOnce {
    /// First use: recorded until the token's end.
    Fresh,
    /// First use, recorded by pushing out an unexpired entry (`when_full: evict`): a replay of
    /// the evicted token would now pass.
    FreshEvicted,
    /// Seen before: a replay.
    Replay,
    /// The store is full of unexpired entries (`when_full: refuse`), or too contended.
    Full,
    /// The owner (the token's subject) already holds its cap of unexpired entries.
    OwnerFull,
}

/// The outcome of asking for an open-socket slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquire {
    Granted,
    /// The owner already holds `limit` live slots.
    OverCap,
    /// The store is full of live slots of other owners, or too contended.
    Full,
}

/// What session-binding needs from a store.
pub trait BindingStore {
    /// Record that token id `id` was used at `now`; it stays recorded until `until`. With
    /// `owner = Some((owner, cap))` the owner (a subject) may hold at most `cap` unexpired ids:
    /// one more is [`UseOnce::OwnerFull`], so one subject cannot fill the store.
    fn use_once(&mut self, id: &str, owner: Option<(&str, usize)>, until: u64, now: u64)
        -> UseOnce;
    /// Take one of `owner`'s `limit` slots for socket `slot`, held until `now + ttl` unless
    /// refreshed.
    fn acquire_slot(&mut self, owner: &str, slot: &str, limit: u32, ttl: u64, now: u64) -> Acquire;
    /// Keep the slots of live sockets: each `(owner, slot)` is held until `now + ttl` again.
    fn refresh_slots(&mut self, slots: &[(&str, &str)], ttl: u64, now: u64);
    /// Free a slot (its stream ended).
    fn release_slot(&mut self, owner: &str, slot: &str, now: u64);
}

/// The fleet store's recorder: during a decision it answers "fresh" and "granted" and keeps what
/// was asked, which the shell then sends to etcd as one transaction ([`crate::store`]).
impl BindingStore for crate::store::Connect {
    fn use_once(
        &mut self,
        id: &str,
        owner: Option<(&str, usize)>,
        until: u64,
        now: u64,
    ) -> UseOnce {
        self.now = now;
        self.jti = Some(crate::store::JtiClaim {
            id: id.to_string(),
            owner: owner.map(|(o, cap)| (o.to_string(), cap)),
            until,
        });
        UseOnce::Fresh
    }

    fn acquire_slot(&mut self, owner: &str, slot: &str, limit: u32, ttl: u64, now: u64) -> Acquire {
        self.now = now;
        self.slot = Some(crate::store::SlotClaim {
            owner: owner.to_string(),
            slot: slot.to_string(),
            limit,
            ttl,
        });
        Acquire::Granted
    }

    fn refresh_slots(&mut self, _slots: &[(&str, &str)], _ttl: u64, _now: u64) {}

    fn release_slot(&mut self, _owner: &str, _slot: &str, _now: u64) {}
}

impl crate::store::Connect {
    /// The same claims against this Envoy's own store (`when_unavailable: local`).
    pub fn claim_locally(&self, store: &mut dyn BindingStore) -> Result<(), (UseOnce, Acquire)> {
        if let Some(j) = &self.jti {
            let owner = j.owner.as_ref().map(|(o, cap)| (o.as_str(), *cap));
            match store.use_once(&j.id, owner, j.until, self.now) {
                UseOnce::Fresh | UseOnce::FreshEvicted => {}
                other => return Err((other, Acquire::Granted)),
            }
        }
        if let Some(s) = &self.slot {
            match store.acquire_slot(&s.owner, &s.slot, s.limit, s.ttl, self.now) {
                Acquire::Granted => {}
                other => return Err((UseOnce::Fresh, other)),
            }
        }
        Ok(())
    }
}

/// Sizes of the token-id store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JtiLimits {
    pub buckets: u32,
    pub per_bucket: usize,
    /// Over the cap: push out the entry that ends soonest (true) or refuse the new one (false).
    pub evict: bool,
}

/// Sizes of the slot store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLimits {
    pub buckets: u32,
    pub per_bucket: usize,
}

const JTI_PREFIX: &str = "gatehouse.session_binding.jti.";
const SLOT_PREFIX: &str = "gatehouse.session_binding.slots.";

pub use crate::short_hash;

/// [`BindingStore`] over a CAS key/value store. Ids and owners given to it are already short
/// hashes without spaces or newlines ([`short_hash`]).
pub struct KvStore<K: Kv> {
    pub kv: K,
    pub jti: JtiLimits,
    pub slots: SlotLimits,
}

/// `<owner> <slot> <expires>` lines.
fn slot_entries(bucket: &[u8]) -> Vec<(&str, &str, u64)> {
    std::str::from_utf8(bucket)
        .unwrap_or("")
        .lines()
        .filter_map(|line| {
            let mut parts = line.split(' ');
            let (Some(o), Some(s), Some(e), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return None;
            };
            Some((o, s, e.parse().ok()?))
        })
        .collect()
}

impl<K: Kv> KvStore<K> {
    pub fn new(kv: K, jti: JtiLimits, slots: SlotLimits) -> Self {
        Self { kv, jti, slots }
    }

    /// The key of a token id's bucket: its owner's (all of a subject's ids share one bucket, so
    /// one CAS write counts and adds atomically), else the id's own.
    pub fn jti_key(&self, id: &str) -> String {
        format!("{JTI_PREFIX}{}", buckets::index(id, self.jti.buckets))
    }

    /// The key of `owner`'s slot bucket (all of an owner's slots live in one bucket, so one CAS
    /// write counts and adds atomically).
    pub fn slot_key(&self, owner: &str) -> String {
        format!("{SLOT_PREFIX}{}", buckets::index(owner, self.slots.buckets))
    }

    /// Create every bucket that does not exist yet, once at start. Shared data cannot create a
    /// key atomically ("set if absent"), so the buckets exist before any request writes them
    /// with compare-and-swap.
    pub fn create_buckets(&mut self) {
        let keys: Vec<String> = (0..self.jti.buckets)
            .map(|n| format!("{JTI_PREFIX}{n}"))
            .chain((0..self.slots.buckets).map(|n| format!("{SLOT_PREFIX}{n}")))
            .collect();
        for key in keys {
            if self.kv.get(&key).0.is_none() {
                self.kv.set(&key, b"", None);
            }
        }
    }

    /// Read-modify-write `key` with compare-and-swap; `change` returns the new value and the
    /// result, or only a result when nothing is to be written.
    fn update<T>(
        &mut self,
        key: &str,
        contended: T,
        change: impl FnMut(&[u8]) -> (Option<Vec<u8>>, T),
    ) -> T {
        crate::kv::update(&mut self.kv, key, contended, change)
    }
}

impl<K: Kv> BindingStore for KvStore<K> {
    fn use_once(
        &mut self,
        id: &str,
        owner: Option<(&str, usize)>,
        until: u64,
        now: u64,
    ) -> UseOnce {
        let key = self.jti_key(owner.map_or(id, |(o, _)| o));
        let limits = self.jti;
        self.update(&key, UseOnce::Full, |bucket| {
            let mut kept: Vec<(&str, u64, &str)> = jti_entries(bucket)
                .into_iter()
                .filter(|(_, d, _)| *d > now)
                .collect();
            if kept.iter().any(|(k, _, _)| *k == id) {
                return (None, UseOnce::Replay);
            }
            if let Some((o, cap)) = owner {
                if kept.iter().filter(|(_, _, ko)| *ko == o).count() >= cap {
                    return (None, UseOnce::OwnerFull);
                }
            }
            let mut outcome = UseOnce::Fresh;
            if kept.len() >= limits.per_bucket {
                if !limits.evict || limits.per_bucket == 0 {
                    return (None, UseOnce::Full);
                }
                // Room for the new entry: those that end soonest go.
                kept.sort_by_key(|(_, d, _)| std::cmp::Reverse(*d));
                kept.truncate(limits.per_bucket - 1);
                outcome = UseOnce::FreshEvicted;
            }
            kept.push((
                id,
                until.max(now.saturating_add(1)),
                owner.map_or("", |(o, _)| o),
            ));
            (Some(write_jtis(&kept)), outcome)
        })
    }

    fn acquire_slot(&mut self, owner: &str, slot: &str, limit: u32, ttl: u64, now: u64) -> Acquire {
        let key = self.slot_key(owner);
        let per_bucket = self.slots.per_bucket;
        self.update(&key, Acquire::Full, |bucket| {
            let mut kept: Vec<(&str, &str, u64)> = slot_entries(bucket)
                .into_iter()
                .filter(|(o, s, e)| *e > now && !(*o == owner && *s == slot))
                .collect();
            let held = kept.iter().filter(|(o, _, _)| *o == owner).count();
            if held >= limit as usize {
                return (None, Acquire::OverCap);
            }
            if kept.len() >= per_bucket {
                return (None, Acquire::Full);
            }
            kept.push((owner, slot, now.saturating_add(ttl)));
            (Some(write_slots(&kept)), Acquire::Granted)
        })
    }

    fn refresh_slots(&mut self, slots: &[(&str, &str)], ttl: u64, now: u64) {
        // One write per bucket.
        let mut keys: Vec<String> = slots.iter().map(|(o, _)| self.slot_key(o)).collect();
        keys.sort();
        keys.dedup();
        for key in keys {
            self.update(&key, (), |bucket| {
                let kept: Vec<(&str, &str, u64)> = slot_entries(bucket)
                    .into_iter()
                    .filter_map(|(o, s, e)| {
                        if slots.contains(&(o, s)) {
                            Some((o, s, now.saturating_add(ttl)))
                        } else {
                            (e > now).then_some((o, s, e))
                        }
                    })
                    .collect();
                (Some(write_slots(&kept)), ())
            });
        }
    }

    fn release_slot(&mut self, owner: &str, slot: &str, now: u64) {
        let key = self.slot_key(owner);
        self.update(&key, (), |bucket| {
            let entries = slot_entries(bucket);
            if !entries.iter().any(|(o, s, _)| *o == owner && *s == slot) {
                return (None, ());
            }
            let kept: Vec<(&str, &str, u64)> = entries
                .into_iter()
                .filter(|(o, s, e)| *e > now && !(*o == owner && *s == slot))
                .collect();
            (Some(write_slots(&kept)), ())
        });
    }
}

/// `<id> <until>` or `<id> <until> <owner>` lines (malformed lines are skipped).
fn jti_entries(bucket: &[u8]) -> Vec<(&str, u64, &str)> {
    std::str::from_utf8(bucket)
        .unwrap_or("")
        .lines()
        .filter_map(|line| {
            let mut parts = line.split(' ');
            let (Some(id), Some(until), owner, None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return None;
            };
            Some((id, until.parse().ok()?, owner.unwrap_or("")))
        })
        .collect()
}

fn write_jtis(entries: &[(&str, u64, &str)]) -> Vec<u8> {
    let mut out = String::new();
    for (id, until, owner) in entries {
        let _ = if owner.is_empty() {
            writeln!(out, "{id} {until}")
        } else {
            writeln!(out, "{id} {until} {owner}")
        };
    }
    out.into_bytes()
}

fn write_slots(entries: &[(&str, &str, u64)]) -> Vec<u8> {
    let mut out = String::new();
    for (o, s, e) in entries {
        let _ = writeln!(out, "{o} {s} {e}");
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(per_bucket: usize, evict: bool) -> KvStore<MemoryKv> {
        let mut s = KvStore::new(
            MemoryKv::default(),
            JtiLimits {
                buckets: 1,
                per_bucket,
                evict,
            },
            SlotLimits {
                buckets: 1,
                per_bucket,
            },
        );
        s.create_buckets();
        s
    }

    #[test]
    fn a_token_id_is_used_once_until_it_expires() {
        let mut s = store(8, false);
        assert_eq!(s.use_once("a", None, 100, 10), UseOnce::Fresh);
        assert_eq!(s.use_once("a", None, 100, 50), UseOnce::Replay);
        assert_eq!(s.use_once("b", None, 100, 50), UseOnce::Fresh);
        // Past its end the entry is pruned: the token itself is expired by then.
        assert_eq!(s.use_once("a", None, 200, 100), UseOnce::Fresh);
    }

    #[test]
    fn the_cap_refuses_or_evicts_and_expired_entries_make_room() {
        let mut s = store(2, false);
        assert_eq!(s.use_once("a", None, 100, 0), UseOnce::Fresh);
        assert_eq!(s.use_once("b", None, 200, 0), UseOnce::Fresh);
        assert_eq!(s.use_once("c", None, 300, 0), UseOnce::Full);
        assert_eq!(s.use_once("c", None, 300, 100), UseOnce::Fresh, "a expired");
        let mut s = store(2, true);
        s.use_once("a", None, 100, 0);
        s.use_once("b", None, 200, 0);
        assert_eq!(s.use_once("c", None, 300, 0), UseOnce::FreshEvicted);
        // The soonest-ending one went.
        assert_eq!(s.use_once("b", None, 200, 0), UseOnce::Replay);
        assert_eq!(s.use_once("a", None, 100, 0), UseOnce::FreshEvicted);
    }

    #[test]
    fn a_lost_cas_race_is_retried_on_the_new_value() {
        let limits = JtiLimits {
            buckets: 1,
            per_bucket: 8,
            evict: false,
        };
        let slots = SlotLimits {
            buckets: 1,
            per_bucket: 8,
        };
        let mut s = KvStore::new(
            crate::kv::Racy {
                inner: MemoryKv::default(),
                races: 0,
                other: b"x 1000\n".to_vec(),
            },
            limits,
            slots,
        );
        s.create_buckets();
        s.kv.races = 1;
        assert_eq!(s.use_once("y", None, 1000, 0), UseOnce::Fresh);
        // The other writer's entry survived our write.
        assert_eq!(s.use_once("x", None, 1000, 0), UseOnce::Replay);
        assert_eq!(s.use_once("y", None, 1000, 0), UseOnce::Replay);
    }

    #[test]
    fn slots_are_capped_per_owner_freed_and_expire() {
        let mut s = store(16, false);
        assert_eq!(s.acquire_slot("alice", "s1", 2, 60, 0), Acquire::Granted);
        assert_eq!(s.acquire_slot("alice", "s2", 2, 60, 0), Acquire::Granted);
        assert_eq!(s.acquire_slot("alice", "s3", 2, 60, 0), Acquire::OverCap);
        assert_eq!(s.acquire_slot("bob", "s4", 2, 60, 0), Acquire::Granted);
        s.release_slot("alice", "s1", 10);
        assert_eq!(s.acquire_slot("alice", "s3", 2, 60, 10), Acquire::Granted);
        // s2 and s3 are refreshed, so they are kept past the TTL; an unrefreshed (vanished)
        // slot expires.
        s.refresh_slots(&[("alice", "s3")], 60, 50);
        assert_eq!(
            s.acquire_slot("alice", "s5", 2, 60, 65),
            Acquire::Granted,
            "s2 expired"
        );
        assert_eq!(s.acquire_slot("alice", "s6", 2, 60, 65), Acquire::OverCap);
    }

    #[test]
    fn a_full_slot_bucket_refuses() {
        let mut s = store(2, false);
        assert_eq!(s.acquire_slot("a", "1", 5, 60, 0), Acquire::Granted);
        assert_eq!(s.acquire_slot("b", "2", 5, 60, 0), Acquire::Granted);
        assert_eq!(s.acquire_slot("c", "3", 5, 60, 0), Acquire::Full);
    }

    #[test]
    fn garbage_in_a_bucket_is_ignored() {
        let mut s = store(4, false);
        let key = s.jti_key("a");
        s.kv.set(&key, b"\xff\xfe\nno-number x\n", None);
        assert_eq!(s.use_once("a", None, 100, 0), UseOnce::Fresh);
        assert_eq!(s.use_once("a", None, 100, 0), UseOnce::Replay);
    }
}

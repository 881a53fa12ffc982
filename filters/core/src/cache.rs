//! A bounded cache of verified tokens (or decrypted cookies), keyed by the token itself.
//!
//! It only saves the parse and the signature check: every time and rule check still runs on a
//! hit, and an entry is never served at or after its deadline, so the cache never changes a
//! decision.
//!
//! The key is the whole token, found through std's `HashMap` (SipHash under a random key per
//! process, so lookups cannot be steered into collisions) and compared byte for byte: a hit is
//! exactly the token that was verified. Hashing a token with SHA-256 instead cost ~2 µs per
//! request inside Envoy's V8, the largest part of a cache hit.
//!
//! When the cache is full, an insert evicts the oldest entry (first in, first out). Expiry is
//! lazy: an expired entry is dropped when it is looked up or when its turn to be evicted comes.
//! Tokens of one issuer carry one lifetime, so the oldest entry is also about the first to
//! expire. Every operation is O(1) amortised: a reconnect storm of new tokens on a full cache
//! (every request a miss) costs one hash-map insert and one eviction per token, where scanning
//! the cache for expired entries on every insert cost ~170 µs per new token in Envoy at the
//! default 1,024 entries.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Dead items the insertion queue may hold beyond the live ones before it is compacted.
const DEAD_SLACK: usize = 32;

pub struct TokenCache<V> {
    cap: usize,
    map: HashMap<Arc<[u8]>, Slot<V>>,
    /// The insertion order, oldest first. An item is live while its key's slot carries the same
    /// `seq`; a removed entry (expired on lookup, dropped by `retain`) leaves a dead item, which
    /// eviction skips and `compact` drops once dead items outnumber live ones.
    order: VecDeque<(u64, Arc<[u8]>)>,
    next_seq: u64,
    /// Queue items visited by eviction and compaction: what the tests bound per insert.
    #[cfg(test)]
    work: usize,
}

struct Slot<V> {
    value: V,
    deadline: u64,
    seq: u64,
}

impl<V: Clone> TokenCache<V> {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            map: HashMap::new(),
            order: VecDeque::new(),
            next_seq: 0,
            #[cfg(test)]
            work: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The entry for `key`, unless it is missing or expired (`now >= deadline`).
    pub fn get(&mut self, key: &[u8], now: u64) -> Option<V> {
        match self.map.get(key) {
            Some(slot) if now < slot.deadline => Some(slot.value.clone()),
            Some(_) => {
                self.map.remove(key);
                None
            }
            None => None,
        }
    }

    /// Insert `value`, valid until `deadline` (not stored if already expired at `now`). When
    /// full, the oldest entry goes. A key already present takes the new value and deadline and
    /// keeps its place.
    pub fn insert(&mut self, key: &[u8], value: V, deadline: u64, now: u64) {
        if self.cap == 0 || now >= deadline {
            return;
        }
        if let Some(slot) = self.map.get_mut(key) {
            slot.value = value;
            slot.deadline = deadline;
            return;
        }
        while self.map.len() >= self.cap {
            let Some((seq, oldest)) = self.order.pop_front() else {
                break;
            };
            self.note_work(1);
            if let Entry::Occupied(slot) = self.map.entry(oldest) {
                if slot.get().seq == seq {
                    slot.remove();
                }
            }
        }
        let seq = self.next_seq;
        self.next_seq = seq.wrapping_add(1);
        let key: Arc<[u8]> = Arc::from(key);
        self.order.push_back((seq, key.clone()));
        self.map.insert(
            key,
            Slot {
                value,
                deadline,
                seq,
            },
        );
        if self.order.len() > self.map.len().saturating_mul(2) + DEAD_SLACK {
            self.compact();
        }
    }

    /// Keep only the entries whose value passes `keep`.
    pub fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        self.map.retain(|_, slot| keep(&slot.value));
        self.compact();
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
    }

    /// Drop the queue's dead items.
    fn compact(&mut self) {
        self.note_work(self.order.len());
        let map = &self.map;
        self.order
            .retain(|(seq, key)| map.get(key).is_some_and(|slot| slot.seq == *seq));
    }

    #[cfg(test)]
    fn note_work(&mut self, items: usize) {
        self.work += items;
    }

    #[cfg(not(test))]
    fn note_work(&mut self, _items: usize) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: usize) -> [u8; 16] {
        let mut k = [0; 16];
        k[..8].copy_from_slice(&(i as u64).to_le_bytes());
        k
    }

    #[test]
    fn bounded_and_expiring() {
        let mut c = TokenCache::new(2);
        c.insert(&[1; 32], "a", 100, 0);
        c.insert(&[2; 32], "b", 50, 0);
        assert_eq!(c.get(&[1; 32], 10), Some("a"));
        c.insert(&[3; 32], "c", 100, 10); // evicts the oldest
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(&[1; 32], 10), None);
        assert_eq!(c.get(&[2; 32], 50), None, "expired at its deadline");
        c.insert(&[4; 32], "d", 100, 60); // room after dropping the expired one
        assert_eq!(c.get(&[3; 32], 60), Some("c"));
        assert_eq!(c.get(&[4; 32], 60), Some("d"));
        c.insert(&[5; 32], "e", 10, 20); // already expired: not stored
        assert_eq!(c.get(&[5; 32], 0), None);
    }

    #[test]
    fn an_expired_entry_left_in_the_cache_is_never_served() {
        let mut c = TokenCache::new(4);
        c.insert(&key(1), 1, 50, 0);
        c.insert(&key(2), 2, 1000, 0);
        c.insert(&key(3), 3, 1000, 0);
        assert_eq!(
            c.len(),
            3,
            "expiry is lazy: the entry stays until looked up or evicted"
        );
        assert_eq!(c.get(&key(1), 50), None);
        assert_eq!(c.get(&key(1), 0), None, "dropped once seen expired");
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn a_full_cache_evicts_oldest_first_and_stays_bounded() {
        let mut c = TokenCache::new(3);
        for i in 0..10 {
            c.insert(&key(i), i, 1000, 0);
            assert!(c.len() <= 3);
        }
        let kept: Vec<_> = (0..10).filter_map(|i| c.get(&key(i), 1)).collect();
        assert_eq!(kept, [7, 8, 9]);
    }

    #[test]
    fn reinserting_a_present_key_updates_it_in_place() {
        let mut c = TokenCache::new(2);
        c.insert(&key(1), 1, 10, 0);
        c.insert(&key(2), 2, 100, 0);
        c.insert(&key(1), 11, 100, 0);
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(&key(1), 50), Some(11), "the new deadline holds");
        c.insert(&key(3), 3, 100, 0);
        assert_eq!(c.get(&key(1), 1), None, "it kept its place as the oldest");
        assert_eq!(c.get(&key(2), 1), Some(2));
    }

    #[test]
    fn a_key_inserted_again_after_expiring_is_not_evicted_by_its_old_place() {
        let mut c = TokenCache::new(2);
        c.insert(&key(1), 1, 10, 0);
        c.insert(&key(2), 2, 100, 0);
        assert_eq!(c.get(&key(1), 10), None); // expired: removed, its queue item is dead
        c.insert(&key(1), 11, 100, 10); // now newer than key 2
        c.insert(&key(3), 3, 100, 10); // full: the oldest live entry (key 2) goes
        assert_eq!(c.get(&key(1), 20), Some(11));
        assert_eq!(c.get(&key(2), 20), None);
        assert_eq!(c.get(&key(3), 20), Some(3));
    }

    #[test]
    fn retain_keeps_what_passes() {
        let mut c = TokenCache::new(4);
        c.insert(&[1; 8], 1, 100, 0);
        c.insert(&[2; 8], 2, 100, 0);
        c.insert(&[3; 8], 3, 100, 0);
        c.retain(|v| *v != 2);
        assert_eq!(
            (c.get(&[1; 8], 1), c.get(&[2; 8], 1), c.get(&[3; 8], 1)),
            (Some(1), None, Some(3))
        );
        c.insert(&[4; 8], 4, 100, 0);
        c.insert(&[5; 8], 5, 100, 0);
        assert_eq!(c.len(), 4, "the dropped entry made room");
        c.insert(&[6; 8], 6, 100, 0);
        assert_eq!(c.get(&[1; 8], 1), None, "the oldest goes first");
        assert_eq!(c.get(&[3; 8], 1), Some(3), "only one entry went");
        assert_eq!(
            c.order.len(),
            c.len(),
            "retain dropped the queue's dead items"
        );
    }

    #[test]
    fn zero_capacity_disables() {
        let mut c = TokenCache::new(0);
        c.insert(&[1; 32], 1, 100, 0);
        assert!(c.is_empty());
    }

    #[test]
    fn clear_empties_everything() {
        let mut c = TokenCache::new(4);
        c.insert(&key(1), 1, 100, 0);
        c.insert(&key(2), 2, 100, 0);
        c.clear();
        assert!(c.is_empty());
        assert_eq!(c.get(&key(1), 0), None);
        c.insert(&key(3), 3, 100, 0);
        assert_eq!(c.get(&key(3), 0), Some(3));
    }

    /// A reconnect storm: every request a new token on a full cache, some tokens looked up again
    /// after they expired (leaving dead queue items behind). The work per insert (queue items
    /// visited, by eviction and compaction) stays a small constant, where scanning for expired
    /// entries on every insert visited all 1,024 entries.
    #[test]
    fn insert_on_a_full_cache_does_bounded_work() {
        let cap = 1024;
        let mut c = TokenCache::new(cap);
        for i in 0..cap {
            c.insert(&key(i), i, u64::MAX, 0);
        }
        assert_eq!(c.len(), cap);
        c.work = 0;
        let inserts = 50 * cap;
        for n in 0..inserts {
            let now = n as u64;
            let i = cap + n;
            // Every third token lives only 20 ticks; most of the others outlive the test.
            let deadline = if i % 3 == 0 { now + 20 } else { u64::MAX };
            c.insert(&key(i), i, deadline, now);
            if n >= 25 && (i - 25) % 3 == 0 {
                // A client retrying with the short-lived token 25 inserts later: expired.
                assert_eq!(c.get(&key(i - 25), now), None);
            }
            assert!(c.len() <= cap);
            assert!(c.order.len() <= 2 * c.len() + DEAD_SLACK + 1);
        }
        assert!(
            c.work <= 2 * inserts,
            "{} queue items visited for {inserts} inserts",
            c.work
        );
    }

    /// The cache never fills, but entries keep expiring on lookup: the queue's dead items are
    /// dropped, so its memory follows the live entries, not the inserts.
    #[test]
    fn dead_queue_items_do_not_accumulate() {
        let mut c = TokenCache::new(1024);
        for i in 0..100_000u64 {
            c.insert(&key(i as usize), i, i + 1, i);
            assert_eq!(c.get(&key(i as usize), i + 1), None);
        }
        assert!(c.is_empty());
        assert!(
            c.order.len() <= DEAD_SLACK + 1,
            "{} queue items",
            c.order.len()
        );
        assert!(c.work <= 2 * 100_000);
    }
}

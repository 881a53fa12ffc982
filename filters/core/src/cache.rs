//! A bounded cache of verified tokens (or decrypted cookies), keyed by the token itself.
//!
//! It only saves the parse and the signature check: every time and rule check still runs on a
//! hit, and an entry is dropped once its token expires, so the cache never changes a decision.
//!
//! The key is the whole token, found through std's `HashMap` (SipHash under a random key per
//! process, so lookups cannot be steered into collisions) and compared byte for byte: a hit is
//! exactly the token that was verified. Hashing a token with SHA-256 instead cost ~2 µs per
//! request inside Envoy's V8, the largest part of a cache hit.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

pub struct TokenCache<V> {
    cap: usize,
    map: HashMap<Arc<[u8]>, (V, u64)>,
    order: VecDeque<Arc<[u8]>>,
}

impl<V: Clone> TokenCache<V> {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            map: HashMap::new(),
            order: VecDeque::new(),
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
            Some((v, deadline)) if now < *deadline => Some(v.clone()),
            Some(_) => {
                self.map.remove(key);
                None
            }
            None => None,
        }
    }

    /// Insert `value`, valid until `deadline`. When full, expired entries go first, then the
    /// oldest.
    pub fn insert(&mut self, key: &[u8], value: V, deadline: u64, now: u64) {
        if self.cap == 0 || now >= deadline {
            return;
        }
        let key: Arc<[u8]> = Arc::from(key);
        if self.map.len() >= self.cap {
            self.map.retain(|_, (_, d)| now < *d);
            let map = &self.map;
            self.order.retain(|k| map.contains_key(k));
        }
        while self.map.len() >= self.cap {
            match self.order.pop_front() {
                Some(oldest) => {
                    self.map.remove(&oldest);
                }
                None => break,
            }
        }
        if self.map.insert(key.clone(), (value, deadline)).is_none() {
            self.order.push_back(key);
        }
    }

    /// Keep only the entries whose value passes `keep`.
    pub fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        self.map.retain(|_, (v, _)| keep(v));
        let map = &self.map;
        self.order.retain(|k| map.contains_key(k));
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(c.len(), 4, "the order list was pruned with the map");
        c.insert(&[6; 8], 6, 100, 0);
        assert_eq!(c.get(&[1; 8], 1), None, "the oldest goes first");
    }

    #[test]
    fn zero_capacity_disables() {
        let mut c = TokenCache::new(0);
        c.insert(&[1; 32], 1, 100, 0);
        assert!(c.is_empty());
    }
}

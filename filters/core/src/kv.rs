//! A compare-and-swap key/value store (Envoy's shared data: one per Envoy process, seen by every
//! worker's VM), and the one read-modify-write loop every filter uses over it.

/// A key/value store with compare-and-swap writes.
pub trait Kv {
    /// The value of `key` and its CAS token (`None, None` when absent).
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Write `value` if `key` is still at `cas` (`None`: unconditionally); false when another
    /// writer came first.
    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool;
}

/// How often a CAS write is retried before giving up (other workers wrote the same key).
pub const CAS_TRIES: usize = 8;

/// Read-modify-write `key` with compare-and-swap, retried up to [`CAS_TRIES`] times. `change`
/// gets the current value (empty when absent) and returns the value to write, or `None` to write
/// nothing, with the result; `contended` is the result when every try lost to another writer.
pub fn update<K: Kv + ?Sized, T>(
    kv: &mut K,
    key: &str,
    contended: T,
    mut change: impl FnMut(&[u8]) -> (Option<Vec<u8>>, T),
) -> T {
    for _ in 0..CAS_TRIES {
        let (value, cas) = kv.get(key);
        let (next, result) = change(value.as_deref().unwrap_or(&[]));
        let Some(next) = next else { return result };
        if kv.set(key, &next, cas) {
            return result;
        }
    }
    contended
}

/// An in-memory [`Kv`] with shared-data semantics, for tests and the CLI.
#[derive(Debug, Default, Clone)]
pub struct MemoryKv {
    entries: std::collections::HashMap<String, (Vec<u8>, u32)>,
    next_cas: u32,
}

impl Kv for MemoryKv {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.entries.get(key) {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        }
    }

    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        if let (Some(want), Some((_, have))) = (cas, self.entries.get(key)) {
            if want != *have {
                return false;
            }
        }
        self.next_cas = self.next_cas.wrapping_add(1).max(1);
        self.entries
            .insert(key.to_string(), (value.to_vec(), self.next_cas));
        true
    }
}

/// A [`Kv`] where another writer appends `other` to the key just before each of the first
/// `races` writes: a lost compare-and-swap, on demand.
#[cfg(test)]
pub(crate) struct Racy {
    pub inner: MemoryKv,
    pub races: usize,
    pub other: Vec<u8>,
}

#[cfg(test)]
impl Kv for Racy {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        self.inner.get(key)
    }
    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        if self.races > 0 {
            self.races -= 1;
            let (old, old_cas) = self.inner.get(key);
            let mut changed = old.unwrap_or_default();
            changed.extend_from_slice(&self.other);
            self.inner.set(key, &changed, old_cas);
        }
        self.inner.set(key, value, cas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append_a(v: &[u8]) -> (Option<Vec<u8>>, bool) {
        let mut next = v.to_vec();
        next.push(b'a');
        (Some(next), true)
    }

    #[test]
    fn a_lost_race_is_retried_on_the_new_value() {
        let mut kv = Racy {
            inner: MemoryKv::default(),
            races: 2,
            other: b"x".to_vec(),
        };
        // A key that exists: only then has a write a CAS token to lose on (shared data cannot
        // create a key atomically; the filters create their keys once at start).
        kv.inner.set("k", b"", None);
        assert!(update(&mut kv, "k", false, append_a));
        // Both other writes survive: our write was made on top of the latest value.
        assert_eq!(kv.get("k").0.as_deref(), Some(&b"xxa"[..]));
    }

    #[test]
    fn every_try_lost_gives_the_contended_result_and_writes_nothing_of_ours() {
        let mut kv = Racy {
            inner: MemoryKv::default(),
            races: CAS_TRIES,
            other: b"x".to_vec(),
        };
        kv.inner.set("k", b"", None);
        assert!(!update(&mut kv, "k", false, append_a));
        assert_eq!(kv.get("k").0.map(|v| v.contains(&b'a')), Some(false));
    }

    #[test]
    fn nothing_to_write_returns_at_once() {
        let mut kv = MemoryKv::default();
        assert_eq!(update(&mut kv, "k", 0, |_| (None, 7)), 7);
        assert_eq!(kv.get("k"), (None, None));
    }
}

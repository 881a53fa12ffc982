//! When to fetch a filter's remote documents (each remote JWKS, the revocation feed): one
//! schedule for every filter, so the shells only start the calls it says are due.
//!
//! Each source is fetched at start, then `refresh` seconds after a good answer, or
//! [`RETRY_SECONDS`] (at most `refresh`) after a failed one or one that could not start; one
//! fetch of a source is in flight at a time. A failure keeps the last good document in use:
//! that is the caller's part.

/// Retry a failed fetch after this long.
pub const RETRY_SECONDS: u64 = 5;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot {
    source: usize,
    refresh: u64,
    due: u64,
    in_flight: Option<u32>,
}

/// The fetch schedule of one filter's sources, named by the caller's index (a provider, the
/// feed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchSchedule {
    slots: Vec<Slot>,
}

impl FetchSchedule {
    /// `sources`: `(source, refresh seconds)`, each due at once.
    pub fn new(sources: impl IntoIterator<Item = (usize, u64)>) -> Self {
        Self {
            slots: sources
                .into_iter()
                .map(|(source, refresh)| Slot {
                    source,
                    refresh,
                    due: 0,
                    in_flight: None,
                })
                .collect(),
        }
    }

    /// Whether there is anything to fetch at all (the shell needs a tick only then).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The sources due at `now` with no fetch in flight.
    pub fn due(&self, now: u64) -> Vec<usize> {
        self.slots
            .iter()
            .filter(|s| s.in_flight.is_none() && s.due <= now)
            .map(|s| s.source)
            .collect()
    }

    fn slot(&mut self, source: usize) -> Option<&mut Slot> {
        self.slots.iter_mut().find(|s| s.source == source)
    }

    /// The source call `call` fetches, if this schedule started it.
    pub fn in_flight(&self, call: u32) -> Option<usize> {
        self.slots
            .iter()
            .find(|s| s.in_flight == Some(call))
            .map(|s| s.source)
    }

    /// A fetch of `source` started as call `call`.
    pub fn started(&mut self, source: usize, call: u32) {
        if let Some(s) = self.slot(source) {
            s.in_flight = Some(call);
        }
    }

    /// A fetch of `source` could not be started at `now`: try again after the retry delay.
    pub fn not_started(&mut self, source: usize, now: u64) {
        if let Some(s) = self.slot(source) {
            s.due = now.saturating_add(RETRY_SECONDS.min(s.refresh));
        }
    }

    /// Call `call` ended at `now`, with a usable document or not. Returns the source it
    /// fetched, or `None` for a call this schedule did not start.
    pub fn finished(&mut self, call: u32, ok: bool, now: u64) -> Option<usize> {
        let s = self.slots.iter_mut().find(|s| s.in_flight == Some(call))?;
        s.in_flight = None;
        let wait = if ok {
            s.refresh
        } else {
            RETRY_SECONDS.min(s.refresh)
        };
        s.due = now.saturating_add(wait);
        Some(s.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetched_at_start_then_every_refresh_and_sooner_after_a_failure() {
        let mut s = FetchSchedule::new([(0, 300), (2, 60)]);
        assert_eq!(s.due(1000), vec![0, 2]);
        s.started(0, 7);
        s.started(2, 8);
        assert_eq!(s.in_flight(8), Some(2));
        // In flight: never started twice.
        assert!(s.due(1000).is_empty());
        assert_eq!(s.finished(7, true, 1001), Some(0));
        assert_eq!(s.finished(8, false, 1001), Some(2));
        assert!(s.due(1005).is_empty());
        assert_eq!(s.due(1006), vec![2]);
        assert_eq!(s.due(1301), vec![0, 2]);
        // A call it did not start is not its business.
        assert_eq!(s.in_flight(99), None);
        assert_eq!(s.finished(99, true, 1301), None);
    }

    #[test]
    fn a_fetch_that_cannot_start_is_retried_and_the_retry_never_exceeds_the_refresh() {
        let mut s = FetchSchedule::new([(0, 2)]);
        s.not_started(0, 100);
        assert!(s.due(101).is_empty());
        assert_eq!(s.due(102), vec![0]);
        s.started(0, 1);
        s.finished(1, false, 200);
        assert_eq!(s.due(202), vec![0]);
    }

    #[test]
    fn nothing_to_fetch() {
        let s = FetchSchedule::new([]);
        assert!(s.is_empty());
        assert!(s.due(0).is_empty());
    }
}

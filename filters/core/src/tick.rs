//! The root tick of a pass. A root context has one tick period, and every stage of a one-pass
//! filter runs on it: each stage root asks for the period it wants while it configures
//! ([`ask`]), and the pass asks the host once for the shortest of them ([`collect`]), so a
//! stage that wants 250 ms (a fleet store) is never slowed to another stage's 1 s, whatever
//! the order the stages configure in. Outside a pass configuring, [`ask`] says "ask the host
//! yourself".

use std::cell::Cell;
use std::time::Duration;

thread_local! {
    /// `Some` while a pass configures its stages: the shortest period asked so far (`None`:
    /// none yet). One VM runs one thread, and its root contexts configure one after the other.
    static ASKED: Cell<Option<Option<Duration>>> = const { Cell::new(None) };
}

/// Run `configure` (a pass configuring its stage roots); returns its result and the shortest
/// tick period a stage asked for in it with [`ask`] (`None`: no stage asked).
pub fn collect<T>(configure: impl FnOnce() -> T) -> (T, Option<Duration>) {
    let outer = ASKED.try_with(|a| a.replace(Some(None))).ok().flatten();
    let out = configure();
    let asked = ASKED
        .try_with(|a| a.replace(outer))
        .ok()
        .flatten()
        .flatten();
    (out, asked)
}

/// A stage asks for a tick every `period`: `true` when a pass is collecting the periods (it
/// asks the host for the shortest), `false` when the caller should ask the host itself.
pub fn ask(period: Duration) -> bool {
    ASKED
        .try_with(|a| match a.get() {
            Some(shortest) => {
                a.set(Some(Some(shortest.map_or(period, |s| s.min(period)))));
                true
            }
            None => false,
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STORE: Duration = Duration::from_millis(250);
    const FETCH: Duration = Duration::from_secs(1);

    #[test]
    fn a_pass_ticks_at_the_shortest_period_any_stage_asks_for() {
        // jwt-auth with a store (250 ms) configured before a session-binding without one (1 s):
        // the last ask must not win.
        let ((), tick) = collect(|| {
            assert!(ask(FETCH));
            assert!(ask(STORE));
            assert!(ask(FETCH));
        });
        assert_eq!(tick, Some(STORE));
        let ((), tick) = collect(|| {
            ask(STORE);
            ask(FETCH);
        });
        assert_eq!(tick, Some(STORE));
    }

    #[test]
    fn a_pass_whose_stages_ask_nothing_sets_no_tick() {
        let (ok, tick) = collect(|| true);
        assert!(ok);
        assert_eq!(tick, None);
    }

    #[test]
    fn each_pass_keeps_its_own_period_and_outside_a_pass_the_caller_asks_the_host() {
        assert!(!ask(STORE), "no pass is configuring");
        let ((), first) = collect(|| {
            ask(STORE);
        });
        let ((), second) = collect(|| {
            ask(FETCH);
        });
        assert_eq!((first, second), (Some(STORE), Some(FETCH)));
        assert!(!ask(FETCH), "the collection ended with its pass");
    }

    #[test]
    fn a_nested_collection_leaves_the_outer_one_as_it_was() {
        let (inner, outer) = collect(|| {
            ask(FETCH);
            let ((), inner) = collect(|| {
                ask(STORE);
            });
            inner
        });
        assert_eq!((inner, outer), (Some(STORE), Some(FETCH)));
    }
}

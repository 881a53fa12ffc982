//! The root's session-deadline work with a fleet store (`store`, docs/fleet.md): what the tick
//! sends to etcd and what an answer does, noted as stats and lines for the shell.

use super::*;
use crate::sessions::DeadlineStat;
use crate::stats::JwtAuthStat;
use crate::store::{Call, StoreConfig, StoreError, MAX_ANSWER};

impl JwtAuth {
    /// The tick's calls (lease grants, a batch of writes, a batch of reads): `send` posts one to
    /// the store with its timeout and returns its call token (`None`: Envoy could not start it).
    pub fn store_tick(
        &mut self,
        now: u64,
        mut send: impl FnMut(&StoreConfig, &Call, u64) -> Option<u32>,
    ) {
        let (Some(store), Some(deadlines)) = (&self.config.store, self.deadlines.as_mut()) else {
            return;
        };
        for (what, call) in deadlines.due(&store.prefix, now) {
            match send(store, &call, store.timeout_ms) {
                Some(token) => deadlines.sent(token, what),
                None => {
                    deadlines.not_sent(what);
                    note_store(
                        &mut self.notes,
                        DeadlineStat::Error(StoreError::Unavailable),
                        1,
                    );
                }
            }
        }
    }

    /// The answer to root call `token`, when it is a session-deadline call (false otherwise).
    /// `read(cap)` reads it; one longer than `cap` reads as too large.
    pub fn store_answered(
        &mut self,
        token: u32,
        now: u64,
        read: impl FnOnce(Option<usize>) -> (u32, Vec<u8>),
    ) -> bool {
        let (Some(store), Some(deadlines)) = (&self.config.store, self.deadlines.as_mut()) else {
            return false;
        };
        if !deadlines.waits_for(token) {
            return false;
        }
        let (status, body) = read(Some(MAX_ANSWER));
        if let Some((stat, n)) = deadlines.answer(&store.prefix, token, status, &body, now) {
            note_store(&mut self.notes, stat, n);
        }
        true
    }
}

/// A store outcome `n` times, with its warning when it has one.
fn note_store(notes: &mut Notes, stat: DeadlineStat, n: u64) {
    if let Some(warning) = stat.warning() {
        notes.line(Line::Warn(warning));
    }
    notes.add(JwtAuthStat::Store(stat), n);
}

//! Bounded logging: a flood of bad requests must not become a flood of log lines (disk and
//! CPU). Stats stay exact; only the lines are limited.

/// At most `per_minute` log lines per minute (per Wasm VM); the rest are counted as suppressed.
#[derive(Debug, Default)]
pub struct LogLimiter {
    window: u64,
    used: u32,
    suppressed: u64,
}

impl LogLimiter {
    /// May a line be logged at `now` (unix seconds)? Returns also how many lines were
    /// suppressed since the last one logged.
    pub fn allow(&mut self, now: u64, per_minute: u32) -> Option<u64> {
        let w = now / 60;
        if w != self.window {
            self.window = w;
            self.used = 0;
        }
        if self.used < per_minute {
            self.used += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_limiter() {
        let mut l = LogLimiter::default();
        assert_eq!(l.allow(60, 2), Some(0));
        assert_eq!(l.allow(61, 2), Some(0));
        assert_eq!(l.allow(62, 2), None);
        assert_eq!(l.allow(63, 2), None);
        assert_eq!(l.allow(120, 2), Some(2));
    }
}

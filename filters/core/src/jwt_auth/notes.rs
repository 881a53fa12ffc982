//! What the shell counts and logs after a core step: the core notes its stats and log lines
//! here, the shell drains them into Envoy's counters and log at the end of each callback.

use crate::stats::JwtAuthStat;

/// A log line for the shell to write under the filter's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    Info(String),
    Warn(String),
    /// A denial line (rate-limited by the host, every one at debug).
    Denial(String),
}

/// Stats (each with how many times) and log lines, in the order they were noted.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Notes {
    pub stats: Vec<(JwtAuthStat, u64)>,
    pub lines: Vec<Line>,
}

impl Notes {
    pub fn count(&mut self, stat: JwtAuthStat) {
        self.stats.push((stat, 1));
    }

    pub fn add(&mut self, stat: JwtAuthStat, n: u64) {
        self.stats.push((stat, n));
    }

    pub fn line(&mut self, line: Line) {
        self.lines.push(line);
    }
}

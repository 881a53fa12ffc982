//! What a core step leaves for the shell: the stats it counted and the log lines it wrote, in
//! order. The shell drains them into Envoy's counters and log at the end of each callback
//! (`host::Counters::write`), so the core decides what is counted and said, host-free.

/// A log line for the shell to write under the filter's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    Info(String),
    Warn(String),
    /// A denial line (rate-limited by the host, every one at debug).
    Denial(String),
}

/// Stats (each with how many times) and log lines, in the order they were noted. `S` is the
/// filter's closed set of stats (`crate::stats`).
#[derive(Debug, PartialEq, Eq)]
pub struct Notes<S> {
    pub stats: Vec<(S, u64)>,
    pub lines: Vec<Line>,
}

impl<S> Default for Notes<S> {
    fn default() -> Self {
        Self {
            stats: Vec::new(),
            lines: Vec::new(),
        }
    }
}

impl<S> Notes<S> {
    pub fn count(&mut self, stat: S) {
        self.stats.push((stat, 1));
    }

    pub fn add(&mut self, stat: S, n: u64) {
        self.stats.push((stat, n));
    }

    pub fn line(&mut self, line: Line) {
        self.lines.push(line);
    }
}

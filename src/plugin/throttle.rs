//! A budget for log lines that someone else can trigger at will: at most `limit` lines per
//! `interval`, the rest counted and reported as one line once the interval is over.
//!
//! A plugin can send answers with unknown request ids or malformed storage requests as fast
//! as it can write; without a budget each one is a warning in the daemon's own log, so one
//! plugin could flood it and bury everything else. The owner decides what to log; this only
//! says whether to, and how many lines were held back. It knows nothing of tracing or of
//! plugins; its clock is tokio's, and the time can be passed in (`admit_at`), which is how
//! the tests drive it.

use std::time::Duration;

use tokio::time::Instant;

/// Default number of lines let through per interval.
pub const DEFAULT_LIMIT: u32 = 10;
/// Default interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

/// What to do with one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Log the line. `suppressed` lines were held back in the interval before this one:
    /// say so first (it is 0 when nothing was).
    Log {
        /// Lines held back since the last line that was logged.
        suppressed: u64,
        /// This is the last line let through in this interval: say that further ones are
        /// counted, not logged.
        last: bool,
    },
    /// Do not log the line; it is counted.
    Suppress,
}

/// At most `limit` lines per `interval`; see the module documentation.
#[derive(Debug)]
pub struct Throttle {
    limit: u32,
    interval: Duration,
    /// When the current interval began.
    started: Instant,
    /// Lines let through in the current interval.
    used: u32,
    /// Lines held back since the last one let through.
    suppressed: u64,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new(DEFAULT_LIMIT, DEFAULT_INTERVAL)
    }
}

impl Throttle {
    /// The interval of the budget.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// A budget of `limit` lines per `interval`, starting now.
    pub fn new(limit: u32, interval: Duration) -> Self {
        Throttle::starting_at(limit, interval, Instant::now())
    }

    fn starting_at(limit: u32, interval: Duration, started: Instant) -> Self {
        Throttle {
            limit,
            interval,
            started,
            used: 0,
            suppressed: 0,
        }
    }

    /// Whether the line that just happened may be logged.
    pub fn admit(&mut self) -> Admit {
        self.admit_at(Instant::now())
    }

    /// Whether a line that happened at `now` may be logged.
    pub fn admit_at(&mut self, now: Instant) -> Admit {
        if now.duration_since(self.started) >= self.interval {
            self.started = now;
            self.used = 0;
        }
        if self.used >= self.limit {
            self.suppressed += 1;
            return Admit::Suppress;
        }
        self.used += 1;
        Admit::Log {
            suppressed: std::mem::take(&mut self.suppressed),
            last: self.used == self.limit,
        }
    }

    /// Lines held back and not yet reported, handed over once (for a last line when the
    /// source goes away).
    pub fn take_suppressed(&mut self) -> u64 {
        std::mem::take(&mut self.suppressed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn lets_limit_lines_through_per_interval_and_counts_the_rest() {
        let t0 = Instant::now();
        let mut t = Throttle::starting_at(3, 10 * S, t0);
        let first: Vec<Admit> = (0..1000).map(|_| t.admit_at(t0)).collect();
        let log = |suppressed, last| Admit::Log { suppressed, last };
        assert_eq!(first[..3], [log(0, false), log(0, false), log(0, true)]);
        assert!(first[3..].iter().all(|a| *a == Admit::Suppress));

        // Still inside the interval: nothing more gets through.
        assert_eq!(
            t.admit_at(t0 + 10 * S - Duration::from_millis(1)),
            Admit::Suppress
        );

        // The next interval: the first line carries the count of what was held back.
        let t1 = t0 + 10 * S;
        assert_eq!(t.admit_at(t1), log(998, false));
        assert_eq!(t.admit_at(t1), log(0, false));
        assert_eq!(t.admit_at(t1 + S), log(0, true));
        assert_eq!(t.admit_at(t1 + 2 * S), Admit::Suppress);
        assert_eq!(t.take_suppressed(), 1);
        assert_eq!(t.take_suppressed(), 0);
        // The interval restarts from the first line after it ended, not on a fixed grid.
        let t2 = t1 + 25 * S;
        assert_eq!(t.admit_at(t2), log(0, false));
        assert_eq!(t.admit_at(t2 + 9 * S), log(0, false));
        assert_eq!(t.admit_at(t2 + 9 * S), log(0, true));
        assert_eq!(t.admit_at(t2 + 9 * S), Admit::Suppress);
    }

    #[test]
    fn a_quiet_source_is_never_held_back() {
        let t0 = Instant::now();
        let mut t = Throttle::starting_at(2, S, t0);
        for i in 0..100u32 {
            let at = t0 + Duration::from_millis(500) * i;
            assert!(
                matches!(t.admit_at(at), Admit::Log { suppressed: 0, .. }),
                "{i}"
            );
        }
        assert_eq!(t.take_suppressed(), 0);
    }
}

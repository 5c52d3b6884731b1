//! [`Backoff`]: the jittered exponential delays between the listener's reconnect attempts.

use std::time::Duration;

use rand::Rng;

/// Jittered exponential backoff for reconnects: the ceiling doubles from `initial` up to `max`,
/// and each delay is drawn uniformly from the upper half of the ceiling so that replicas that
/// lost the database together do not reconnect in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    ceiling: Duration,
}

impl Backoff {
    /// A backoff starting at `initial`, never above `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            ceiling: initial,
        }
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = (self.ceiling * 2).min(self.max);
        let half = ceiling / 2;
        half + rand::rng().random_range(Duration::ZERO..=ceiling - half)
    }

    /// Back to `initial`, after a success.
    pub fn reset(&mut self) {
        self.ceiling = self.initial;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_jittered_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let expected_ceilings = [100, 200, 400, 800, 1000, 1000];
        for ceiling in expected_ceilings {
            let d = b.next_delay();
            let ceiling = Duration::from_millis(ceiling);
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "{d:?} outside {ceiling:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
        // Jitter: many draws are not all equal.
        let mut draws: Vec<_> = (0..50)
            .map(|_| {
                b.reset();
                b.next_delay()
            })
            .collect();
        draws.dedup();
        assert!(draws.len() > 1);
    }
}

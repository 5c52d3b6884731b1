//! The client frame rate limit: a token bucket per connection, refilled at
//! `client_frames_per_second` and holding two seconds' worth, so a burst of subscribes after a
//! reconnect passes and a steady flood does not.

use tokio::time::Instant;

/// A token bucket; starts full.
#[derive(Debug)]
pub(super) struct RateLimit {
    per_second: f64,
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    pub(super) fn new(per_second: u32) -> Self {
        let per_second = f64::from(per_second);
        RateLimit {
            per_second,
            tokens: per_second * 2.0,
            at: Instant::now(),
        }
    }

    fn burst(&self) -> f64 {
        self.per_second * 2.0
    }

    /// Takes a token for one client frame; false when the bucket is empty (the frame gets
    /// `rate_limited`).
    pub(super) fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + refill).min(self.burst());
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_two_seconds_passes_then_the_rate_refills() {
        let mut rate = RateLimit::new(5);
        let passed = (0..20).filter(|_| rate.take()).count();
        assert_eq!(passed, 10, "the bucket holds two seconds' worth");
        assert!(!rate.take());
        tokio::time::advance(Duration::from_millis(400)).await;
        assert!(rate.take(), "0.4 s at 5/s refills two tokens");
        assert!(rate.take());
        assert!(!rate.take());
        // A long quiet spell refills no more than the burst.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!((0..20).filter(|_| rate.take()).count(), 10);
    }
}

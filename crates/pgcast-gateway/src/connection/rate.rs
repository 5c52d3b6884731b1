//! The client frame rate limit: a token bucket per connection, refilled at
//! `client_frames_per_second` and holding two seconds' worth, and at least room for every
//! subscription twice (a reconnect's subscribes, then their answers to `resync`), so a client's
//! burst after a reconnect passes and a steady flood does not. A flood is told once (`rate_limited`) and its
//! further frames are dropped unanswered until one passes again: answering each would let one
//! client make the gateway write a frame per frame it sends, as fast as it can send them.

use tokio::time::Instant;

/// A token bucket; starts full.
#[derive(Debug)]
pub(super) struct RateLimit {
    per_second: f64,
    /// What the bucket holds when full.
    burst: f64,
    tokens: f64,
    at: Instant,
    /// The last frame was refused: the client has been told.
    refusing: bool,
}

/// What to do with one client frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Rate {
    /// Within the rate: handle it.
    Pass,
    /// The first over the rate since the last that passed: answer `rate_limited`.
    Refuse,
    /// Over the rate again: drop it unanswered.
    Drop,
}

impl RateLimit {
    /// `per_second` on average; a full bucket holds two seconds' worth, or room for
    /// `subscriptions` subscribes twice over and two frames more, whichever is more.
    pub(super) fn new(per_second: u32, subscriptions: usize) -> Self {
        let per_second = f64::from(per_second);
        let subscribes = u32::try_from(subscriptions.saturating_mul(2).saturating_add(2))
            .map_or(f64::from(u32::MAX), f64::from);
        let burst = (per_second * 2.0).max(subscribes);
        RateLimit {
            per_second,
            burst,
            tokens: burst,
            at: Instant::now(),
            refusing: false,
        }
    }

    /// Takes a token for one client frame.
    pub(super) fn take(&mut self) -> Rate {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refusing = false;
            Rate::Pass
        } else if std::mem::replace(&mut self.refusing, true) {
            Rate::Drop
        } else {
            Rate::Refuse
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_two_seconds_passes_then_the_rate_refills() {
        let mut rate = RateLimit::new(5, 1);
        let passed = (0..20).filter(|_| rate.take() == Rate::Pass).count();
        assert_eq!(passed, 10, "the bucket holds two seconds' worth");
        assert_eq!(rate.take(), Rate::Drop, "told once already");
        tokio::time::advance(Duration::from_millis(400)).await;
        assert_eq!(rate.take(), Rate::Pass, "0.4 s at 5/s refills two tokens");
        assert_eq!(rate.take(), Rate::Pass);
        assert_eq!(rate.take(), Rate::Refuse, "told again after frames passed");
        assert_eq!(rate.take(), Rate::Drop);
        // A long quiet spell refills no more than the burst.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!((0..20).filter(|_| rate.take() == Rate::Pass).count(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn the_burst_holds_every_subscription_twice() {
        // 100 subscriptions at 5 frames/s: a reconnect re-sends all of them, and each may be
        // answered by `resync` and sent again.
        let mut rate = RateLimit::new(5, 100);
        let passed = (0..300).filter(|_| rate.take() == Rate::Pass).count();
        assert_eq!(passed, 202);
    }
}

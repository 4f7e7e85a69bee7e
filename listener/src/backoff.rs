//! Jittered exponential backoff: one validated policy type, used for every retry loop
//! (EWS reconnects, credential failures, Creatio deliveries).

use std::time::Duration;

/// A validated backoff policy: delays grow from `base` by doubling up to `max`; each delay is
/// drawn uniformly from its upper half, so synchronized clients spread out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    base: Duration,
    max: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidBackoff {
    #[error("backoff base must be greater than zero")]
    ZeroBase,
    #[error("backoff maximum ({max:?}) must not be less than its base ({base:?})")]
    MaxBelowBase { base: Duration, max: Duration },
}

impl BackoffPolicy {
    pub fn new(base: Duration, max: Duration) -> Result<Self, InvalidBackoff> {
        if base.is_zero() {
            return Err(InvalidBackoff::ZeroBase);
        }
        if max < base {
            return Err(InvalidBackoff::MaxBelowBase { base, max });
        }
        Ok(BackoffPolicy { base, max })
    }

    pub fn base(&self) -> Duration {
        self.base
    }

    pub fn max(&self) -> Duration {
        self.max
    }

    /// The delay before retry number `attempt` (0-based), for a jitter draw in `[0, 1]`.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let ceiling = self
            .base
            .checked_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
            .map_or(self.max, |d| d.min(self.max));
        let half = ceiling / 2;
        half + half.mul_f64(jitter.clamp(0.0, 1.0))
    }

    /// A fresh retry sequence under this policy.
    pub fn start(&self) -> Backoff {
        Backoff {
            policy: *self,
            attempt: 0,
        }
    }
}

/// One retry sequence: each [`Backoff::next_delay`] is longer (up to the maximum) until
/// [`Backoff::reset`].
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: BackoffPolicy,
    attempt: u32,
}

impl Backoff {
    pub fn next_delay(&mut self) -> Duration {
        let d = self.policy.delay(self.attempt, fastrand::f64());
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// The next delay, but at least what the server asked for.
    pub fn next_delay_at_least(&mut self, server_asked: Option<Duration>) -> Duration {
        let d = self.next_delay();
        server_asked.map_or(d, |asked| d.max(asked))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

/// The delay a `Retry-After` header asks for, in its seconds form.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_bad_policies() {
        assert_eq!(
            BackoffPolicy::new(Duration::ZERO, Duration::from_secs(1)),
            Err(InvalidBackoff::ZeroBase)
        );
        assert!(BackoffPolicy::new(Duration::from_secs(2), Duration::from_secs(1)).is_err());
    }

    #[test]
    fn server_request_wins_when_longer() {
        let p = BackoffPolicy::new(Duration::from_millis(10), Duration::from_millis(100)).unwrap();
        let mut b = p.start();
        assert_eq!(
            b.next_delay_at_least(Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
    }

    proptest! {
        #[test]
        fn delays_stay_within_bounds_and_grow(
            base_ms in 1u64..10_000, extra_ms in 0u64..1_000_000,
            attempt in 0u32..100, jitter in 0.0f64..=1.0,
        ) {
            let p = BackoffPolicy::new(Duration::from_millis(base_ms), Duration::from_millis(base_ms + extra_ms)).unwrap();
            let d = p.delay(attempt, jitter);
            prop_assert!(d <= p.max());
            prop_assert!(d >= p.base() / 2);
            prop_assert!(p.delay(attempt + 1, jitter) >= d);
        }
    }
}

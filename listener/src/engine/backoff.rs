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

/// The delay a `Retry-After` header asks for.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(value, std::time::SystemTime::now())
}

/// A `Retry-After` value: seconds, or an HTTP date (a date already past asks for no wait).
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
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

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = httpdate::parse_http_date("Mon, 30 Nov 2026 10:00:00 GMT").unwrap();
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Mon, 30 Nov 2026 10:01:30 GMT", now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse_retry_after("Mon, 30 Nov 2026 09:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
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

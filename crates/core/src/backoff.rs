//! How long to wait between retries: one rule for every retry loop in Cairn
//! (clients resending appends, the writer repairing the log, relays, sagas,
//! timers, subscriptions reconnecting).

use std::time::Duration;

/// Waits that start at `first` and double after each failure up to `max`.
/// With `jitter` (0.0 to 1.0), each wait is shortened by up to that share
/// of itself, at random, so that clients that failed together (a server
/// restart) do not all come back in the same millisecond.
///
/// ```
/// use std::time::Duration;
/// use cairn_core::Backoff;
///
/// let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1)).with_jitter(0.2);
/// for retry in 0..6 {
///     let wait = backoff.delay(retry); // 100, 200, 400, 800, 1000, 1000 ms, each up to 20% less
///     assert!(wait <= backoff.base(retry) && wait >= backoff.base(retry).mul_f64(0.8));
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
    pub jitter: f64,
}

impl Backoff {
    /// Doubling from `first` up to `max`, without jitter.
    pub const fn new(first: Duration, max: Duration) -> Backoff {
        Backoff { first, max, jitter: 0.0 }
    }

    /// The same waits, each shortened at random by up to `jitter` of itself.
    pub const fn with_jitter(self, jitter: f64) -> Backoff {
        Backoff { jitter, ..self }
    }

    /// The wait before retry `retry` (0 for the first), jitter left out:
    /// `first × 2^retry`, at most `max` (and never past it on overflow).
    pub fn base(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
        self.first.saturating_mul(factor).min(self.max)
    }

    /// The wait before retry `retry` (0 for the first), with jitter.
    pub fn delay(&self, retry: u32) -> Duration {
        let base = self.base(retry);
        let jitter = self.jitter.clamp(0.0, 1.0);
        if jitter == 0.0 { base } else { base.mul_f64(1.0 - jitter * fastrand::f64()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_up_to_the_cap_and_never_overflows() {
        let b = Backoff::new(100 * MS, 2_000 * MS);
        let waits: Vec<_> = (0..7).map(|r| b.delay(r)).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1_600, 2_000, 2_000].map(|m| m * MS));
        assert_eq!(b.delay(u32::MAX), 2_000 * MS);
        assert_eq!(Backoff::new(Duration::MAX, Duration::MAX).delay(40), Duration::MAX);
    }

    #[test]
    fn jitter_only_shortens_and_within_its_share() {
        let b = Backoff::new(1_000 * MS, 1_000 * MS).with_jitter(0.25);
        let waits: Vec<_> = (0..1_000).map(|_| b.delay(3)).collect();
        assert!(waits.iter().all(|w| *w >= 750 * MS && *w <= 1_000 * MS), "{waits:?}");
        assert!(waits.iter().any(|w| *w != waits[0]), "jitter should vary the waits");
        // Out of range is clamped: no negative waits, no longer ones.
        assert!(b.with_jitter(7.0).delay(0) <= 1_000 * MS);
        assert_eq!(b.with_jitter(-1.0).delay(0), 1_000 * MS);
    }
}

//! The re-dial schedule after failed connection attempts.
//!
//! Pure: the caller passes the number of consecutive failures and a jitter
//! sample, so the schedule is tested without clocks or sockets.

use std::time::Duration;

/// Delay before the first re-dial after a failure: long enough not to spin
/// on a refused port, short enough that a restarted peer is back quickly.
pub const BACKOFF_BASE: Duration = Duration::from_millis(50);

/// Ceiling of the delay between attempts: a peer that is down for long is
/// still retried every few seconds, so it is found soon after it returns.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Share of the delay that is randomised (equal jitter: half fixed, half
/// random), so that many callers who lost the same peer do not re-dial in
/// lockstep.
pub const BACKOFF_JITTER: f64 = 0.5;

const _: () = assert!(BACKOFF_BASE.as_millis() < BACKOFF_MAX.as_millis());

/// The delay before the next attempt after `failures` consecutive failed
/// attempts (0 = none failed yet: no delay). `jitter` is a sample in
/// `[0, 1)`; values outside are clamped.
pub fn delay(failures: u32, jitter: f64) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let exp = failures.saturating_sub(1).min(31);
    let full = BACKOFF_BASE
        .saturating_mul(1u32 << exp)
        .min(BACKOFF_MAX)
        .as_secs_f64();
    let jitter = jitter.clamp(0.0, 1.0);
    Duration::from_secs_f64(full * (1.0 - BACKOFF_JITTER) + full * BACKOFF_JITTER * jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_failure_no_delay() {
        assert_eq!(delay(0, 0.9), Duration::ZERO);
    }

    #[test]
    fn doubles_then_caps() {
        // With the jitter sample at its maximum the delay is the full step.
        assert_eq!(delay(1, 1.0), BACKOFF_BASE);
        assert_eq!(delay(2, 1.0), BACKOFF_BASE * 2);
        assert_eq!(delay(3, 1.0), BACKOFF_BASE * 4);
        assert_eq!(delay(20, 1.0), BACKOFF_MAX);
        assert_eq!(delay(u32::MAX, 1.0), BACKOFF_MAX);
    }

    #[test]
    fn jitter_stays_within_half_and_full_step() {
        for failures in 1..40 {
            let full = delay(failures, 1.0);
            let low = delay(failures, 0.0);
            assert_eq!(low, full / 2);
            for j in [0.1, 0.5, 0.99, -3.0, 7.0] {
                let d = delay(failures, j);
                assert!(d >= low && d <= full, "{failures} {j}: {d:?}");
            }
        }
    }
}

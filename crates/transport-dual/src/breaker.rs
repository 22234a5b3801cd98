//! A per-peer circuit breaker for the preferred path.
//!
//! When iroh to a peer fails at the transport level and the call falls back
//! to gRPC, paying iroh's failure again on every call (a dial timeout when
//! UDP is blocked, say) would make each call slow. The breaker opens after
//! such a failure: calls go straight to gRPC for a cool-down that doubles on
//! each consecutive failure, up to [`MAX_COOLDOWN`]. After the cool-down one
//! call at a time tries iroh again (half-open); a success closes the breaker.
//!
//! Pure state: time comes in as `now`.

use std::time::{Duration, Instant};

/// The first cool-down after a failure.
pub const BASE_COOLDOWN: Duration = Duration::from_secs(1);
/// The longest cool-down, however many failures in a row.
pub const MAX_COOLDOWN: Duration = Duration::from_secs(30);

const _: () = assert!(BASE_COOLDOWN.as_nanos() <= MAX_COOLDOWN.as_nanos());

/// Whether a call may try the guarded path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Yes: the path is healthy.
    Closed,
    /// Yes, as the single trial after a cool-down.
    Trial,
    /// No: use the other path until `until`.
    Open {
        /// When the cool-down ends.
        until: Instant,
    },
}

/// The breaker for one peer's path.
#[derive(Debug, Clone, Default)]
pub struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    trial_in_flight: bool,
}

impl Breaker {
    /// Asks whether a call may use the path now.
    pub fn admit(&mut self, now: Instant) -> Admit {
        match self.open_until {
            None => Admit::Closed,
            Some(until) if now < until => Admit::Open { until },
            Some(until) if self.trial_in_flight => Admit::Open { until },
            Some(_) => {
                self.trial_in_flight = true;
                Admit::Trial
            }
        }
    }

    /// The path carried a call successfully.
    pub fn on_success(&mut self) {
        *self = Breaker::default();
    }

    /// The path failed at the transport level.
    pub fn on_failure(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        let exp = self.failures.saturating_sub(1).min(16);
        let cooldown = BASE_COOLDOWN.saturating_mul(1 << exp).min(MAX_COOLDOWN);
        self.open_until = Some(now + cooldown);
        self.trial_in_flight = false;
    }

    /// A trial ended without a verdict (e.g. an application error, which says
    /// nothing about the path): let the next call try.
    pub fn on_neutral(&mut self) {
        self.trial_in_flight = false;
    }

    /// Whether the breaker is open (or half-open) now.
    pub fn is_open(&self) -> bool {
        self.open_until.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_backs_off_and_recovers() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        assert_eq!(b.admit(t0), Admit::Closed);
        b.on_failure(t0);
        assert!(matches!(b.admit(t0), Admit::Open { .. }));
        let t1 = t0 + BASE_COOLDOWN;
        assert_eq!(b.admit(t1), Admit::Trial);
        // Only one trial at a time.
        assert!(matches!(b.admit(t1), Admit::Open { .. }));
        b.on_failure(t1);
        // Second failure: twice the cool-down.
        assert!(matches!(b.admit(t1 + BASE_COOLDOWN), Admit::Open { .. }));
        assert_eq!(b.admit(t1 + 2 * BASE_COOLDOWN), Admit::Trial);
        b.on_success();
        assert_eq!(b.admit(t1 + 2 * BASE_COOLDOWN), Admit::Closed);
        assert!(!b.is_open());
    }

    #[test]
    fn cooldown_is_capped() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        for _ in 0..100 {
            b.on_failure(t0);
        }
        assert_eq!(b.admit(t0 + MAX_COOLDOWN), Admit::Trial);
    }

    #[test]
    fn neutral_trial_lets_the_next_call_try() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        b.on_failure(t0);
        let t1 = t0 + BASE_COOLDOWN;
        assert_eq!(b.admit(t1), Admit::Trial);
        b.on_neutral();
        assert_eq!(b.admit(t1), Admit::Trial);
    }
}

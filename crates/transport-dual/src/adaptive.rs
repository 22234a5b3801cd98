//! The adaptive Raft transport chooser: per peer, pick gRPC or iroh from
//! measured round-trip time and error rate, with hysteresis so the choice
//! does not flap.
//!
//! Pure state: every input carries its `now`, nothing sleeps or dials, so the
//! decisions are tested deterministically. The router feeds it the outcome
//! of each Raft call and of the pings it sends to idle paths.
//!
//! Rules, in order:
//! 1. A path with no sample yet is never chosen over one that has samples;
//!    the incumbent is gRPC, the transport the fleet already trusts.
//! 2. If the current path's error rate passes [`ERROR_SWITCH_RATE`] and the
//!    other's is below it, switch at once (errors are not a matter of taste).
//! 3. Otherwise switch only when the other path's score has been better by
//!    at least [`HYSTERESIS`] for [`SWITCH_DWELL`] without a break, and the
//!    last switch is at least [`MIN_HOLD`] ago.

use std::time::{Duration, Instant};

use tern_protocol::TransportKind;

/// Weight of a new RTT sample in the moving average.
pub const RTT_ALPHA: f64 = 0.2;
/// Weight of a new outcome in the moving error rate.
pub const ERROR_ALPHA: f64 = 0.1;
/// How much an error rate of 1.0 multiplies a path's score (RTT).
pub const ERROR_PENALTY: f64 = 10.0;
/// The other path must score this fraction better to be considered.
pub const HYSTERESIS: f64 = 0.2;
/// ...continuously for this long...
pub const SWITCH_DWELL: Duration = Duration::from_secs(5);
/// ...and the previous switch must be at least this old.
pub const MIN_HOLD: Duration = Duration::from_secs(15);
/// An error rate above which a path is abandoned at once for a healthier one.
pub const ERROR_SWITCH_RATE: f64 = 0.5;
/// Samples older than this no longer count as fresh; the router pings a path
/// whose last sample is older.
pub const STALE_AFTER: Duration = Duration::from_secs(2);

const _: () = assert!(HYSTERESIS > 0.0 && HYSTERESIS < 1.0);

/// Measurements of one path (one transport to one peer).
#[derive(Debug, Clone, Default)]
pub struct PathStats {
    /// Moving average round trip, once there is a sample.
    pub rtt: Option<Duration>,
    /// Moving error rate in [0, 1].
    pub error_rate: f64,
    /// When the last sample arrived.
    pub last_sample: Option<Instant>,
}

impl PathStats {
    fn record_ok(&mut self, rtt: Duration, now: Instant) {
        self.rtt = Some(match self.rtt {
            None => rtt,
            Some(avg) => avg.mul_f64(1.0 - RTT_ALPHA) + rtt.mul_f64(RTT_ALPHA),
        });
        self.error_rate *= 1.0 - ERROR_ALPHA;
        self.last_sample = Some(now);
    }

    fn record_error(&mut self, now: Instant) {
        self.error_rate = self.error_rate * (1.0 - ERROR_ALPHA) + ERROR_ALPHA;
        self.last_sample = Some(now);
    }

    /// Lower is better: RTT in seconds inflated by the error rate. `None`
    /// until a successful sample exists.
    pub fn score(&self) -> Option<f64> {
        self.rtt
            .map(|rtt| rtt.as_secs_f64().max(1e-6) * (1.0 + ERROR_PENALTY * self.error_rate))
    }

    /// Whether the path needs a probe to stay measured.
    pub fn is_stale(&self, now: Instant) -> bool {
        self.last_sample
            .is_none_or(|t| now.saturating_duration_since(t) >= STALE_AFTER)
    }
}

/// A switch the chooser made, for logs and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct Switch {
    /// From this transport...
    pub from: TransportKind,
    /// ...to this one.
    pub to: TransportKind,
    /// Why, in words.
    pub reason: String,
}

/// The chooser for one peer.
#[derive(Debug, Clone)]
pub struct Adaptive {
    current: TransportKind,
    grpc: PathStats,
    iroh: PathStats,
    better_since: Option<Instant>,
    last_switch: Option<Instant>,
}

impl Default for Adaptive {
    fn default() -> Self {
        Adaptive {
            current: TransportKind::Grpc,
            grpc: PathStats::default(),
            iroh: PathStats::default(),
            better_since: None,
            last_switch: None,
        }
    }
}

fn other(kind: TransportKind) -> TransportKind {
    match kind {
        TransportKind::Grpc => TransportKind::Iroh,
        TransportKind::Iroh => TransportKind::Grpc,
    }
}

impl Adaptive {
    /// The transport in use now.
    pub fn current(&self) -> TransportKind {
        self.current
    }

    /// The measurements of one path.
    pub fn stats(&self, kind: TransportKind) -> &PathStats {
        match kind {
            TransportKind::Grpc => &self.grpc,
            TransportKind::Iroh => &self.iroh,
        }
    }

    fn stats_mut(&mut self, kind: TransportKind) -> &mut PathStats {
        match kind {
            TransportKind::Grpc => &mut self.grpc,
            TransportKind::Iroh => &mut self.iroh,
        }
    }

    /// Records a successful round trip on `kind`.
    pub fn record_ok(
        &mut self,
        kind: TransportKind,
        rtt: Duration,
        now: Instant,
    ) -> Option<Switch> {
        self.stats_mut(kind).record_ok(rtt, now);
        self.evaluate(now)
    }

    /// Records a transport-level failure on `kind`.
    pub fn record_error(&mut self, kind: TransportKind, now: Instant) -> Option<Switch> {
        self.stats_mut(kind).record_error(now);
        self.evaluate(now)
    }

    /// Re-evaluates the choice; returns the switch if one was made.
    pub fn evaluate(&mut self, now: Instant) -> Option<Switch> {
        let cur = self.current;
        let alt = other(cur);
        let (cur_stats, alt_stats) = (self.stats(cur).clone(), self.stats(alt).clone());
        let Some(alt_score) = alt_stats.score() else {
            self.better_since = None;
            return None;
        };
        if cur_stats.error_rate > ERROR_SWITCH_RATE && alt_stats.error_rate < ERROR_SWITCH_RATE {
            return Some(self.switch(
                now,
                format!(
                    "{cur} error rate {:.0}% (over {:.0}%), {alt} {:.0}%",
                    cur_stats.error_rate * 100.0,
                    ERROR_SWITCH_RATE * 100.0,
                    alt_stats.error_rate * 100.0
                ),
            ));
        }
        let alt_better = match cur_stats.score() {
            None => true,
            Some(cur_score) => alt_score < cur_score * (1.0 - HYSTERESIS),
        };
        if !alt_better {
            self.better_since = None;
            return None;
        }
        let since = *self.better_since.get_or_insert(now);
        let dwelt = now.saturating_duration_since(since) >= SWITCH_DWELL;
        let held = self
            .last_switch
            .is_none_or(|t| now.saturating_duration_since(t) >= MIN_HOLD);
        if dwelt && held {
            let fmt = |s: &PathStats| {
                s.rtt
                    .map(|r| format!("{r:?}"))
                    .unwrap_or_else(|| "none".into())
            };
            return Some(self.switch(
                now,
                format!(
                    "{alt} rtt {} vs {cur} rtt {}, better by over {:.0}% for {SWITCH_DWELL:?}",
                    fmt(&alt_stats),
                    fmt(&cur_stats),
                    HYSTERESIS * 100.0
                ),
            ));
        }
        None
    }

    fn switch(&mut self, now: Instant, reason: String) -> Switch {
        let from = self.current;
        self.current = other(from);
        self.better_since = None;
        self.last_switch = Some(now);
        Switch {
            from,
            to: self.current,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Feeds both paths one sample every 100 ms for `secs`, returns switches.
    fn run(
        a: &mut Adaptive,
        t0: Instant,
        secs: u64,
        grpc: Duration,
        iroh: Duration,
    ) -> Vec<Switch> {
        let mut switches = Vec::new();
        for step in 0..secs * 10 {
            let now = t0 + Duration::from_millis(step * 100);
            switches.extend(a.record_ok(TransportKind::Grpc, grpc, now));
            switches.extend(a.record_ok(TransportKind::Iroh, iroh, now));
        }
        switches
    }

    #[test]
    fn starts_on_grpc_and_moves_to_a_clearly_faster_iroh_after_the_dwell() {
        let t0 = Instant::now();
        let mut a = Adaptive::default();
        assert_eq!(a.current(), TransportKind::Grpc);
        // 4 s of iroh being twice as fast: not yet (dwell is 5 s).
        assert!(run(&mut a, t0, 4, 2 * MS, MS).is_empty());
        let switches = run(&mut a, t0 + Duration::from_secs(4), 3, 2 * MS, MS);
        assert_eq!(switches.len(), 1, "{switches:?}");
        assert_eq!(a.current(), TransportKind::Iroh);
    }

    #[test]
    fn small_differences_never_switch() {
        let t0 = Instant::now();
        let mut a = Adaptive::default();
        // iroh 10% faster: inside the hysteresis band.
        assert!(
            run(
                &mut a,
                t0,
                60,
                Duration::from_micros(1000),
                Duration::from_micros(900)
            )
            .is_empty()
        );
        assert_eq!(a.current(), TransportKind::Grpc);
    }

    #[test]
    fn alternating_measurements_do_not_flap() {
        let t0 = Instant::now();
        let mut a = Adaptive::default();
        let mut switches = 0;
        // Which path is faster flips every 3 s for two minutes: shorter than
        // the dwell, so at most the first clear trend may switch.
        for period in 0..40u64 {
            let (g, i) = if period % 2 == 0 {
                (3 * MS, MS)
            } else {
                (MS, 3 * MS)
            };
            switches += run(&mut a, t0 + Duration::from_secs(period * 3), 3, g, i).len();
        }
        assert_eq!(switches, 0);
    }

    #[test]
    fn errors_switch_at_once_and_min_hold_limits_speed_switches() {
        let t0 = Instant::now();
        let mut a = Adaptive::default();
        run(&mut a, t0, 10, 2 * MS, MS);
        assert_eq!(a.current(), TransportKind::Iroh);
        // iroh starts failing: once its error rate passes the threshold, go
        // back to gRPC without waiting for dwell or hold.
        let mut now = t0 + Duration::from_secs(10);
        let mut switched = None;
        for _ in 0..20 {
            now += 100 * MS;
            if let Some(s) = a.record_error(TransportKind::Iroh, now) {
                switched = Some(s);
                break;
            }
            a.record_ok(TransportKind::Grpc, 2 * MS, now);
        }
        let s = switched.expect("switched away from a failing path");
        assert_eq!((s.from, s.to), (TransportKind::Iroh, TransportKind::Grpc));
        assert!(s.reason.contains("error rate"), "{}", s.reason);
    }

    #[test]
    fn an_unmeasured_path_is_never_chosen() {
        let t0 = Instant::now();
        let mut a = Adaptive::default();
        for step in 0..200 {
            a.record_ok(
                TransportKind::Grpc,
                50 * MS,
                t0 + Duration::from_millis(step * 100),
            );
        }
        assert_eq!(a.current(), TransportKind::Grpc);
        assert!(a.stats(TransportKind::Iroh).is_stale(t0));
        assert!(
            !a.stats(TransportKind::Grpc)
                .is_stale(t0 + Duration::from_millis(19_900))
        );
    }
}

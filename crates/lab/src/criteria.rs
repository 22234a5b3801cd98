//! The rollout's success criteria, computed from the nodes' `/metrics`.
//!
//! A stage is judged on the **difference** between two scrapes of every
//! node (its window), summed over the nodes: the counters' increase and the
//! latency histograms' bucket increases. The criteria are those of
//! `docs/operations.md`:
//!
//! - **error rate**: transport errors per call (every call every node made
//!   or served, both transports, but Raft's) must not rise above the
//!   baseline's by more than [`ERROR_RATE_SLACK`]. Raft's own transport
//!   errors are heartbeats and appends that missed their deadline on a
//!   loaded machine, sent again (over gRPC when they were on iroh: planned
//!   fallbacks); they are reported apart, and Raft's health is judged by
//!   the leader-change and unplanned-fallback criteria;
//! - **P99 latency** within 10 % of the gRPC baseline, from the
//!   `tern_transport_call_seconds` buckets with Prometheus'
//!   `histogram_quantile` interpolation;
//! - **zero unplanned rollbacks**: no unplanned router fallback to gRPC
//!   ([`names::fallback_is_unplanned`]: the iroh path failed — connect,
//!   handshake, a broken connection, a dead path as when UDP is blocked;
//!   a call that missed its deadline on a loaded machine and was sent
//!   again over gRPC is planned, counted apart and reported), and exactly
//!   the policy changes the stage made.
//!
//! Everything here is pure text-in, figures-out, so it is unit-tested
//! without nodes.

use tern_protocol::metric_names as names;

use crate::cluster::{Metrics, quantile_of};

/// One stage's figures over its window, summed over every node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    /// Calls recorded (made and served), both transports.
    pub calls: f64,
    /// Of them, over iroh.
    pub iroh_calls: f64,
    /// Transport errors among them, Raft's apart.
    pub transport_errors: f64,
    /// Raft calls (made and served), both transports.
    pub raft_calls: f64,
    /// Transport errors of Raft calls: heartbeats and appends that missed
    /// their deadline on a loaded machine (reported; Raft's health is the
    /// leader-change and fallback criteria's).
    pub raft_errors: f64,
    /// Application errors among them (answers, not failures; reported).
    pub app_errors: f64,
    /// P99 latency of every call served, seconds.
    pub p99: Option<f64>,
    /// P99 of calls served over gRPC.
    pub p99_grpc: Option<f64>,
    /// P99 of calls served over iroh.
    pub p99_iroh: Option<f64>,
    /// Unplanned router fallbacks to gRPC (the iroh path failed).
    pub fallbacks: f64,
    /// Planned ones (a missed deadline, a breaker cooling down, ...).
    pub planned_fallbacks: f64,
    /// Router reroutes (peer lacks the preferred transport).
    pub reroutes: f64,
    /// Transport policy changes applied.
    pub policy_changes: f64,
    /// Raft leader changes seen (summed over nodes).
    pub leader_changes: f64,
    /// Adaptive Raft transport switches.
    pub adaptive_switches: f64,
}

impl Figures {
    /// Transport errors per call, Raft's calls and errors apart (0 with
    /// no calls).
    pub fn error_rate(&self) -> f64 {
        let calls = self.calls - self.raft_calls;
        if calls > 0.0 {
            self.transport_errors / calls
        } else {
            0.0
        }
    }

    /// Share of calls over iroh.
    pub fn iroh_share(&self) -> f64 {
        if self.calls > 0.0 {
            self.iroh_calls / self.calls
        } else {
            0.0
        }
    }
}

/// The figures of one window: `deltas[i]` is node `i`'s increase over
/// the window (`after.since(&before)`, see [`Metrics::since`]).
pub fn window(deltas: &[Metrics]) -> Figures {
    let mut f = Figures::default();
    let server = names::Side::Server.as_str();
    let mut all: Vec<(f64, f64)> = Vec::new();
    let mut grpc: Vec<(f64, f64)> = Vec::new();
    let mut iroh: Vec<(f64, f64)> = Vec::new();
    for d in deltas {
        let s = |name: &str, labels: &[(&str, &str)]| d.sum(name, labels).max(0.0);
        f.calls += s(names::CALLS, &[]);
        f.iroh_calls += s(names::CALLS, &[("transport", "iroh")]);
        let terr = names::Outcome::TransportError.as_str();
        let raft_errors = s(names::CALLS, &[("outcome", terr), ("service", "raft")]);
        f.transport_errors += s(names::CALLS, &[("outcome", terr)]) - raft_errors;
        f.raft_errors += raft_errors;
        f.raft_calls += s(names::CALLS, &[("service", "raft")]);
        f.app_errors += s(
            names::CALLS,
            &[("outcome", names::Outcome::AppError.as_str())],
        );
        for sample in d
            .samples
            .iter()
            .filter(|x| x.name == names::ROUTER_FALLBACKS)
        {
            let n = sample.value.max(0.0);
            if names::fallback_is_unplanned(sample.label("reason").unwrap_or("")) {
                f.fallbacks += n;
            } else {
                f.planned_fallbacks += n;
            }
        }
        f.reroutes += s(names::ROUTER_REROUTES, &[]);
        f.policy_changes += s(names::ROUTER_POLICY_CHANGES, &[]);
        f.leader_changes += s(names::RAFT_LEADER_CHANGES, &[]);
        f.adaptive_switches += s(names::ROUTER_ADAPTIVE_SWITCHES, &[]);
        add(
            &mut all,
            &d.buckets(names::CALL_SECONDS, &[("side", server)]),
        );
        add(
            &mut grpc,
            &d.buckets(
                names::CALL_SECONDS,
                &[("side", server), ("transport", "grpc")],
            ),
        );
        add(
            &mut iroh,
            &d.buckets(
                names::CALL_SECONDS,
                &[("side", server), ("transport", "iroh")],
            ),
        );
    }
    f.p99 = quantile_of(&all, 0.99);
    f.p99_grpc = quantile_of(&grpc, 0.99);
    f.p99_iroh = quantile_of(&iroh, 0.99);
    f
}

/// Router fallbacks over a window by `service/method (reason)`, summed
/// over the nodes, largest first (`breaker_open`: sent over gRPC while the
/// breaker cooled down after iroh failures to that peer).
pub fn fallback_reasons(deltas: &[Metrics]) -> Vec<(String, f64)> {
    fallback_reasons_where(deltas, |_| true)
}

/// Counts by what was counted, largest first.
pub type Counts = Vec<(String, f64)>;

/// [`fallback_reasons`] split into the unplanned ones and the planned
/// ones ([`names::fallback_is_unplanned`]).
pub fn fallback_split(deltas: &[Metrics]) -> (Counts, Counts) {
    (
        fallback_reasons_where(deltas, names::fallback_is_unplanned),
        fallback_reasons_where(deltas, |r| !names::fallback_is_unplanned(r)),
    )
}

fn fallback_reasons_where(deltas: &[Metrics], keep: impl Fn(&str) -> bool) -> Vec<(String, f64)> {
    let mut by: Vec<(String, f64)> = Vec::new();
    for d in deltas {
        for s in d.samples.iter().filter(|s| {
            s.name == names::ROUTER_FALLBACKS
                && s.value > 0.0
                && keep(s.label("reason").unwrap_or(""))
        }) {
            let what = format!(
                "{}/{} ({})",
                s.label("service").unwrap_or("?"),
                s.label("method").unwrap_or("?"),
                s.label("reason").unwrap_or("?")
            );
            match by.iter_mut().find(|(w, _)| *w == what) {
                Some((_, n)) => *n += s.value,
                None => by.push((what, s.value)),
            }
        }
    }
    by.sort_by(|a, b| b.1.total_cmp(&a.1));
    by
}

/// Transport errors over a window by `transport service/method side`,
/// summed over the nodes, largest first (what the error rate is made of).
pub fn transport_errors(deltas: &[Metrics]) -> Vec<(String, f64)> {
    let err = names::Outcome::TransportError.as_str();
    let mut by: Vec<(String, f64)> = Vec::new();
    for d in deltas {
        for s in d
            .samples
            .iter()
            .filter(|s| s.name == names::CALLS && s.value > 0.0 && s.label("outcome") == Some(err))
        {
            let what = format!(
                "{} {}/{} {}",
                s.label("transport").unwrap_or("?"),
                s.label("service").unwrap_or("?"),
                s.label("method").unwrap_or("?"),
                s.label("side").unwrap_or("?")
            );
            match by.iter_mut().find(|(w, _)| *w == what) {
                Some((_, n)) => *n += s.value,
                None => by.push((what, s.value)),
            }
        }
    }
    by.sort_by(|a, b| b.1.total_cmp(&a.1));
    by
}

/// Adds cumulative buckets `more` into `total`, bound by bound.
fn add(total: &mut Vec<(f64, f64)>, more: &[(f64, f64)]) {
    for &(le, n) in more {
        match total.iter_mut().find(|(x, _)| *x == le) {
            Some((_, m)) => *m += n.max(0.0),
            None => total.push((le, n.max(0.0))),
        }
    }
    total.sort_by(|x, y| x.0.total_cmp(&y.0));
}

/// How much the transport-error rate may exceed the baseline's before a
/// stage fails (absolute, per call): 0.1 percentage points, so one stray
/// error among thousands of calls does not fail a stage but a broken path
/// does.
pub const ERROR_RATE_SLACK: f64 = 0.001;

/// The latency criterion: P99 within 10 % of the baseline.
pub const P99_ALLOWANCE: f64 = 0.10;

/// A stage's verdict on one criterion.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// The criterion.
    pub name: &'static str,
    /// Whether it held.
    pub ok: bool,
    /// Whether a miss fails the run (`false`: reported only).
    pub binding: bool,
    /// The figures behind it, in words.
    pub detail: String,
}

/// Judges a stage against the baseline.
///
/// `noise` is the relative P99 difference between two baseline windows
/// measured in the same run (nothing changed between them): on a noisy
/// machine a stage's P99 is held to `max(10 %, noise)`, and the latency
/// criterion is reported, not binding, because that noise (shared CPUs,
/// other builds) is not the transport's. `planned_changes` is the number
/// of policy changes the stage applied; `client_failures` the calls the
/// load generator saw fail.
pub fn judge(
    baseline: &Figures,
    noise: f64,
    stage: &Figures,
    planned_changes: u64,
    client_failures: u64,
) -> Vec<Check> {
    let mut checks = Vec::new();
    let (br, sr) = (baseline.error_rate(), stage.error_rate());
    checks.push(Check {
        name: "error rate",
        ok: sr <= br + ERROR_RATE_SLACK,
        binding: true,
        detail: format!(
            "{:.3}% ({} of {} calls) vs baseline {:.3}%; Raft apart: {} errors in {} calls",
            sr * 100.0,
            stage.transport_errors,
            stage.calls - stage.raft_calls,
            br * 100.0,
            stage.raft_errors,
            stage.raft_calls
        ),
    });
    checks.push(Check {
        name: "client calls",
        ok: client_failures == 0,
        binding: true,
        detail: format!("{client_failures} failed"),
    });
    let allowance = P99_ALLOWANCE.max(noise);
    let (ok, detail) = match (baseline.p99, stage.p99) {
        (Some(b), Some(s)) if b > 0.0 => (
            s <= b * (1.0 + allowance),
            format!(
                "{:.2} ms vs baseline {:.2} ms ({:+.1}%, allowed +{:.0}%)",
                s * 1e3,
                b * 1e3,
                (s / b - 1.0) * 100.0,
                allowance * 100.0
            ),
        ),
        _ => (true, "no calls measured".to_owned()),
    };
    checks.push(Check {
        name: "p99",
        ok,
        binding: false,
        detail,
    });
    checks.push(Check {
        name: "unplanned rollbacks",
        ok: stage.fallbacks == 0.0 && stage.policy_changes == planned_changes as f64,
        binding: true,
        detail: format!(
            "{} unplanned fallbacks ({} planned, not counted); {} policy changes, {} planned",
            stage.fallbacks, stage.planned_fallbacks, stage.policy_changes, planned_changes
        ),
    });
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP tern_transport_calls_total Calls.
# TYPE tern_transport_calls_total counter
tern_transport_calls_total{transport="grpc",service="status",method="Get",side="server",outcome="ok"} 90
tern_transport_calls_total{transport="iroh",service="status",method="Get",side="server",outcome="transport_error"} 10
tern_transport_calls_total{transport="grpc",service="raft",method="AppendEntries",side="client",outcome="transport_error"} 0
tern_router_fallbacks_total{service="status",method="Get",reason="a \"quoted\" reason"} 2
tern_router_fallbacks_total{service="raft",method="Append",reason="timed_out"} 5
tern_router_policy_changes_total 1
tern_transport_call_seconds_bucket{transport="grpc",side="server",le="0.001"} 50
tern_transport_call_seconds_bucket{transport="grpc",side="server",le="0.01"} 90
tern_transport_call_seconds_bucket{transport="grpc",side="server",le="+Inf"} 100
tern_transport_call_seconds_sum{transport="grpc",side="server"} 0.5
tern_transport_call_seconds_count{transport="grpc",side="server"} 100
"#;

    #[test]
    fn a_window_is_the_difference_of_two_scrapes() {
        let before = Metrics::parse(TEXT);
        let after = Metrics::parse(
            &TEXT
                .replace("outcome=\"ok\"} 90", "outcome=\"ok\"} 190")
                .replace("le=\"0.001\"} 50", "le=\"0.001\"} 150")
                .replace("le=\"0.01\"} 90", "le=\"0.01\"} 190")
                .replace("le=\"+Inf\"} 100", "le=\"+Inf\"} 200"),
        );
        let f = window(&[after.since(&before)]);
        assert!(transport_errors(&[after.since(&before)]).is_empty());
        assert_eq!(
            transport_errors(std::slice::from_ref(&before)),
            vec![("iroh status/Get server".to_owned(), 10.0)]
        );
        assert_eq!(f.calls, 100.0);
        assert_eq!(f.transport_errors, 0.0);
        assert_eq!(f.fallbacks, 0.0);
        assert_eq!(f.policy_changes, 0.0);
        // Every new call landed in the first bucket.
        assert!(f.p99.unwrap() <= 0.001, "{f:?}");
        assert!(f.p99_iroh.is_none());
        // Two nodes' windows add up.
        let f = window(&[before.clone(), before]);
        assert_eq!(f.calls, 200.0);
        assert_eq!(f.error_rate(), 0.1);
        assert_eq!(f.iroh_share(), 0.1);
        assert_eq!(f.fallbacks, 4.0);
        assert_eq!(f.planned_fallbacks, 10.0);
        assert_eq!(f.policy_changes, 2.0);
        assert_eq!(f.p99, Some(0.01));
        assert_eq!(f.p99_grpc, Some(0.01));
        let two = [Metrics::parse(TEXT), Metrics::parse(TEXT)];
        assert_eq!(
            fallback_reasons(&two),
            vec![
                ("raft/Append (timed_out)".to_owned(), 10.0),
                ("status/Get (a \"quoted\" reason)".to_owned(), 4.0)
            ]
        );
        // A reason nobody classed counts as unplanned; a missed deadline
        // is planned.
        let (unplanned, planned) = fallback_split(&two);
        assert_eq!(
            unplanned,
            vec![("status/Get (a \"quoted\" reason)".to_owned(), 4.0)]
        );
        assert_eq!(planned, vec![("raft/Append (timed_out)".to_owned(), 10.0)]);
    }

    #[test]
    fn raft_deadline_misses_are_reported_apart_from_the_error_rate() {
        let d = Metrics::parse(
            "tern_transport_calls_total{transport=\"grpc\",service=\"status\",method=\"Get\",side=\"server\",outcome=\"ok\"} 999\n\
             tern_transport_calls_total{transport=\"grpc\",service=\"status\",method=\"Get\",side=\"server\",outcome=\"transport_error\"} 1\n\
             tern_transport_calls_total{transport=\"grpc\",service=\"raft\",method=\"AppendEntries\",side=\"client\",outcome=\"ok\"} 90\n\
             tern_transport_calls_total{transport=\"grpc\",service=\"raft\",method=\"AppendEntries\",side=\"client\",outcome=\"transport_error\"} 10\n",
        );
        let f = window(&[d]);
        assert_eq!(
            (f.calls, f.raft_calls, f.raft_errors),
            (1100.0, 100.0, 10.0)
        );
        assert_eq!(f.transport_errors, 1.0);
        assert_eq!(f.error_rate(), 0.001);
    }

    #[test]
    fn stages_are_judged_against_the_baseline() {
        let base = Figures {
            calls: 10_000.0,
            p99: Some(0.010),
            ..Figures::default()
        };
        let good = Figures {
            calls: 10_000.0,
            iroh_calls: 5_000.0,
            p99: Some(0.0105),
            policy_changes: 2.0,
            ..Figures::default()
        };
        assert!(judge(&base, 0.0, &good, 2, 0).iter().all(|c| c.ok));
        let bad = Figures {
            transport_errors: 100.0,
            p99: Some(0.02),
            fallbacks: 3.0,
            ..good.clone()
        };
        let checks = judge(&base, 0.0, &bad, 2, 1);
        assert!(checks.iter().all(|c| !c.ok), "{checks:#?}");
        // The latency check widens to the measured noise and is not binding.
        let p99 = judge(&base, 1.5, &bad, 2, 0)
            .into_iter()
            .find(|c| c.name == "p99")
            .unwrap();
        assert!(p99.ok && !p99.binding);
        // A policy change nobody planned.
        let extra = Figures {
            policy_changes: 3.0,
            ..good
        };
        assert!(
            !judge(&base, 0.0, &extra, 2, 0)
                .iter()
                .find(|c| c.name == "unplanned rollbacks")
                .unwrap()
                .ok
        );
    }
}

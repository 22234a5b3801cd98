//! The rollout's driver: a task on every node that acts only while the
//! node leads. It reads the rollout from the applied state, measures the
//! stage in force on the nodes it covers, and once the stage has soaked
//! proposes what the gates say: advance, hold, or roll back.
//!
//! # The window
//!
//! When the driver first sees a stage (its decision number) as leader it
//! scrapes every covered node's `Monitoring/Metrics` (the window's start).
//! Once the stage's soak is over (counted from the replicated
//! `stage_started_unix_ms`, so a new leader does not restart it) and the
//! window has lasted at least `min(soak, MAX_WINDOW_WAIT)`, it scrapes
//! again and judges the difference ([`figures`], then
//! [`tern_state::rollout::evaluate`]). A node that does not answer either
//! scrape, or whose counters went back (it restarted), is missing: the
//! verdict is at best a hold, never an advance, and a hold starts a fresh
//! window. A leader that loses its quorum cannot commit any decision, so a
//! partition never advances a stage.
//!
//! # Fallbacks
//!
//! The `fallbacks` gate counts only **unplanned** router fallbacks
//! ([`unplanned_fallbacks`], classed by `tern_protocol::metric_names::
//! fallback_is_unplanned`): the iroh path failed. A call that missed its
//! deadline on a loaded machine and was sent again over gRPC
//! (`timed_out`), one sent while the breaker cooled down, a local limit, a
//! node shutting down or without iroh are planned. The gate's words
//! ([`fallbacks_detail`]) name each covered node that saw unplanned ones
//! with their reasons, and list the planned ones not counted, so a roll
//! back's reason in the history says which node and why.
//!
//! # Idempotent decisions
//!
//! Every proposal carries the decision number the driver judged
//! (`expected_seq`); the state refuses it if another decision came first
//! (an operator's pause, a previous leader's decision committed late). A
//! new leader starts with no window and measures afresh: nothing is lost
//! but the time of one window.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use prost::Message;
use tern_protocol::catalog::methods;
use tern_protocol::exposition::{Metrics, quantile_of};
use tern_protocol::metric_names as names;
use tern_protocol::{Call, PeerAddr, RpcClient, pb};
use tern_state::rollout::{GateFigures, RolloutOp, Verdict, evaluate};
use tern_state::{Command, NodeId, Response, RolloutStatus};

use crate::node::RaftNode;
use crate::rollout::now_unix_ms;

/// How often the driver looks at the rollout.
pub const TICK: Duration = Duration::from_secs(1);

/// The longest a window must last before a stage whose soak is over is
/// judged (a shorter soak is the window's length).
pub const MAX_WINDOW_WAIT: Duration = Duration::from_secs(60);

/// How long one `Monitoring/Metrics` call may take.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a decision may take to commit.
const DECIDE_TIMEOUT: Duration = Duration::from_secs(10);

/// The figures of a window, from each covered node's scrape at its start
/// (`before`) and end (`after`): counters' increases summed over the nodes
/// (leader changes: the most any one node saw), P99 of the calls served
/// by transport from the summed bucket increases. A node absent from
/// either, or whose call counter went back, is listed as missing.
pub fn figures(
    covered: &[NodeId],
    before: &BTreeMap<NodeId, Metrics>,
    after: &BTreeMap<NodeId, Metrics>,
) -> GateFigures {
    let mut f = GateFigures::default();
    let mut grpc: Vec<(f64, f64)> = Vec::new();
    let mut iroh: Vec<(f64, f64)> = Vec::new();
    let mut direct = 0.0;
    let mut paths = 0.0;
    let server = names::Side::Server.as_str();
    let err = names::Outcome::TransportError.as_str();
    for id in covered {
        let (Some(b), Some(a)) = (before.get(id), after.get(id)) else {
            f.missing.push(*id);
            continue;
        };
        if a.sum(names::CALLS, &[]) < b.sum(names::CALLS, &[]) {
            f.missing.push(*id);
            continue;
        }
        let d = a.since(b);
        let n = |name: &str, labels: &[(&str, &str)]| d.sum(name, labels).max(0.0) as u64;
        // Raft's calls apart: a heartbeat or append that missed its tight
        // deadline on a loaded machine is sent again by Raft (over gRPC
        // when it was on iroh: a planned fallback), not an error anyone
        // sees; Raft's health is the leader-change and fallback gates'.
        let not_raft = |t: &str, outcome: Option<&str>| {
            let mut labels = vec![("transport", t)];
            labels.extend(outcome.map(|o| ("outcome", o)));
            let all = n(names::CALLS, &labels);
            labels.push(("service", "raft"));
            all.saturating_sub(n(names::CALLS, &labels))
        };
        f.grpc_calls += not_raft("grpc", None);
        f.grpc_errors += not_raft("grpc", Some(err));
        f.iroh_calls += not_raft("iroh", None);
        f.iroh_errors += not_raft("iroh", Some(err));
        f.fallbacks += unplanned_fallbacks(&d).values().sum::<u64>();
        f.leader_changes = f.leader_changes.max(n(names::RAFT_LEADER_CHANGES, &[]));
        // Like with like: only the methods both transports served here,
        // Raft's apart (as for the error rate). At 100% iroh, iroh serves
        // Raft's appends while gRPC serves only light reads; comparing all
        // calls would judge the mix, not the transport.
        for (service, method) in methods_served_by_both(&d, server) {
            for (t, into) in [("grpc", &mut grpc), ("iroh", &mut iroh)] {
                add(
                    into,
                    &d.buckets(
                        names::CALL_SECONDS,
                        &[
                            ("side", server),
                            ("transport", t),
                            ("service", &service),
                            ("method", &method),
                        ],
                    ),
                );
            }
        }
        direct += d
            .sum(names::CONNECTION_PATHS, &[("path", "direct")])
            .max(0.0);
        paths += d.sum(names::CONNECTION_PATHS, &[]).max(0.0);
    }
    let us = |s: f64| (s * 1e6).round() as u64;
    f.grpc_p99_us = quantile_of(&grpc, 0.99).map(us);
    f.iroh_p99_us = quantile_of(&iroh, 0.99).map(us);
    // Only a node with a relay configured can settle on a relayed path;
    // with none relayed in the window the gate has nothing to judge.
    if paths > direct {
        f.paths = Some((direct as u64, paths as u64));
    }
    f
}

/// The (service, method) pairs both transports served in the window
/// `d`, Raft's apart: the P99 gate compares iroh and gRPC on these only.
pub fn methods_served_by_both(d: &Metrics, server: &str) -> Vec<(String, String)> {
    let count = format!("{}_count", names::CALL_SECONDS);
    let served = |t: &str| -> std::collections::BTreeSet<(String, String)> {
        d.samples
            .iter()
            .filter(|s| {
                s.name == count
                    && s.value > 0.0
                    && s.label("side") == Some(server)
                    && s.label("transport") == Some(t)
                    && s.label("service") != Some("raft")
            })
            .filter_map(|s| {
                Some((
                    s.label("service")?.to_owned(),
                    s.label("method")?.to_owned(),
                ))
            })
            .collect()
    };
    served("grpc")
        .intersection(&served("iroh"))
        .cloned()
        .collect()
}

/// A window's router fallbacks by `reason` (increase of
/// `tern_router_fallbacks_total`), of the unplanned reasons only
/// ([`names::fallback_is_unplanned`]: the iroh path failed, not a missed
/// deadline on a loaded machine nor a breaker cooling down).
pub fn unplanned_fallbacks(delta: &Metrics) -> BTreeMap<String, u64> {
    fallbacks_where(delta, true)
}

fn fallbacks_where(delta: &Metrics, unplanned: bool) -> BTreeMap<String, u64> {
    let mut by = BTreeMap::new();
    for s in delta
        .samples
        .iter()
        .filter(|s| s.name == names::ROUTER_FALLBACKS && s.value > 0.0)
    {
        let reason = s.label("reason").unwrap_or("unknown");
        if names::fallback_is_unplanned(reason) == unplanned {
            *by.entry(reason.to_owned()).or_insert(0) += s.value.round() as u64;
        }
    }
    by
}

/// The words of the `fallbacks` gate: which covered node saw how many
/// unplanned fallbacks and why, and the planned ones that were not
/// counted, so the history names the node and the cause of a roll back.
pub fn fallbacks_detail(
    covered: &[NodeId],
    before: &BTreeMap<NodeId, Metrics>,
    after: &BTreeMap<NodeId, Metrics>,
    max: u64,
) -> String {
    let mut unplanned = Vec::new();
    let mut total = 0;
    let mut planned: BTreeMap<String, u64> = BTreeMap::new();
    for id in covered {
        let (Some(b), Some(a)) = (before.get(id), after.get(id)) else {
            continue;
        };
        let d = a.since(b);
        let mine = unplanned_fallbacks(&d);
        let n: u64 = mine.values().sum();
        if n > 0 {
            total += n;
            let why: Vec<String> = mine.iter().map(|(r, k)| format!("{r} {k}")).collect();
            unplanned.push(format!("node {id} {n} ({})", why.join(", ")));
        }
        for (r, k) in fallbacks_where(&d, false) {
            *planned.entry(r).or_insert(0) += k;
        }
    }
    let mut out = format!("{total} unplanned (at most {max})");
    if !unplanned.is_empty() {
        out.push_str(": ");
        out.push_str(&unplanned.join("; "));
    }
    if !planned.is_empty() {
        let list: Vec<String> = planned.iter().map(|(r, k)| format!("{r} {k}")).collect();
        out.push_str(&format!("; planned, not counted: {}", list.join(", ")));
    }
    out
}

/// Adds cumulative buckets `more` into `total`, bound by bound (as the
/// lab's criteria do).
fn add(total: &mut Vec<(f64, f64)>, more: &[(f64, f64)]) {
    for &(le, n) in more {
        match total.iter_mut().find(|(x, _)| *x == le) {
            Some((_, m)) => *m += n.max(0.0),
            None => total.push((le, n.max(0.0))),
        }
    }
    total.sort_by(|x, y| x.0.total_cmp(&y.0));
}

/// One scrape of `addr`'s metrics through `Monitoring/Metrics`.
async fn scrape(client: &dyn RpcClient, addr: &PeerAddr) -> Option<Metrics> {
    let call = Call::new(
        methods::MONITORING_METRICS,
        pb::MetricsRequest {}.encode_to_vec().into(),
    )
    .with_timeout(SCRAPE_TIMEOUT);
    // Bounded here too: a call to a node that went away must not hold the
    // driver (and with it every decision) beyond the timeout.
    let bytes = tokio::time::timeout(SCRAPE_TIMEOUT, client.call(addr, call))
        .await
        .ok()?
        .ok()?;
    let resp = pb::MetricsResponse::decode(bytes).ok()?;
    Some(Metrics::parse(&resp.prometheus_text))
}

/// Scrapes every covered node. The leader's own scrape goes over gRPC
/// (its address without iroh, a reroute): iroh cannot dial its own
/// endpoint, and that refusal would be counted as an unplanned fallback
/// against the stage.
async fn scrape_all(
    client: &dyn RpcClient,
    me: NodeId,
    nodes: &[(NodeId, PeerAddr)],
) -> BTreeMap<NodeId, Metrics> {
    let mut out = BTreeMap::new();
    for (id, addr) in nodes {
        let own;
        let addr = if *id == me {
            own = PeerAddr {
                iroh: None,
                ..addr.clone()
            };
            &own
        } else {
            addr
        };
        match scrape(client, addr).await {
            Some(m) => {
                out.insert(*id, m);
            }
            None => tracing::warn!(node = id, "rollout: no metrics from a covered node"),
        }
    }
    out
}

/// A window the driver is measuring.
struct Window {
    /// The decision number of the stage it measures.
    seq: u64,
    /// When it began.
    started: Instant,
    /// Each covered node's scrape at its start.
    before: BTreeMap<NodeId, Metrics>,
}

/// What the driver needs of the rollout at one tick.
struct View {
    seq: u64,
    stage_started_unix_ms: u64,
    status: RolloutStatus,
    soaked: bool,
    soak: Duration,
    gates: tern_state::Gates,
    covered: Vec<(NodeId, PeerAddr)>,
}

fn view(raft: &RaftNode) -> Option<View> {
    let now = now_unix_ms();
    raft.state()
        .read(|s| {
            let r = s.rollout()?;
            let stage = r.stage?;
            let covered = r
                .covered()?
                .iter()
                .filter_map(|id| {
                    let addr = match s.members().get(id) {
                        Some(m) => m.addr.clone(),
                        None => s.agent(*id)?.addr.clone(),
                    };
                    Some((*id, addr))
                })
                .collect();
            Some(View {
                seq: r.seq,
                stage_started_unix_ms: r.stage_started_unix_ms,
                status: r.status,
                soaked: r.soaked(now),
                soak: Duration::from_secs(r.plan.stages[stage].soak_secs),
                gates: r.plan.gates.clone(),
                covered,
            })
        })
        .ok()
        .flatten()
}

fn is_leader(raft: &RaftNode) -> bool {
    raft.raft().metrics().borrow_watched().current_leader == Some(raft.id())
}

/// Runs the driver until `stop` resolves.
pub async fn drive(
    raft: Arc<RaftNode>,
    client: Arc<dyn RpcClient>,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut window: Option<Window> = None;
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(TICK) => {}
        }
        window = tick(&raft, client.as_ref(), window).await;
    }
}

/// One look at the rollout; answers the window to keep measuring.
async fn tick(raft: &RaftNode, client: &dyn RpcClient, window: Option<Window>) -> Option<Window> {
    if !is_leader(raft) {
        return None;
    }
    let v = view(raft)?;
    if !matches!(v.status, RolloutStatus::Running | RolloutStatus::Holding) {
        return None;
    }
    let w = match window {
        Some(w) if w.seq == v.seq => w,
        _ => {
            tracing::info!(
                seq = v.seq,
                nodes = v.covered.len(),
                "rollout: measuring the stage in force"
            );
            return Some(Window {
                seq: v.seq,
                started: Instant::now(),
                before: scrape_all(client, raft.id(), &v.covered).await,
            });
        }
    };
    if !v.soaked || w.started.elapsed() < v.soak.min(MAX_WINDOW_WAIT) {
        return Some(w);
    }
    judge(raft, client, &v, &w).await;
    // Whatever happened, the next window starts afresh.
    None
}

/// Ends window `w`: scrapes the covered nodes again, evaluates the gates
/// and proposes what they say.
async fn judge(raft: &RaftNode, client: &dyn RpcClient, v: &View, w: &Window) {
    let after = scrape_all(client, raft.id(), &v.covered).await;
    let ids: Vec<NodeId> = v.covered.iter().map(|(id, _)| *id).collect();
    let f = figures(&ids, &w.before, &after);
    let (verdict, mut checks) = evaluate(&v.gates, &f);
    if let Some(c) = checks.iter_mut().find(|c| c.gate == "fallbacks") {
        c.detail = fallbacks_detail(&ids, &w.before, &after, v.gates.max_fallbacks);
    }
    let op = match verdict {
        Verdict::Pass => RolloutOp::Advance {
            expected_seq: Some(v.seq),
            checks,
            figures: Some(f),
        },
        Verdict::Hold => RolloutOp::Hold {
            expected_seq: v.seq,
            checks,
            figures: f,
        },
        Verdict::Fail => RolloutOp::RollBack {
            expected_seq: v.seq,
            checks,
            figures: f,
        },
    };
    let name = op.name();
    let command = Command::Rollout {
        // Unique across rollouts too (decision numbers restart with each):
        // a request id seen before is answered from the dedup table, not
        // applied.
        request_id: format!(
            "rollout-{}-{}-{}-{name}",
            raft.id(),
            v.stage_started_unix_ms,
            v.seq
        ),
        op,
        last: vec![raft.id()],
        at_unix_ms: now_unix_ms(),
    };
    match tokio::time::timeout(DECIDE_TIMEOUT, raft.client_write(command)).await {
        Ok(Ok(w)) => match w.data {
            Response::Rejected(why) => {
                tracing::info!(decision = name, reason = %why, "rollout: decision refused");
            }
            _ => tracing::info!(decision = name, seq = v.seq, "rollout: decided"),
        },
        Ok(Err(e)) => {
            tracing::warn!(decision = name, error = %e, "rollout: decision not committed")
        }
        Err(_) => {
            tracing::warn!(
                decision = name,
                "rollout: decision not committed within {DECIDE_TIMEOUT:?}"
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape_text(grpc: u64, iroh: u64, iroh_errors: u64, fallbacks: u64, leader: u64) -> Metrics {
        with_missed(grpc, iroh, iroh_errors, fallbacks, leader, 0)
    }

    /// `missed`: Raft calls that missed their iroh deadline on a loaded
    /// machine and went over gRPC, and as many sent while the breaker
    /// cooled down (planned fallbacks).
    fn with_missed(
        grpc: u64,
        iroh: u64,
        iroh_errors: u64,
        fallbacks: u64,
        leader: u64,
        missed: u64,
    ) -> Metrics {
        Metrics::parse(&format!(
            "tern_transport_calls_total{{transport=\"grpc\",side=\"server\",outcome=\"ok\"}} {grpc}\n\
             tern_transport_calls_total{{transport=\"iroh\",side=\"server\",outcome=\"ok\"}} {iroh}\n\
             tern_transport_calls_total{{transport=\"iroh\",side=\"server\",outcome=\"transport_error\"}} {iroh_errors}\n\
             tern_router_fallbacks_total{{service=\"vm\",method=\"Stop\",reason=\"connection_lost\"}} {fallbacks}\n\
             tern_router_fallbacks_total{{service=\"raft\",method=\"Append\",reason=\"timed_out\"}} {missed}\n\
             tern_transport_calls_total{{transport=\"iroh\",service=\"raft\",side=\"client\",outcome=\"transport_error\"}} {missed}\n\
             tern_router_fallbacks_total{{service=\"raft\",method=\"Append\",reason=\"breaker_open\"}} {missed}\n\
             tern_raft_leader_changes_total {leader}\n\
             tern_transport_call_seconds_bucket{{transport=\"grpc\",side=\"server\",service=\"status\",method=\"Get\",le=\"0.001\"}} {grpc}\n\
             tern_transport_call_seconds_bucket{{transport=\"grpc\",side=\"server\",service=\"status\",method=\"Get\",le=\"+Inf\"}} {grpc}\n\
             tern_transport_call_seconds_count{{transport=\"grpc\",side=\"server\",service=\"status\",method=\"Get\"}} {grpc}\n\
             tern_transport_call_seconds_bucket{{transport=\"iroh\",side=\"server\",service=\"status\",method=\"Get\",le=\"0.01\"}} {iroh}\n\
             tern_transport_call_seconds_bucket{{transport=\"iroh\",side=\"server\",service=\"status\",method=\"Get\",le=\"+Inf\"}} {iroh}\n\
             tern_transport_call_seconds_count{{transport=\"iroh\",side=\"server\",service=\"status\",method=\"Get\"}} {iroh}\n\
             tern_transport_call_seconds_bucket{{transport=\"iroh\",side=\"server\",service=\"raft\",method=\"Append\",le=\"10\"}} {iroh}\n\
             tern_transport_call_seconds_bucket{{transport=\"iroh\",side=\"server\",service=\"raft\",method=\"Append\",le=\"+Inf\"}} {iroh}\n\
             tern_transport_call_seconds_count{{transport=\"iroh\",side=\"server\",service=\"raft\",method=\"Append\"}} {iroh}\n\
             tern_transport_call_seconds_bucket{{transport=\"iroh\",side=\"server\",service=\"vm\",method=\"Create\",le=\"5\"}} {iroh}\n\
             tern_transport_call_seconds_bucket{{transport=\"iroh\",side=\"server\",service=\"vm\",method=\"Create\",le=\"+Inf\"}} {iroh}\n\
             tern_transport_call_seconds_count{{transport=\"iroh\",side=\"server\",service=\"vm\",method=\"Create\"}} {iroh}\n"
        ))
    }

    #[test]
    fn a_window_is_summed_over_the_covered_nodes_and_a_missing_node_is_named() {
        let before: BTreeMap<NodeId, Metrics> = [
            (1, scrape_text(10, 10, 0, 0, 1)),
            (2, scrape_text(0, 0, 0, 0, 1)),
        ]
        .into();
        let after: BTreeMap<NodeId, Metrics> = [
            (1, scrape_text(210, 110, 5, 1, 2)),
            (2, scrape_text(100, 100, 0, 0, 1)),
        ]
        .into();
        let f = figures(&[1, 2, 3], &before, &after);
        assert_eq!((f.grpc_calls, f.iroh_calls, f.iroh_errors), (300, 205, 5));
        assert_eq!((f.fallbacks, f.leader_changes), (1, 1));
        assert_eq!(f.missing, [3]);
        // histogram_quantile: linear within the first bucket (0 to 1 ms).
        assert_eq!(f.grpc_p99_us, Some(990));
        assert!(f.iroh_p99_us.unwrap() > 1000 && f.iroh_p99_us.unwrap() <= 10_000);
        assert_eq!(f.paths, None);
        // Like with like: Raft's appends and a method only iroh served
        // (both slow here) are left out of the P99s.
        let d = after[&1].since(&before[&1]);
        assert_eq!(
            methods_served_by_both(&d, "server"),
            [("status".to_owned(), "Get".to_owned())]
        );
        // A node whose counters went back restarted: missing.
        let restarted: BTreeMap<NodeId, Metrics> = [(1, scrape_text(1, 1, 0, 0, 0))].into();
        assert_eq!(figures(&[1], &before, &restarted).missing, [1]);
    }

    #[test]
    fn missed_deadlines_are_not_unplanned_fallbacks_and_the_gate_still_passes() {
        let before: BTreeMap<NodeId, Metrics> = [
            (1, with_missed(0, 0, 0, 0, 1, 0)),
            (2, with_missed(0, 0, 0, 0, 1, 0)),
        ]
        .into();
        // A loaded machine: 40 Raft calls missed their iroh deadline and
        // 40 more went over gRPC while the breaker cooled down; no iroh
        // path failed.
        let after: BTreeMap<NodeId, Metrics> = [
            (1, with_missed(1000, 1000, 0, 0, 1, 40)),
            (2, with_missed(1000, 1000, 0, 0, 1, 0)),
        ]
        .into();
        let f = figures(&[1, 2], &before, &after);
        assert_eq!(f.fallbacks, 0);
        // The 40 missed Raft calls are not iroh errors of the stage.
        assert_eq!((f.iroh_calls, f.iroh_errors), (2000, 0));
        // (This fixture's iroh calls sit in a slower bucket than gRPC's;
        // the latency gate is not what is judged here.)
        let gates = tern_state::Gates {
            p99_allowance_pct: 1000,
            ..tern_state::Gates::default()
        };
        let (verdict, checks) = evaluate(&gates, &f);
        assert_eq!(verdict, Verdict::Pass, "{checks:?}");
        assert_eq!(
            fallbacks_detail(&[1, 2], &before, &after, 0),
            "0 unplanned (at most 0); planned, not counted: breaker_open 40, timed_out 40"
        );
        // The same window with one broken iroh connection on node 2 fails
        // the gate, and the words name the node and the reason.
        let broken: BTreeMap<NodeId, Metrics> = [
            (1, with_missed(1000, 1000, 0, 0, 1, 40)),
            (2, with_missed(1000, 1000, 0, 3, 1, 0)),
        ]
        .into();
        let f = figures(&[1, 2], &before, &broken);
        assert_eq!(f.fallbacks, 3);
        assert_eq!(evaluate(&gates, &f).0, Verdict::Fail);
        assert_eq!(
            fallbacks_detail(&[1, 2], &before, &broken, 0),
            "3 unplanned (at most 0): node 2 3 (connection_lost 3); planned, not counted: breaker_open 40, timed_out 40"
        );
    }
}

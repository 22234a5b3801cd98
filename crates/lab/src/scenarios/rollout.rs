//! `rollout`: the operators' rollout plan, replayed in minutes on an
//! 8-node cluster under steady client load, judged at every stage from the
//! nodes' `/metrics`, then the emergency rollback.
//!
//! Eight nodes run in namespaces on one switch (namespaces, not loopback:
//! they cost no CPU of their own, and each node then has its own address
//! and ports as in a fleet; the nodes' processes are the cost either way).
//! The waves follow `docs/operations.md`:
//!
//! | wave | nodes      | `[transport]` on those nodes                                   |
//! |------|------------|----------------------------------------------------------------|
//! | 0    | all (8)    | `mode = "grpc"` (baseline, measured twice)                     |
//! | 1    | 5 % → 1    | dual, `prefer_iroh = ["health", "status"]`                     |
//! | 2    | 25 % → 2   | dual, `+ "monitoring", "vm_ops"`                               |
//! | 3    | 50 % → 4   | dual, `["all_except_raft"]`, `raft_transport = "adaptive"`     |
//! | 4    | 100 % → 8  | `mode = "iroh"`                                                |
//! | back | all (8)    | `mode = "grpc"` (the emergency rollback)                       |
//!
//! Nodes outside a wave run `mode = "grpc"`. A wave is applied node by node
//! (edit `[transport]`, SIGHUP, wait until `tern transport show` reports
//! it), then the load settles and a measurement window runs.
//!
//! **Load**: a client in the client namespace calls every node, round after
//! round: Health/Check, Status/Get, Monitoring/Metrics, VM/List, and a
//! register put and get (`Cluster/MetaPut`/`MetaGet`, forwarded by a
//! follower to the leader over the node's router). Like a peer of that
//! node, it sends each call over the transport the node's current policy
//! prefers for the service, so stage 1 really moves health and status to
//! iroh. Every call is recorded; a failed one fails the stage.
//!
//! **Criteria** per window, from every node's `/metrics` (the difference of
//! two scrapes, `crate::criteria`): transport-error rate not above the
//! baseline's (+0.1 pp), zero router fallbacks and exactly the planned
//! policy changes (zero unplanned rollbacks), and P99 of the calls the
//! nodes served within 10 % of the gRPC baseline.
//!
//! **Fairness of the latency comparison**: the baseline is measured in the
//! same run, on the same nodes, under the same load, right before the
//! waves, in two windows; their P99 difference is the run's noise floor
//! (this machine has two shared cores and other builds run on it). A
//! stage's P99 is held to `max(10 %, noise)` and reported as `hold` when
//! over, but does not fail the run: on this machine the noise, not the
//! transport, dominates a 10 % margin. Errors, failed calls, fallbacks and
//! unplanned policy changes do fail it.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::Value;
use tern_protocol::catalog::methods;
use tern_protocol::{Dispatcher, Method, PeerAddr, RpcClient, pb};
use tern_transport_grpc::{ClientConfig, GrpcClient};
use tern_transport_iroh::{IrohConfig, IrohTransport};

use tern_testkit::config;
use tern_transport_dual::{RaftTransport, TransportConfig};

use crate::cluster::{self, Cluster, ClusterSpec, Metrics};
use crate::criteria::{self, Figures};
use crate::report::{Latencies, ms};
use crate::scenarios::Ctx;

/// Number of nodes.
pub const NODES: usize = 8;
/// Bound on one load call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// One policy of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Policy {
    /// `mode = "grpc"`.
    Grpc,
    /// Dual, health and status over iroh.
    HealthStatus,
    /// Dual, + monitoring and VM calls.
    PlusMonitoringVm,
    /// Dual, all but Raft over iroh, Raft adaptive.
    AllExceptRaft,
    /// `mode = "iroh"`.
    Iroh,
}

impl Policy {
    /// The `[transport]` section.
    pub fn section(self) -> TransportConfig {
        match self {
            Policy::Grpc => config::grpc(),
            Policy::HealthStatus => {
                cluster::dual_section(&["health", "status"], RaftTransport::Grpc)
            }
            Policy::PlusMonitoringVm => cluster::dual_section(
                &["health", "status", "monitoring", "vm_ops"],
                RaftTransport::Grpc,
            ),
            Policy::AllExceptRaft => {
                cluster::dual_section(&["all_except_raft"], RaftTransport::Adaptive)
            }
            Policy::Iroh => config::iroh(),
        }
    }

    /// The mode `tern transport show` reports.
    pub fn mode(self) -> &'static str {
        match self {
            Policy::Grpc => "grpc",
            Policy::Iroh => "iroh",
            _ => "dual",
        }
    }

    /// Whether a peer following this policy sends `service` over iroh.
    pub fn iroh_for(self, service: &str) -> bool {
        match self {
            Policy::Grpc => false,
            Policy::HealthStatus => matches!(service, "health" | "status"),
            Policy::PlusMonitoringVm => {
                matches!(service, "health" | "status" | "monitoring" | "vm")
            }
            Policy::AllExceptRaft => service != "raft",
            Policy::Iroh => true,
        }
    }

    fn short(self) -> &'static str {
        match self {
            Policy::Grpc => "grpc",
            Policy::HealthStatus => "dual health,status",
            Policy::PlusMonitoringVm => "dual +monitoring,vm_ops",
            Policy::AllExceptRaft => "dual all_except_raft, raft adaptive",
            Policy::Iroh => "iroh",
        }
    }
}

/// One wave: how many nodes (the first ones) run which policy.
#[derive(Debug, Clone, Copy)]
pub struct Wave {
    /// Its name in the table.
    pub name: &'static str,
    /// Share of the fleet in percent (for the table).
    pub percent: u32,
    /// The policy of the nodes in the wave.
    pub policy: Policy,
}

/// The plan after the baseline.
pub const WAVES: &[Wave] = &[
    Wave {
        name: "1: 5% dual (health, status)",
        percent: 5,
        policy: Policy::HealthStatus,
    },
    Wave {
        name: "2: 25% + monitoring, vm_ops",
        percent: 25,
        policy: Policy::PlusMonitoringVm,
    },
    Wave {
        name: "3: 50% all_except_raft, adaptive",
        percent: 50,
        policy: Policy::AllExceptRaft,
    },
    Wave {
        name: "4: 100% iroh",
        percent: 100,
        policy: Policy::Iroh,
    },
    Wave {
        name: "rollback: all grpc",
        percent: 100,
        policy: Policy::Grpc,
    },
];

/// Nodes in a wave of `percent` of `n` nodes: rounded up, at least one.
pub fn wave_size(percent: u32, n: usize) -> usize {
    ((percent as usize * n).div_ceil(100)).clamp(1, n)
}

/// The policy of every node at a wave (the first `wave_size` nodes run the
/// wave's policy, the others gRPC).
pub fn policies_at(wave: &Wave, n: usize) -> Vec<Policy> {
    let k = wave_size(wave.percent, n);
    (0..n)
        .map(|i| if i < k { wave.policy } else { Policy::Grpc })
        .collect()
}

/// One call of the load.
#[derive(Debug, Clone)]
struct Call {
    at: Instant,
    took: Duration,
    iroh: bool,
    error: Option<String>,
}

struct Load {
    stop: Arc<AtomicBool>,
    calls: Arc<Mutex<Vec<Call>>>,
    rounds: Arc<AtomicUsize>,
    handle: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Load {
    fn between(&self, from: Instant, to: Instant) -> Vec<Call> {
        self.calls
            .lock()
            .map(|c| {
                c.iter()
                    .filter(|c| c.at >= from && c.at <= to)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

async fn one<Req: prost::Message, Resp: prost::Message + Default>(
    client: &dyn RpcClient,
    peer: &PeerAddr,
    method: &'static Method,
    req: &Req,
) -> Result<(), String> {
    tern_protocol::rpc::call_typed::<Req, Resp>(client, peer, method, req, CALL_TIMEOUT)
        .await
        .map(|_| ())
        .map_err(|e| format!("{}: {e}", method.label()))
}

/// The client and address a peer following `policy` uses for `service`,
/// and whether that is iroh.
fn pick_transport<'a>(
    policy: Policy,
    service: &str,
    grpc: (&'a dyn RpcClient, &'a PeerAddr),
    iroh: (&'a dyn RpcClient, &'a PeerAddr),
) -> (&'a dyn RpcClient, &'a PeerAddr, bool) {
    if policy.iroh_for(service) {
        (iroh.0, iroh.1, true)
    } else {
        (grpc.0, grpc.1, false)
    }
}

async fn load_loop(
    peers: Vec<PeerAddr>,
    policies: Arc<Mutex<Vec<Policy>>>,
    stop: Arc<AtomicBool>,
    calls: Arc<Mutex<Vec<Call>>>,
    rounds: Arc<AtomicUsize>,
    pause: Duration,
) -> anyhow::Result<()> {
    let key = crate::keys::client_key();
    let grpc: Arc<dyn RpcClient> = Arc::new(GrpcClient::new(ClientConfig::new(key)));
    // Bound to every address of the client namespace: the default
    // (127.0.0.1) reaches no node.
    let iroh_t = IrohTransport::bind(
        IrohConfig::new(crate::keys::client_key()).with_bind_addr(std::net::SocketAddr::from((
            std::net::Ipv4Addr::UNSPECIFIED,
            0,
        ))),
        Arc::new(Dispatcher::new()),
    )
    .await
    .context("starting the load's iroh endpoint")?;
    let iroh = iroh_t.client();
    let mut round = 0u64;
    while !stop.load(Ordering::SeqCst) {
        for (i, peer) in peers.iter().enumerate() {
            let policy = policies
                .lock()
                .map(|p| p.get(i).copied().unwrap_or(Policy::Grpc))
                .unwrap_or(Policy::Grpc);
            let mut via_grpc = peer.clone();
            via_grpc.iroh = None;
            let mut via_iroh = peer.clone();
            via_iroh.grpc = None;
            let pick = |service: &str| {
                pick_transport(
                    policy,
                    service,
                    (grpc.as_ref(), &via_grpc),
                    (iroh.as_ref(), &via_iroh),
                )
            };
            let record = |at: Instant, iroh: bool, r: Result<(), String>| {
                if let Ok(mut c) = calls.lock() {
                    c.push(Call {
                        at,
                        took: at.elapsed(),
                        iroh,
                        error: r.err(),
                    });
                }
            };
            let (c, p, on) = pick("health");
            let at = Instant::now();
            let r = one::<_, pb::HealthCheckResponse>(
                c,
                p,
                methods::HEALTH_CHECK,
                &pb::HealthCheckRequest {},
            )
            .await;
            record(at, on, r);
            let (c, p, on) = pick("status");
            let at = Instant::now();
            let r =
                one::<_, pb::NodeStatus>(c, p, methods::STATUS_GET, &pb::StatusRequest {}).await;
            record(at, on, r);
            if round.is_multiple_of(4) {
                let (c, p, on) = pick("monitoring");
                let at = Instant::now();
                let r = one::<_, pb::MetricsResponse>(
                    c,
                    p,
                    methods::MONITORING_METRICS,
                    &pb::MetricsRequest {},
                )
                .await;
                record(at, on, r);
            }
            let (c, p, on) = pick("vm");
            let at = Instant::now();
            let r = one::<_, pb::ListVmsResponse>(
                c,
                p,
                methods::VM_LIST,
                &pb::ListVmsRequest { node_id: 0 },
            )
            .await;
            record(at, on, r);
            let (c, p, on) = pick("cluster");
            let key = format!("rollout/n{}", i + 1);
            let at = Instant::now();
            let r = tern_cluster::meta_put(
                c,
                p,
                &tern_node::client::request_id(),
                &key,
                &round.to_string(),
                CALL_TIMEOUT,
            )
            .await
            .map(|_| ())
            .map_err(|e| format!("cluster/metaput: {e}"));
            record(at, on, r);
            let at = Instant::now();
            let r = tern_cluster::meta_get(c, p, &key, CALL_TIMEOUT)
                .await
                .map(|_| ())
                .map_err(|e| format!("cluster/metaget: {e}"));
            record(at, on, r);
        }
        round += 1;
        rounds.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(pause).await;
    }
    iroh_t.shutdown(Duration::from_millis(200)).await;
    Ok(())
}

async fn scrape_all(c: &Cluster) -> anyhow::Result<Vec<Metrics>> {
    let mut out = Vec::new();
    for i in c.indices() {
        out.push(
            c.metrics(i)
                .await
                .with_context(|| format!("scraping n{i}"))?,
        );
    }
    Ok(out)
}

fn deltas(before: &[Metrics], after: &[Metrics]) -> Vec<Metrics> {
    after.iter().zip(before).map(|(a, b)| a.since(b)).collect()
}

/// One measured window: the nodes' figures and the load's own calls.
#[derive(Debug, Clone)]
struct Measured {
    figures: Figures,
    calls: usize,
    failures: Vec<String>,
    latency_grpc: Latencies,
    latency_iroh: Latencies,
}

async fn measure(
    c: &Cluster,
    load: &Load,
    window: Duration,
) -> anyhow::Result<(Measured, Vec<Metrics>, Vec<Metrics>)> {
    let before = scrape_all(c).await?;
    let from = Instant::now();
    tokio::time::sleep(window).await;
    let to = Instant::now();
    let after = scrape_all(c).await?;
    let figures = criteria::window(&deltas(&before, &after));
    let calls = load.between(from, to);
    let mut latency_grpc = Latencies::default();
    let mut latency_iroh = Latencies::default();
    for call in calls.iter().filter(|c| c.error.is_none()) {
        if call.iroh {
            latency_iroh.push(call.took);
        } else {
            latency_grpc.push(call.took);
        }
    }
    Ok((
        Measured {
            figures,
            calls: calls.len(),
            failures: calls.iter().filter_map(|c| c.error.clone()).collect(),
            latency_grpc,
            latency_iroh,
        },
        before,
        after,
    ))
}

fn p(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |s| format!("{:.2} ms", s * 1e3))
}

/// Applies `target` to every node whose policy differs (SIGHUP) and waits
/// until each reports it; returns the number of nodes changed.
async fn apply(
    c: &mut Cluster,
    current: &Arc<Mutex<Vec<Policy>>>,
    target: &[Policy],
    report: &crate::report::Report,
) -> anyhow::Result<u64> {
    let now: Vec<Policy> = current.lock().map(|p| p.clone()).unwrap_or_default();
    let mut changed = 0;
    for (k, policy) in target.iter().enumerate() {
        let i = k + 1;
        if now.get(k) == Some(policy) {
            continue;
        }
        c.set_transport(i, &policy.section())?;
        let mode = policy.mode();
        c.wait_policy(i, |v: &Value| v["mode"] == mode).await?;
        if let Ok(mut p) = current.lock()
            && let Some(slot) = p.get_mut(k)
        {
            *slot = *policy;
        }
        report.info(format!("n{i}: {}", policy.short()));
        changed += 1;
    }
    Ok(changed)
}

/// Runs the scenario.
pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let quick = ctx.opts.quick;
    let window = if quick {
        Duration::from_secs(8)
    } else {
        Duration::from_secs(30)
    };
    let settle = Duration::from_secs(3);
    ctx.report.step(format!(
        "start {NODES} nodes in namespaces on one switch, all mode = \"grpc\""
    ));
    let spec = ClusterSpec::new(NODES, &Policy::Grpc.section());
    let report = &mut ctx.report;
    let mut c = Cluster::start(&ctx.lab, &ctx.opts.tern, spec, &mut |m| report.info(m)).await?;
    let leader = c.leader().await?;
    ctx.report.info(format!("leader: n{leader}"));

    ctx.report.step("start the steady client load (every node, each call over the transport the node's policy prefers)");
    let peers: Vec<PeerAddr> = c
        .indices()
        .into_iter()
        .map(|i| {
            c.node(i)?
                .node_file()?
                .peer_addr()
                .map_err(|e| anyhow::anyhow!("n{i}: {e}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let current = Arc::new(Mutex::new(vec![Policy::Grpc; NODES]));
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(Mutex::new(Vec::new()));
    let rounds = Arc::new(AtomicUsize::new(0));
    let handle = {
        let (p, s, cl, r) = (current.clone(), stop.clone(), calls.clone(), rounds.clone());
        let pause = Duration::from_millis(50);
        c.client
            .spawn_task(move || load_loop(peers, p, s, cl, r, pause))?
    };
    let mut load = Load {
        stop,
        calls,
        rounds,
        handle: Some(handle),
    };
    let warm = Instant::now() + cluster::CONVERGE_BOUND;
    while load.rounds.load(Ordering::SeqCst) < 3 {
        if Instant::now() > warm || load.handle.as_ref().is_some_and(|h| h.is_finished()) {
            load.stop.store(true, Ordering::SeqCst);
            anyhow::bail!("the load made no progress");
        }
        tokio::time::sleep(cluster::POLL).await;
    }

    ctx.report.step(format!(
        "wave 0: baseline, all gRPC, two windows of {window:?}"
    ));
    let (b1, first, _) = measure(&c, &load, window).await?;
    let (b2, _, last) = measure(&c, &load, window).await?;
    let base = criteria::window(&deltas(&first, &last));
    let noise = match (b1.figures.p99, b2.figures.p99) {
        (Some(x), Some(y)) if x > 0.0 && y > 0.0 => (x.max(y) / x.min(y)) - 1.0,
        _ => 0.0,
    };
    let mut table = String::new();
    let _ = writeln!(
        table,
        "{:<36} {:>5} {:>7} {:>6} {:>9} {:>10} {:>10} {:>10} {:>5} {:>6} {:>6}  verdict",
        "stage",
        "nodes",
        "calls",
        "iroh%",
        "err%",
        "p99",
        "p99 grpc",
        "p99 iroh",
        "fallb",
        "policy",
        "leader"
    );
    let row = |table: &mut String, name: &str, nodes: usize, f: &Figures, verdict: &str| {
        let _ = writeln!(
            table,
            "{:<36} {:>5} {:>7} {:>5.1}% {:>8.3}% {:>10} {:>10} {:>10} {:>5} {:>6} {:>6}  {verdict}",
            name,
            nodes,
            f.calls,
            f.iroh_share() * 100.0,
            f.error_rate() * 100.0,
            p(f.p99),
            p(f.p99_grpc),
            p(f.p99_iroh),
            f.fallbacks,
            f.policy_changes,
            f.leader_changes
        );
    };
    row(&mut table, "0: baseline, window 1", 0, &b1.figures, "");
    row(&mut table, "0: baseline, window 2", 0, &b2.figures, "");
    row(&mut table, "0: baseline (both)", 0, &base, "baseline");
    ctx.report.figure(
        "baseline p99 (nodes' /metrics, served calls)",
        format!(
            "{} (windows {} / {}; noise floor {:.1}%)",
            p(base.p99),
            p(b1.figures.p99),
            p(b2.figures.p99),
            noise * 100.0
        ),
    );
    ctx.report.figure(
        "baseline load calls",
        format!(
            "{} ({} failed), client-side gRPC {}",
            b1.calls + b2.calls,
            b1.failures.len() + b2.failures.len(),
            b1.latency_grpc.summary()
        ),
    );
    ctx.report.check(
        "baseline: no failed load call",
        b1.failures.is_empty() && b2.failures.is_empty(),
        format!("{} failed", b1.failures.len() + b2.failures.len()),
    );

    for wave in WAVES {
        let target = policies_at(wave, NODES);
        let k = wave_size(wave.percent, NODES);
        ctx.report.step(format!(
            "wave {}: {k} of {NODES} nodes → {}",
            wave.name,
            wave.policy.short()
        ));
        // The stage's whole span (SIGHUPs, settling, window) counts for
        // policy changes, fallbacks and failed load calls; the steady
        // window alone for error rate and latency.
        let stage_start = Instant::now();
        let before_apply = scrape_all(&c).await?;
        let changed = apply(&mut c, &current, &target, &ctx.report).await?;
        ctx.report.info(format!(
            "{changed} nodes changed by SIGHUP in {}; settling {settle:?}",
            ms(stage_start.elapsed())
        ));
        tokio::time::sleep(settle).await;
        let (mut m, _, after) = measure(&c, &load, window).await?;
        let whole_deltas = deltas(&before_apply, &after);
        let whole = criteria::window(&whole_deltas);
        let reasons = criteria::fallback_reasons(&whole_deltas);
        if !reasons.is_empty() {
            let list: Vec<String> = reasons.iter().map(|(w, n)| format!("{w}: {n}")).collect();
            ctx.report.figure(
                format!("wave {}: fallbacks by method (reason)", wave.name),
                list.join(", "),
            );
        }
        let mut figures = m.figures.clone();
        figures.policy_changes = whole.policy_changes;
        figures.fallbacks = whole.fallbacks;
        m.failures = load
            .between(stage_start, Instant::now())
            .into_iter()
            .filter_map(|c| c.error)
            .collect();
        let checks = criteria::judge(&base, noise, &figures, changed, m.failures.len() as u64);
        let mut verdict = Vec::new();
        for ch in &checks {
            let label = format!("wave {}: {}", wave.name, ch.name);
            if ch.binding {
                ctx.report.check(label, ch.ok, &ch.detail);
            } else {
                ctx.report.figure(
                    label,
                    format!(
                        "{}{}",
                        ch.detail,
                        if ch.ok {
                            ""
                        } else {
                            " — HOLD (reported, not failed: see notes)"
                        }
                    ),
                );
            }
            if !ch.ok {
                verdict.push(if ch.binding {
                    format!("FAIL {}", ch.name)
                } else {
                    format!("hold {}", ch.name)
                });
            }
        }
        if !m.failures.is_empty() {
            ctx.report
                .info(format!("first failed load call: {}", m.failures[0]));
        }
        ctx.report.figure(
            format!("wave {}: load (client side)", wave.name),
            format!(
                "{} calls; gRPC {}; iroh {}",
                m.calls,
                m.latency_grpc.summary(),
                m.latency_iroh.summary()
            ),
        );
        if wave.policy == Policy::Iroh {
            ctx.report.check(
                format!("wave {}: calls really over iroh", wave.name),
                m.figures.iroh_share() > 0.9,
                format!("{:.1}% of calls", m.figures.iroh_share() * 100.0),
            );
        }
        if wave.policy == Policy::Grpc {
            ctx.report.check(
                format!("wave {}: calls back on gRPC", wave.name),
                m.figures.iroh_share() < 0.01,
                format!("{:.2}% of calls over iroh", m.figures.iroh_share() * 100.0),
            );
        }
        let shown = figures.clone();
        row(
            &mut table,
            wave.name,
            k,
            &shown,
            &if verdict.is_empty() {
                "ok".to_owned()
            } else {
                verdict.join(", ")
            },
        );
    }

    ctx.report.step("stop the load and the cluster");
    load.stop.store(true, Ordering::SeqCst);
    if let Some(h) = load.handle.take() {
        tokio::task::spawn_blocking(move || {
            h.join()
                .map_err(|_| anyhow::anyhow!("the load thread panicked"))?
        })
        .await??;
    }
    let total = load.calls.lock().map(|c| c.len()).unwrap_or(0);
    ctx.report.figure("load calls in total", total);
    println!(
        "\n== rollout stages (figures summed over the {NODES} nodes' /metrics, per window) ==\n{table}"
    );
    for line in table.lines() {
        ctx.report.note(line.to_owned());
    }
    ctx.report.note(format!(
        "p99: every call the nodes served (side=\"server\", both transports), from the tern_transport_call_seconds buckets, interpolated as histogram_quantile; baseline from two gRPC windows in this run, noise floor {:.1}%; a stage is held to max(10%, noise) and a miss is reported (HOLD), not failed, because the 2-core shared machine's noise dominates a 10% margin",
        noise * 100.0
    ));
    ctx.report.note("err%: transport_error outcomes per call in tern_transport_calls_total; fallb: tern_router_fallbacks_total; policy: changes the stage made (a change beyond them fails the stage); leader: tern_raft_leader_changes_total summed over nodes");
    let unclean = c.shutdown().await;
    if !unclean.is_empty() {
        ctx.report
            .info(format!("nodes that did not stop cleanly: {unclean:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves_of_eight_nodes_follow_the_plan() {
        let sizes: Vec<usize> = WAVES.iter().map(|w| wave_size(w.percent, 8)).collect();
        assert_eq!(sizes, vec![1, 2, 4, 8, 8]);
        let p = policies_at(&WAVES[2], 8);
        assert_eq!(&p[..4], &[Policy::AllExceptRaft; 4]);
        assert_eq!(&p[4..], &[Policy::Grpc; 4]);
        assert!(Policy::HealthStatus.iroh_for("status"));
        assert!(!Policy::HealthStatus.iroh_for("vm"));
        assert!(Policy::PlusMonitoringVm.iroh_for("monitoring"));
        assert!(!Policy::AllExceptRaft.iroh_for("raft"));
        assert!(Policy::AllExceptRaft.iroh_for("cluster"));
        assert!(Policy::Iroh.iroh_for("raft"));
        for w in WAVES {
            let s = w.policy.section();
            assert_eq!(s.mode.as_str(), w.policy.mode(), "{s:?}");
        }
    }
}

//! `loss`: 5% packet loss on every link. Guarantee: no client call fails
//! (retries only where the transports' rules allow them) and the cluster
//! keeps committing. Figures: p50/p99 of calls over iroh and over gRPC,
//! before and under loss, from the client's own timings and from the
//! nodes' `/metrics` histograms (node-to-node calls).
//!
//! Loss is made by nftables in every namespace on a switch (the nodes'
//! and the client's): `numgen random mod 100 < 5 drop` on the link, in
//! the input and the output chain, so each link loses 5% each way (this
//! kernel has no netem). A packet between two nodes crosses two links,
//! so it is lost with probability 1 - 0.95² ≈ 9.75%.
//!
//! Two clients run at once from the client namespace, one over gRPC and
//! one over iroh, each calling every node (status, health, a VM read, a
//! VM stop/start). The nodes run dual with `prefer_iroh =
//! ["all_except_raft"]`; each of the two periods (without, then with loss)
//! is measured twice, with Raft over gRPC and then, after a SIGHUP, over
//! iroh, so the nodes' Raft calls (appends, heartbeats, and the VM writes
//! a follower forwards to the leader by `Raft/Propose`) are compared on
//! both transports from the nodes' own histograms.

use std::time::Duration;

use tern_protocol::metric_names as names;

use tern_transport_dual::RaftTransport;

use crate::cluster::{self, CallRecord, Cluster, ClusterSpec, Metrics, TrafficSpec};
use crate::report::Latencies;
use crate::scenarios::Ctx;
use crate::scenarios::udp_blocked::create_vm;

/// Loss on each link, each way, in percent.
pub const LOSS_PERCENT: u8 = 5;

fn window(records: &[CallRecord], from: Duration, to: Duration) -> Vec<CallRecord> {
    records
        .iter()
        .filter(|r| r.at >= from && r.at < to)
        .cloned()
        .collect()
}

/// Node-to-node client-side call latency by transport over an interval,
/// summed over the nodes' histograms: `p50 / p99 (n)`.
fn node_latency(deltas: &[Metrics], transport: &str) -> String {
    let labels = [("transport", transport), ("side", "client")];
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for m in deltas {
        for (le, n) in m.buckets(names::CALL_SECONDS, &labels) {
            match buckets.iter_mut().find(|(l, _)| *l == le) {
                Some(b) => b.1 += n,
                None => buckets.push((le, n)),
            }
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let count = buckets.last().map_or(0.0, |b| b.1);
    match (
        cluster::quantile_of(&buckets, 0.5),
        cluster::quantile_of(&buckets, 0.99),
    ) {
        (Some(a), Some(b)) => format!(
            "p50 {:.1} ms / p99 {:.1} ms (n={count})",
            a * 1000.0,
            b * 1000.0
        ),
        _ => "no calls".to_owned(),
    }
}

/// One measured phase: loss or not, Raft over which transport.
struct Phase {
    loss: bool,
    raft: &'static str,
    grpc: (Duration, Duration),
    iroh: (Duration, Duration),
    metrics: Vec<Metrics>,
}

/// Runs the scenario.
pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let each = if ctx.opts.quick {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(20)
    };
    ctx.report.step(
        "start 3 nodes in dual mode: prefer iroh for all_except_raft, Raft over gRPC, fallback on",
    );
    let spec = ClusterSpec::new(
        3,
        &cluster::dual_section(&["all_except_raft"], RaftTransport::Grpc),
    );
    let report = &mut ctx.report;
    let mut c = Cluster::start(&ctx.lab, &ctx.opts.tern, spec, &mut |m| report.info(m)).await?;
    let leader = c.leader().await?;
    let vm = create_vm(&c, 1, leader, "loss").await?;

    ctx.report
        .step("start a gRPC and an iroh client, each calling every node");
    let mk = |transport: &str| TrafficSpec {
        transport: transport.into(),
        vm_id: Some(vm.clone()),
        pause: Duration::from_millis(10),
    };
    let grpc = c.traffic(mk("grpc"))?;
    let iroh = c.traffic(mk("iroh"))?;
    let mut namespaces = vec![(c.client.clone(), c.client_iface.clone())];
    for i in c.indices() {
        let n = c.node(i)?;
        namespaces.push((n.ns.clone(), n.iface.clone()));
    }
    let mut phases = Vec::new();
    let mut applied = (0, 0);
    let mut dropped = 0;
    for loss in [false, true] {
        if loss {
            ctx.report.step(format!(
                "{LOSS_PERCENT}% loss each way on every link (nodes and client)"
            ));
            for (ns, iface) in &namespaces {
                let (input, output) = iface.loss_rules(LOSS_PERCENT);
                ns.set_rules(&input, &output)?;
            }
            applied.0 = c.status(leader).await?["applied_index"]
                .as_u64()
                .unwrap_or(0);
        }
        for (raft, raft_transport) in [("grpc", RaftTransport::Grpc), ("iroh", RaftTransport::Iroh)]
        {
            ctx.report.step(format!(
                "{}Raft over {raft}: measure for {}s",
                if loss { "under loss, " } else { "no loss, " },
                each.as_secs()
            ));
            for i in c.indices() {
                c.set_transport(
                    i,
                    &cluster::dual_section(&["all_except_raft"], raft_transport),
                )?;
            }
            for i in c.indices() {
                c.wait_policy(i, |p| p["raft_transport"] == raft).await?;
            }
            let before = c.snapshot().await;
            let (g0, i0) = (grpc.now(), iroh.now());
            tokio::time::sleep(each).await;
            let (g1, i1) = (grpc.now(), iroh.now());
            let metrics = cluster::deltas(&c.snapshot().await, &before);
            phases.push(Phase {
                loss,
                raft,
                grpc: (g0, g1),
                iroh: (i0, i1),
                metrics,
            });
        }
        if loss {
            for (ns, _) in &namespaces {
                dropped += ns.nft_dropped();
            }
            applied.1 = c.status(leader).await?["applied_index"]
                .as_u64()
                .unwrap_or(0);
            for (ns, _) in &namespaces {
                ns.clear_rules()?;
            }
        }
    }

    ctx.report.step("stop the clients and the nodes");
    let grpc_records = grpc.finish().await?;
    let iroh_records = iroh.finish().await?;
    for loss in [false, true] {
        let label = if loss {
            format!("{LOSS_PERCENT}% loss")
        } else {
            "no loss".to_owned()
        };
        let mine: Vec<&Phase> = phases.iter().filter(|p| p.loss == loss).collect();
        for (name, records) in [("gRPC", &grpc_records), ("iroh", &iroh_records)] {
            let mut l = Latencies::default();
            for p in &mine {
                let (from, to) = if name == "gRPC" { p.grpc } else { p.iroh };
                for r in window(records, from, to)
                    .iter()
                    .filter(|r| r.error.is_none())
                {
                    l.push(r.took);
                }
            }
            ctx.report
                .figure(format!("client over {name}, {label}"), l.summary());
        }
        for p in &mine {
            ctx.report.figure(
                format!("Raft calls over {}, {label}", p.raft),
                node_latency(&p.metrics, p.raft),
            );
        }
        let fallbacks: f64 = mine
            .iter()
            .map(|p| cluster::sum_all(&p.metrics, names::ROUTER_FALLBACKS, &[]))
            .sum();
        let redials: f64 = mine
            .iter()
            .map(|p| cluster::sum_all(&p.metrics, names::CONNECT_RETRIES, &[]))
            .sum();
        ctx.report.figure(
            format!("router fallbacks / re-dials, {label}"),
            format!("{} / {}", fallbacks + 0.0, redials + 0.0),
        );
    }
    ctx.report
        .figure("packets dropped by the loss rules", dropped);
    let mut failed = cluster::failures(&grpc_records);
    failed.extend(cluster::failures(&iroh_records));
    for f in failed.iter().take(5) {
        ctx.report.info(format!(
            "failed: n{} {}: {}",
            f.node,
            f.method,
            f.error.as_deref().unwrap_or("")
        ));
    }
    let total = grpc_records.len() + iroh_records.len();
    ctx.report.check(
        "no failed client call",
        failed.is_empty(),
        format!("{} of {total}", failed.len()),
    );
    let lossy: Vec<&Phase> = phases.iter().filter(|p| p.loss).collect();
    let writes_under_loss = lossy
        .iter()
        .map(|p| {
            window(&grpc_records, p.grpc.0, p.grpc.1)
                .iter()
                .chain(window(&iroh_records, p.iroh.0, p.iroh.1).iter())
                .filter(|r| r.method.starts_with("vm/st") && r.error.is_none())
                .count()
        })
        .sum::<usize>();
    ctx.report.check(
        "the cluster kept committing under loss",
        applied.1 > applied.0 && writes_under_loss > 0,
        format!(
            "applied index {} -> {}, {writes_under_loss} VM writes acknowledged",
            applied.0, applied.1
        ),
    );
    let unclean = c.shutdown().await;
    ctx.report.stopped_cleanly(&unclean);
    Ok(())
}

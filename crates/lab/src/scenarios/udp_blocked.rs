//! `udp-blocked`: every UDP packet between the nodes is dropped while the
//! cluster runs in dual mode with fallback on. Guarantee: no client call
//! fails, the router counts its fallbacks to gRPC, and iroh carries
//! traffic again once UDP is back.
//!
//! The policy is `prefer_iroh = ["all_except_raft"]` with
//! `raft_transport = "iroh"`: every node-to-node call, Raft included,
//! prefers iroh, so blocking UDP takes away the path of *everything* and
//! the fallback has to carry Raft heartbeats and appends as well as the
//! forwarded VM writes. That is the strongest form of the guarantee (with
//! Raft on gRPC only the forwarded writes would be at stake).
//!
//! The client (in its own namespace) calls every node over gRPC: status,
//! health, a VM read and a VM stop/start through each node; a follower
//! forwards the writes to the leader through its router, over iroh while
//! UDP flows. UDP is dropped by nftables in every node's namespace, both
//! directions, on the node's link.

use std::time::{Duration, Instant};

use anyhow::Context;
use tern_protocol::metric_names as names;

use tern_transport_dual::RaftTransport;

use crate::cluster::{self, Cluster, ClusterSpec, TrafficSpec};
use crate::scenarios::Ctx;

/// Iroh client calls (node to node) summed over the cluster.
async fn iroh_calls(c: &Cluster) -> f64 {
    c.metric_sum(names::CALLS, &[("transport", "iroh"), ("side", "client")])
        .await
}

/// Creates a VM (a `sleep` process) pinned to node `on`; returns its id.
pub async fn create_vm(c: &Cluster, via: usize, on: usize, name: &str) -> anyhow::Result<String> {
    let pin = c
        .node(on)?
        .raft_id
        .context("the node's Raft id is unknown")?
        .to_string();
    let vm = c
        .cli(
            via,
            &[
                "vm",
                "create",
                name,
                "--runtime",
                "process",
                "--memory-mib",
                "64",
                "--pin-node",
                &pin,
                "--",
                "sleep",
                "3600",
            ],
        )
        .await?;
    vm["id"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("vm create printed no id: {vm}"))
}

/// Runs the scenario.
pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let (warm, blocked, resume_bound) = if ctx.opts.quick {
        (40, Duration::from_secs(10), Duration::from_secs(60))
    } else {
        (200, Duration::from_secs(60), Duration::from_secs(90))
    };
    ctx.report.step(
        "start 3 nodes in dual mode: prefer iroh for all_except_raft, Raft over iroh, fallback on",
    );
    let spec = ClusterSpec::new(
        3,
        &cluster::dual_section(&["all_except_raft"], RaftTransport::Iroh),
    );
    let report = &mut ctx.report;
    let mut c = Cluster::start(&ctx.lab, &ctx.opts.tern, spec, &mut |m| report.info(m)).await?;
    let leader = c.leader().await?;
    ctx.report.info(format!("leader n{leader}"));

    ctx.report
        .step("create a VM on the leader; start client traffic (gRPC to every node)");
    let vm = create_vm(&c, 1, leader, "udp-blocked").await?;
    let traffic = c.traffic(TrafficSpec {
        transport: "grpc".into(),
        vm_id: Some(vm),
        pause: Duration::from_millis(20),
    })?;
    traffic.wait_calls(warm).await?;
    let iroh_before = iroh_calls(&c).await;
    ctx.report.check(
        "node-to-node calls go over iroh before the block",
        iroh_before > 0.0,
        format!("{iroh_before} iroh client calls"),
    );
    let before = c.snapshot().await;

    ctx.report.step(format!(
        "drop all UDP on every node's link for {}s",
        blocked.as_secs()
    ));
    let calls_at_block = traffic.count();
    let block_from = traffic.now();
    for i in c.indices() {
        let n = c.node(i)?;
        let (input, output) = n.iface.udp_block_rules();
        n.ns.set_rules(&input, &output)?;
    }
    tokio::time::sleep(blocked).await;
    let mut dropped = 0;
    for i in c.indices() {
        dropped += c.node(i)?.ns.nft_dropped();
    }
    let block_to = traffic.now();
    let calls_blocked = traffic.count() - calls_at_block;
    let iroh_during_end = iroh_calls(&c).await;
    let during = cluster::deltas(&c.snapshot().await, &before);
    let fallbacks = cluster::sum_all(&during, names::ROUTER_FALLBACKS, &[]);
    ctx.report.figure("UDP packets dropped", dropped);
    ctx.report
        .figure("client calls while UDP was blocked", calls_blocked);
    ctx.report.figure(
        "fallbacks during the block, by service",
        cluster::by_label(&during, names::ROUTER_FALLBACKS, "service"),
    );
    ctx.report.figure(
        "fallbacks during the block, by reason",
        cluster::by_label(&during, names::ROUTER_FALLBACKS, "reason"),
    );
    ctx.report.figure(
        "node-to-node calls during the block, by transport",
        cluster::by_label(&during, names::ROUTER_CALLS, "transport"),
    );
    ctx.report.check(
        "fallbacks to gRPC were counted",
        fallbacks > 0.0,
        format!("{fallbacks} during the block"),
    );
    ctx.report.check(
        "client traffic went on while UDP was blocked",
        calls_blocked > 0,
        format!(
            "{calls_blocked} calls in {:.1}s",
            (block_to - block_from).as_secs_f64()
        ),
    );

    ctx.report
        .step("let UDP through again; wait for iroh to carry calls again");
    for i in c.indices() {
        c.node(i)?.ns.clear_rules()?;
    }
    let unblocked = Instant::now();
    let mut resumed = None;
    while unblocked.elapsed() < resume_bound {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = iroh_calls(&c).await;
        if now > iroh_during_end + 10.0 {
            resumed = Some((unblocked.elapsed(), now - iroh_during_end));
            break;
        }
    }
    match resumed {
        Some((after, n)) => {
            ctx.report.figure(
                "iroh back after unblocking",
                format!("{:.1}s ({n} iroh calls since)", after.as_secs_f64()),
            );
            ctx.report
                .check("iroh traffic resumed after unblocking", true, "yes");
        }
        None => {
            ctx.report.check(
                "iroh traffic resumed after unblocking",
                false,
                format!("no new iroh calls within {resume_bound:?}"),
            );
        }
    }
    traffic.wait_calls(warm / 2).await?;

    ctx.report.step("stop the traffic and the nodes");
    let records = traffic.finish().await?;
    let failed = cluster::failures(&records);
    for f in failed.iter().take(5) {
        ctx.report.info(format!(
            "failed: n{} {} at {:.1}s: {}",
            f.node,
            f.method,
            f.at.as_secs_f64(),
            f.error.as_deref().unwrap_or("")
        ));
    }
    let leader_changes = cluster::sum_all(
        &cluster::deltas(&c.snapshot().await, &before),
        names::RAFT_LEADER_CHANGES,
        &[],
    );
    ctx.report.figure("client calls", records.len());
    ctx.report.figure(
        "client latency before/after the block",
        cluster::latencies(&records, |r| r.at < block_from || r.at >= block_to).summary(),
    );
    ctx.report.figure(
        "client latency while UDP was blocked",
        cluster::latencies(&records, |r| r.at >= block_from && r.at < block_to).summary(),
    );
    ctx.report.figure(
        "client VM writes latency while UDP was blocked",
        cluster::latencies(&records, |r| {
            r.method.starts_with("vm/st") && r.at >= block_from && r.at < block_to
        })
        .summary(),
    );
    ctx.report
        .figure("leader changes seen (sum over nodes)", leader_changes);
    ctx.report.check(
        "zero failed client calls",
        failed.is_empty(),
        format!("{} of {}", failed.len(), records.len()),
    );
    let unclean = c.shutdown().await;
    ctx.report.stopped_cleanly(&unclean);
    Ok(())
}
